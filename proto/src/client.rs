//! A blocking client of the agent, over any byte stream split into a reading
//! and a writing half (for a socket: the stream and its `try_clone`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::frame::{read_frame, write_frame, FrameError};
use crate::hybrid_vsock::{self, HybridVsockError};
use crate::image::Pages;
use crate::prelayout::PreLayout;
use crate::message::{
    ErrorKind, ExecRequest, ExitStatus, LoadInfo, ProcessInfo, Request, Response,
};
use crate::{AGENT_VSOCK_PORT, PROTOCOL_VERSION, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Connect(#[from] HybridVsockError),
    #[error("cannot split the agent connection into halves: {0}")]
    Split(std::io::Error),
    #[error("the agent closed the connection")]
    Closed,
    #[error("agent error ({kind}): {message}")]
    Agent { kind: ErrorKind, message: String },
    #[error("the agent speaks protocol version {agent}, this client {client}")]
    VersionMismatch { agent: u32, client: u32 },
    #[error("unexpected reply from the agent: expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// A connection to an agent that has completed the hello exchange.
pub struct AgentClient<R, W> {
    reader: R,
    writer: W,
    agent_version: String,
}

impl AgentClient<UnixStream, UnixStream> {
    /// Connects to the agent of a node through the VMM's hybrid vsock Unix
    /// socket (`/run/pmivmm/<node>/vsock.sock`) and says hello.
    pub fn connect(vsock_socket: &Path) -> Result<Self, ClientError> {
        let stream = hybrid_vsock::connect(vsock_socket, AGENT_VSOCK_PORT)?;
        Self::over_unix_stream(stream)
    }

    /// Says hello over an already connected stream.
    pub fn over_unix_stream(stream: UnixStream) -> Result<Self, ClientError> {
        let reader = stream.try_clone().map_err(ClientError::Split)?;
        Self::hello(reader, stream)
    }
}

impl<R: Read, W: Write> AgentClient<R, W> {
    /// Exchanges hellos: fails with `VersionMismatch` (or the agent's
    /// `Error`) if the agent speaks another protocol version.
    pub fn hello(mut reader: R, mut writer: W) -> Result<Self, ClientError> {
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: VERSION.to_string(),
        };
        write_frame(&mut writer, &hello)?;
        match receive(&mut reader)? {
            Response::Hello {
                protocol_version,
                software_version,
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(ClientError::VersionMismatch {
                        agent: protocol_version,
                        client: PROTOCOL_VERSION,
                    });
                }
                Ok(AgentClient {
                    reader,
                    writer,
                    agent_version: software_version,
                })
            }
            other => Err(unexpected("Hello", &other)),
        }
    }

    /// The agent's software version, from its hello.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// Lists the node's processes.
    pub fn ps(&mut self) -> Result<Vec<ProcessInfo>, ClientError> {
        match self.call(&Request::Ps)? {
            Response::ProcessList(list) => Ok(list),
            other => Err(unexpected("ProcessList", &other)),
        }
    }

    /// Reports the node's load.
    pub fn load(&mut self) -> Result<LoadInfo, ClientError> {
        match self.call(&Request::Load)? {
            Response::Load(load) => Ok(load),
            other => Err(unexpected("Load", &other)),
        }
    }

    /// Sends `signal` to process `pid` of the node.
    pub fn kill(&mut self, pid: u32, signal: i32) -> Result<(), ClientError> {
        self.call_ok(&Request::Kill { pid, signal })
    }

    /// Asks the agent to power the node off. `Ok` means the agent accepted;
    /// the VMM exits once the guest has reset.
    pub fn poweroff(&mut self) -> Result<(), ClientError> {
        self.call_ok(&Request::Poweroff)
    }

    /// Freezes and captures process `pid`: the encoded image and its pages'
    /// frames, with their dirty bits if [`Self::precopy_round`] ran
    /// (otherwise all dirty). The process stays frozen until
    /// [`Self::resume_original`] or [`Self::kill_original`] on this same
    /// client (or until it is dropped: then the agent resumes it).
    pub fn checkpoint(&mut self, pid: u32, page_walk: bool) -> Result<(Vec<u8>, Pages), ClientError> {
        match self.call(&Request::Checkpoint { pid, page_walk })? {
            Response::Checkpointed { image, pages } => Ok((image, pages)),
            other => Err(unexpected("Checkpointed", &other)),
        }
    }

    /// One pre-copy round of process `pid`, which keeps running: with
    /// `first` (the first round, which seizes it) every present page,
    /// otherwise the pages written since the previous round (all
    /// [`crate::image::PageRef::dirty`]). The process stays seized by this client until
    /// [`Self::checkpoint`] freezes it (its pages then carry their dirty
    /// bits) or the client is dropped (then the agent lets it go). The
    /// first round fails with [`ErrorKind::Refused`] if the process cannot
    /// be checkpointed; a failed later round lets it go. `page_walk`: if the
    /// pages include a walk, the process stays stopped until
    /// [`Self::precopy_continue`].
    pub fn precopy_round(&mut self, pid: u32, first: bool, page_walk: bool) -> Result<Pages, ClientError> {
        match self.call(&Request::PrecopyRound { pid, first, page_walk })? {
            Response::PrecopyPages { pages } => Ok(pages),
            other => Err(unexpected("PrecopyPages", &other)),
        }
    }

    /// Lets a process held by [`Self::precopy_round`] for the VMM's walk run
    /// on (its soft-dirty bits cleared).
    pub fn precopy_continue(&mut self, pid: u32) -> Result<(), ClientError> {
        self.call_ok(&Request::PrecopyContinue { pid })
    }

    /// Lets the process frozen by [`Self::checkpoint`] run on.
    pub fn resume_original(&mut self, pid: u32) -> Result<(), ClientError> {
        self.call_ok(&Request::ResumeOriginal { pid })
    }

    /// Kills the process frozen by [`Self::checkpoint`].
    pub fn kill_original(&mut self, pid: u32) -> Result<(), ClientError> {
        self.call_ok(&Request::KillOriginal { pid })
    }

    /// Starts the child of the next [`Self::prepare_restore`] on this client
    /// ahead of it (see `Request::StartRestore`).
    pub fn start_restore(&mut self, forward_stdio: bool) -> Result<(), ClientError> {
        self.call_ok(&Request::StartRestore { forward_stdio })
    }

    /// Lays out private anonymous memory in the child started by
    /// [`Self::start_restore`] ahead of its image (see `Request::PreLayout`).
    pub fn pre_layout(&mut self, layout: PreLayout) -> Result<(), ClientError> {
        self.call_ok(&Request::PreLayout(layout))
    }

    /// Builds a stopped process from an encoded image: its PID and the frame
    /// of every saved page, in image order. Complete it with
    /// [`Self::finish_restore`] (or, with `forward_stdio`,
    /// [`Self::finish_restore_streaming`]) on this same client (dropping the
    /// client kills it). `forward_stdio`: the process's stdio that the image
    /// does not reopen as regular files becomes pipes (stdin: /dev/null)
    /// whose output the agent streams; otherwise /dev/null.
    pub fn prepare_restore(
        &mut self,
        image: Vec<u8>,
        forward_stdio: bool,
        page_walk: bool,
    ) -> Result<(u32, Pages), ClientError> {
        match self.call(&Request::PrepareRestore {
            image,
            forward_stdio,
            page_walk,
        })? {
            Response::RestorePrepared { pid, pages } => Ok((pid, pages)),
            other => Err(unexpected("RestorePrepared", &other)),
        }
    }

    /// Lets the prepared process run; returns its PID.
    pub fn finish_restore(&mut self) -> Result<u32, ClientError> {
        match self.call(&Request::FinishRestore)? {
            Response::Restored { pid } => Ok(pid),
            other => Err(unexpected("Restored", &other)),
        }
    }

    /// Lets a process prepared with `forward_stdio` run; the returned
    /// session (its [`ExecSession::pid`] is the restored PID) yields its
    /// output and exit status exactly like an exec's. It has no stdin:
    /// data written to the session's stdin is discarded.
    pub fn finish_restore_streaming(mut self) -> Result<ExecSession<R, W>, ClientError> {
        match self.call(&Request::FinishRestore)? {
            Response::Restored { pid } => Ok(self.into_session(pid)),
            other => Err(unexpected("Restored", &other)),
        }
    }

    /// Starts a process; the returned session yields its output and exit
    /// status and takes its stdin (if `req.stdin`).
    pub fn exec(mut self, req: ExecRequest) -> Result<ExecSession<R, W>, ClientError> {
        match self.call(&Request::Exec(req))? {
            Response::Started { pid } => Ok(self.into_session(pid)),
            other => Err(unexpected("Started", &other)),
        }
    }

    /// Turns process `pid`, frozen by [`Self::checkpoint`] on this client,
    /// into the deputy of its migrated self, which now runs on `node` (see
    /// `Request::BecomeDeputy`). From then on the connection carries only
    /// the deputy's traffic, split in two halves for two threads:
    /// [`DeputyEvents`] reads the signals sent to the deputy and its end,
    /// [`DeputyControl`] sends the migrated process's output and end. If
    /// the connection closes before [`DeputyControl::exit`], the agent
    /// kills the deputy. If the agent refuses, the client is gone with the
    /// error (and the agent resumes the frozen process).
    pub fn become_deputy(
        mut self,
        pid: u32,
        node: String,
    ) -> Result<(DeputyEvents<R>, DeputyControl<W>), ClientError> {
        self.call_ok(&Request::BecomeDeputy { pid, node })?;
        let events = DeputyEvents {
            reader: self.reader,
            ended: false,
        };
        let control = DeputyControl {
            writer: self.writer,
        };
        Ok((events, control))
    }

    fn into_session(self, pid: u32) -> ExecSession<R, W> {
        ExecSession {
            pid,
            output: ExecOutput {
                reader: self.reader,
                exited: false,
            },
            stdin: ExecStdin {
                writer: self.writer,
            },
        }
    }

    fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        write_frame(&mut self.writer, req)?;
        receive(&mut self.reader)
    }

    fn call_ok(&mut self, req: &Request) -> Result<(), ClientError> {
        match self.call(req)? {
            Response::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }
}

