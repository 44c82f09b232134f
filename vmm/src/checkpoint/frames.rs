//! Guest frames named by the guest, checked and copied.
//!
//! A page frame number (PFN) from the guest agent is untrusted input: a
//! compromised or buggy guest could name any number. A frame is accepted
//! only if all of `[pfn * 4096, pfn * 4096 + 4096)` lies inside one RAM
//! region (checked arithmetic, so `u64::MAX` or a frame in the MMIO gap is
//! an error, never a wrap-around), and contents move only through
//! vm-memory's bounds-checked `read_slice` / `write_slice`.
//!
//! Copies are batched: consecutive frames (common, since the guest kernel
//! hands out neighbouring frames to neighbouring faults) become one copy.

use pmivmm_proto::image::{page_runs, PageKind, PageRef, PageRun, Pages, ProcessImage, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::page_walk::{self, WalkError};
use crate::guest_ram::{frame_addr, ram_frames};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the guest named frame {pfn:#x} (page {vaddr:#x}), which is not guest RAM")]
    NotRam { pfn: u64, vaddr: u64 },
    #[error("the guest listed {got} pages to copy, the image has {expected}")]
    Count { got: u64, expected: u64 },
    #[error("page {index} of the guest's list is {got:#x}, the image says {expected:#x}")]
    Order { index: u64, got: u64, expected: u64 },
    #[error("guest memory access at frame {pfn:#x} failed: {reason}")]
    Access { pfn: u64, reason: String },
    #[error("{got} bytes of page data for {pages} pages")]
    DataLength { got: usize, pages: usize },
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("the guest listed page {vaddr:#x} twice, or out of order")]
    Unsorted { vaddr: u64 },
}

/// The pages the agent reported, its walk ([`page_walk`]) done: listed and
/// walked pages in strictly increasing address order. At most twice as
/// many pages as guest RAM has frames (a process may map one frame, the
/// zero page, many times, but not that often): the VMM allocates a page of
/// memory for each.
pub fn resolve(mem: &GuestMemoryMmap, pages: Pages) -> Result<Vec<PageRef>, FrameError> {
    let Pages { mut listed, walk } = pages;
    let limit = ram_frames(mem).saturating_mul(2);
    if listed.len() as u64 > limit {
        return Err(WalkError::TooLarge(limit).into());
    }
    if let Some(walk) = walk {
        page_walk::walk(mem, &walk, limit, &mut listed)?;
        // Two sorted runs (listed, walked): a stable sort merges them.
        listed.sort_by_key(|p| p.vaddr);
    }
    if let Some(w) = listed.windows(2).find(|w| w[0].vaddr >= w[1].vaddr) {
        return Err(FrameError::Unsorted { vaddr: w[1].vaddr });
    }
    Ok(listed)
}

/// A capture's pages (see [`resolve`]); after a walk, `image`'s page runs
/// (the agent's list only the pages it listed) become those of every data
/// page.
pub fn resolve_capture(mem: &GuestMemoryMmap, image: &mut ProcessImage, pages: Pages) -> Result<Vec<PageRef>, FrameError> {
    let walked = pages.walk.is_some();
    let pages = resolve(mem, pages)?;
    if walked {
        image.pages = page_runs(pages.iter().filter(|p| p.kind == PageKind::Data).map(|p| p.vaddr));
    }
    Ok(pages)
}

/// Checks every frame of `pages`.
pub fn check_frames(mem: &GuestMemoryMmap, pages: &[PageRef]) -> Result<(), FrameError> {
    for p in pages {
        if frame_addr(mem, p.pfn).is_none() {
            return Err(FrameError::NotRam { pfn: p.pfn, vaddr: p.vaddr });
        }
    }
    Ok(())
}

/// The [`PageKind::Data`] pages of `pages`, which must be exactly the pages
/// of `runs`, in order.
pub fn data_pages(pages: &[PageRef], runs: &[PageRun]) -> Result<Vec<PageRef>, FrameError> {
    let data: Vec<PageRef> = pages.iter().filter(|p| p.kind == PageKind::Data).copied().collect();
    check_order(&data, runs)?;
    Ok(data)
}

/// `pages` must be exactly the pages of `runs`, in order.
pub fn check_order(pages: &[PageRef], runs: &[PageRun]) -> Result<(), FrameError> {
    let expected: u64 = runs.iter().map(|r| r.count).sum();
    if pages.len() as u64 != expected {
        return Err(FrameError::Count { got: pages.len() as u64, expected });
    }
    let vaddrs = runs.iter().flat_map(|r| (0..r.count).map(move |i| r.start + i * PAGE_SIZE));
    for (index, (p, want)) in pages.iter().zip(vaddrs).enumerate() {
        if p.vaddr != want {
            return Err(FrameError::Order { index: index as u64, got: p.vaddr, expected: want });
        }
    }
    Ok(())
}

