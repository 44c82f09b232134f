//! The process list, from one pass over /proc: `stat` and `cmdline` of
//! every process, and for user processes that could migrate `status`
//! (tracer), `maps` (shared memory), the fd links (sockets, devices) and
//! `timers` (POSIX timers).
//! Every read is an emulated syscall in the guest, so nothing else is read.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::{getpid, sysconf, SysconfVar};
use pmivmm_proto::{Migratability, MigrationObstacle, ProcessInfo};

use crate::deputy::deputies;
use crate::procfs::{count_posix_timers, deleted_file, field, nul_separated, read_into};

/// PF_KTHREAD in the flags field of /proc/PID/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Devices a migratable process may have open: the console and the
/// stateless ones.
const HARMLESS_DEVICES: [&str; 8] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/console",
    "/dev/tty",
    "/dev/ttyS0",
];

#[derive(Debug, thiserror::Error)]
#[error("cannot list /proc: {0}")]
pub struct PsError(io::Error);

/// What every process of the list is seen against.
struct Units {
    ms_per_tick: u64,
    page_size: u64,
    agent: u32,
    /// Deputies, and where their migrated processes run.
    deputies: BTreeMap<u32, String>,
}

pub fn list_processes() -> Result<Vec<ProcessInfo>, PsError> {
    let sysconf_or = |var, default| sysconf(var).ok().flatten().map_or(default, |v| v as u64);
    let units = Units {
        ms_per_tick: 1000 / sysconf_or(SysconfVar::CLK_TCK, 100).max(1),
        page_size: sysconf_or(SysconfVar::PAGE_SIZE, 4096),
        agent: getpid().as_raw() as u32,
        deputies: deputies(),
    };
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .map_err(PsError)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut buf = Vec::with_capacity(4096);
    // A process that exits during the scan is left out.
    Ok(pids
        .into_iter()
        .filter_map(|pid| inspect(pid, &units, &mut buf))
        .collect())
}

/// The fields of /proc/PID/stat that `ps` uses.
#[derive(Debug, PartialEq)]
struct Stat {
    comm: String,
    state: char,
    ppid: u32,
    flags: u64,
    ticks: u64,
    threads: u32,
    rss_pages: u64,
}

fn inspect(pid: u32, units: &Units, buf: &mut Vec<u8>) -> Option<ProcessInfo> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    read_into(&dir.join("stat"), buf).ok()?;
    let stat = parse_stat(&String::from_utf8_lossy(buf))?;
    let kernel_thread = stat.flags & PF_KTHREAD != 0;
    let argv = if kernel_thread || stat.state == 'Z' {
        Vec::new()
    } else {
        read_into(&dir.join("cmdline"), buf).ok()?;
        nul_separated(buf)
    };

    let mut obstacles = Vec::new();
    if pid == 1 {
        obstacles.push(MigrationObstacle::Init);
    }
    if pid == units.agent {
        obstacles.push(MigrationObstacle::Agent);
    }
    if kernel_thread {
        obstacles.push(MigrationObstacle::KernelThread);
    } else if stat.state == 'Z' {
        obstacles.push(MigrationObstacle::Zombie);
    } else if stat.threads > 1 {
        obstacles.push(MigrationObstacle::MultiThreaded {
            threads: stat.threads,
        });
    }
    // The deeper checks cost several syscalls per process: only for
    // processes that are otherwise candidates.
    if obstacles.is_empty() {
        if let Err(e) = resource_obstacles(&dir, buf, &mut obstacles) {
            if e.kind() == io::ErrorKind::NotFound {
                return None;
            }
            obstacles.push(MigrationObstacle::Uninspectable {
                error: e.to_string(),
            });
        }
    }

    Some(ProcessInfo {
        pid,
        ppid: stat.ppid,
        state: stat.state,
        comm: stat.comm,
        argv,
        cpu_time_ms: stat.ticks * units.ms_per_tick,
        rss_bytes: stat.rss_pages * units.page_size,
        migratable: if obstacles.is_empty() {
            Migratability::Migratable
        } else {
            Migratability::NotMigratable(obstacles)
        },
        remote: units.deputies.get(&pid).cloned(),
    })
}

/// Parses /proc/PID/stat; the command name may contain spaces and `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // Fields from the third (state) on, numbered as in proc(5) minus 3.
    let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some(Stat {
        comm,
        state: f.first()?.chars().next()?,
        ppid: num(1)? as u32,
        flags: num(6)?,
        ticks: num(11)? + num(12)?,
        threads: num(17)? as u32,
        rss_pages: num(21)?,
    })
}

/// Tracing, shared memory, open fds that cannot move, and POSIX timers.
fn resource_obstacles(
    dir: &Path,
    buf: &mut Vec<u8>,
    out: &mut Vec<MigrationObstacle>,
) -> io::Result<()> {
    read_into(&dir.join("status"), buf)?;
    let tracer = field(&String::from_utf8_lossy(buf), "TracerPid")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    if tracer != 0 {
        out.push(MigrationObstacle::Traced { tracer });
    }
    read_into(&dir.join("maps"), buf)?;
    out.extend(shared_memory(&String::from_utf8_lossy(buf)));
    let links = fs::read_dir(dir.join("fd"))?.filter_map(|e| {
        let e = e.ok()?;
        let fd = e.file_name().to_str()?.parse().ok()?;
        Some((
            fd,
            fs::read_link(e.path()).ok()?.to_string_lossy().into_owned(),
        ))
    });
    out.extend(fd_obstacles(links));
    read_into(&dir.join("timers"), buf)?;
    let count = count_posix_timers(&String::from_utf8_lossy(buf));
    if count > 0 {
        out.push(MigrationObstacle::PosixTimers { count });
    }
    Ok(())
}

