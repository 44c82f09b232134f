//! What the engine reads from /proc: one read per file (syscalls are costly
//! in the guest), parsed by pure functions that the unit tests exercise.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use pmivmm_proto::image::{PROT_EXEC, PROT_READ, PROT_WRITE};

use crate::procfs::{count_posix_timers, field, read_into};

#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: cannot parse {what}")]
    Parse { path: PathBuf, what: &'static str },
    #[error("{path}: not valid UTF-8 ({what})")]
    NotUtf8 { path: PathBuf, what: &'static str },
}

fn proc_path(pid: i32, rel: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rel}"))
}

fn read(path: &Path) -> Result<Vec<u8>, ProcfsError> {
    let mut buf = Vec::new();
    read_into(path, &mut buf).map_err(|source| ProcfsError::Io {
        path: path.into(),
        source,
    })?;
    Ok(buf)
}

fn read_text(pid: i32, rel: &str) -> Result<(PathBuf, String), ProcfsError> {
    let path = proc_path(pid, rel);
    let bytes = read(&path)?;
    let text = String::from_utf8(bytes).map_err(|_| ProcfsError::NotUtf8 {
        path: path.clone(),
        what: "contents",
    })?;
    Ok((path, text))
}

/// The target of a /proc symlink (cwd, exe, fd/N), which must be UTF-8.
pub fn read_link(path: &Path) -> Result<String, ProcfsError> {
    let target = std::fs::read_link(path).map_err(|source| ProcfsError::Io {
        path: path.into(),
        source,
    })?;
    String::from_utf8(target.as_os_str().as_bytes().to_vec()).map_err(|_| ProcfsError::NotUtf8 {
        path: path.into(),
        what: "link target",
    })
}

pub fn link(pid: i32, rel: &str) -> Result<String, ProcfsError> {
    read_link(&proc_path(pid, rel))
}

/// The fields of /proc/PID/status the engine uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    /// The state letter (`R`, `S`, `Z`, `t`...).
    pub state: char,
    pub tracer_pid: i32,
    pub threads: u32,
    pub umask: u32,
    pub sig_ignored: u64,
    pub sig_caught: u64,
    /// Signals pending for the thread or the process (SigPnd | ShdPnd).
    pub sig_pending: u64,
}

pub fn status(pid: i32) -> Result<Status, ProcfsError> {
    let (path, text) = read_text(pid, "status")?;
    parse_status(&text).ok_or(ProcfsError::Parse {
        path,
        what: "status",
    })
}

pub fn parse_status(text: &str) -> Option<Status> {
    let hex = |key| u64::from_str_radix(field(text, key)?, 16).ok();
    Some(Status {
        name: field(text, "Name")?.to_string(),
        state: field(text, "State")?.chars().next()?,
        tracer_pid: field(text, "TracerPid")?.parse().ok()?,
        threads: field(text, "Threads")?.parse().ok()?,
        umask: u32::from_str_radix(field(text, "Umask")?, 8).ok()?,
        sig_ignored: hex("SigIgn")?,
        sig_caught: hex("SigCgt")?,
        sig_pending: hex("SigPnd")? | hex("ShdPnd")?,
    })
}

/// The fields of /proc/PID/stat the engine uses (numbered as in proc(5)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    pub flags: u64,
    /// The nice value (field 19), -20..19.
    pub nice: i32,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// `PF_KTHREAD` in the `flags` field.
pub const PF_KTHREAD: u64 = 0x0020_0000;

pub fn stat(pid: i32) -> Result<Stat, ProcfsError> {
    let (path, text) = read_text(pid, "stat")?;
    parse_stat(&text).ok_or(ProcfsError::Parse { path, what: "stat" })
}

