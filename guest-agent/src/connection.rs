//! One client connection: the hello exchange, then requests until the
//! client closes.

use std::io;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pmivmm_proto::frame::{decode_request, read_payload, FrameError};
use pmivmm_proto::{ErrorKind, ExitStatus, Request, Response, PROTOCOL_VERSION, VERSION};

use crate::deputy::{Deputy, DeputyError, SIGNAL_POLL};
use crate::exec::{Exec, ExecError};
use crate::kill::{send_signal, KillError};
use crate::load::load;
use crate::migrate::{not_frozen, Finished, Migrations};
use crate::ps::list_processes;
use crate::server::Stream;
use crate::sink::ResponseSink;
use crate::spawn::SpawnError;

/// How long a `Poweroff` waits for its client to close the connection.
const POWER_OFF_WAIT: Duration = Duration::from_secs(2);

/// What requests do to the node beyond the agent's own work.
#[derive(Clone, Copy)]
pub struct Actions {
    /// Called after `Poweroff` has been answered.
    pub power_off: fn(),
}

struct Connection<S: Stream> {
    reader: S,
    sink: ResponseSink<S>,
    actions: Actions,
    /// The last exec started on this connection (or restored process
    /// whose stdio it forwards).
    exec: Option<Exec>,
    /// `Poweroff` was accepted: power off once the reply is sent.
    power_off_requested: bool,
    /// Processes this connection seized, froze or half-restored; dropped
    /// (let go, resumed or killed) when the connection ends.
    migrations: Migrations,
    /// The deputy this connection serves (see `Request::BecomeDeputy`);
    /// killed if the connection ends first.
    deputy: Option<Deputy>,
    /// When the deputy's signals are checked next.
    deputy_check: Instant,
}

/// Serves one client until it closes the connection. If it goes away while
/// an exec runs, the exec's session is hung up (SIGHUP).
pub fn serve_connection<S: Stream>(stream: S, actions: Actions) {
    let writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(e) => {
            eprintln!("pmivmm-agent: cannot split a connection: {e}");
            return;
        }
    };
    let mut conn = Connection {
        reader: stream,
        sink: ResponseSink::new(writer),
        actions,
        exec: None,
        power_off_requested: false,
        migrations: Migrations::default(),
        deputy: None,
        deputy_check: Instant::now(),
    };
    if let Err(e) = conn.run() {
        if !is_disconnect(&e) {
            eprintln!("pmivmm-agent: connection failed: {e}");
        }
    }
    if let Some(exec) = &conn.exec {
        exec.hang_up();
    }
}

