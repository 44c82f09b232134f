//! Reading /proc files with as few syscalls as possible (open, read until
//! end of file, close: no stat, no small probe reads).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Reads the whole file at `path` into `buf` (cleared first).
pub fn read_into(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    let mut file = File::open(path)?;
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(buf.capacity().max(4096));
        }
        let start = buf.len();
        buf.resize(buf.capacity(), 0);
        match file.read(&mut buf[start..]) {
            Ok(0) => {
                buf.truncate(start);
                return Ok(());
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(e) => {
                buf.truncate(start);
                return Err(e);
            }
        }
    }
}

/// NUL-separated strings (an argument or environment area), lossily
/// decoded, empty ones dropped: information for `ps` and the image, never
/// used to restore.
pub fn nul_separated(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The value of a `Key:   value` line (as in /proc/meminfo, status).
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// The path of a file that was deleted while open, from the target of its
/// /proc/PID/fd link (`/path (deleted)`).
pub fn deleted_file(link: &str) -> Option<&str> {
    link.strip_suffix(" (deleted)")
        .filter(|p| p.starts_with('/'))
}

/// The number of POSIX timers in /proc/PID/timers (one `ID:` line each).
pub fn count_posix_timers(text: &str) -> u32 {
    text.lines().filter(|line| line.starts_with("ID:")).count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_files_are_recognised() {
        assert_eq!(deleted_file("/share/x (deleted)"), Some("/share/x"));
        assert_eq!(deleted_file("/share/x"), None);
        assert_eq!(deleted_file("anon_inode:[x] (deleted)"), None);
    }

    #[test]
    fn read_into_reads_files_larger_than_one_read() {
        let mut buf = Vec::new();
        read_into(Path::new("/proc/self/maps"), &mut buf).unwrap();
        assert!(buf.ends_with(b"\n"));
        let big = std::env::temp_dir().join(format!("pmivmm-procfs-{}", std::process::id()));
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        std::fs::write(&big, &data).unwrap();
        read_into(&big, &mut buf).unwrap();
        std::fs::remove_file(&big).unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn field_finds_keyed_values() {
        let text = "MemTotal:  100 kB\nTracerPid:\t0\n";
        assert_eq!(field(text, "MemTotal"), Some("100 kB"));
        assert_eq!(field(text, "TracerPid"), Some("0"));
        assert_eq!(field(text, "Mem"), None);
    }
}
