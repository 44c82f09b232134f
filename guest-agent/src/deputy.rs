//! Deputies (openMosix's name): a process that migrated away leaves its
//! original behind, frozen, as its deputy on its home node. The deputy keeps
//! what the migrated process cannot take along: its PID, its parent (which
//! waits for it) and its stdio. It never runs its own code again: the
//! connection thread that froze it keeps it in a ptrace stop and
//!
//! - takes every signal sent to it, for the migrated process: every
//!   [`SIGNAL_POLL`] it peeks at the deputy's signal queues
//!   (`PTRACE_PEEKSIGINFO`; every [`STATUS_CHECK_EVERY`]th time it reads
//!   SigPnd/ShdPnd of /proc/PID/status instead, which also shows a signal
//!   the kernel could not queue an entry for) and dequeues what is pending
//!   inside the deputy with an injected zero-timeout `rt_sigtimedwait`
//!   (SIGSTOP, which that cannot take, is suppressed at its delivery to
//!   ptrace on the way). A
//!   SIGKILL kills the deputy; its pidfd reports that at once. Signals
//!   pending at the checkpoint travelled in the image: they are dropped,
//!   not forwarded twice;
//! - writes the migrated process's output to its own fds 1 and 2: the very
//!   open files (pipe, terminal or file), fetched once with
//!   `pidfd_getfd`;
//! - ends the way the migrated process ended, so that its parent's `wait`
//!   sees that status: `exit_group(code)` injected, or killed by the signal
//!   with its default action.
//!
//! All its signals are blocked from the start, so injected syscalls are
//! never interrupted by a handler. A process-global registry tells `Ps`
//! which processes are deputies and where their migrated selves run.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pmivmm_proto::image::{MAX_SIGNAL, PAGE_SIZE};
use pmivmm_proto::ExitStatus;

use crate::checkpoint::{
    injector_for, is_end, parse_status, untrace, wait_for_end, wait_raw_status, CheckpointError,
    InjectError, Injector, PtraceError, Tracee, SIGSET_LEN,
};
use crate::pidfd;

/// How often a deputy's pending signals are checked.
pub const SIGNAL_POLL: Duration = Duration::from_secs(1);

/// Every this many checks read /proc/PID/status, the others only peek at
/// the signal queues. Generating the status (~55 formatted lines) costs
/// ~20 ms of emulated guest kernel on the development hosts: read each
/// second, two deputies took ~4% of their home's vCPU (guest profile of an
/// idle home); two ptrace calls cost a small fraction of that. The status
/// also shows a signal without a queue entry (one the kernel could not
/// allocate an entry for), which peeking does not.
const STATUS_CHECK_EVERY: u32 = 10;

/// At most this many signals are taken from a deputy per check (the rest
/// at the next one).
const MAX_SIGNALS_PER_CHECK: usize = 64;

/// The scratch page mapped in the deputy for the arguments of injected
/// syscalls. A fresh anonymous page is zeroed, which is already the zero
/// timeout and a `SIG_DFL` `struct sigaction`; only the set is written.
const SCRATCH_SET: u64 = 0;
const SCRATCH_TIMEOUT: u64 = 8;
const SCRATCH_SIGACTION: u64 = 32;