fn parse_stat(text: &str) -> Option<Stat> {
    // comm (field 2) may hold spaces and parentheses: fields 3.. follow the
    // last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().skip(1).collect();
    // fields[0] is field 4 (ppid).
    let f = |n: usize| fields.get(n - 4).map(|f| f.parse().unwrap_or(0));
    Some(Stat {
        flags: f(9)?,
        nice: fields.get(19 - 4)?.parse().ok()?,
        start_code: f(26)?,
        end_code: f(27)?,
        start_stack: f(28)?,
        start_data: f(45)?,
        end_data: f(46)?,
        start_brk: f(47)?,
        arg_start: f(48)?,
        arg_end: f(49)?,
        env_start: f(50)?,
        env_end: f(51)?,
    })
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub prot: u8,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`), empty for anonymous memory.
    pub name: String,
}

impl MapsEntry {
    pub fn is_vdso_family(&self) -> bool {
        self.name == "[vdso]" || self.name.starts_with("[vvar")
    }
}

pub fn maps(pid: i32) -> Result<Vec<MapsEntry>, ProcfsError> {
    let (path, text) = read_text(pid, "maps")?;
    text.lines()
        .map(|line| {
            parse_maps_line(line).ok_or_else(|| ProcfsError::Parse {
                path: path.clone(),
                what: "maps line",
            })
        })
        .collect()
}

fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    // start-end perms offset dev inode [name]; the name may contain spaces.
    let mut parts = line.splitn(6, ' ');
    let (start, end) = parts.next()?.split_once('-')?;
    let perms = parts.next()?.as_bytes();
    let offset = parts.next()?;
    let _dev = parts.next()?;
    let inode = parts.next()?;
    let name = parts.next().unwrap_or("").trim_start();
    if perms.len() != 4 {
        return None;
    }
    let bit = |i: usize, c: u8, prot: u8| if perms[i] == c { prot } else { 0 };
    Some(MapsEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        prot: bit(0, b'r', PROT_READ) | bit(1, b'w', PROT_WRITE) | bit(2, b'x', PROT_EXEC),
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        name: name.to_string(),
    })
}

/// Position and open flags of a descriptor, from /proc/PID/fdinfo/N.
pub fn fdinfo(pid: i32, fd: i32) -> Result<(u64, i32), ProcfsError> {
    let (path, text) = read_text(pid, &format!("fdinfo/{fd}"))?;
    parse_fdinfo(&text).ok_or(ProcfsError::Parse {
        path,
        what: "fdinfo",
    })
}

fn parse_fdinfo(text: &str) -> Option<(u64, i32)> {
    let pos = field(text, "pos")?.parse().ok()?;
    let flags = i32::from_str_radix(field(text, "flags")?, 8).ok()?;
    Some((pos, flags))
}

/// The execution domain and flags of `personality(2)`, from
/// /proc/PID/personality (`%08x`).
pub fn personality(pid: i32) -> Result<u32, ProcfsError> {
    let (path, text) = read_text(pid, "personality")?;
    u32::from_str_radix(text.trim(), 16).map_err(|_| ProcfsError::Parse {
        path,
        what: "personality",
    })
}

/// How many POSIX timers (`timer_create`) the process has.
pub fn posix_timers(pid: i32) -> Result<u32, ProcfsError> {
    Ok(count_posix_timers(&read_text(pid, "timers")?.1))
}

/// The open descriptor numbers, ascending.
pub fn fd_numbers(pid: i32) -> Result<Vec<i32>, ProcfsError> {
    numeric_entries(&proc_path(pid, "fd"))
}

fn numeric_entries(dir: &Path) -> Result<Vec<i32>, ProcfsError> {
    let io_err = |source| ProcfsError::Io {
        path: dir.into(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        if let Some(n) = entry
            .map_err(io_err)?
            .file_name()
            .to_str()
            .and_then(|s| s.parse().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let text =
            "Name:\tcat (x)\nUmask:\t0027\nState:\tS (sleeping)\nTracerPid:\t0\nThreads:\t1\n\
                    SigPnd:\t0000000000000100\nShdPnd:\t0000000000004000\n\
                    SigIgn:\t0000000000001000\nSigCgt:\t0000000180000002\n";
        let s = parse_status(text).unwrap();
        assert_eq!(
            (s.name.as_str(), s.state, s.tracer_pid, s.threads),
            ("cat (x)", 'S', 0, 1)
        );
        assert_eq!(
            (s.umask, s.sig_ignored, s.sig_caught, s.sig_pending),
            (0o027, 0x1000, 0x1_8000_0002, 0x4100)
        );
    }

    #[test]
    fn parses_stat_with_a_hostile_comm() {
        let mut text = String::from("12 (a) b (c) S 1 12 12 0 -1 4194304");
        for n in 10..=52 {
            text.push_str(&format!(" {}", if n == 19 { -5 } else { n }));
        }
        let s = parse_stat(&text).unwrap();
        assert_eq!(s.nice, -5);
        assert_eq!(
            (s.flags, s.start_code, s.end_code, s.start_stack),
            (4194304, 26, 27, 28)
        );
        assert_eq!((s.start_data, s.start_brk, s.env_end), (45, 47, 51));
    }

    #[test]
    fn parses_maps_lines() {
        let e = parse_maps_line(
            "00400000-00401000 r-xp 00001000 fe:00 325843                     /bin/a b",
        )
        .unwrap();
        assert_eq!(
            (e.start, e.end, e.prot, e.shared, e.offset),
            (0x400000, 0x401000, 5, false, 0x1000)
        );
        assert_eq!((e.inode, e.name.as_str()), (325843, "/bin/a b"));
        let e =
            parse_maps_line("7f0000000000-7f0000001000 rw-s 00000000 00:01 7 /dev/zero (deleted)")
                .unwrap();
        assert!(e.shared && e.prot == 3);
        let e = parse_maps_line("7f0000000000-7f0000001000 ---p 00000000 00:00 0 ").unwrap();
        assert_eq!((e.prot, e.name.as_str()), (0, ""));
        assert!(parse_maps_line("garbage").is_none());
    }

    #[test]
    fn parses_fdinfo() {
        assert_eq!(
            parse_fdinfo("pos:\t4096\nflags:\t02102001\nmnt_id:\t25\n"),
            Some((4096, 0o2102001))
        );
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        assert!(status(me).unwrap().threads >= 1);
        assert!(stat(me).unwrap().start_code > 0);
        assert!(maps(std::process::id() as i32).unwrap().iter().any(|m| m.name == "[stack]"));
        assert!(fd_numbers(me).unwrap().contains(&0));
        // SAFETY: personality(0xffffffff) only reads the caller's persona.
        let own = unsafe { libc::personality(0xffff_ffff) };
        assert_eq!(personality(me).unwrap(), own as u32);
        assert_eq!(posix_timers(me).unwrap(), 0);
    }

    #[test]
    fn counts_posix_timers() {
        let text = "ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.7\nClockID: 1\n\
                    ID: 1\nsignal: 10/0000000000000000\nnotify: thread/tid.7\nClockID: 0\n";
        assert_eq!(count_posix_timers(text), 2);
        assert_eq!(count_posix_timers(""), 0);
    }
}
