//! Page contents a target receives before it knows where they go: the
//! pre-copy rounds arrive while the process still runs on the source, so
//! they are kept by virtual address (a later copy of a page replaces an
//! earlier one) until the image is restored and names the frames.
//!
//! The store is bounded by the target's guest RAM: a process cannot need
//! more pages than the node has, so a peer sending more is refused.

use std::collections::HashMap;

use pmivmm_proto::image::PAGE_SIZE;

const PS: usize = PAGE_SIZE as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the process needs more than the {limit_mib} MiB of memory this node has")]
    Full { limit_mib: u64 },
    #[error("page {0:#x} of the process was never sent")]
    Missing(u64),
}

/// Received page contents by virtual address.
pub struct PageStore {
    index: HashMap<u64, usize>,
    data: Vec<u8>,
    limit_pages: usize,
}

impl PageStore {
    /// A store for at most `limit_pages` distinct pages.
    pub fn new(limit_pages: usize) -> Self {
        PageStore { index: HashMap::new(), data: Vec::new(), limit_pages }
    }

    /// Distinct pages held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Keeps the pages of a checked `Pages` message (`data` holds
    /// `vaddrs.len()` pages), replacing earlier copies.
    pub fn insert(&mut self, vaddrs: &[u64], data: &[u8]) -> Result<(), StoreError> {
        for (vaddr, page) in vaddrs.iter().zip(data.chunks_exact(PS)) {
            let slot = match self.index.get(vaddr) {
                Some(&slot) => slot,
                None => {
                    if self.index.len() >= self.limit_pages {
                        return Err(StoreError::Full { limit_mib: (self.limit_pages * PS >> 20) as u64 });
                    }
                    let slot = self.index.len();
                    self.index.insert(*vaddr, slot);
                    self.data.resize((slot + 1) * PS, 0);
                    slot
                }
            };
            self.data[slot * PS..(slot + 1) * PS].copy_from_slice(page);
        }
        Ok(())
    }

    /// The contents of page `vaddr`.
    pub fn page(&self, vaddr: u64) -> Result<&[u8], StoreError> {
        let slot = *self.index.get(&vaddr).ok_or(StoreError::Missing(vaddr))?;
        Ok(&self.data[slot * PS..(slot + 1) * PS])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PS]
    }

    #[test]
    fn later_copies_replace_earlier_ones() {
        let mut s = PageStore::new(4);
        s.insert(&[0x1000, 0x2000], &[page(1), page(2)].concat()).unwrap();
        s.insert(&[0x1000], &page(3)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.page(0x2000).unwrap(), page(2));
        assert_eq!(s.page(0x1000).unwrap(), page(3));
    }

    #[test]
    fn missing_pages_and_overflow_are_errors() {
        let mut s = PageStore::new(1);
        s.insert(&[0x1000], &page(1)).unwrap();
        assert_eq!(s.insert(&[0x2000], &page(2)), Err(StoreError::Full { limit_mib: 0 }));
        // Replacing a held page is always possible.
        s.insert(&[0x1000], &page(5)).unwrap();
        assert_eq!(s.page(0x3000), Err(StoreError::Missing(0x3000)));
    }
}