/// Reads one response; an agent `Error` becomes `ClientError::Agent`.
fn receive<R: Read>(reader: &mut R) -> Result<Response, ClientError> {
    match read_frame(reader)? {
        None => Err(ClientError::Closed),
        Some(Response::Error { kind, message }) => Err(ClientError::Agent { kind, message }),
        Some(resp) => Ok(resp),
    }
}

fn unexpected(expected: &'static str, got: &Response) -> ClientError {
    ClientError::Unexpected {
        expected,
        got: got.name(),
    }
}

/// What a running exec produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last event of a session.
    Exited(ExitStatus),
}

/// A running exec (or restored process with forwarded stdio): its output
/// events and its stdin, which [`split`] hands to different threads.
///
/// [`split`]: ExecSession::split
pub struct ExecSession<R, W> {
    pid: u32,
    output: ExecOutput<R>,
    stdin: ExecStdin<W>,
}

impl<R: Read, W: Write> ExecSession<R, W> {
    /// The PID of the process in the node.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// See [`ExecOutput::next_event`].
    pub fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        self.output.next_event()
    }

    /// See [`ExecStdin::write`].
    pub fn write_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.stdin.write(data)
    }

    /// See [`ExecStdin::close`].
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.stdin.close()
    }

    /// Separates output and stdin, e.g. to forward stdin from another thread
    /// while output is streamed. Dropping the stdin half does not close the
    /// process's stdin; [`ExecStdin::close`] does.
    pub fn split(self) -> (ExecOutput<R>, ExecStdin<W>) {
        (self.output, self.stdin)
    }

    /// Reads events until exit, gathering stdout and stderr.
    pub fn wait_with_output(mut self) -> Result<CollectedOutput, ClientError> {
        let mut out = CollectedOutput {
            stdout: Vec::new(),
            stderr: Vec::new(),
            status: ExitStatus::Code(0),
        };
        loop {
            match self.next_event()? {
                ExecEvent::Stdout(data) => out.stdout.extend_from_slice(&data),
                ExecEvent::Stderr(data) => out.stderr.extend_from_slice(&data),
                ExecEvent::Exited(status) => {
                    out.status = status;
                    return Ok(out);
                }
            }
        }
    }
}

