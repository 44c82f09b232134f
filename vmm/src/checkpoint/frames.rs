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

use pmivmm_proto::image::{PageKind, PageRef, PageRun, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest_ram::frame_addr;

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
