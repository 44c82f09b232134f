//! `pmivmm checkpoint` and `pmivmm restore`: ask the node's VMM (control
//! socket), which talks to its agent and copies pages in guest RAM itself.

use std::path::Path;

use anyhow::Context;

use crate::checkpoint::{CheckpointReport, RestoreReport};
use crate::control;
use crate::rundir::NodePaths;

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// MB/s of `bytes` moved in `us` microseconds.
fn rate(bytes: u64, us: u64) -> String {
    if us == 0 {
        return "-".into();
    }
    format!("{:.0} MB/s", bytes as f64 / us as f64)
}

/// The one-line summary `pmivmm checkpoint` prints.
pub fn describe_checkpoint(r: &CheckpointReport, dir: &Path) -> String {
    let bytes = r.data_pages * 4096;
    format!(
        "checkpointed PID {} ({}) into {}: {} pages saved ({} bytes; {} present, {} found by the VMM's page-table \
         walk), image {} bytes; \
         frozen {}, capture {}, page-table walk {}, page read {} ({}; memcpy of the same bytes {}, {}), dir write {}, total {}; \
         original {}",
        r.pid,
        r.comm,
        dir.display(),
        r.data_pages,
        bytes,
        r.present_pages,
        r.walked_pages,
        r.image_bytes,
        ms(r.frozen_us),
        ms(r.capture_us),
        ms(r.walk_us),
        ms(r.read_us),
        rate(bytes, r.read_us),
        ms(r.memcpy_us),
        rate(bytes, r.memcpy_us),
        ms(r.write_us),
        ms(r.total_us),
        if r.left_running { "left running" } else { "killed" },
    )
}

/// The one-line summary `pmivmm restore` prints.
pub fn describe_restore(r: &RestoreReport) -> String {
    format!(
        "restored {} as PID {}: {} pages; read dir {}, prepare {}, page-table walk {}, page write {}, finish {}, total {}",
        r.comm,
        r.pid,
        r.data_pages,
        ms(r.read_dir_us),
        ms(r.prepare_us),
        ms(r.walk_us),
        ms(r.write_us),
        ms(r.finish_us),
        ms(r.total_us)
    )
}

/// `pmivmm checkpoint --node N PID -o DIR [--leave-running] [--pagemap]`.
pub fn checkpoint(
    name: &str,
    pid: u32,
    dir: &Path,
    leave_running: bool,
    page_walk: bool,
) -> anyhow::Result<CheckpointReport> {
    let paths = NodePaths::existing(name)?;
    // The VMM runs elsewhere (another cwd): hand it an absolute path.
    let dir = std::path::absolute(dir).with_context(|| format!("bad directory {}", dir.display()))?;
    Ok(control::checkpoint(&paths.control(), pid, &dir, leave_running, page_walk)?)
}

/// `pmivmm restore --node N DIR [--pagemap]`.
pub fn restore(name: &str, dir: &Path, page_walk: bool) -> anyhow::Result<RestoreReport> {
    let paths = NodePaths::existing(name)?;
    let dir = std::path::absolute(dir).with_context(|| format!("bad directory {}", dir.display()))?;
    // Check the directory here too, so that a corrupt one (or one too large
    // for the node) fails before the node is even asked (the VMM checks
    // again).
    let mem_pages = control::status(&paths.control())?.mem_mib * (1 << 20) / pmivmm_proto::image::PAGE_SIZE;
    crate::checkpoint::dir::read(&dir, mem_pages)?;
    Ok(control::restore(&paths.control(), &dir, page_walk)?)
}