/// Everything an exec wrote, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// The output half of an exec session.
pub struct ExecOutput<R> {
    reader: R,
    exited: bool,
}

impl<R: Read> ExecOutput<R> {
    /// Blocks for the next output chunk or the exit status. After `Exited`,
    /// further calls fail with `Closed`.
    pub fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        if self.exited {
            return Err(ClientError::Closed);
        }
        match receive(&mut self.reader)? {
            Response::Stdout(data) => Ok(ExecEvent::Stdout(data)),
            Response::Stderr(data) => Ok(ExecEvent::Stderr(data)),
            Response::Exited(status) => {
                self.exited = true;
                Ok(ExecEvent::Exited(status))
            }
            other => Err(unexpected("Stdout, Stderr or Exited", &other)),
        }
    }
}

/// Data is sent in frames of at most this much, well below the frame limit.
const DATA_CHUNK: usize = 64 << 10;

/// The stdin half of an exec session.
pub struct ExecStdin<W> {
    writer: W,
}

impl<W: Write> ExecStdin<W> {
    /// Sends bytes to the process's stdin. Blocks while the agent has not
    /// taken earlier data (the process reads slowly): that is backpressure.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            write_frame(&mut self.writer, &Request::StdinData(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Closes the process's stdin (it reads end of file).
    pub fn close(&mut self) -> Result<(), ClientError> {
        Ok(write_frame(&mut self.writer, &Request::StdinEof)?)
    }
}

