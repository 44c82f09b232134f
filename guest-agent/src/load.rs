//! The node's load, from /proc/pmivmm_load (guest kernel patch 0011): the
//! runnable threads of user space other than the agent's, counted by the
//! kernel, with the load averages, the thread count and the memory figures,
//! in one small read (the balancer asks every 2 s, and each file read costs
//! an emulated guest kernel milliseconds), and the online CPU count.

use std::io;
use std::path::Path;
use std::sync::OnceLock;

use nix::unistd::{sysconf, SysconfVar};
use pmivmm_proto::LoadInfo;

use crate::procfs::read_into;

const LOAD_FILE: &str = "/proc/pmivmm_load";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {LOAD_FILE} (a guest kernel without pmivmm patch 0011?): {0}")]
    Read(io::Error),
    #[error("cannot parse {LOAD_FILE}: {0:?}")]
    Parse(String),
}

pub fn load() -> Result<LoadInfo, LoadError> {
    let mut buf = Vec::new();
    read_into(Path::new(LOAD_FILE), &mut buf).map_err(LoadError::Read)?;
    let text = String::from_utf8_lossy(&buf);
    let mut info = parse_load(&text).ok_or_else(|| LoadError::Parse(text.into_owned()))?;
    info.cpus = online_cpus();
    Ok(info)
}

/// Parses the `key value...` lines of /proc/pmivmm_load (memory in kB); the
/// CPU count is left 0.
fn parse_load(text: &str) -> Option<LoadInfo> {
    let values = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' '));
    let number = |key: &str| values(key)?.trim().parse::<u64>().ok();
    let kib = |key: &str| number(key)?.checked_mul(1024);
    let mut avg = [0f32; 3];
    let mut averages = values("load")?.split_whitespace();
    for a in &mut avg {
        *a = averages.next()?.parse().ok()?;
    }
    Some(LoadInfo {
        load_avg: avg,
        runnable_tasks: number("runnable")?.try_into().ok()?,
        total_tasks: number("tasks")?.try_into().ok()?,
        cpus: 0,
        mem_total_bytes: kib("mem_total")?,
        mem_free_bytes: kib("mem_free")?,
        mem_available_bytes: kib("mem_available")?,
    })
}

/// The online CPU count, read once (sysconf reads a sysfs file each time,
/// and a node's CPUs do not change).
fn online_cpus() -> u32 {
    static CPUS: OnceLock<u32> = OnceLock::new();
    *CPUS.get_or_init(|| sysconf(SysconfVar::_NPROCESSORS_ONLN).ok().flatten().unwrap_or(1) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "load 0.50 0.25 0.12\nrunnable 2\ntasks 130\nmem_total 241664\nmem_free 233472\nmem_available 215756\n";

    #[test]
    fn parses_the_load_file() {
        let info = parse_load(SAMPLE).unwrap();
        assert_eq!(info.load_avg, [0.5, 0.25, 0.12]);
        assert_eq!((info.runnable_tasks, info.total_tasks), (2, 130));
        assert_eq!(
            (info.mem_total_bytes, info.mem_free_bytes, info.mem_available_bytes),
            (241664 * 1024, 233472 * 1024, 215756 * 1024)
        );
    }

    #[test]
    fn refuses_a_load_file_with_a_line_missing_or_garbled() {
        for line in SAMPLE.lines() {
            let without: String = SAMPLE.lines().filter(|l| *l != line).map(|l| format!("{l}\n")).collect();
            assert!(parse_load(&without).is_none(), "parsed without {line:?}");
        }
        assert!(parse_load(&SAMPLE.replace("runnable 2", "runnable two")).is_none());
        assert!(parse_load(&SAMPLE.replace("load 0.50 0.25 0.12", "load 0.50 0.25")).is_none());
        assert!(parse_load(&SAMPLE.replace("runnable 2", "runnable 99999999999")).is_none());
        // A key is a whole word: `runnable_x 5` is not `runnable`.
        assert!(parse_load(&SAMPLE.replace("runnable 2", "runnable_x 5")).is_none());
    }
}
