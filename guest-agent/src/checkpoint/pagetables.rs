//! /proc/PID/pmivmm_mm (a pmivmm kernel patch): where a process's page
//! tables are in guest-physical memory, and which VMAs count as soft-dirty
//! as a whole. With it the agent hands the VMM address ranges to walk
//! ([`PageWalk`]) instead of reading pagemap, whose per-page work is
//! emulated guest-kernel code on the development hosts (~0.13 ms a page);
//! the VMM walks natively. Pagemap still serves file and vdso mappings
//! (whether a page of a private file mapping is the file's or a private
//! copy does not show in the page-table entry) and kernels without the
//! patch (the host tests).

use std::collections::HashMap;
use std::io;

use pmivmm_proto::image::{PageRun, PageWalk, Vma, VmaKind, WalkMode, WalkRange};

#[derive(Debug, thiserror::Error)]
pub enum PageTablesError {
    #[error("cannot read /proc/{pid}/pmivmm_mm: {source}")]
    Io { pid: i32, source: io::Error },
    #[error("/proc/{pid}/pmivmm_mm is malformed: {line:?}")]
    Malformed { pid: i32, line: String },
}

/// What /proc/PID/pmivmm_mm says, read while the process is stopped.
#[derive(Debug, PartialEq, Eq)]
pub struct MmTables {
    root: u64,
    levels: u8,
    /// VMA start -> (end, VM_SOFTDIRTY).
    soft_dirty: HashMap<u64, (u64, bool)>,
}

impl MmTables {
    /// Reads the file of `pid` if `wanted`; `None` if not, or where the
    /// kernel has no such file.
    pub fn read(pid: i32, wanted: bool) -> Result<Option<MmTables>, PageTablesError> {
        if !wanted {
            return Ok(None);
        }
        match std::fs::read_to_string(format!("/proc/{pid}/pmivmm_mm")) {
            Ok(text) => parse(&text).map(Some).map_err(|line| PageTablesError::Malformed { pid, line }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PageTablesError::Io { pid, source }),
        }
    }

    /// Whether the VMM walks `vma`: private anonymous memory, whose every
    /// present page is the process's own data.
    pub fn walks(vma: &Vma) -> bool {
        !vma.shared && matches!(vma.kind, VmaKind::Anonymous | VmaKind::Heap | VmaKind::Stack)
    }

    /// A walk of `vmas` (each one that [`Self::walks`]). A VMA the file did
    /// not list counts as soft-dirty (never a missed write).
    pub fn walk_vmas<'a>(&self, mode: WalkMode, vmas: impl IntoIterator<Item = &'a Vma>) -> PageWalk {
        let ranges = vmas
            .into_iter()
            .map(|vma| WalkRange {
                start: vma.start,
                end: vma.end,
                soft_dirty: self.soft_dirty.get(&vma.start) != Some(&(vma.end, false)),
            })
            .collect();
        self.walk(mode, ranges)
    }

    /// A walk that must find every page of `runs` present.
    pub fn walk_runs(&self, runs: &[PageRun]) -> PageWalk {
        let ranges = runs
            .iter()
            .map(|r| WalkRange {
                start: r.start,
                end: r.end(),
                soft_dirty: false,
            })
            .collect();
        self.walk(WalkMode::Populated, ranges)
    }

    fn walk(&self, mode: WalkMode, ranges: Vec<WalkRange>) -> PageWalk {
        PageWalk {
            root: self.root,
            levels: self.levels,
            mode,
            ranges,
        }
    }
}

/// Parses the file (see the kernel patch): `pgd <hex> levels <n>`, then
/// `<start hex> <end hex> <0|1>` per VMA. The error is the bad line.
fn parse(text: &str) -> Result<MmTables, String> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let header = match first.split_whitespace().collect::<Vec<_>>()[..] {
        ["pgd", root, "levels", levels] => u64::from_str_radix(root, 16).ok().zip(levels.parse().ok()),
        _ => None,
    };
    let (root, levels) = header.ok_or_else(|| first.to_owned())?;
    let mut soft_dirty = HashMap::new();
    for line in lines {
        let vma = match line.split_whitespace().collect::<Vec<_>>()[..] {
            [start, end, sd @ ("0" | "1")] => u64::from_str_radix(start, 16)
                .ok()
                .zip(u64::from_str_radix(end, 16).ok())
                .map(|(start, end)| (start, (end, sd == "1"))),
            _ => None,
        };
        let (start, entry) = vma.ok_or_else(|| line.to_owned())?;
        soft_dirty.insert(start, entry);
    }
    Ok(MmTables {
        root,
        levels,
        soft_dirty,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use pmivmm_proto::image::Select;

    /// A private read-write VMA (for the checkpoint module's tests).
    pub(in crate::checkpoint) fn vma(start: u64, end: u64, kind: VmaKind) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            shared: false,
            offset: 0,
            kind,
        }
    }

    #[test]
    fn parses_root_levels_and_soft_dirty_vmas() {
        let t = parse("pgd 2a3f000 levels 4\n400000 401000 0\n7ffd0000 7ffe0000 1\n").unwrap();
        assert_eq!((t.root, t.levels), (0x2a3f000, 4));
        let walk = t.walk_vmas(
            WalkMode::Present(Select::All),
            &[
                vma(0x400000, 0x401000, VmaKind::Heap),
                vma(0x7ffd0000, 0x7ffe0000, VmaKind::Stack),
                // Not in the file: soft-dirty.
                vma(0x500000, 0x501000, VmaKind::Anonymous),
            ],
        );
        let sd: Vec<bool> = walk.ranges.iter().map(|r| r.soft_dirty).collect();
        assert_eq!(sd, [false, true, true]);
        assert_eq!(walk.root, 0x2a3f000);
    }

    #[test]
    fn malformed_lines_are_reported() {
        assert_eq!(parse("pgd zz levels 4\n").unwrap_err(), "pgd zz levels 4");
        assert_eq!(parse("pgd 1000 levels 4\n1000 2000 7\n").unwrap_err(), "1000 2000 7");
        assert_eq!(parse("").unwrap_err(), "");
    }

    #[test]
    fn only_private_anonymous_memory_is_walked() {
        assert!(MmTables::walks(&vma(0, 0x1000, VmaKind::Anonymous)));
        let mut shared = vma(0, 0x1000, VmaKind::Anonymous);
        shared.shared = true;
        assert!(!MmTables::walks(&shared));
        assert!(!MmTables::walks(&vma(0, 0x1000, VmaKind::Vdso)));
    }

    #[test]
    fn runs_become_populated_ranges() {
        let t = parse("pgd 1000 levels 5\n").unwrap();
        let walk = t.walk_runs(&[PageRun {
            start: 0x1000,
            count: 2,
        }]);
        assert_eq!(walk.mode, WalkMode::Populated);
        assert_eq!(walk.levels, 5);
        assert_eq!(
            walk.ranges,
            [WalkRange {
                start: 0x1000,
                end: 0x3000,
                soft_dirty: false
            }]
        );
    }
}