fn is_disconnect(e: &FrameError) -> bool {
    matches!(e, FrameError::Io(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe))
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

impl<S: Stream> Connection<S> {
    fn run(&mut self) -> Result<(), FrameError> {
        if !self.hello()? {
            return Ok(());
        }
        loop {
            self.await_request()?;
            let Some(payload) = self.next_payload()? else {
                break;
            };
            let reply = match decode_request(&payload) {
                Ok(req) => self.handle(req),
                Err(e @ FrameError::UnknownRequest { .. }) => Some(error(
                    ErrorKind::UnknownRequest,
                    format!("{e}; this agent speaks protocol version {PROTOCOL_VERSION}"),
                )),
                Err(e) => Some(error(ErrorKind::BadRequest, e.to_string())),
            };
            if let Some(reply) = reply {
                self.sink.send(&reply)?;
            }
            if self.power_off_requested {
                self.await_close(POWER_OFF_WAIT);
                (self.actions.power_off)();
            }
        }
        Ok(())
    }

    /// Waits (at most `limit`) until the client closes the connection: a
    /// reply sent just before the node powers off must reach it first (the
    /// reset drops vsock packets the guest has not sent yet, and the agent
    /// runs ahead of the kernel thread that sends them).
    fn await_close(&mut self, limit: Duration) {
        let mut fds = [PollFd::new(self.reader.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(limit.as_millis()).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, timeout);
    }

    /// Waits until the next request can be read, tending meanwhile what
    /// this connection holds: the stops of processes in pre-copy, as the
    /// reaper reports them, and its deputy (signals every [`SIGNAL_POLL`],
    /// its death at once). Only whole frames are read afterwards: nothing
    /// ever times out in the middle of one.
    fn await_request(&mut self) -> Result<(), FrameError> {
        loop {
            let waker = self.migrations.waker();
            let deputy = self.deputy.as_ref().and_then(Deputy::watched);
            let (tending_precopies, tending_deputy) = (waker.is_some(), deputy.is_some());
            if !tending_precopies && !tending_deputy {
                return Ok(());
            }
            let timeout = if tending_deputy {
                let left = self.deputy_check.saturating_duration_since(Instant::now());
                // Rounded up to whole milliseconds: never early.
                let ms = left.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            } else {
                PollTimeout::NONE
            };
            let mut fds = vec![PollFd::new(self.reader.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                waker
                    .into_iter()
                    .chain(deputy)
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
            );
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            if tending_precopies && ready[1] {
                self.migrations.tend();
            }
            let deputy_died = tending_deputy && ready[ready.len() - 1];
            if tending_deputy && (deputy_died || Instant::now() >= self.deputy_check) {
                self.tend_deputy()?;
            }
            if ready[0] {
                return Ok(());
            }
        }
    }

    /// Sends `DeputySignal` for each signal taken from the deputy. One the
    /// agent can no longer take signals from is killed: better an end its
    /// host sees than signals lost.
    fn tend_deputy(&mut self) -> Result<(), FrameError> {
        self.deputy_check = Instant::now() + SIGNAL_POLL;
        let Some(deputy) = &mut self.deputy else {
            return Ok(());
        };
        let signals = deputy.take_signals().unwrap_or_else(|e| {
            deputy.kill(&format!("cannot take its signals: {e}"));
            vec![libc::SIGKILL]
        });
        for signal in signals {
            self.sink.send(&Response::DeputySignal { signal })?;
        }
        Ok(())
    }

    /// `BecomeDeputy { pid, node }`.
    fn become_deputy(&mut self, pid: u32, node: String) -> Response {
        let Some(frozen) = self.migrations.take_frozen(pid) else {
            return not_frozen(pid);
        };
        match Deputy::new(frozen.pid, frozen.carried.clone(), node) {
            Ok(deputy) => {
                self.deputy = Some(deputy);
                // Signals may be pending already.
                self.deputy_check = Instant::now();
                Response::Ok
            }
            Err(e) => {
                // The host asks only once the migrated process runs
                // elsewhere: resuming this copy would run it twice.
                let killed = match crate::checkpoint::kill_original(frozen.pid) {
                    Ok(()) => "it was killed".to_owned(),
                    Err(k) => format!("killing it failed too: {k}"),
                };
                error(
                    ErrorKind::Failed,
                    format!("PID {pid} cannot become a deputy ({e}); {killed}"),
                )
            }
        }
    }

    /// `DeputyExit(status)`.
    fn end_deputy(&mut self, status: ExitStatus) -> Response {
        let Some(deputy) = &mut self.deputy else {
            return no_deputy();
        };
        match deputy.exit(status) {
            Ok(()) => {
                self.deputy = None;
                Response::Ok
            }
            Err(e @ DeputyError::NotFatal(_)) => error(ErrorKind::BadRequest, e.to_string()),
            Err(e) => {
                deputy.kill(&format!("it could not end by {status}: {e}"));
                self.deputy = None;
                error(
                    ErrorKind::Failed,
                    format!("the deputy could not end by {status} ({e}); it was killed"),
                )
            }
        }
    }

    /// Reads the next request frame; a frame that breaks the framing (too
    /// large) is answered with an error before the connection is closed.
    fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match read_payload(&mut self.reader) {
            Err(e @ FrameError::TooLarge { .. }) => {
                self.sink
                    .send(&error(ErrorKind::BadRequest, e.to_string()))?;
                Err(e)
            }
            other => other,
        }
    }

    /// The hello exchange; `false` if the connection must close.
    fn hello(&mut self) -> Result<bool, FrameError> {
        let Some(payload) = self.next_payload()? else {
            return Ok(false);
        };
        let reply = match decode_request(&payload) {
            Ok(Request::Hello {
                protocol_version, ..
            }) if protocol_version == PROTOCOL_VERSION => {
                self.sink.send(&Response::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    software_version: VERSION.to_owned(),
                })?;
                return Ok(true);
            }
            Ok(Request::Hello {
                protocol_version,
                software_version,
            }) => error(
                ErrorKind::VersionMismatch,
                format!(
                    "the agent speaks protocol version {PROTOCOL_VERSION} (pmivmm {VERSION}), \
                     the client version {protocol_version} (pmivmm {software_version})"
                ),
            ),
            _ => error(
                ErrorKind::HelloRequired,
                "the first request on a connection must be Hello",
            ),
        };
        self.sink.send(&reply)?;
        Ok(false)
    }

    fn exec_running(&self) -> bool {
        self.exec.as_ref().is_some_and(|e| !e.is_finished())
    }

    /// Handles a request; `None` when it has no reply of its own.
    fn handle(&mut self, req: Request) -> Option<Response> {
        match req {
            Request::StdinData(data) => {
                if let Some(exec) = &mut self.exec {
                    exec.write_stdin(&data);
                }
                None
            }
            Request::StdinEof => {
                if let Some(exec) = &mut self.exec {
                    exec.close_stdin();
                }
                None
            }
            _ if self.exec_running() => Some(error(
                ErrorKind::Busy,
                "a process streams its output on this connection (an exec, or a restored \
                 process with forwarded stdio); only stdin is accepted until it exits",
            )),
            Request::DeputyOutput { fd, data } => match &mut self.deputy {
                Some(deputy) => deputy
                    .output(fd, &data)
                    .err()
                    .map(|e| error(ErrorKind::BadRequest, e.to_string())),
                None => Some(no_deputy()),
            },
            Request::DeputyExit(status) => Some(self.end_deputy(status)),
            Request::DeputyMoved { node } => match &mut self.deputy {
                Some(deputy) => {
                    deputy.moved(node);
                    None
                }
                None => Some(no_deputy()),
            },
            _ if self.deputy.is_some() => Some(error(
                ErrorKind::Busy,
                "this connection serves a deputy: only DeputyOutput, DeputyExit and DeputyMoved are \
                 accepted",
            )),
            Request::Hello { .. } => {
                Some(error(ErrorKind::BadRequest, "hello was already exchanged"))
            }
            Request::Exec(req) => match Exec::start(&req, self.sink.clone()) {
                Ok(exec) => {
                    self.exec = Some(exec);
                    None
                }
                Err(e) => Some(exec_error(e)),
            },
            Request::Ps => Some(match list_processes() {
                Ok(list) => Response::ProcessList(list),
                Err(e) => error(ErrorKind::Failed, e.to_string()),
            }),
            Request::Load => Some(match load() {
                Ok(info) => Response::Load(info),
                Err(e) => error(ErrorKind::Failed, e.to_string()),
            }),
            Request::Kill { pid, signal } => Some(match send_signal(pid, signal) {
                Ok(()) => Response::Ok,
                Err(e) => kill_error(e),
            }),
            Request::Poweroff => {
                self.power_off_requested = true;
                Some(Response::Ok)
            }
            Request::Checkpoint { pid, page_walk } => Some(self.migrations.checkpoint(pid, page_walk)),
            Request::ResumeOriginal { pid } => Some(self.migrations.end_freeze(pid, false)),
            Request::KillOriginal { pid } => Some(self.migrations.end_freeze(pid, true)),
            Request::PrepareRestore {
                image,
                forward_stdio,
                page_walk,
            } => Some(self.migrations.prepare(&image, forward_stdio, page_walk)),
            Request::StartRestore { forward_stdio } => Some(self.migrations.start(forward_stdio)),
            Request::PreLayout(layout) => Some(self.migrations.pre_layout(&layout)),
            Request::FinishRestore => match self.migrations.finish() {
                Finished::Reply(reply) => Some(reply),
                Finished::Forward(streamed) => {
                    let pid = streamed.pid;
                    match Exec::forward_restored(streamed, self.sink.clone()) {
                        Ok(exec) => {
                            self.exec = Some(exec);
                            None
                        }
                        Err(e) => Some(error(
                            ErrorKind::Failed,
                            format!("restored PID {pid} was killed: {e}"),
                        )),
                    }
                }
            },
            Request::PrecopyRound {
                pid,
                first,
                page_walk,
            } => Some(self.migrations.precopy_round(pid, first, page_walk)),
            Request::PrecopyContinue { pid } => Some(self.migrations.precopy_continue(pid)),
            Request::BecomeDeputy { pid, node } => Some(self.become_deputy(pid, node)),
        }
    }
}

fn no_deputy() -> Response {
    error(
        ErrorKind::BadRequest,
        "no deputy on this connection (send BecomeDeputy first)",
    )
}

fn exec_error(e: ExecError) -> Response {
    let kind = match &e {
        ExecError::BadEnv(_) | ExecError::Spawn(SpawnError::EmptyArgv | SpawnError::Nul(_)) => {
            ErrorKind::BadRequest
        }
        ExecError::Spawn(SpawnError::NotFound { .. } | SpawnError::Spawn { .. }) => {
            ErrorKind::SpawnFailed
        }
        ExecError::Stdio(_) | ExecError::Thread(_) => ErrorKind::Failed,
    };
    error(kind, e.to_string())
}

fn kill_error(e: KillError) -> Response {
    let kind = match &e {
        KillError::InvalidPid(_) | KillError::Agent(_) | KillError::InvalidSignal(_) => {
            ErrorKind::BadRequest
        }
        KillError::NoSuchProcess(_) => ErrorKind::NoSuchProcess,
        KillError::Failed { .. } => ErrorKind::Failed,
    };
    error(kind, e.to_string())
}
