//! The node's load: /proc/loadavg (load averages, runnable and total
//! tasks; the agent's own running threads are not counted), /proc/meminfo
//! and the online CPU count.

use std::io;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::unistd::{sysconf, SysconfVar};
use pmivmm_proto::LoadInfo;

use crate::procfs::{field, read_into};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: &'static str,
        source: io::Error,
    },
    #[error("cannot parse {file}: {text:?}")]
    Parse { file: &'static str, text: String },
}

pub fn load() -> Result<LoadInfo, LoadError> {
    let mut buf = Vec::new();
    let loadavg = read_text("/proc/loadavg", &mut buf)?;
    let mut info = parse_loadavg(&loadavg).ok_or_else(|| LoadError::Parse {
        file: "/proc/loadavg",
        text: loadavg.clone(),
    })?;
    // The agent's own running threads (this one at least) are no load.
    info.runnable_tasks = info.runnable_tasks.saturating_sub(own_running_threads(&mut buf));
    (info.mem_total_bytes, info.mem_free_bytes, info.mem_available_bytes) = memory(&mut buf)?;
    info.cpus = online_cpus();
    Ok(info)
}

/// How long a reading of /proc/meminfo is reused: the balancer asks for the
/// load a few times a second, and generating meminfo (~50 formatted lines)
/// is the dearest part of the answer in an emulated guest kernel, while a
/// node's memory use changes slowly.
const MEMINFO_REUSE: Duration = Duration::from_secs(2);

/// Total, free and available memory in bytes, from /proc/meminfo.
fn memory(buf: &mut Vec<u8>) -> Result<(u64, u64, u64), LoadError> {
    static LAST: Mutex<Option<(Instant, (u64, u64, u64))>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((at, memory)) = *last {
        if at.elapsed() < MEMINFO_REUSE {
            return Ok(memory);
        }
    }
    let meminfo = read_text("/proc/meminfo", buf)?;
    let kib = |key| -> Result<u64, LoadError> {
        field(&meminfo, key)
            .and_then(|v| v.strip_suffix(" kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|v| v * 1024)
            .ok_or_else(|| LoadError::Parse {
                file: "/proc/meminfo",
                text: format!("no {key} line"),
            })
    };
    let memory = (kib("MemTotal")?, kib("MemFree")?, kib("MemAvailable")?);
    *last = Some((Instant::now(), memory));
    Ok(memory)
}

/// How many of the agent's threads are running or runnable (state `R` in
/// /proc/self/task/TID/stat); at least 1, the caller.
fn own_running_threads(buf: &mut Vec<u8>) -> u32 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 1 };
    let running = tasks
        .flatten()
        .filter(|task| {
            read_into(&task.path().join("stat"), buf).is_ok() && stat_state(&String::from_utf8_lossy(buf)) == Some('R')
        })
        .count() as u32;
    running.max(1)
}

/// The state letter of a /proc stat line (after the comm's last `)`).
fn stat_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The online CPU count, read once (sysconf reads a sysfs file each time,
/// and a node's CPUs do not change).
fn online_cpus() -> u32 {
    static CPUS: OnceLock<u32> = OnceLock::new();
    *CPUS.get_or_init(|| sysconf(SysconfVar::_NPROCESSORS_ONLN).ok().flatten().unwrap_or(1) as u32)
}

fn read_text(file: &'static str, buf: &mut Vec<u8>) -> Result<String, LoadError> {
    read_into(Path::new(file), buf).map_err(|source| LoadError::Read { file, source })?;
    Ok(String::from_utf8_lossy(buf).into_owned())
}

/// Parses `0.50 0.25 0.12 2/130 4567`; memory and CPU fields are left 0.
fn parse_loadavg(text: &str) -> Option<LoadInfo> {
    let mut fields = text.split_whitespace();
    let mut avg = [0f32; 3];
    for a in &mut avg {
        *a = fields.next()?.parse().ok()?;
    }
    let (runnable, total) = fields.next()?.split_once('/')?;
    Some(LoadInfo {
        load_avg: avg,
        runnable_tasks: runnable.parse().ok()?,
        total_tasks: total.parse().ok()?,
        cpus: 0,
        mem_total_bytes: 0,
        mem_free_bytes: 0,
        mem_available_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_of_a_stat_line() {
        assert_eq!(stat_state("17 (connection) R 1 1 0"), Some('R'));
        assert_eq!(stat_state("18 (a) b) S 1"), Some('S'));
        assert_eq!(stat_state("garbage"), None);
        // This test's own thread runs.
        assert!(own_running_threads(&mut Vec::new()) >= 1);
    }

    #[test]
    fn parses_loadavg() {
        let info = parse_loadavg("0.50 0.25 0.12 2/130 4567\n").unwrap();
        assert_eq!(info.load_avg, [0.5, 0.25, 0.12]);
        assert_eq!((info.runnable_tasks, info.total_tasks), (2, 130));
        assert!(parse_loadavg("0.50 0.25").is_none());
        assert!(parse_loadavg("a b c 1/2 3").is_none());
    }

    #[test]
    fn reads_this_machines_load() {
        let info = load().unwrap();
        assert!(info.cpus >= 1 && info.total_tasks >= 1);
        assert!(info.mem_total_bytes >= info.mem_available_bytes && info.mem_available_bytes > 0);
    }
}
