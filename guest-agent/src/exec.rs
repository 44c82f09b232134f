//! One exec session: a spawned process whose output is streamed to the
//! client as it comes and whose exit status ends the stream. A migrated
//! process restored with forwarded stdio streams the same way
//! ([`Exec::forward_restored`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{pipe2, Pid};
use pmivmm_proto::frame::FrameError;
use pmivmm_proto::{ExecRequest, ExitStatus, Response};

use crate::pidfd;
use crate::reaper::reaper;
use crate::sink::ResponseSink;
use crate::spawn::{spawn, Program, SpawnError};

/// The environment every exec starts from; request entries add to or
/// replace these.
const DEFAULT_ENV: [&str; 3] = [
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "TERM=dumb",
];

/// Variables of the agent's own environment (set for init on the kernel
/// command line by the VMM) that every exec inherits: GLIBC_TUNABLES keeps
/// glibc from using AVX on hosts whose guest kernel cannot preserve the
/// upper YMM halves across task switches (see vmm/src/cmdline.rs).
const INHERITED_ENV: [&str; 1] = ["GLIBC_TUNABLES"];

/// Output is read and sent in chunks of at most this size (a pipe's default
/// capacity).
const CHUNK: usize = 64 << 10;

/// After the process has exited, at most this many more rounds of output
/// (from children still holding its pipes) are forwarded.
const ROUNDS_AFTER_EXIT: u32 = 16;

/// Output goes out at most once per interval while the process runs; what
/// it writes meanwhile gathers in the pipe and goes out in one message. A
/// message costs the emulated guest kernel far more than its bytes (vsock
/// packets, wake-ups; for a migrated process also the relay and the
/// deputy's write at home): a job printing a line every 0.1 s kept both
/// nodes' vCPUs busy with its output, and at one message every 250 ms two
/// migrated processes printing 10 lines a second still took ~30% of their
/// home's vCPU (`burn 100` there: 14.8-15.5 s against 11.1 s). A line
/// after a quiet spell goes out at once, and so does the last output when
/// the process exits.
///
/// The output of an exec (a message on this node only).
const EXEC_SEND_INTERVAL: Duration = Duration::from_secs(1);
/// The output of a migrated process, which its home receives and sends
/// again: two such processes printing 10 lines a second cost their idle
/// home 15.0 s of guest kernel in 69 s at one message a second, 11.0 s at
/// one every 3 s, and 10.0 s printing nothing (guest profiles).
const RELAY_SEND_INTERVAL: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("environment entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("cannot set up the process's stdio: {0}")]
    Stdio(io::Error),
    #[error("cannot start the output thread: {0}")]
    Thread(io::Error),
}

/// A started exec, or a restored process whose stdio is forwarded. Its
/// output thread sends `Started` (`Restored`), the output and `Exited` on
/// the connection.
pub struct Exec {
    pid: i32,
    stdin: Option<File>,
    finished: Arc<AtomicBool>,
    /// An exec leads its own session: a hangup goes to its process group.
    /// A restored process gets it alone.
    session_leader: bool,
}

/// The output pipes and exit status of a process whose output streams on a
/// connection.
pub struct Streamed {
    pub pid: i32,
    pub stdout: File,
    pub stderr: File,
    /// From the reaper, registered before the process could exit.
    pub exit: Receiver<ExitStatus>,
}

