//! Page contents a target receives before it knows where they go: the
//! pre-copy rounds arrive while the process still runs on the source, so
//! they are kept by virtual address (a later copy of a page replaces an
//! earlier one) until the image is restored and names the frames.
//!
//! Each received batch is kept as it arrived, in the buffer the link read
//! it into: nothing is copied until the pages are written into their
//! frames. A page replaced by a later copy stays in its batch until no page
//! of that batch is current (the batch is freed then) or the store compacts.
//!
//! The store is bounded by the target's guest RAM: a process cannot need
//! more pages than the node has, so a peer sending more is refused. Before
//! the pages it holds (current or replaced) would exceed that, it compacts
//! its current pages into one buffer, so it never holds more than the limit
//! and the batch being added.

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

/// Pages received together, in one buffer.
struct Batch {
    data: Vec<u8>,
    /// How many of its pages are current.
    current: usize,
}

/// Received page contents by virtual address.
pub struct PageStore {
    batches: Vec<Batch>,
    /// Where the current copy of each page is: (batch, page in the batch).
    index: HashMap<u64, (usize, usize)>,
    /// Pages in the buffers of `batches`, current or replaced.
    held: usize,
    limit_pages: usize,
}

impl PageStore {
    /// A store for at most `limit_pages` distinct pages.
    pub fn new(limit_pages: usize) -> Self {
        PageStore { batches: Vec::new(), index: HashMap::new(), held: 0, limit_pages }
    }

    /// Distinct pages held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Keeps the pages of a checked `Pages` message (`data` holds
    /// `vaddrs.len()` pages), replacing earlier copies. Refused, changing
    /// nothing, if the store would hold more than its limit of distinct
    /// pages (a page named twice in `vaddrs` counts twice).
    pub fn insert(&mut self, vaddrs: &[u64], data: Vec<u8>) -> Result<(), StoreError> {
        let new = vaddrs.iter().filter(|v| !self.index.contains_key(v)).count();
        if self.index.len() + new > self.limit_pages {
            return Err(StoreError::Full { limit_mib: (self.limit_pages * PS >> 20) as u64 });
        }
        if self.held + vaddrs.len() > self.limit_pages {
            self.compact();
        }
        let batch = self.batches.len();
        self.batches.push(Batch { data, current: 0 });
        self.held += vaddrs.len();
        for (slot, vaddr) in vaddrs.iter().enumerate() {
            self.batches[batch].current += 1;
            if let Some((old, _)) = self.index.insert(*vaddr, (batch, slot)) {
                self.replaced(old);
            }
        }
        Ok(())
    }

    /// A page of batch `b` was replaced; the batch goes with its last
    /// current page.
    fn replaced(&mut self, b: usize) {
        let batch = &mut self.batches[b];
        batch.current -= 1;
        if batch.current == 0 {
            self.held -= batch.data.len() / PS;
            batch.data = Vec::new();
        }
    }

    /// Copies the current pages into one batch and drops the others.
    fn compact(&mut self) {
        let mut data = Vec::with_capacity(self.index.len() * PS);
        for (slot, (b, i)) in self.index.values_mut().enumerate() {
            data.extend_from_slice(&self.batches[*b].data[*i * PS..(*i + 1) * PS]);
            (*b, *i) = (0, slot);
        }
        self.held = self.index.len();
        self.batches = vec![Batch { data, current: self.held }];
    }

    /// The contents of page `vaddr`.
    #[cfg(test)]
    fn page(&self, vaddr: u64) -> Result<&[u8], StoreError> {
        Ok(self.page_at(self.locate(vaddr)?))
    }

    fn locate(&self, vaddr: u64) -> Result<(usize, usize), StoreError> {
        self.index.get(&vaddr).copied().ok_or(StoreError::Missing(vaddr))
    }

    fn page_at(&self, (b, i): (usize, usize)) -> &[u8] {
        &self.batches[b].data[i * PS..(i + 1) * PS]
    }

    /// Each of `pages` (all of which must be held) with its contents, in
    /// the order the contents lie in the store: copying them out in this
    /// order reads the store from start to end, several times faster than
    /// scattered 4 KiB reads.
    pub fn in_store_order<'p, P>(
        &self,
        pages: &'p [P],
        vaddr: impl Fn(&P) -> u64,
    ) -> Result<Vec<(&'p P, &[u8])>, StoreError> {
        let mut placed = pages.iter().map(|p| Ok((self.locate(vaddr(p))?, p))).collect::<Result<Vec<_>, _>>()?;
        placed.sort_unstable_by_key(|(place, _)| *place);
        Ok(placed.into_iter().map(|(place, p)| (p, self.page_at(place))).collect())
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
        s.insert(&[0x1000, 0x2000], [page(1), page(2)].concat()).unwrap();
        s.insert(&[0x1000], page(3)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.page(0x2000).unwrap(), page(2));
        assert_eq!(s.page(0x1000).unwrap(), page(3));
    }

    #[test]
    fn missing_pages_and_overflow_are_errors() {
        let mut s = PageStore::new(1);
        s.insert(&[0x1000], page(1)).unwrap();
        assert_eq!(s.insert(&[0x2000], page(2)), Err(StoreError::Full { limit_mib: 0 }));
        // Replacing a held page is always possible.
        s.insert(&[0x1000], page(5)).unwrap();
        assert_eq!(s.page(0x1000).unwrap(), page(5));
        assert_eq!(s.page(0x3000), Err(StoreError::Missing(0x3000)));
    }

    #[test]
    fn pages_in_store_order() {
        let mut s = PageStore::new(8);
        s.insert(&[0x3000, 0x1000], [page(3), page(1)].concat()).unwrap();
        s.insert(&[0x2000], page(2)).unwrap();
        let wanted = [0x1000u64, 0x2000, 0x3000];
        let (p1, p2, p3) = (page(1), page(2), page(3));
        let expected: Vec<(&u64, &[u8])> = vec![(&0x3000, &p3), (&0x1000, &p1), (&0x2000, &p2)];
        assert_eq!(s.in_store_order(&wanted, |v| *v).unwrap(), expected);
        assert_eq!(s.in_store_order(&[0x4000u64], |v| *v), Err(StoreError::Missing(0x4000)));
    }

    #[test]
    fn replaced_batches_are_freed_and_held_pages_stay_bounded() {
        let mut s = PageStore::new(5);
        s.insert(&[0x1000, 0x2000], [page(1), page(2)].concat()).unwrap();
        s.insert(&[0x3000], page(3)).unwrap();
        assert_eq!(s.held, 3);
        // Both pages of the first batch replaced: it is freed.
        s.insert(&[0x2000, 0x1000], [page(4), page(5)].concat()).unwrap();
        assert_eq!((s.held, s.batches[0].data.len()), (3, 0));
        // A page named twice in one batch: the later copy wins.
        s.insert(&[0x4000, 0x4000], [page(6), page(7)].concat()).unwrap();
        assert_eq!((s.held, s.len()), (5, 4));
        // Over the limit of held pages: compacted, then added.
        for round in 0..10u8 {
            s.insert(&[0x3000, 0x1000], [page(10 + round), page(20 + round)].concat()).unwrap();
            assert!(s.held <= 5 + 2, "round {round}: {} pages held", s.held);
        }
        assert_eq!(s.len(), 4);
        for (vaddr, fill) in [(0x1000, 29), (0x2000, 4), (0x3000, 19), (0x4000, 7)] {
            assert_eq!(s.page(vaddr).unwrap(), page(fill), "page {vaddr:#x}");
        }
    }
}