/// Runs of consecutive frames: (index of the first page, first pfn, count).
fn batches(pages: &[PageRef]) -> impl Iterator<Item = (usize, u64, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(i)?;
        let mut n = 1;
        while pages.get(i + n).is_some_and(|p| Some(p.pfn) == first.pfn.checked_add(n as u64)) {
            n += 1;
        }
        let batch = (i, first.pfn, n);
        i += n;
        Some(batch)
    })
}

/// Copies the frames of `pages` (checked first) into `out`, which must hold
/// exactly `pages.len()` pages.
pub fn read_pages(mem: &GuestMemoryMmap, pages: &[PageRef], out: &mut [u8]) -> Result<(), FrameError> {
    check_frames(mem, pages)?;
    if out.len() as u64 != pages.len() as u64 * PAGE_SIZE {
        return Err(FrameError::DataLength { got: out.len(), pages: pages.len() });
    }
    let ps = PAGE_SIZE as usize;
    for (i, pfn, n) in batches(pages) {
        mem.read_slice(&mut out[i * ps..(i + n) * ps], GuestAddress(pfn * PAGE_SIZE))
            .map_err(|e| FrameError::Access { pfn, reason: e.to_string() })?;
    }
    Ok(())
}

/// Writes `data` (`pages.len()` pages) into the frames of `pages` (checked
/// first, all of them before anything is written).
pub fn write_pages(mem: &GuestMemoryMmap, pages: &[PageRef], data: &[u8]) -> Result<(), FrameError> {
    check_frames(mem, pages)?;
    if data.len() as u64 != pages.len() as u64 * PAGE_SIZE {
        return Err(FrameError::DataLength { got: data.len(), pages: pages.len() });
    }
    let ps = PAGE_SIZE as usize;
    for (i, pfn, n) in batches(pages) {
        mem.write_slice(&data[i * ps..(i + n) * ps], GuestAddress(pfn * PAGE_SIZE))
            .map_err(|e| FrameError::Access { pfn, reason: e.to_string() })?;
    }
    Ok(())
}

