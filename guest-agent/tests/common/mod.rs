//! Helpers shared by the agent's unit tests (src/checkpoint/tests.rs
//! includes this file) and its integration tests: the workloads of
//! images/workloads/, and page contents copied the way the VMM copies them
//! during a migration.

#![allow(dead_code)] // Each test crate uses its part.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pmivmm_proto::image::{PageKind, PageRef, Pages, ProcessImage, PAGE_SIZE};

/// target/<profile>/cr-tests: workloads and per-test output files.
pub fn work_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .join("cr-tests")
}

/// The path of workload `name`, built once per test binary.
pub fn workload(name: &str) -> PathBuf {
    workload_built_by(name, |script, out| {
        let status = Command::new(script)
            .arg(out)
            .status()
            .expect("run images/workloads/build.sh");
        assert!(status.success(), "building the workloads failed");
    })
}

/// The path of workload `name`; `build(script, dir)` must run the build
/// script once per test binary (where the agent's reaper waits for every
/// child, through the agent).
pub fn workload_built_by(name: &str, build: impl FnOnce(&Path, &Path)) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let out = work_dir().join("workloads");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/workloads/build.sh");
        build(&script, &out);
        out
    });
    dir.join(name)
}

/// Page contents by virtual address, copied like the VMM copies them: in
/// pre-copy rounds while the process runs (a later copy replaces an
/// earlier one), then, once it is frozen, the pages written since their
/// copy or never copied.
#[derive(Default)]
pub struct PageCopies {
    pages: HashMap<u64, Vec<u8>>,
    /// How many pages were copied after the freeze.
    pub frozen: usize,
}

/// The listed data pages: the host kernel has no /proc/PID/pmivmm_mm, so
/// nothing is left to a walk.
fn data(pages: &Pages) -> impl Iterator<Item = &PageRef> {
    assert!(pages.walk.is_none(), "a page walk on the host");
    pages.listed.iter().filter(|p| p.kind == PageKind::Data)
}

impl PageCopies {
    /// Copies the data pages of a pre-copy round with `read` (one page's
    /// contents at an address).
    pub fn round(&mut self, pages: &Pages, read: impl Fn(u64) -> Vec<u8>) {
        for page in data(pages) {
            self.pages.insert(page.vaddr, read(page.vaddr));
        }
    }

    /// After the checkpoint (`pages` as it reported them): copies what the
    /// rounds missed and returns the contents of the image's pages, in
    /// order, as `ProcMem::write_runs` takes them.
    pub fn finish(
        &mut self,
        image: &ProcessImage,
        pages: &Pages,
        read: impl Fn(u64) -> Vec<u8>,
    ) -> Vec<u8> {
        for page in data(pages) {
            if page.dirty || !self.pages.contains_key(&page.vaddr) {
                self.pages.insert(page.vaddr, read(page.vaddr));
                self.frozen += 1;
            }
        }
        let mut out = Vec::new();
        for run in &image.pages {
            for i in 0..run.count {
                let page = &self.pages[&(run.start + i * PAGE_SIZE)];
                out.extend_from_slice(page);
            }
        }
        out
    }
}