impl Exec {
    pub fn start<W: Write + Send + 'static>(
        req: &ExecRequest,
        sink: ResponseSink<W>,
    ) -> Result<Exec, ExecError> {
        let env = environment(&req.env)?;
        let (stdin_child, stdin) = if req.stdin {
            let (r, w) = pipe()?;
            (r, Some(File::from(w)))
        } else {
            let null = File::open("/dev/null").map_err(ExecError::Stdio)?;
            (OwnedFd::from(null), None)
        };
        let (stdout, stdout_child) = pipe()?;
        let (stderr, stderr_child) = pipe()?;
        let prog = Program {
            argv: &req.argv,
            env: &env,
            cwd: req.cwd.as_deref(),
            stdin: stdin_child.as_fd(),
            stdout: stdout_child.as_fd(),
            stderr: stderr_child.as_fd(),
        };
        let (pid, exit) = reaper().spawn_registered(|| spawn(&prog))?;
        // The child has its copies; the pipes must see EOF when it exits.
        drop((stdin_child, stdout_child, stderr_child));
        let streamed = Streamed {
            pid,
            stdout: File::from(stdout),
            stderr: File::from(stderr),
            exit,
        };
        let exec = Exec {
            pid,
            stdin,
            finished: Arc::new(AtomicBool::new(false)),
            session_leader: true,
        };
        exec.stream(Response::Started { pid: pid as u32 }, EXEC_SEND_INTERVAL, streamed, sink)
    }

    /// Streams the output of a restored process (see
    /// `Request::PrepareRestore`): `Restored`, its output, `Exited`. It has
    /// no stdin to forward.
    pub fn forward_restored<W: Write + Send + 'static>(
        streamed: Streamed,
        sink: ResponseSink<W>,
    ) -> Result<Exec, ExecError> {
        let pid = streamed.pid;
        let exec = Exec {
            pid,
            stdin: None,
            finished: Arc::new(AtomicBool::new(false)),
            session_leader: false,
        };
        exec.stream(Response::Restored { pid: pid as u32 }, RELAY_SEND_INTERVAL, streamed, sink)
    }

    /// Starts the output thread, which sends `first`, then output at most
    /// once per `interval`; without it the process is killed.
    fn stream<W: Write + Send + 'static>(
        self,
        first: Response,
        interval: Duration,
        streamed: Streamed,
        sink: ResponseSink<W>,
    ) -> Result<Exec, ExecError> {
        let output = Output {
            first,
            interval,
            watch: watch_exit(self.pid),
            streamed,
        };
        let finished = Arc::clone(&self.finished);
        let started = std::thread::Builder::new()
            .name(format!("output-{}", self.pid))
            .stack_size(128 << 10)
            .spawn(move || output.forward(&sink, &finished));
        if let Err(e) = started {
            self.signal(Signal::SIGKILL);
            return Err(ExecError::Thread(e));
        }
        Ok(self)
    }

    /// Whether `Exited` has been (or is being) sent.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Writes to the process's stdin, blocking while it does not read.
    /// Data for a process without stdin, or that closed it, is discarded.
    pub fn write_stdin(&mut self, data: &[u8]) {
        if let Some(stdin) = &mut self.stdin {
            if stdin.write_all(data).is_err() {
                self.stdin = None;
            }
        }
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The client went away: hang up the process's session, as a terminal
    /// would.
    pub fn hang_up(&self) {
        if !self.is_finished() {
            self.signal(Signal::SIGHUP);
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.pid);
        let _ = if self.session_leader {
            killpg(pid, signal)
        } else {
            kill(pid, signal)
        };
    }
}