/// Writes one page of contents into the (checked) frame of `page`.
pub fn write_page(mem: &GuestMemoryMmap, page: &PageRef, data: &[u8]) -> Result<(), FrameError> {
    let addr = frame_addr(mem, page.pfn).ok_or(FrameError::NotRam { pfn: page.pfn, vaddr: page.vaddr })?;
    if data.len() as u64 != PAGE_SIZE {
        return Err(FrameError::DataLength { got: data.len(), pages: 1 });
    }
    mem.write_slice(data, addr).map_err(|e| FrameError::Access { pfn: page.pfn, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

    /// 64 KiB at 0 and 64 KiB at 4 GiB, like a VM with RAM above the gap.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(MMIO_GAP_END), 0x10000)])
            .unwrap()
    }

    fn page(vaddr: u64, pfn: u64) -> PageRef {
        PageRef { vaddr, pfn, kind: PageKind::Data, dirty: true }
    }

    #[test]
    fn walked_pages_merge_with_listed_ones_and_complete_the_image_runs() {
        let mem = memory();
        // A PGD at 0x1000 -> PUD 0x2000 -> PMD 0x3000 -> PTE 0x4000 mapping
        // virtual 0x5000 to frame 9.
        for (table, entry) in [(0x1000u64, 0x2001u64), (0x2000, 0x3001), (0x3000, 0x4001), (0x4000 + 5 * 8, 0x9001)] {
            mem.write_obj(entry, GuestAddress(table)).unwrap();
        }
        let walk = pmivmm_proto::image::PageWalk {
            root: 0x1000,
            levels: 4,
            mode: pmivmm_proto::image::WalkMode::Present(pmivmm_proto::image::Select::AllDirty),
            ranges: vec![pmivmm_proto::image::WalkRange { start: 0x5000, end: 0x7000, soft_dirty: false }],
        };
        let listed = vec![page(0x1000, 1), page(0x9000, 2)];
        let mut image = crate::checkpoint::dir::sample_image(1);
        let pages = resolve_capture(&mem, &mut image, Pages { listed, walk: Some(walk) }).unwrap();
        let got: Vec<(u64, u64)> = pages.iter().map(|p| (p.vaddr, p.pfn)).collect();
        assert_eq!(got, [(0x1000, 1), (0x5000, 9), (0x9000, 2)]);
        assert_eq!(image.pages, page_runs([0x1000, 0x5000, 0x9000]));
        // Without a walk, the image keeps the agent's runs.
        let mut image = crate::checkpoint::dir::sample_image(1);
        let runs = image.pages.clone();
        resolve_capture(&mem, &mut image, Pages { listed: vec![page(0x1000, 1)], walk: None }).unwrap();
        assert_eq!(image.pages, runs);
    }

    #[test]
    fn listed_pages_must_be_sorted_and_few_enough() {
        let mem = memory();
        let twice = Pages { listed: vec![page(0x1000, 1), page(0x1000, 2)], walk: None };
        assert_eq!(resolve(&mem, twice), Err(FrameError::Unsorted { vaddr: 0x1000 }));
        // 32 frames of RAM: at most 64 pages.
        let many = Pages { listed: (0..65).map(|i| page(i * 0x1000, 1)).collect(), walk: None };
        assert_eq!(resolve(&mem, many), Err(FrameError::Walk(WalkError::TooLarge(64))));
    }

    #[test]
    fn frames_inside_ram_only() {
        let mem = memory();
        let err = check_frames(&mem, &[page(0x1000, 1), page(0x2000, u64::MAX)]).unwrap_err();
        assert_eq!(err, FrameError::NotRam { pfn: u64::MAX, vaddr: 0x2000 });
    }

    #[test]
    fn pages_round_trip_in_batches() {
        let mem = memory();
        let hi = MMIO_GAP_END / 4096;
        // Two consecutive frames, one alone, one above the gap, one repeated order.
        let pages = [page(0x1000, 3), page(0x2000, 4), page(0x3000, 9), page(0x4000, hi + 2), page(0x5000, 5)];
        let data: Vec<u8> = (0..pages.len() * 4096).map(|i| (i % 253) as u8).collect();
        write_pages(&mem, &pages, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        read_pages(&mem, &pages, &mut back).unwrap();
        assert_eq!(back, data);
        // The bytes landed in the named frames.
        let mut one = [0u8; 4096];
        mem.read_slice(&mut one, GuestAddress((hi + 2) * 4096)).unwrap();
        assert_eq!(&one[..], &data[3 * 4096..4 * 4096]);
        assert_eq!(batches(&pages).collect::<Vec<_>>(), vec![(0, 3, 2), (2, 9, 1), (3, hi + 2, 1), (4, 5, 1)]);
    }

    #[test]
    fn hostile_frames_write_nothing() {
        let mem = memory();
        let pages = [page(0x1000, 2), page(0x2000, MMIO_GAP_START / 4096)];
        let data = vec![0xaa; 2 * 4096];
        assert!(matches!(write_pages(&mem, &pages, &data), Err(FrameError::NotRam { .. })));
        let mut one = [0u8; 4096];
        mem.read_slice(&mut one, GuestAddress(2 * 4096)).unwrap();
        assert!(one.iter().all(|&b| b == 0), "a valid frame was written before the bad one was seen");
        let mut out = vec![0u8; 4096];
        assert!(read_pages(&mem, &[page(0, u64::MAX)], &mut out).is_err());
        assert!(matches!(
            read_pages(&mem, &[page(0, 1)], &mut [0u8; 100]),
            Err(FrameError::DataLength { .. })
        ));
    }

    #[test]
    fn page_list_must_match_the_image_runs() {
        let runs = [PageRun { start: 0x1000, count: 2 }, PageRun { start: 0x8000, count: 1 }];
        let good = [page(0x1000, 1), page(0x2000, 2), page(0x8000, 3)];
        check_order(&good, &runs).unwrap();
        assert!(matches!(check_order(&good[..2], &runs), Err(FrameError::Count { got: 2, expected: 3 })));
        let swapped = [page(0x2000, 1), page(0x1000, 2), page(0x8000, 3)];
        assert!(matches!(check_order(&swapped, &runs), Err(FrameError::Order { index: 0, .. })));
        // Non-data pages are skipped when picking the data pages.
        let mixed = [
            page(0x1000, 1),
            PageRef { vaddr: 0x1800_0000, pfn: 7, kind: PageKind::CleanFile, dirty: true },
            page(0x2000, 2),
            page(0x8000, 3),
        ];
        assert_eq!(data_pages(&mixed, &runs).unwrap(), good.to_vec());
    }
}