/// Signals whose default action does not end a process.
const NOT_FATAL: [i32; 8] = [
    libc::SIGCHLD,
    libc::SIGCONT,
    libc::SIGURG,
    libc::SIGWINCH,
    libc::SIGSTOP,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

#[derive(Debug, thiserror::Error)]
pub enum DeputyError {
    #[error("cannot open a pidfd of PID {pid}: {errno}")]
    Pidfd { pid: i32, errno: Errno },
    #[error("cannot read /proc/{pid}/status of the deputy: {source}")]
    Status { pid: i32, source: io::Error },
    #[error("cannot parse /proc/{pid}/status of the deputy")]
    StatusParse { pid: i32 },
    #[error("a deputy writes output to fd 1 or 2, not {0}")]
    BadFd(u8),
    #[error("signal {0} cannot end a process (its default action does not kill)")]
    NotFatal(i32),
    #[error("cannot send signal {signal} to deputy PID {pid}: {errno}")]
    Kill { pid: i32, signal: i32, errno: Errno },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
}

impl DeputyError {
    /// Whether the error says that the deputy is gone (it was killed).
    fn is_gone(&self) -> bool {
        matches!(
            self,
            DeputyError::Ptrace(PtraceError::Gone { .. })
                | DeputyError::Inject(InjectError::Ptrace(PtraceError::Gone { .. }))
        )
    }
}

/// PID → the node the migrated process of that deputy runs on.
static REGISTRY: Mutex<BTreeMap<u32, String>> = Mutex::new(BTreeMap::new());

fn registry() -> MutexGuard<'static, BTreeMap<u32, String>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The deputies of this node: PID → the node their migrated process runs
/// on.
pub fn deputies() -> BTreeMap<u32, String> {
    registry().clone()
}

/// A deputy, held by the connection thread that froze it.
pub struct Deputy {
    tracee: Tracee,
    /// Where its migrated process runs.
    node: String,
    injector: Injector,
    /// Readable once it has died.
    pidfd: OwnedFd,
    /// Its /proc/PID/status, re-read with pread.
    status: File,
    /// Signals pending at the checkpoint, carried by the image: dropped
    /// (once each) when taken.
    carried: Vec<i32>,
    /// The scratch page, once mapped.
    scratch: Option<u64>,
    /// Its fds 1 and 2 once fetched (`None` inside: it has no such fd).
    stdio: [Option<Option<File>>; 2],
    /// It has ended (and its tracing with it).
    ended: bool,
    /// Signal checks so far.
    checks: u32,
}

impl Deputy {
    /// Turns `pid`, frozen by a checkpoint of this thread, into the deputy
    /// of its migrated self on `node`. `carried`: the signals pending in it
    /// at the checkpoint.
    pub fn new(pid: i32, carried: Vec<i32>, node: String) -> Result<Deputy, DeputyError> {
        let tracee = Tracee {
            pid: nix::unistd::Pid::from_raw(pid),
        };
        let pidfd = pidfd::open(pid).map_err(|errno| DeputyError::Pidfd { pid, errno })?;
        let status = File::open(format!("/proc/{pid}/status"))
            .map_err(|source| DeputyError::Status { pid, source })?;
        let injector = injector_for(tracee)?;
        tracee.set_sigmask(!0)?;
        registry().insert(pid as u32, node.clone());
        Ok(Deputy {
            tracee,
            node,
            injector,
            pidfd,
            status,
            carried,
            scratch: None,
            stdio: [None, None],
            ended: false,
            checks: 0,
        })
    }

    pub fn pid(&self) -> i32 {
        self.tracee.pid.as_raw()
    }

    /// Its migrated process now runs on `node`.
    pub fn moved(&mut self, node: String) {
        registry().insert(self.pid() as u32, node.clone());
        self.node = node;
    }

    /// What to poll while it lives: readable once it has died.
    pub fn watched(&self) -> Option<BorrowedFd<'_>> {
        (!self.ended).then(|| self.pidfd.as_fd())
    }

    /// The signals sent to the deputy since the last call, taken from it
    /// (it does not get them), with SIGKILL last if it was killed: it has
    /// ended then.
    pub fn take_signals(&mut self) -> Result<Vec<i32>, DeputyError> {
        if self.ended {
            return Ok(Vec::new());
        }
        let mut taken = Vec::new();
        let alive = match self.pending()? {
            None => false,
            Some(0) => true,
            Some(pending) => match self.dequeue(pending, &mut taken) {
                Ok(()) => true,
                Err(e) if e.is_gone() => false,
                Err(e) => return Err(e),
            },
        };
        taken.retain(|&signal| !self.was_carried(signal));
        if !alive {
            // Its end is queued for us, the tracer.
            let _ = wait_for_end(self.tracee.pid);
            self.end();
            taken.push(libc::SIGKILL);
        }
        Ok(taken)
    }

    /// Its pending signals (thread and process); `None` once it has died.
    fn pending(&mut self) -> Result<Option<u64>, DeputyError> {
        self.checks = self.checks.wrapping_add(1);
        if !self.checks.is_multiple_of(STATUS_CHECK_EVERY) {
            return self.queued();
        }
        let pid = self.pid();
        // SigPnd and ShdPnd come early in the file.
        let mut buf = [0u8; 4096];
        let n = match self.status.read_at(&mut buf, 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(source) => return Err(DeputyError::Status { pid, source }),
        };
        let status = parse_status(&String::from_utf8_lossy(&buf[..n]))
            .ok_or(DeputyError::StatusParse { pid })?;
        Ok((!matches!(status.state, 'Z' | 'X')).then_some(status.sig_pending))
    }

    /// The signals of its queue entries (thread and process); `None` once
    /// it has died.
    fn queued(&self) -> Result<Option<u64>, DeputyError> {
        let mut set = 0;
        for shared in [false, true] {
            match self.tracee.pending(shared) {
                Ok(queued) => {
                    for info in queued.iter().filter(|i| (1..=MAX_SIGNAL).contains(&i.signo)) {
                        set |= signal_bit(info.signo as i32);
                    }
                }
                Err(PtraceError::Call { errno: Errno::ESRCH, .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(set))
    }

    /// Dequeues the `pending` signals inside the deputy into `taken`.
    fn dequeue(&mut self, pending: u64, taken: &mut Vec<i32>) -> Result<(), DeputyError> {
        let scratch = self.scratch(taken)?;
        let set = pending & !(signal_bit(libc::SIGKILL) | signal_bit(libc::SIGSTOP));
        self.injector
            .poke(scratch + SCRATCH_SET, &set.to_ne_bytes())?;
        let args = [
            scratch + SCRATCH_SET,
            0,
            scratch + SCRATCH_TIMEOUT,
            SIGSET_LEN,
        ];
        for _ in 0..MAX_SIGNALS_PER_CHECK {
            let r = self.injector.call_passing_signals(
                || "rt_sigtimedwait".into(),
                libc::SYS_rt_sigtimedwait,
                &args,
                &mut |signal| taken.push(signal as i32),
            );
            match r {
                Ok(signal) => taken.push(signal as i32),
                // None left.
                Err(InjectError::Failed {
                    errno: Errno::EAGAIN,
                    ..
                }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The scratch page, mapped on first use. Signals delivered meanwhile
    /// go to `taken`.
    fn scratch(&mut self, taken: &mut Vec<i32>) -> Result<u64, DeputyError> {
        if let Some(scratch) = self.scratch {
            return Ok(scratch);
        }
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let scratch = self.injector.call_passing_signals(
            || "mmap of a scratch page".into(),
            libc::SYS_mmap,
            &[0, PAGE_SIZE, prot, flags, u64::MAX, 0],
            &mut |signal| taken.push(signal as i32),
        )?;
        self.scratch = Some(scratch);
        Ok(scratch)
    }

    /// Whether `signal` is one of those the image carried (each counts
    /// once).
    fn was_carried(&mut self, signal: i32) -> bool {
        match self.carried.iter().position(|&s| s == signal) {
            Some(i) => {
                self.carried.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Writes `data` to the deputy's own fd `fd` (1 or 2). Output for an fd
    /// it does not have, for a reader that is gone (EPIPE) or for an ended
    /// deputy is dropped.
    pub fn output(&mut self, fd: u8, data: &[u8]) -> Result<(), DeputyError> {
        let slot = match fd {
            1 | 2 => usize::from(fd - 1),
            _ => return Err(DeputyError::BadFd(fd)),
        };
        if self.ended {
            return Ok(());
        }
        let pid = self.pid();
        let file = self.stdio[slot].get_or_insert_with(|| {
            match pidfd::get_fd(self.pidfd.as_fd(), fd.into()) {
                Ok(file) => Some(File::from(file)),
                Err(e) => {
                    eprintln!(
                        "pmivmm-agent: deputy PID {pid} has no fd {fd} ({e}): the output of its \
                         migrated process to it is dropped"
                    );
                    None
                }
            }
        });
        if let Some(file) = file {
            match write_all(file, data) {
                Err(e) if e.raw_os_error() != Some(libc::EPIPE) => eprintln!(
                    "pmivmm-agent: deputy PID {pid}: cannot write to its fd {fd}: {e}; output \
                     dropped"
                ),
                _ => {}
            }
        }
        Ok(())
    }

    /// Ends the deputy the way its migrated process ended; returns once it
    /// is gone (at once if it was killed before). A signal that cannot end
    /// a process is refused, the deputy untouched.
    pub fn exit(&mut self, status: ExitStatus) -> Result<(), DeputyError> {
        if self.ended {
            return Ok(());
        }
        // Signals sent now have no process to go to: it has ended.
        let ignore = &mut |_| {};
        match status {
            ExitStatus::Code(code) => {
                self.injector
                    .call_final(libc::SYS_exit_group, &[code as u64], ignore)?;
            }
            ExitStatus::Signal {
                signal,
                core_dumped,
            } => self.kill_by(signal, core_dumped)?,
        }
        self.end();
        Ok(())
    }

    /// Ends the deputy by `signal` with its default action. Unless the
    /// migrated process dumped core, the deputy must not either (its memory
    /// is stale): its core size limit becomes 0.
    fn kill_by(&mut self, signal: i32, core_dumped: bool) -> Result<(), DeputyError> {
        if !(1..=MAX_SIGNAL as i32).contains(&signal) || NOT_FATAL.contains(&signal) {
            return Err(DeputyError::NotFatal(signal));
        }
        let pid = self.pid();
        if signal != libc::SIGKILL {
            let scratch = self.scratch(&mut Vec::new())?;
            self.injector.call_passing_signals(
                || format!("rt_sigaction({signal}, SIG_DFL)"),
                libc::SYS_rt_sigaction,
                &[signal as u64, scratch + SCRATCH_SIGACTION, 0, SIGSET_LEN],
                &mut |_| {},
            )?;
            if !core_dumped {
                let none = libc::rlimit64 {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: prlimit64 reads one valid rlimit64 and writes
                // nothing.
                let rc =
                    unsafe { libc::prlimit64(pid, libc::RLIMIT_CORE, &none, std::ptr::null_mut()) };
                if rc < 0 {
                    eprintln!(
                        "pmivmm-agent: deputy PID {pid}: cannot forbid a core dump: {}",
                        Errno::last()
                    );
                }
            }
            self.tracee.set_sigmask(!signal_bit(signal))?;
        }
        // SAFETY: kill takes plain integers.
        if unsafe { libc::kill(pid, signal) } < 0 {
            let errno = Errno::last();
            return Err(DeputyError::Kill { pid, signal, errno });
        }
        // Resume it: it stops once more, to deliver `signal` (ptrace sees
        // every signal first), which then takes its default action.
        let mut pass = 0;
        loop {
            match self.tracee.cont_with(pass) {
                // Dying already (SIGKILL).
                Ok(())
                | Err(PtraceError::Call {
                    errno: Errno::ESRCH,
                    ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
            let raw = wait_raw_status(self.tracee.pid).map_err(|errno| PtraceError::Call {
                op: "wait",
                pid,
                errno,
            })?;
            if is_end(raw) {
                untrace(self.tracee.pid);
                return Ok(());
            }
            let delivering = raw >> 16 == 0 && libc::WSTOPSIG(raw) == signal;
            pass = if delivering { signal } else { 0 };
        }
    }

    /// Kills the deputy (SIGKILL), saying why.
    pub fn kill(&mut self, why: &str) {
        if !self.ended {
            eprintln!(
                "pmivmm-agent: killing deputy PID {} of the process migrated to {}: {why}",
                self.pid(),
                self.node
            );
            self.tracee.kill();
            self.end();
        }
    }

    fn end(&mut self) {
        self.ended = true;
        registry().remove(&(self.pid() as u32));
    }
}

impl Drop for Deputy {
    fn drop(&mut self) {
        self.kill("its host connection closed before DeputyExit: the process lost its home");
    }
}

/// The bit of `signal` in a signal set.
fn signal_bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

/// Writes all of `data`, waiting for room if the open file (which the
/// deputy may have made non-blocking) has none.
fn write_all(mut file: &File, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
