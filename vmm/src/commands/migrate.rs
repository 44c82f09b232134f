//! `pmivmm migrate`: asks the source node's VMM (control socket), which
//! drives its agent and talks to the target's VMM itself.

use crate::control;
use crate::migration::MigrationReport;
use crate::rundir::NodePaths;

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// `pmivmm migrate --node N PID TARGET [--no-precopy]`.
pub fn migrate(name: &str, pid: u32, target: &str, precopy: bool) -> anyhow::Result<MigrationReport> {
    let paths = NodePaths::existing(name)?;
    Ok(control::migrate(&paths.control(), pid, target, precopy)?)
}

/// The summary `pmivmm migrate` prints.
pub fn describe(r: &MigrationReport) -> String {
    let rounds = if r.precopy_rounds.is_empty() {
        "no pre-copy".to_owned()
    } else {
        format!(
            "pre-copy {} rounds ({} pages) in {}",
            r.precopy_rounds.len(),
            r.precopy_rounds.iter().map(u64::to_string).collect::<Vec<_>>().join("+"),
            ms(r.precopy_us)
        )
    };
    let remote = if r.remote_pid == 0 { "(PID unknown: the link broke after the target started it)".to_owned() } else { format!("PID {}", r.remote_pid) };
    format!(
        "migrated PID {} ({}) to {} as {remote}: {rounds}; frozen {} ({} pages sent frozen, target restore {}); \
         {} bytes sent; total {}",
        r.pid,
        r.comm,
        r.target,
        ms(r.frozen_us),
        r.frozen_pages,
        ms(r.target_restore_us),
        r.bytes_sent,
        ms(r.total_us)
    )
}