/// Shared writable mappings in /proc/PID/maps text (one per path).
fn shared_memory(maps: &str) -> Vec<MigrationObstacle> {
    let mut paths = BTreeSet::new();
    let mut sysv = false;
    for line in maps.lines() {
        let mut fields = line.splitn(6, ' ');
        let perms = fields.nth(1).unwrap_or("");
        if !(perms.as_bytes().get(1) == Some(&b'w') && perms.as_bytes().get(3) == Some(&b's')) {
            continue;
        }
        let path = fields.nth(3).unwrap_or("").trim();
        if path.starts_with("/SYSV") {
            sysv = true;
        } else {
            paths.insert(if path.is_empty() { "[anonymous]" } else { path }.to_owned());
        }
    }
    let mut out: Vec<MigrationObstacle> = paths
        .into_iter()
        .map(|path| MigrationObstacle::SharedWritableMapping { path })
        .collect();
    if sysv {
        out.push(MigrationObstacle::SysvSharedMemory);
    }
    out
}

/// Sockets, devices, special and deleted files among the targets of
/// /proc/PID/fd links (by fd number). Regular files and pipes are fine.
fn fd_obstacles(links: impl Iterator<Item = (i32, String)>) -> Vec<MigrationObstacle> {
    let mut sockets = 0;
    let mut devices = BTreeSet::new();
    let mut special = BTreeSet::new();
    let mut deleted = BTreeMap::new();
    for (fd, link) in links {
        if let Some(path) = deleted_file(&link) {
            deleted.insert(fd, path.to_owned());
        } else if link.starts_with("socket:") {
            sockets += 1;
        } else if link.starts_with("/dev/") && !HARMLESS_DEVICES.contains(&link.as_str()) {
            devices.insert(link);
        } else if link.starts_with("anon_inode:") {
            special.insert(link);
        }
    }
    let mut out = Vec::new();
    if sockets > 0 {
        out.push(MigrationObstacle::Sockets { count: sockets });
    }
    if !devices.is_empty() {
        out.push(MigrationObstacle::Devices {
            paths: devices.into_iter().collect(),
        });
    }
    if !special.is_empty() {
        out.push(MigrationObstacle::SpecialFiles {
            kinds: special.into_iter().collect(),
        });
    }
    out.extend(
        deleted
            .into_iter()
            .map(|(fd, path)| MigrationObstacle::DeletedFile { fd, path }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let text = "42 (a) b (c)) S 7 42 42 0 -1 4194560 100 0 0 0 12 3 0 0 20 0 1 0 500 1234567 89 18446744073709551615";
        let stat = parse_stat(text).unwrap();
        assert_eq!(
            stat,
            Stat {
                comm: "a) b (c)".into(),
                state: 'S',
                ppid: 7,
                flags: 4194560,
                ticks: 15,
                threads: 1,
                rss_pages: 89
            }
        );
        assert!(parse_stat("42 (x) S 1").is_none());
    }

    #[test]
    fn finds_shared_writable_mappings() {
        let maps = "\
00400000-00401000 r-xp 00000000 08:01 1 /bin/true
7f00-7f01 rw-s 00000000 00:01 5 /dev/zero (deleted)
7f01-7f02 rw-s 00000000 00:01 6 /SYSV00000000 (deleted)
7f02-7f03 r--s 00000000 08:01 7 /usr/share/x
7f03-7f04 rw-p 00000000 00:00 0
7f04-7f05 rw-s 00000000 00:01 5 /dev/zero (deleted)
";
        assert_eq!(
            shared_memory(maps),
            [
                MigrationObstacle::SharedWritableMapping {
                    path: "/dev/zero (deleted)".into()
                },
                MigrationObstacle::SysvSharedMemory
            ]
        );
    }

    #[test]
    fn classifies_fds() {
        let links = [
            "/dev/null",
            "pipe:[1]",
            "socket:[2]",
            "socket:[3]",
            "/dev/vda",
            "anon_inode:[eventfd]",
            "/tmp/f",
            "/tmp/gone (deleted)",
        ];
        assert_eq!(
            fd_obstacles((0..).zip(links.iter().map(|s| s.to_string()))),
            [
                MigrationObstacle::Sockets { count: 2 },
                MigrationObstacle::Devices {
                    paths: vec!["/dev/vda".into()]
                },
                MigrationObstacle::SpecialFiles {
                    kinds: vec!["anon_inode:[eventfd]".into()]
                },
                MigrationObstacle::DeletedFile {
                    fd: 7,
                    path: "/tmp/gone".into()
                },
            ]
        );
    }
}