/// `DEFAULT_ENV` with `extra` entries added or replacing.
fn environment(extra: &[String]) -> Result<Vec<String>, ExecError> {
    let mut env: Vec<String> = DEFAULT_ENV.iter().map(|e| e.to_string()).collect();
    for key in INHERITED_ENV {
        if let Ok(value) = std::env::var(key) {
            env.push(format!("{key}={value}"));
        }
    }
    for entry in extra {
        let key = match entry.split_once('=') {
            Some((key, _)) if !key.is_empty() => key,
            _ => return Err(ExecError::BadEnv(entry.clone())),
        };
        match env
            .iter_mut()
            .find(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
        {
            Some(existing) => existing.clone_from(entry),
            None => env.push(entry.clone()),
        }
    }
    Ok(env)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ExecError> {
    stdio_pipe().map_err(ExecError::Stdio)
}

/// A pipe for a child's stdio: (read end, write end), both close-on-exec
/// in the agent.
pub fn stdio_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(pipe2(OFlag::O_CLOEXEC)?)
}

/// How the output thread learns that the process has exited.
enum ExitWatch {
    /// A pidfd: readable once the process has exited.
    Pidfd(OwnedFd),
    /// The process is already gone (reaped before the pidfd was opened).
    AlreadyExited,
    /// No pidfd (an old kernel): output ends when both pipes are closed.
    PipesOnly,
}

fn watch_exit(pid: i32) -> ExitWatch {
    match pidfd::open(pid) {
        Ok(fd) => ExitWatch::Pidfd(fd),
        Err(Errno::ESRCH) => ExitWatch::AlreadyExited,
        Err(_) => ExitWatch::PipesOnly,
    }
}

/// What the output thread of an exec holds.
struct Output {
    /// `Started` or `Restored`.
    first: Response,
    /// Output goes out at most once per this interval.
    interval: Duration,
    watch: ExitWatch,
    streamed: Streamed,
}

impl Output {
    /// Sends `first`, the output, then `Exited`. Stops early if the client
    /// is gone (dropping the pipes: the process then gets EPIPE / SIGPIPE).
    fn forward<W: Write>(self, sink: &ResponseSink<W>, finished: &AtomicBool) {
        let Output {
            first,
            interval,
            watch,
            streamed:
                Streamed {
                    stdout,
                    stderr,
                    exit,
                    ..
                },
        } = self;
        if sink.send(&first).is_err() || forward_output([stdout, stderr], watch, interval, sink).is_err() {
            return;
        }
        // The reaper keeps the sender until the process is reaped.
        if let Ok(status) = exit.recv() {
            finished.store(true, Ordering::Release);
            let _ = sink.send(&Response::Exited(status));
        }
    }
}

/// Forwards stdout and stderr chunks, at most one round per `interval`,
/// until both reach end of file, or, once the process has exited, until
/// nothing more is ready.
fn forward_output<W: Write>(
    pipes: [File; 2],
    watch: ExitWatch,
    interval: Duration,
    sink: &ResponseSink<W>,
) -> Result<(), FrameError> {
    const PIDFD: usize = 2;
    let mut pipes = pipes.map(Some);
    let mut rounds_after_exit = matches!(watch, ExitWatch::AlreadyExited).then_some(0);
    let pidfd = match watch {
        ExitWatch::Pidfd(fd) => Some(fd),
        ExitWatch::AlreadyExited | ExitWatch::PipesOnly => None,
    };
    let mut buf = vec![0u8; CHUNK];
    let mut last_sent: Option<Instant> = None;
    while pipes.iter().any(Option::is_some)
        && rounds_after_exit.is_none_or(|r| r < ROUNDS_AFTER_EXIT)
    {
        if let (Some(sent), None) = (last_sent, rounds_after_exit) {
            if pause(pidfd.as_ref(), interval.saturating_sub(sent.elapsed())) {
                rounds_after_exit = Some(0);
            }
        }
        let mut ready = Vec::with_capacity(3);
        {
            let mut which = Vec::with_capacity(3);
            let mut fds = Vec::with_capacity(3);
            for (i, pipe) in pipes.iter().enumerate() {
                if let Some(pipe) = pipe {
                    which.push(i);
                    fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
                }
            }
            if let (Some(fd), None) = (&pidfd, rounds_after_exit) {
                which.push(PIDFD);
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            let timeout = match rounds_after_exit {
                Some(_) => PollTimeout::ZERO,
                None => PollTimeout::NONE,
            };
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
            for (i, fd) in which.into_iter().zip(&fds) {
                if fd.revents().is_some_and(|r| !r.is_empty()) {
                    ready.push(i);
                }
            }
        }
        if let Some(r) = &mut rounds_after_exit {
            *r += 1;
        }
        for i in ready {
            if i == PIDFD {
                rounds_after_exit = Some(0);
                continue;
            }
            let Some(pipe) = &mut pipes[i] else { continue };
            match pipe.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => pipes[i] = None,
                Ok(n) => {
                    last_sent = Some(Instant::now());
                    let data = buf[..n].to_vec();
                    sink.send(&if i == 0 {
                        Response::Stdout(data)
                    } else {
                        Response::Stderr(data)
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// Waits `left`, or less if the process exits meanwhile (its pidfd turns
/// readable); returns whether it did.
fn pause(pidfd: Option<&OwnedFd>, left: Duration) -> bool {
    let Some(fd) = pidfd else {
        std::thread::sleep(left);
        return false;
    };
    let timeout = PollTimeout::try_from(left.as_millis()).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    // An interrupted wait only ends the pause early.
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_adds_and_replaces() {
        let env = environment(&["PATH=/x".into(), "A=1=2".into()]).unwrap();
        assert_eq!(env, ["PATH=/x", "HOME=/root", "TERM=dumb", "A=1=2"]);
        assert!(matches!(
            environment(&["=x".into()]),
            Err(ExecError::BadEnv(_))
        ));
        assert!(matches!(
            environment(&["NOVALUE".into()]),
            Err(ExecError::BadEnv(_))
        ));
    }

    #[test]
    fn a_pause_ends_when_the_process_exits() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let pidfd = pidfd::open(child.id() as i32).unwrap();
        let started = Instant::now();
        assert!(pause(Some(&pidfd), Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        child.wait().unwrap();
        // Without an exit to wait for, the whole pause.
        let started = Instant::now();
        assert!(!pause(None, Duration::from_millis(100)));
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
