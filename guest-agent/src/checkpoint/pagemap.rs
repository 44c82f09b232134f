//! /proc/PID/pagemap: which pages of a VMA are present, in which frame,
//! and whether they were written since the soft-dirty bits were cleared.
//! Neighbouring VMAs (or page runs) are read with one pread (chunked only
//! for huge sparse VMAs): in the emulated guest kernel of these hosts a
//! pread of pagemap costs 10-40 ms whatever its length, while the entries
//! of a hole between two ranges cost little.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use pmivmm_proto::image::{PageKind, PageRef, PageRun, Select, Vma, VmaKind, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    #[error("cannot read /proc/{pid}/pagemap: {source}")]
    Io { pid: i32, source: io::Error },
    #[error("page {vaddr:#x} of PID {pid} is swapped out (nodes have no swap)")]
    Swapped { pid: i32, vaddr: u64 },
    #[error("page {vaddr:#x} of PID {pid} is not present after populating it")]
    NotPresent { pid: i32, vaddr: u64 },
    #[error("page {vaddr:#x} of PID {pid} has no frame number (is the agent root?)")]
    NoPfn { pid: i32, vaddr: u64 },
}

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// "file-page or shared-anon".
const FILE_OR_SHARED: u64 = 1 << 61;
/// Written since the soft-dirty bits were last cleared (`4` written to
/// /proc/PID/clear_refs); needs CONFIG_MEM_SOFT_DIRTY.
const SOFT_DIRTY: u64 = 1 << 55;
const PFN_MASK: u64 = (1 << 55) - 1;
/// Entries per pread: 64 Ki entries (512 KiB) cover 256 MiB of address space.
const CHUNK_PAGES: u64 = 64 << 10;
/// The largest hole between two ranges that one pread still spans: 4 MiB
/// of address space, 8 KiB of entries.
const MAX_HOLE_PAGES: u64 = 1024;

/// Whether this kernel tracks soft-dirty pages (CONFIG_MEM_SOFT_DIRTY).
/// Without it the bit is never set, so every page must count as dirty:
/// pre-copy rounds then report every present page (more copying, never a
/// missed write). Probed once on a written page of the agent's own, which
/// is soft-dirty where the bits are tracked (the agent never clears its
/// own).
pub fn soft_dirty_tracked() -> bool {
    static TRACKED: OnceLock<bool> = OnceLock::new();
    *TRACKED.get_or_init(|| {
        let page = std::hint::black_box([1u8; 1]);
        let addr = page.as_ptr() as u64 / PAGE_SIZE * PAGE_SIZE;
        let mut dirty = false;
        let probed = Pagemap::open(std::process::id() as i32).and_then(|own| {
            own.for_each(addr, addr + PAGE_SIZE, |_, entry| {
                dirty = entry & SOFT_DIRTY != 0;
                Ok(())
            })
        });
        if let Err(e) = probed {
            eprintln!("pmivmm-agent: cannot probe soft-dirty tracking: {e}");
        }
        if !dirty {
            eprintln!(
                "pmivmm-agent: this kernel does not track soft-dirty pages \
                 (CONFIG_MEM_SOFT_DIRTY): every present page counts as dirty"
            );
        }
        dirty
    })
}

/// `select` where the kernel tracks soft-dirty pages; otherwise every page
/// counts as dirty (see [`soft_dirty_tracked`]).
pub fn tracked(select: Select) -> Select {
    if soft_dirty_tracked() {
        select
    } else {
        Select::AllDirty
    }
}

pub struct Pagemap {
    pid: i32,
    file: File,
}

