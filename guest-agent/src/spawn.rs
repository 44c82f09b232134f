//! Starting a program with `posix_spawn` (a vfork-style clone plus exec:
//! far cheaper than fork in the emulated guest kernel, and unlike
//! `std::process::Command` it never waits for the child itself, which would
//! race with the reaper).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::priority;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("empty argv")]
    EmptyArgv,
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("{program}: not found in PATH {path}")]
    NotFound { program: String, path: String },
    #[error("cannot start {program}: {errno}")]
    Spawn { program: String, errno: Errno },
}

/// What to start, and where its standard fds come from.
pub struct Program<'a> {
    pub argv: &'a [String],
    /// Complete environment, `KEY=VALUE`.
    pub env: &'a [String],
    pub cwd: Option<&'a str>,
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
}

/// Starts `prog` as the leader of a new session, with default signal
/// dispositions and an empty signal mask. Returns its PID.
pub fn spawn(prog: &Program<'_>) -> Result<i32, SpawnError> {
    let name = prog.argv.first().ok_or(SpawnError::EmptyArgv)?;
    let path = resolve(name, prog.env)?;
    let path = cstring(path.to_string_lossy().into_owned())?;
    let argv = prog
        .argv
        .iter()
        .cloned()
        .map(cstring)
        .collect::<Result<Vec<_>, _>>()?;
    let env = prog
        .env
        .iter()
        .cloned()
        .map(cstring)
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = prog.cwd.map(|c| cstring(c.to_owned())).transpose()?;
    let fail = |errno| SpawnError::Spawn {
        program: name.clone(),
        errno,
    };

    let mut actions = FileActions::new().map_err(fail)?;
    for (fd, target) in [(prog.stdin, 0), (prog.stdout, 1), (prog.stderr, 2)] {
        actions.dup2(fd.as_raw_fd(), target).map_err(fail)?;
    }
    if let Some(cwd) = &cwd {
        actions.chdir(cwd).map_err(fail)?;
    }
    let attr = Attributes::new(&Signals::Program).map_err(fail)?;
    let pid = posix_spawn(&path, &argv, &env, &actions, &attr).map_err(fail)?;
    // posix_spawn cannot set a nice value: the program starts at the
    // agent's and is put back at once (it may have exited already).
    if let Err(e) = priority::set_nice(pid, 0) {
        if e != Errno::ESRCH {
            eprintln!("pmivmm-agent: cannot set the priority of PID {pid}: {e}");
        }
    }
    Ok(pid)
}

/// The busybox of the node image and the list of its applets, one name per
/// line (images/build.sh). The image has no symlink per applet: each costs a
/// path walk and an inode in the emulated guest kernel while the initramfs
/// is unpacked (~270 of them, seconds of boot on the development hosts).
const BUSYBOX: &str = "/bin/busybox";
const BUSYBOX_APPLETS: &str = "/etc/busybox.applets";

/// Finds `program` like a shell does: as given if it contains a `/`,
/// otherwise in the `PATH` of the program's own environment, and failing
/// that as a busybox applet (busybox picks the applet from argv[0]).
fn resolve(program: &str, env: &[String]) -> Result<PathBuf, SpawnError> {
    resolve_with(program, env, Path::new(BUSYBOX_APPLETS), Path::new(BUSYBOX))
}

fn resolve_with(
    program: &str,
    env: &[String],
    applets: &Path,
    busybox: &Path,
) -> Result<PathBuf, SpawnError> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("");
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .or_else(|| is_applet(program, applets).then(|| busybox.to_path_buf()))
        .ok_or_else(|| SpawnError::NotFound {
            program: program.to_owned(),
            path: path.to_owned(),
        })
}

fn is_applet(program: &str, applets: &Path) -> bool {
    std::fs::read_to_string(applets).is_ok_and(|list| list.lines().any(|l| l == program))
}

fn cstring(s: String) -> Result<CString, SpawnError> {
    CString::new(s)
        .map_err(|e| SpawnError::Nul(String::from_utf8_lossy(&e.into_vec()).into_owned()))
}

/// `posix_spawn(3)`: starts `path` with `argv` and the complete
/// environment `env`. Returns the child's PID.
pub(crate) fn posix_spawn(
    path: &CStr,
    argv: &[CString],
    env: &[CString],
    actions: &FileActions,
    attr: &Attributes,
) -> Result<i32, Errno> {
    let argv_ptrs = null_terminated(argv);
    let env_ptrs = null_terminated(env);
    let mut pid = 0;
    // SAFETY: every pointer is valid for the call: path and the NULL
    // terminated argv/env arrays point into CStrings that outlive it, and
    // actions/attr are initialised objects owned by the caller.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attr.0,
            argv_ptrs.as_ptr(),
            env_ptrs.as_ptr(),
        )
    };
    check(rc)?;
    Ok(pid)
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain([std::ptr::null_mut()])
        .collect()
}

