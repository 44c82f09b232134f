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
//!
//! All the stores of a node together are bounded by guest RAM too (and one
//! batch, the room a single store needs to replace pages): the pages
//! a store holds (current or replaced) are taken from the node's
//! [`PageBudget`] as they arrive and given back as they are freed. A store
//! that finds the budget spent compacts; if that is not enough, the batch is
//! refused ([`StoreError::Busy`]) and the migration with it: the process runs
//! on at its source.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pmivmm_proto::image::PAGE_SIZE;

const PS: usize = PAGE_SIZE as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the process needs more than the {limit_mib} MiB of memory this node has")]
    Full { limit_mib: u64 },
    #[error("page {0:#x} of the process was never sent")]
    Missing(u64),
    #[error("other incoming migrations hold the {budget_mib} MiB this node keeps for them; try again later")]
    Busy { budget_mib: u64 },
}

/// The pages all the stores of a node may hold together.
pub struct PageBudget {
    total: usize,
    free: Mutex<usize>,
}

impl PageBudget {
    pub fn new(pages: usize) -> Arc<Self> {
        Arc::new(PageBudget { total: pages, free: Mutex::new(pages) })
    }

    /// Takes `pages` from the budget if it has them.
    fn take(&self, pages: usize) -> bool {
        let mut free = crate::devices::lock(&self.free);
        let enough = *free >= pages;
        if enough {
            *free -= pages;
        }
        enough
    }

    fn give(&self, pages: usize) {
        *crate::devices::lock(&self.free) += pages;
    }

    /// Refused ([`StoreError::Busy`]) unless a full batch of `pages` fits
    /// now (or the whole budget is free): checked when an offer arrives.
    pub fn check_room(&self, pages: usize) -> Result<(), StoreError> {
        let free = *crate::devices::lock(&self.free);
        match free >= pages.min(self.total) {
            true => Ok(()),
            false => Err(self.busy()),
        }
    }

    fn busy(&self) -> StoreError {
        StoreError::Busy { budget_mib: ((self.total * PS) >> 20) as u64 }
    }
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
    index: HashMap<u64, (usize, usize), foldhash::fast::RandomState>,
    /// Pages in the buffers of `batches`, current or replaced: taken from
    /// `budget`.
    held: usize,
    limit_pages: usize,
    budget: Arc<PageBudget>,
}