/// What happens to a deputy (see [`AgentClient::become_deputy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeputyEvent {
    /// This signal was sent to the deputy, which did not take it: the
    /// migrated process must get it. `Signal(9)` (SIGKILL) killed the
    /// deputy: no other signal follows, output is dropped and
    /// [`DeputyControl::exit`] is answered at once.
    Signal(i32),
    /// The deputy ended as [`DeputyControl::exit`] asked; the last event.
    Ended,
}

/// The reading half of a deputy's connection.
pub struct DeputyEvents<R> {
    reader: R,
    ended: bool,
}

impl<R: Read> DeputyEvents<R> {
    /// Blocks for the next event. After `Ended`, further calls fail with
    /// `Closed`. A request the agent refused (an invalid fd for
    /// [`DeputyControl::output`], a signal that cannot end a process for
    /// [`DeputyControl::exit`]) comes back here as `ClientError::Agent`.
    pub fn next_event(&mut self) -> Result<DeputyEvent, ClientError> {
        if self.ended {
            return Err(ClientError::Closed);
        }
        match receive(&mut self.reader)? {
            Response::DeputySignal { signal } => Ok(DeputyEvent::Signal(signal)),
            Response::Ok => {
                self.ended = true;
                Ok(DeputyEvent::Ended)
            }
            other => Err(unexpected("DeputySignal or Ok", &other)),
        }
    }
}

/// The writing half of a deputy's connection: it only sends; what comes
/// back arrives on [`DeputyEvents`].
pub struct DeputyControl<W> {
    writer: W,
}

