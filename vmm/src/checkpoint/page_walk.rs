//! The VMM's walk of a guest process's page tables ([`PageWalk`]): the
//! frames of private anonymous memory found by native code instead of the
//! guest kernel's pagemap (whose per-page work is emulated, and slow, on
//! hosts where guest kernel code is emulated).
//!
//! Everything the walk reads is guest data and untrusted: the agent's
//! ranges are checked (sorted, page-aligned, user addresses), every table
//! frame is checked against guest RAM before it is read, the number of
//! tables read and of pages found is bounded (a hostile guest can make
//! tables point at themselves), and the page frames found go through the
//! same checks as listed ones ([`super::frames::check_frames`]) before any
//! access.
//!
//! x86-64 entries, as the guest kernel writes them (arch/x86 pgtable_types.h):
//! a present leaf maps a frame; an entry with `_PAGE_PROTNONE` (the global
//! bit) but not present is a PROT_NONE page whose frame bits are inverted
//! (the L1TF mitigation inverts the frame of every non-present entry); any
//! other non-zero non-present entry is a swap or migration entry, which a
//! node never has for a stopped process.

use pmivmm_proto::image::{PageKind, PageRef, PageWalk, Select, WalkMode, WalkRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::guest_ram::frame_addr;

const ENTRIES: usize = 512;
const PRESENT: u64 = 1 << 0;
/// Large page (2 MiB in a PMD, 1 GiB in a PUD).
const PSE: u64 = 1 << 7;
/// `_PAGE_PROTNONE`: the global bit, in a non-present entry.
const PROTNONE: u64 = 1 << 8;
/// `_PAGE_SOFT_DIRTY` (software bit 3).
const SOFT_DIRTY: u64 = 1 << 11;
/// Physical address bits 12-51.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// At most this many ranges (the kernel's default VMA limit is 65530).
pub const MAX_RANGES: usize = 65536;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalkError {
    #[error("the guest asked for a page-table walk with {0} levels (4 or 5 exist)")]
    Levels(u8),
    #[error("the guest asked for a walk of {0} ranges (at most {MAX_RANGES})")]
    TooManyRanges(usize),
    #[error("the guest's walk range {start:#x}-{end:#x} is not a sorted, page-aligned range of user addresses")]
    BadRange { start: u64, end: u64 },
    #[error("the guest's page table for {vaddr:#x} at {table:#x} is not a page of guest RAM")]
    TableNotRam { table: u64, vaddr: u64 },
    #[error("page {vaddr:#x} has page-table entry {entry:#x} at level {level}: swapped out, migrating or corrupt (nodes have no swap)")]
    BadEntry { vaddr: u64, entry: u64, level: u32 },
    #[error("page {vaddr:#x} is not present, but the restore needs its frame")]
    Missing { vaddr: u64 },
    #[error("the guest named more than {0} pages or page tables (twice the frames of guest RAM)")]
    TooLarge(u64),
}

/// One page-table page of guest-physical memory, read whole.
pub trait TableReader {
    /// The 512 entries of the table at `phys`; `None` if that is not a page
    /// of guest RAM.
    fn table(&self, phys: u64) -> Option<[u64; ENTRIES]>;
}

impl TableReader for GuestMemoryMmap {
    fn table(&self, phys: u64) -> Option<[u64; ENTRIES]> {
        if !phys.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let addr = frame_addr(self, phys / PAGE_SIZE)?;
        let mut bytes = [0u8; PAGE_SIZE as usize];
        self.read_slice(&mut bytes, addr).ok()?;
        let mut entries = [0u64; ENTRIES];
        for (e, b) in entries.iter_mut().zip(bytes.chunks_exact(8)) {
            *e = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
        Some(entries)
    }
}

/// Walks `walk` and appends the pages it finds to `out`, in address order
/// (all [`PageKind::Data`]). At most `limit` pages are found and `limit`
/// tables read.
pub fn walk(tables: &impl TableReader, walk: &PageWalk, limit: u64, out: &mut Vec<PageRef>) -> Result<(), WalkError> {
    let levels = u32::from(walk.levels);
    if !(4..=5).contains(&levels) {
        return Err(WalkError::Levels(walk.levels));
    }
    if walk.ranges.len() > MAX_RANGES {
        return Err(WalkError::TooManyRanges(walk.ranges.len()));
    }
    // User addresses: the lower half of the canonical address space.
    let user_end = 1u64 << (12 + 9 * levels - 1);
    let mut previous_end = 0;
    for r in &walk.ranges {
        if r.start >= r.end || r.start < previous_end || r.end > user_end || (r.start | r.end) % PAGE_SIZE != 0 {
            return Err(WalkError::BadRange { start: r.start, end: r.end });
        }
        previous_end = r.end;
    }
    let mut walker = Walker { tables, mode: walk.mode, limit, tables_read: 0, out };
    for r in &walk.ranges {
        walker.level(walk.root, levels, 0, r)?;
    }
    Ok(())
}

struct Walker<'a, T> {
    tables: &'a T,
    mode: WalkMode,
    limit: u64,
    tables_read: u64,
    out: &'a mut Vec<PageRef>,
}

impl<T: TableReader> Walker<'_, T> {
    /// The part of `range` that the table at `table` (of `level`, 1 = PTE)
    /// maps, starting at virtual address `base`.
    fn level(&mut self, table: u64, level: u32, base: u64, range: &WalkRange) -> Result<(), WalkError> {
        let shift = 12 + 9 * (level - 1);
        let span = 1u64 << shift;
        let start = range.start.max(base);
        let end = range.end.min(base + span * ENTRIES as u64);
        self.tables_read += 1;
        if self.tables_read > self.limit {
            return Err(WalkError::TooLarge(self.limit));
        }
        let entries = self.tables.table(table).ok_or(WalkError::TableNotRam { table, vaddr: start })?;
        let first = ((start - base) >> shift) as usize;
        let last = ((end - 1 - base) >> shift) as usize;
        for (i, &entry) in entries.iter().enumerate().take(last + 1).skip(first) {
            let va = base + ((i as u64) << shift);
            let (lo, hi) = (start.max(va), end.min(va + span));
            let present = entry & PRESENT != 0;
            let leaf = level == 1 || entry & PSE != 0;
            if entry == 0 {
                self.hole(lo)?;
            } else if !leaf && present {
                self.level(entry & ADDR_MASK, level - 1, va, &WalkRange { start: lo, end: hi, ..*range })?;
            } else if leaf && level <= 3 && (present || entry & PROTNONE != 0) {
                // The frame bits of a non-present entry are inverted.
                let bits = if present { entry } else { !entry };
                let first_pfn = (bits & ADDR_MASK & !(span - 1)) / PAGE_SIZE;
                let dirty = range.soft_dirty || entry & SOFT_DIRTY != 0;
                for vaddr in (lo..hi).step_by(PAGE_SIZE as usize) {
                    self.page(vaddr, first_pfn + (vaddr - va) / PAGE_SIZE, dirty)?;
                }
            } else {
                return Err(WalkError::BadEntry { vaddr: lo, entry, level });
            }
        }
        Ok(())
    }

    /// Nothing mapped from `vaddr` on (to the end of the entry).
    fn hole(&self, vaddr: u64) -> Result<(), WalkError> {
        match self.mode {
            WalkMode::Present(_) => Ok(()),
            WalkMode::Populated => Err(WalkError::Missing { vaddr }),
        }
    }

    fn page(&mut self, vaddr: u64, pfn: u64, soft_dirty: bool) -> Result<(), WalkError> {
        let dirty = match self.mode {
            WalkMode::Present(Select::AllDirty) | WalkMode::Populated => true,
            WalkMode::Present(Select::All) => soft_dirty,
            WalkMode::Present(Select::Dirty) if soft_dirty => true,
            WalkMode::Present(Select::Dirty) => return Ok(()),
        };
        if self.out.len() as u64 >= self.limit {
            return Err(WalkError::TooLarge(self.limit));
        }
        self.out.push(PageRef { vaddr, pfn, kind: PageKind::Data, dirty });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Page tables in a map of table address -> entries.
    #[derive(Default)]
    struct Fake(HashMap<u64, [u64; ENTRIES]>);

    impl TableReader for Fake {
        fn table(&self, phys: u64) -> Option<[u64; ENTRIES]> {
            self.0.get(&phys).copied()
        }
    }

    impl Fake {
        fn set(&mut self, table: u64, index: usize, entry: u64) {
            self.0.entry(table).or_insert([0; ENTRIES])[index] = entry;
        }

        /// 4-level tables at 0x1000 (PGD) 0x2000 (PUD) 0x3000 (PMD) 0x4000
        /// (PTE) covering virtual 0..2 MiB, plus `pmd` entries from index 1.
        fn four_level(ptes: &[(usize, u64)], pmds: &[(usize, u64)]) -> Fake {
            let mut f = Fake::default();
            f.set(0x1000, 0, 0x2000 | PRESENT);
            f.set(0x2000, 0, 0x3000 | PRESENT);
            f.set(0x3000, 0, 0x4000 | PRESENT);
            f.set(0x4000, 0, 0);
            for &(i, e) in ptes {
                f.set(0x4000, i, e);
            }
            for &(i, e) in pmds {
                f.set(0x3000, i, e);
            }
            f
        }
    }

    fn pw(mode: WalkMode, ranges: &[(u64, u64, bool)]) -> PageWalk {
        PageWalk {
            root: 0x1000,
            levels: 4,
            mode,
            ranges: ranges.iter().map(|&(start, end, soft_dirty)| WalkRange { start, end, soft_dirty }).collect(),
        }
    }

    fn run(tables: &Fake, w: &PageWalk) -> Result<Vec<(u64, u64, bool)>, WalkError> {
        let mut out = Vec::new();
        walk(tables, w, 1 << 20, &mut out)?;
        assert!(out.iter().all(|p| p.kind == PageKind::Data));
        Ok(out.iter().map(|p| (p.vaddr, p.pfn, p.dirty)).collect())
    }

    const ALL: WalkMode = WalkMode::Present(Select::All);

    #[test]
    fn finds_present_and_protnone_pages_with_soft_dirty_bits() {
        let ptes = [
            (1, 0x7000 | PRESENT | SOFT_DIRTY),
            (2, 0x8000 | PRESENT),
            // PROT_NONE: frame 0x9 inverted.
            (3, (!0x9000 & ADDR_MASK) | PROTNONE),
        ];
        let t = Fake::four_level(&ptes, &[]);
        let got = run(&t, &pw(ALL, &[(0, 0x20_0000, false)])).unwrap();
        assert_eq!(got, [(0x1000, 7, true), (0x2000, 8, false), (0x3000, 9, false)]);
        // A VMA that is soft-dirty as a whole makes every page dirty.
        let got = run(&t, &pw(ALL, &[(0x2000, 0x3000, true)])).unwrap();
        assert_eq!(got, [(0x2000, 8, true)]);
        let dirty = run(&t, &pw(WalkMode::Present(Select::Dirty), &[(0, 0x20_0000, false)])).unwrap();
        assert_eq!(dirty, [(0x1000, 7, true)]);
        let all_dirty = run(&t, &pw(WalkMode::Present(Select::AllDirty), &[(0x1000, 0x3000, false)])).unwrap();
        assert_eq!(all_dirty, [(0x1000, 7, true), (0x2000, 8, true)]);
    }

    #[test]
    fn huge_pages_give_one_frame_per_4k_page() {
        // PMD entry 1 maps virtual 2 MiB..4 MiB to frames from 0x400
        // (4 MiB), PAT bit (12) set: not part of the frame.
        let t = Fake::four_level(&[], &[(1, 0x40_0000 | 1 << 12 | PSE | PRESENT)]);
        let got = run(&t, &pw(ALL, &[(0x20_0000 + 0x1000, 0x20_0000 + 0x4000, false)])).unwrap();
        assert_eq!(got, [(0x201000, 0x401, false), (0x202000, 0x402, false), (0x203000, 0x403, false)]);
        let all = run(&t, &pw(ALL, &[(0, 0x40_0000, false)])).unwrap();
        assert_eq!(all.len(), 512);
    }

    #[test]
    fn populated_walks_need_every_page() {
        let t = Fake::four_level(&[(1, 0x7000 | PRESENT)], &[]);
        assert_eq!(run(&t, &pw(WalkMode::Populated, &[(0x1000, 0x2000, false)])).unwrap(), [(0x1000, 7, true)]);
        assert_eq!(
            run(&t, &pw(WalkMode::Populated, &[(0x1000, 0x3000, false)])),
            Err(WalkError::Missing { vaddr: 0x2000 })
        );
        // A hole at a higher level too.
        assert_eq!(
            run(&t, &pw(WalkMode::Populated, &[(0x40_0000, 0x40_1000, false)])),
            Err(WalkError::Missing { vaddr: 0x40_0000 })
        );
    }

    #[test]
    fn hostile_ranges_and_entries_are_errors() {
        let t = Fake::four_level(&[(1, 0x7000 | PRESENT)], &[]);
        let bad = |ranges: &[(u64, u64, bool)]| run(&t, &pw(ALL, ranges)).unwrap_err();
        assert!(matches!(bad(&[(0x2000, 0x1000, false)]), WalkError::BadRange { .. }));
        assert!(matches!(bad(&[(0x1001, 0x2000, false)]), WalkError::BadRange { .. }));
        assert!(matches!(bad(&[(0x3000, 0x4000, false), (0x1000, 0x2000, false)]), WalkError::BadRange { .. }));
        assert!(matches!(bad(&[(0, 1 << 48, false)]), WalkError::BadRange { .. }), "kernel half");
        assert!(matches!(bad(&[(0, !0xfff_u64, false)]), WalkError::BadRange { .. }));
        let mut w = pw(ALL, &[(0, 0x1000, false)]);
        w.levels = 3;
        assert_eq!(run(&t, &w), Err(WalkError::Levels(3)));
        // A swap entry.
        let swap = Fake::four_level(&[(1, 0x1234_5600)], &[]);
        assert!(matches!(run(&swap, &pw(ALL, &[(0, 0x2000, false)])), Err(WalkError::BadEntry { vaddr: 0x1000, .. })));
        // A table outside guest RAM.
        let mut outside = Fake::four_level(&[], &[]);
        outside.set(0x3000, 0, 0xdead_0000 | PRESENT);
        assert!(matches!(run(&outside, &pw(ALL, &[(0, 0x1000, false)])), Err(WalkError::TableNotRam { .. })));
        // A large-page bit where none can be (PGD).
        let mut pse = Fake::four_level(&[], &[]);
        pse.set(0x1000, 0, 0x2000 | PSE | PRESENT);
        assert!(matches!(run(&pse, &pw(ALL, &[(0, 0x1000, false)])), Err(WalkError::BadEntry { level: 4, .. })));
    }

    #[test]
    fn self_referencing_tables_are_bounded() {
        // Every entry of every level points back at the one table: 512^3
        // PTE tables' worth of "pages" if nothing stopped it.
        let mut t = Fake::default();
        for i in 0..ENTRIES {
            t.set(0x1000, i, 0x1000 | PRESENT);
        }
        let mut out = Vec::new();
        let err = walk(&t, &pw(ALL, &[(0, 1 << 47, false)]), 10_000, &mut out).unwrap_err();
        assert_eq!(err, WalkError::TooLarge(10_000));
        assert!(out.len() <= 10_000);
    }

    #[test]
    fn five_levels_reach_the_larger_user_half() {
        let mut t = Fake::default();
        // PML5 entry 1 covers 2^48..2^49.
        t.set(0x1000, 1, 0x2000 | PRESENT);
        t.set(0x2000, 0, 0x3000 | PRESENT);
        t.set(0x3000, 0, 0x4000 | PRESENT);
        t.set(0x4000, 0, 0x5000 | PRESENT);
        t.set(0x5000, 0, 0x6000 | PRESENT);
        let mut w = pw(ALL, &[(1 << 48, (1 << 48) + 0x1000, false)]);
        w.levels = 5;
        assert_eq!(run(&t, &w).unwrap(), [(1 << 48, 6, false)]);
    }

    #[test]
    fn reads_tables_out_of_guest_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0x7000u64 | PRESENT, vm_memory::GuestAddress(0x2008)).unwrap();
        let entries = mem.table(0x2000).unwrap();
        assert_eq!(entries[1], 0x7001);
        assert!(mem.table(0x10000).is_none(), "past RAM");
        assert!(mem.table(0x2008).is_none(), "not a table's start");
    }
}