impl Drop for PageStore {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

impl PageStore {
    /// A store for at most `limit_pages` distinct pages, its buffers taken
    /// from `budget`.
    pub fn new(limit_pages: usize, budget: Arc<PageBudget>) -> Self {
        PageStore { batches: Vec::new(), index: HashMap::default(), held: 0, limit_pages, budget }
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
    /// nothing but the layout, if the store would hold more than its limit
    /// of distinct pages (a page named twice in `vaddrs` counts twice) or the
    /// budget cannot hold the batch even after a compaction.
    pub fn insert(&mut self, vaddrs: &[u64], data: Vec<u8>) -> Result<(), StoreError> {
        let new = vaddrs.iter().filter(|v| !self.index.contains_key(v)).count();
        if self.index.len() + new > self.limit_pages {
            return Err(StoreError::Full { limit_mib: ((self.limit_pages * PS) >> 20) as u64 });
        }
        if self.held + vaddrs.len() > self.limit_pages {
            self.compact();
        }
        if !self.budget.take(vaddrs.len()) {
            self.compact();
            if !self.budget.take(vaddrs.len()) {
                return Err(self.budget.busy());
            }
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
            let freed = batch.data.len() / PS;
            self.held -= freed;
            self.budget.give(freed);
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
        self.budget.give(self.held - self.index.len());
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
    use crate::migration::protocol::PAGES_PER_BATCH;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PS]
    }

    impl PageStore {
        /// A store with a budget of its own, as large as a node's.
        fn alone(limit_pages: usize) -> Self {
            PageStore::new(limit_pages, PageBudget::new(limit_pages + PAGES_PER_BATCH))
        }
    }

    fn free(budget: &PageBudget) -> usize {
        *crate::devices::lock(&budget.free)
    }

    #[test]
    fn later_copies_replace_earlier_ones() {
        let mut s = PageStore::alone(4);
        s.insert(&[0x1000, 0x2000], [page(1), page(2)].concat()).unwrap();
        s.insert(&[0x1000], page(3)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.page(0x2000).unwrap(), page(2));
        assert_eq!(s.page(0x1000).unwrap(), page(3));
    }

    #[test]
    fn missing_pages_and_overflow_are_errors() {
        let mut s = PageStore::alone(1);
        s.insert(&[0x1000], page(1)).unwrap();
        assert_eq!(s.insert(&[0x2000], page(2)), Err(StoreError::Full { limit_mib: 0 }));
        // Replacing a held page is always possible.
        s.insert(&[0x1000], page(5)).unwrap();
        assert_eq!(s.page(0x1000).unwrap(), page(5));
        assert_eq!(s.page(0x3000), Err(StoreError::Missing(0x3000)));
    }

    #[test]
    fn pages_in_store_order() {
        let mut s = PageStore::alone(8);
        s.insert(&[0x3000, 0x1000], [page(3), page(1)].concat()).unwrap();
        s.insert(&[0x2000], page(2)).unwrap();
        let wanted = [0x1000u64, 0x2000, 0x3000];
        let (p1, p2, p3) = (page(1), page(2), page(3));
        let expected: Vec<(&u64, &[u8])> = vec![(&0x3000, &p3), (&0x1000, &p1), (&0x2000, &p2)];
        assert_eq!(s.in_store_order(&wanted, |v| *v).unwrap(), expected);
        assert_eq!(s.in_store_order(&[0x4000u64], |v| *v), Err(StoreError::Missing(0x4000)));
    }

    #[test]
    fn the_stores_of_a_node_share_one_budget() {
        let budget = PageBudget::new(6);
        let mut first = PageStore::new(6, budget.clone());
        let mut second = PageStore::new(6, budget.clone());
        first.insert(&[0x1000, 0x2000, 0x3000, 0x4000], vec![0; 4 * PS]).unwrap();
        assert_eq!(free(&budget), 2);
        assert_eq!(budget.check_room(3), Err(StoreError::Busy { budget_mib: 0 }));
        second.insert(&[0x1000, 0x2000], vec![0; 2 * PS]).unwrap();
        // Each store alone is under its limit, not the two together.
        assert_eq!(second.insert(&[0x3000], page(3)), Err(StoreError::Busy { budget_mib: 0 }));
        assert_eq!(second.len(), 2);
        // Replacing a page needs room too, until other stores give theirs back.
        assert_eq!(second.insert(&[0x2000], page(4)), Err(StoreError::Busy { budget_mib: 0 }));
        drop(first);
        assert_eq!(free(&budget), 4);
        second.insert(&[0x2000], page(4)).unwrap();
        assert_eq!(free(&budget), 3);
        // A batch whose pages are all replaced gives its room back ...
        second.insert(&[0x1000, 0x3000, 0x4000], vec![5; 3 * PS]).unwrap();
        assert_eq!((second.held, free(&budget)), (4, 2));
        second.insert(&[0x1000, 0x3000], vec![6; 2 * PS]).unwrap();
        assert_eq!((second.held, free(&budget)), (6, 0));
        // ... and a compaction the room of the copies replaced.
        second.insert(&[0x4000], page(7)).unwrap();
        assert_eq!((second.held, free(&budget)), (5, 1));
        for (vaddr, fill) in [(0x1000, 6), (0x2000, 4), (0x3000, 6), (0x4000, 7)] {
            assert_eq!(second.page(vaddr).unwrap(), page(fill), "page {vaddr:#x}");
        }
        drop(second);
        assert_eq!(free(&budget), 6);
        budget.check_room(PAGES_PER_BATCH).unwrap();
    }

    #[test]
    fn replaced_batches_are_freed_and_held_pages_stay_bounded() {
        let mut s = PageStore::alone(5);
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
