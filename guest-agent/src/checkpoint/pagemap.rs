//! /proc/PID/pagemap: which pages of a VMA are present, in which frame,
//! and whether they were written since the soft-dirty bits were cleared.
//! One pread per VMA (chunked only for huge sparse VMAs).

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

    /// The present pages of `vma` that `select` asks for, classified (see
    /// [`PageKind`]). `[vvar]` pages and the pages of shared file mappings
    /// (which the file provides) are never listed.
    pub fn present_pages(
        &self,
        vma: &Vma,
        select: Select,
        out: &mut Vec<PageRef>,
    ) -> Result<(), PagemapError> {
        let select = tracked(select);
        let (private_file, vdso) = match vma.kind {
            VmaKind::Vvar { .. } => return Ok(()),
            VmaKind::File { .. } if vma.shared => return Ok(()),
            VmaKind::File { .. } => (true, false),
            VmaKind::Vdso => (false, true),
            _ => (false, false),
        };
        self.for_each(vma.start, vma.end, |vaddr, entry| {
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
            let kind = if vdso {
                PageKind::Vdso
            } else if private_file && entry & FILE_OR_SHARED != 0 {
                PageKind::CleanFile
            } else {
                PageKind::Data
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
        for run in runs {
            self.for_each(run.start, run.end(), |vaddr, entry| {
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
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