impl Pagemap {
    pub fn open(pid: i32) -> Result<Pagemap, PagemapError> {
        let file = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| PagemapError::Io { pid, source })?;
        Ok(Pagemap { pid, file })
    }

    /// Calls `f(vaddr, entry)` for every page in `start..end`.
    fn for_each(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), PagemapError>,
    ) -> Result<(), PagemapError> {
        let mut buf = Vec::new();
        let mut addr = start;
        while addr < end {
            let pages = ((end - addr) / PAGE_SIZE).min(CHUNK_PAGES);
            buf.resize(pages as usize * 8, 0);
            self.file
                .read_exact_at(&mut buf, addr / PAGE_SIZE * 8)
                .map_err(|source| PagemapError::Io {
                    pid: self.pid,
                    source,
                })?;
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                f(
                    addr + i as u64 * PAGE_SIZE,
                    u64::from_ne_bytes(entry.try_into().expect("8 bytes")),
                )?;
            }
            addr += pages * PAGE_SIZE;
        }
        Ok(())
    }

    /// Calls `f(i, vaddr, entry)` for every page of each range `i` of
    /// `ranges` (`start..end`). Ranges in ascending order with holes of at
    /// most [`MAX_HOLE_PAGES`] between them are read together; the entries
    /// of the holes are skipped.
    fn for_each_in(
        &self,
        ranges: &[(u64, u64)],
        mut f: impl FnMut(usize, u64, u64) -> Result<(), PagemapError>,
    ) -> Result<(), PagemapError> {
        let mut first = 0;
        while first < ranges.len() {
            let mut last = first;
            while let Some(next) = ranges.get(last + 1) {
                let end = ranges[last].1;
                match next.0.checked_sub(end) {
                    Some(hole) if hole <= MAX_HOLE_PAGES * PAGE_SIZE => last += 1,
                    _ => break,
                }
            }
            let mut i = first;
            self.for_each(ranges[first].0, ranges[last].1, |vaddr, entry| {
                // Ends ascend within the group, and vaddr < the last one.
                while vaddr >= ranges[i].1 {
                    i += 1;
                }
                if vaddr < ranges[i].0 {
                    return Ok(()); // a hole
                }
                f(i, vaddr, entry)
            })?;
            first = last + 1;
        }
        Ok(())
    }

    /// The present pages of `vmas` (in ascending order, as /proc/PID/maps
    /// lists them) that `select` asks for, classified (see [`PageKind`]).
    /// The pages of `[vvar]` and `[vdso]` (the target's kernel provides
    /// them) and of shared file mappings (the file does) are never listed.
    pub fn present_pages(
        &self,
        vmas: &[&Vma],
        select: Select,
        out: &mut Vec<PageRef>,
    ) -> Result<(), PagemapError> {
        let select = tracked(select);
        let read: Vec<&Vma> = vmas
            .iter()
            .copied()
            .filter(|vma| match vma.kind {
                VmaKind::Vvar { .. } | VmaKind::Vdso => false,
                VmaKind::File { .. } => !vma.shared,
                _ => true,
            })
            .collect();
        let ranges: Vec<(u64, u64)> = read.iter().map(|vma| (vma.start, vma.end)).collect();
        self.for_each_in(&ranges, |i, vaddr, entry| {
            if entry & SWAPPED != 0 {
                return Err(PagemapError::Swapped {
                    pid: self.pid,
                    vaddr,
                });
            }
            let dirty = select == Select::AllDirty || entry & SOFT_DIRTY != 0;
            if entry & PRESENT == 0 || (select == Select::Dirty && !dirty) {
                return Ok(());
            }
            let kind = match read[i].kind {
                VmaKind::File { .. } if entry & FILE_OR_SHARED != 0 => PageKind::CleanFile,
                _ => PageKind::Data,
            };
            out.push(PageRef {
                vaddr,
                pfn: entry & PFN_MASK,
                kind,
                dirty,
            });
            Ok(())
        })
    }

    /// The frames of the pages in `runs`, which must all be present.
    pub fn frames(&self, runs: &[PageRun], out: &mut Vec<PageRef>) -> Result<(), PagemapError> {
        let ranges: Vec<(u64, u64)> = runs.iter().map(|run| (run.start, run.end())).collect();
        self.for_each_in(&ranges, |_, vaddr, entry| {
            if entry & PRESENT == 0 {
                return Err(PagemapError::NotPresent {
                    pid: self.pid,
                    vaddr,
                });
            }
            if entry & PFN_MASK == 0 {
                return Err(PagemapError::NoPfn {
                    pid: self.pid,
                    vaddr,
                });
            }
            // Pages about to receive contents: dirty by definition.
            out.push(PageRef {
                vaddr,
                pfn: entry & PFN_MASK,
                kind: PageKind::Data,
                dirty: true,
            });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_together_skip_their_holes() {
        let pages = vec![1u8; PAGE_SIZE as usize * 9];
        let base = (pages.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let at = |i: u64| base + i * PAGE_SIZE;
        // Two neighbours with a hole of two pages, an empty range, and one
        // beyond the largest hole (read on its own).
        let far = at(4) + (MAX_HOLE_PAGES + 1) * PAGE_SIZE;
        let ranges = [
            (at(0), at(2)),
            (at(4), at(5)),
            (at(5), at(5)),
            (far, far + PAGE_SIZE),
        ];
        let mut seen = Vec::new();
        Pagemap::open(std::process::id() as i32)
            .unwrap()
            .for_each_in(&ranges, |i, vaddr, entry| {
                seen.push((i, vaddr, entry & PRESENT != 0));
                Ok(())
            })
            .unwrap();
        let expected: Vec<(usize, u64)> = vec![(0, at(0)), (0, at(1)), (1, at(4)), (3, far)];
        assert_eq!(
            seen.iter().map(|&(i, v, _)| (i, v)).collect::<Vec<_>>(),
            expected
        );
        assert!(seen[..3].iter().all(|&(_, _, present)| present));
    }

    #[test]
    fn sees_own_present_pages_with_frames() {
        let page = vec![1u8; PAGE_SIZE as usize * 4];
        let start = (page.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let run = [PageRun { start, count: 2 }];
        let mut out = Vec::new();
        Pagemap::open(std::process::id() as i32)
            .unwrap()
            .frames(&run, &mut out)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|p| p.pfn != 0 && p.kind == PageKind::Data));
    }
}