fn check(rc: libc::c_int) -> Result<(), Errno> {
    match rc {
        0 => Ok(()),
        errno => Err(Errno::from_raw(errno)),
    }
}

/// An initialised `posix_spawn_file_actions_t`.
pub(crate) struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    pub(crate) fn new() -> Result<Self, Errno> {
        // SAFETY: an all-zero value is a valid argument to ..._init, which
        // initialises it.
        let mut actions = FileActions(unsafe { std::mem::zeroed() });
        // SAFETY: a valid pointer to an uninitialised actions object.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut actions.0) })?;
        Ok(actions)
    }

    pub(crate) fn dup2(&mut self, fd: libc::c_int, target: libc::c_int) -> Result<(), Errno> {
        // SAFETY: self.0 is initialised; fds are plain integers here.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, target) })
    }

    fn chdir(&mut self, dir: &CStr) -> Result<(), Errno> {
        // SAFETY: self.0 is initialised; glibc copies the path string.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: self.0 was initialised by new() and is destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// The signal state a spawned child starts with.
pub(crate) enum Signals {
    /// A program the agent runs: leader of a new session, empty signal
    /// mask, every signal at its default disposition (the Rust runtime
    /// ignores SIGPIPE in the agent, and an agent started with a signal
    /// ignored, as under nohup, would pass that on: a hang-up of the exec
    /// did not end it).
    Program,
    /// The child a restore builds a process in: the agent's session, every
    /// signal blocked and at its default disposition.
    Restore,
}

/// An initialised `posix_spawnattr_t`.
pub(crate) struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    pub(crate) fn new(signals: &Signals) -> Result<Self, Errno> {
        // SAFETY: an all-zero value is a valid argument to ..._init.
        let mut attr = Attributes(unsafe { std::mem::zeroed() });
        // SAFETY: a valid pointer to an uninitialised attribute object.
        check(unsafe { libc::posix_spawnattr_init(&mut attr.0) })?;
        // SAFETY: sigset_t values are written by sigemptyset/sigfillset
        // before use.
        let (mut mask, mut default): (libc::sigset_t, libc::sigset_t) = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to local sigsets and to the initialised
        // attribute object; the flags are valid POSIX_SPAWN_* bits.
        unsafe {
            let mut flags = (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short;
            match signals {
                Signals::Program => {
                    libc::sigemptyset(&mut mask);
                    libc::sigfillset(&mut default);
                    flags |= libc::POSIX_SPAWN_SETSID;
                }
                Signals::Restore => {
                    libc::sigfillset(&mut mask);
                    libc::sigfillset(&mut default);
                }
            }
            check(libc::posix_spawnattr_setsigmask(&mut attr.0, &mask))?;
            check(libc::posix_spawnattr_setsigdefault(&mut attr.0, &default))?;
            check(libc::posix_spawnattr_setflags(&mut attr.0, flags))?;
        }
        Ok(attr)
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: self.0 was initialised by new() and is destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_searches_the_programs_path() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_owned()];
        assert!(resolve("sh", &env).unwrap().ends_with("sh"));
        assert_eq!(resolve("./x", &env).unwrap(), PathBuf::from("./x"));
        let err = resolve("no-such-program-pmivmm", &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no-such-program-pmivmm: not found in PATH /nonexistent:/bin:/usr/bin"
        );
    }

    #[test]
    fn resolve_falls_back_to_a_busybox_applet() {
        let dir = std::env::temp_dir().join(format!("pmivmm-applets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("applets");
        std::fs::write(&list, "ls\nmy-applet\n").unwrap();
        let env = vec!["PATH=/nonexistent".to_owned()];
        let bb = Path::new("/bin/busybox");
        assert_eq!(resolve_with("my-applet", &env, &list, bb).unwrap(), bb);
        // Not an applet (a prefix is not a match), or no list: not found.
        assert!(resolve_with("my-app", &env, &list, bb).is_err());
        assert!(resolve_with("ls", &env, &dir.join("missing"), bb).is_err());
        // PATH wins over the applet list.
        let env = vec!["PATH=/bin".to_owned()];
        assert_ne!(resolve_with("sh", &env, &list, bb).unwrap(), bb);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