impl<W: Write> DeputyControl<W> {
    /// Writes `data`, which the migrated process wrote to its fd `fd` (1 or
    /// 2), to the deputy's own fd `fd`. Blocks while the agent has not
    /// taken earlier data (the deputy's reader is slow): that is
    /// backpressure.
    pub fn output(&mut self, fd: u8, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            let req = Request::DeputyOutput {
                fd,
                data: chunk.to_vec(),
            };
            write_frame(&mut self.writer, &req)?;
        }
        Ok(())
    }

    /// The migrated process now runs on `node`.
    pub fn moved(&mut self, node: &str) -> Result<(), ClientError> {
        Ok(write_frame(&mut self.writer, &Request::DeputyMoved { node: node.to_owned() })?)
    }

    /// The migrated process ended this way: the agent ends the deputy the
    /// same way, so that its parent sees it, and [`DeputyEvents`] then
    /// reports `Ended`.
    pub fn exit(&mut self, status: ExitStatus) -> Result<(), ClientError> {
        Ok(write_frame(&mut self.writer, &Request::DeputyExit(status))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_request, read_payload};

    /// Runs `agent` on the far end of a socket pair; returns the near end.
    fn fake_agent(agent: impl FnOnce(&mut UnixStream) + Send + 'static) -> UnixStream {
        let (near, mut far) = UnixStream::pair().unwrap();
        std::thread::spawn(move || agent(&mut far));
        near
    }

    fn expect_request(s: &mut UnixStream) -> Request {
        decode_request(&read_payload(s).unwrap().unwrap()).unwrap()
    }

    /// A client of a fake agent that answers the hello, then runs `agent`.
    fn client_of(
        agent: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> AgentClient<UnixStream, UnixStream> {
        let stream = fake_agent(|s| {
            assert!(matches!(expect_request(s), Request::Hello { .. }));
            let hello = Response::Hello {
                protocol_version: PROTOCOL_VERSION,
                software_version: "x".into(),
            };
            write_frame(s, &hello).unwrap();
            agent(s);
        });
        AgentClient::over_unix_stream(stream).unwrap()
    }

    fn page(vaddr: u64) -> crate::image::PageRef {
        crate::image::PageRef {
            vaddr,
            pfn: 7,
            kind: crate::image::PageKind::Data,
            dirty: true,
        }
    }

    #[test]
    fn precopy_rounds_return_pages_and_refusals() {
        let mut client = client_of(|s| {
            let first = Request::PrecopyRound {
                pid: 5,
                first: true,
                page_walk: false,
            };
            assert_eq!(expect_request(s), first);
            let pages = Pages {
                listed: vec![page(0x1000), page(0x2000)],
                walk: None,
            };
            write_frame(s, &Response::PrecopyPages { pages }).unwrap();
            let refused = Response::Error {
                kind: ErrorKind::Refused,
                message: "PID 6 cannot migrate".into(),
            };
            assert_eq!(
                expect_request(s),
                Request::PrecopyRound {
                    pid: 6,
                    first: true,
                    page_walk: false
                }
            );
            write_frame(s, &refused).unwrap();
        });
        let pages = client.precopy_round(5, true, false).unwrap();
        assert_eq!(pages.listed, [page(0x1000), page(0x2000)]);
        assert!(matches!(
            client.precopy_round(6, true, false),
            Err(ClientError::Agent {
                kind: ErrorKind::Refused,
                ..
            })
        ));
    }

    #[test]
    fn deputy_halves_carry_output_signals_and_the_end() {
        let client = client_of(|s| {
            let become_deputy = Request::BecomeDeputy {
                pid: 4,
                node: "n2".into(),
            };
            assert_eq!(expect_request(s), become_deputy);
            write_frame(s, &Response::Ok).unwrap();
            write_frame(s, &Response::DeputySignal { signal: 15 }).unwrap();
            // Large output arrives in chunks.
            let mut out = Vec::new();
            while out.len() < 100_000 {
                match expect_request(s) {
                    Request::DeputyOutput { fd: 1, data } => out.extend(data),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(out, vec![7u8; 100_000]);
            let end = ExitStatus::Code(3);
            assert_eq!(expect_request(s), Request::DeputyExit(end));
            write_frame(s, &Response::Ok).unwrap();
        });
        let (mut events, mut control) = client.become_deputy(4, "n2".into()).unwrap();
        assert_eq!(events.next_event().unwrap(), DeputyEvent::Signal(15));
        control.output(1, &[7u8; 100_000]).unwrap();
        control.exit(ExitStatus::Code(3)).unwrap();
        assert_eq!(events.next_event().unwrap(), DeputyEvent::Ended);
        assert!(matches!(events.next_event(), Err(ClientError::Closed)));
    }

    #[test]
    fn refused_deputy_is_an_agent_error() {
        let client = client_of(|s| {
            expect_request(s);
            let refused = Response::Error {
                kind: ErrorKind::BadRequest,
                message: "PID 4 was not frozen by a checkpoint on this connection".into(),
            };
            write_frame(s, &refused).unwrap();
        });
        assert!(matches!(
            client.become_deputy(4, "n2".into()),
            Err(ClientError::Agent {
                kind: ErrorKind::BadRequest,
                ..
            })
        ));
    }

    #[test]
    fn forwarded_restore_streams_like_an_exec() {
        let mut client = client_of(|s| {
            assert_eq!(
                expect_request(s),
                Request::PrepareRestore {
                    image: vec![1],
                    forward_stdio: true,
                    page_walk: false
                }
            );
            let prepared = Response::RestorePrepared {
                pid: 9,
                pages: Pages {
                    listed: vec![page(0x1000)],
                    walk: None,
                },
            };
            write_frame(s, &prepared).unwrap();
            assert_eq!(expect_request(s), Request::FinishRestore);
            write_frame(s, &Response::Restored { pid: 9 }).unwrap();
            write_frame(s, &Response::Stdout(b"out".to_vec())).unwrap();
            write_frame(s, &Response::Exited(ExitStatus::Code(3))).unwrap();
        });
        let (pid, pages) = client.prepare_restore(vec![1], true, false).unwrap();
        assert_eq!((pid, pages.listed), (9, vec![page(0x1000)]));
        let session = client.finish_restore_streaming().unwrap();
        assert_eq!(session.pid(), 9);
        let out = session.wait_with_output().unwrap();
        assert_eq!(out.stdout, b"out");
        assert_eq!(out.status, ExitStatus::Code(3));
    }

    #[test]
    fn hello_with_another_protocol_version_is_refused() {
        let stream = fake_agent(|s| {
            expect_request(s);
            let hello = Response::Hello {
                protocol_version: PROTOCOL_VERSION + 1,
                software_version: "9".into(),
            };
            write_frame(s, &hello).unwrap();
        });
        let err = AgentClient::over_unix_stream(stream).err().unwrap();
        assert!(matches!(err, ClientError::VersionMismatch { .. }), "{err}");
    }

    #[test]
    fn agent_version_mismatch_error_is_reported() {
        let stream = fake_agent(|s| {
            expect_request(s);
            let kind = ErrorKind::VersionMismatch;
            write_frame(
                s,
                &Response::Error {
                    kind,
                    message: "agent speaks 1".into(),
                },
            )
            .unwrap();
        });
        let err = AgentClient::over_unix_stream(stream).err().unwrap();
        assert_eq!(
            err.to_string(),
            "agent error (version mismatch): agent speaks 1"
        );
    }

    #[test]
    fn exec_session_streams_events_and_forwards_stdin() {
        let stream = fake_agent(|s| {
            assert!(matches!(expect_request(s), Request::Hello { .. }));
            let hello = Response::Hello {
                protocol_version: PROTOCOL_VERSION,
                software_version: "x".into(),
            };
            write_frame(s, &hello).unwrap();
            assert!(matches!(
                expect_request(s),
                Request::Exec(ExecRequest { stdin: true, .. })
            ));
            write_frame(s, &Response::Started { pid: 7 }).unwrap();
            assert_eq!(expect_request(s), Request::StdinData(b"in".to_vec()));
            assert_eq!(expect_request(s), Request::StdinEof);
            write_frame(s, &Response::Stdout(b"in".to_vec())).unwrap();
            write_frame(s, &Response::Stderr(b"e".to_vec())).unwrap();
            write_frame(s, &Response::Exited(ExitStatus::Code(0))).unwrap();
        });
        let client = AgentClient::over_unix_stream(stream).unwrap();
        assert_eq!(client.agent_version(), "x");
        let req = ExecRequest {
            argv: vec!["cat".into()],
            env: vec![],
            cwd: None,
            stdin: true,
        };
        let session = client.exec(req).unwrap();
        assert_eq!(session.pid(), 7);
        let (mut output, mut stdin) = session.split();
        let feeder = std::thread::spawn(move || {
            stdin.write(b"in").unwrap();
            stdin.close().unwrap();
        });
        assert_eq!(
            output.next_event().unwrap(),
            ExecEvent::Stdout(b"in".to_vec())
        );
        assert_eq!(
            output.next_event().unwrap(),
            ExecEvent::Stderr(b"e".to_vec())
        );
        assert_eq!(
            output.next_event().unwrap(),
            ExecEvent::Exited(ExitStatus::Code(0))
        );
        assert!(matches!(output.next_event(), Err(ClientError::Closed)));
        feeder.join().unwrap();
    }
}
