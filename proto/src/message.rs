//! The messages of the agent protocol.
//!
//! Compatibility rule: variant 0 of [`Request`] and [`Response`] is `Hello`
//! and variant 1 of [`Response`] is `Error`, in every protocol version, with
//! the same fields, so that peers of different versions can always exchange
//! hellos and the version-mismatch error. Everything else may change with
//! [`crate::PROTOCOL_VERSION`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::image::Pages;
use crate::prelayout::PreLayout;

/// A message from the host to the agent.
///
/// Conversation rules:
/// - the first request on a connection must be `Hello` with the agent's
///   [`crate::PROTOCOL_VERSION`]; otherwise the agent replies `Error`
///   (`HelloRequired` / `VersionMismatch`) and closes the connection;
/// - every other request gets exactly one reply, except `Exec`, `StdinData`
///   and `StdinEof` (see [`ExecRequest`]);
/// - a request the agent cannot decode (unknown variant from a newer host,
///   garbage) gets `Error` (`UnknownRequest` / `BadRequest`); the connection
///   stays usable, since framing is independent of decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Must stay variant 0.
    Hello {
        protocol_version: u32,
        software_version: String,
    },
    /// Starts a process; see [`ExecRequest`] for the replies.
    Exec(ExecRequest),
    /// Bytes for the stdin of the running exec (discarded if it has none).
    StdinData(Vec<u8>),
    /// Closes the stdin of the running exec.
    StdinEof,
    /// Replied with `ProcessList`.
    Ps,
    /// Replied with `Load`.
    Load,
    /// Sends `signal` to `pid`; replied with `Ok`.
    Kill { pid: u32, signal: i32 },
    /// Replied with `Ok`, then the agent syncs and resets the node.
    Poweroff,
    /// Freezes `pid` (ptrace) and captures it; replied with `Checkpointed`
    /// or `Error` (`Refused` lists the obstacles; the process is untouched).
    /// The process stays frozen, traced by this connection, until
    /// `ResumeOriginal` or `KillOriginal` on the SAME connection; if the
    /// connection closes first, the agent resumes it. `page_walk`: where
    /// the guest kernel tells where the page tables are, private anonymous
    /// memory is reported as ranges for the VMM to walk
    /// ([`crate::image::PageWalk`]) instead of read from pagemap.
    Checkpoint { pid: u32, page_walk: bool },
    /// Lets a process frozen by `Checkpoint` on this connection run on;
    /// replied with `Ok`.
    ResumeOriginal { pid: u32 },
    /// Kills a process frozen by `Checkpoint` on this connection; replied
    /// with `Ok` once it is gone.
    KillOriginal { pid: u32 },
    /// Builds a stopped process from an encoded
    /// [`crate::image::ProcessImage`]; replied with `RestorePrepared`, whose
    /// frames must receive the saved pages before `FinishRestore` on the
    /// SAME connection. If the connection closes first, the agent kills the
    /// half-restored process.
    ///
    /// `forward_stdio` (migration): the process's stdio that the image does
    /// not reopen as regular files become pipes (stdin: /dev/null) whose
    /// output is streamed on this connection after `Restored`, exactly like
    /// an exec's: `Stdout` / `Stderr` chunks, then `Exited`. Without it they
    /// are /dev/null. `page_walk`: the frames are reported as a
    /// [`crate::image::PageWalk`] where the guest kernel allows (as for
    /// `Checkpoint`).
    PrepareRestore { image: Vec<u8>, forward_stdio: bool, page_walk: bool },
    /// Restores the rest of the prepared process and lets it run; replied
    /// with `Restored` (then the forwarded output, see `PrepareRestore`).
    FinishRestore,
    /// One pre-copy round of a process that keeps running: the agent seizes
    /// `pid` (first round; refused with `Refused` like `Checkpoint` if it
    /// cannot be checkpointed), stops it for a moment, reads which pages are
    /// present (`first`: all of them) or were written since the previous
    /// round (soft-dirty), clears the soft-dirty bits and lets it run on.
    /// Replied with `PrecopyPages`. The process stays seized (but running) by
    /// this connection; a later `Checkpoint { pid }` on the same connection
    /// freezes it for good and reports every present page with its
    /// soft-dirty bit ([`crate::image::PageRef::dirty`]: written since the last round). If
    /// the connection closes first, or a later round fails, the agent lets
    /// it go. `first` again starts over (every present page). On a kernel
    /// without soft-dirty tracking every present page counts as dirty.
    ///
    /// `page_walk` (as for `Checkpoint`): if the reply leaves pages to the
    /// VMM's walk, the process stays stopped (so that the walk reads the
    /// soft-dirty bits before they are cleared) until `PrecopyContinue`.
    PrecopyRound { pid: u32, first: bool, page_walk: bool },
    /// After the VMM walked a round's page tables: clears the soft-dirty
    /// bits and lets the process run on; replied with `Ok` (also when the
    /// round held nothing).
    PrecopyContinue { pid: u32 },
    /// Turns the process frozen by `Checkpoint { pid }` on this connection
    /// into the deputy of its migrated self, which now runs on `node`: it
    /// keeps its PID, its parent and its stdio, stays frozen and never runs
    /// its own code again. Replied with `Ok`; on `Error` it has been killed
    /// (the host asks once the migrated process runs elsewhere, so resuming
    /// it would run the process twice). From then on the connection carries only the
    /// deputy's traffic (other requests get `Busy`): the agent sends
    /// `DeputySignal` for each signal sent to the deputy (which the deputy
    /// does not take; signals already pending at the checkpoint travel in
    /// the image and are not sent again), and accepts `DeputyOutput` and
    /// `DeputyExit` (and `DeputyMoved`). A SIGKILL kills the deputy: the agent sends
    /// `DeputySignal { signal: 9 }` and nothing more, drops further output
    /// and answers `DeputyExit` with `Ok` at once. If the connection closes
    /// before `DeputyExit`, the deputy is killed (SIGKILL): its migrated
    /// process has lost its home. `Ps` shows a deputy's `node` as
    /// [`ProcessInfo::remote`].
    BecomeDeputy { pid: u32, node: String },
    /// Bytes the migrated process wrote to its fd `fd` (1 or 2): written to
    /// the deputy's own fd `fd` (its pipe, terminal or file; dropped if the
    /// reader is gone). No reply, except `Error` (`BadRequest`) for another
    /// `fd` or without a deputy.
    DeputyOutput { fd: u8, data: Vec<u8> },
    /// The migrated process ended this way: the deputy ends the same way
    /// (exits with the code, or is killed by the signal with its default
    /// action, dumping core only if the migrated process did), so that its
    /// parent sees it. Replied with `Ok` once the deputy is gone; a signal
    /// that cannot end a process gets `Error` (`BadRequest`) and the
    /// deputy stays.
    DeputyExit(ExitStatus),
    /// The migrated process now runs on `node` (it moved on, or came
    /// home): `Ps` shows it. No reply, except `Error` (`BadRequest`)
    /// without a deputy.
    DeputyMoved { node: String },
    /// Starts the child of a coming `PrepareRestore` on this connection (the
    /// restore stub, stopped, with the stdio `forward_stdio` asks for), so
    /// that a migration target does it while the pages are still arriving
    /// rather than while the process is frozen. Replied with `Ok`. The
    /// next `PrepareRestore` on this connection builds the process in it
    /// (with the same `forward_stdio`); dropping the connection kills it.
    StartRestore { forward_stdio: bool },
    /// Maps and populates private anonymous memory in the child started by
    /// `StartRestore` on this connection, ahead of its `PrepareRestore`
    /// (a migration target does it while the process still runs at its
    /// source); replied with `Ok`. Regions that would cover the child's own
    /// mappings are left out. The restore keeps what the image maps where
    /// it was laid out and unmaps the rest; on `Error` nothing is kept.
    PreLayout(PreLayout),
}

impl Request {
    /// How many variants [`Request`] has: a decoded variant index at or past
    /// this is a request from a newer protocol version.
    pub const VARIANTS: u32 = 21;
}

/// Starts a process in the guest.
///
/// The agent replies `Started { pid }` (or `Error`), then streams `Stdout`
/// and `Stderr` chunks as the process writes them, then `Exited` when it has
/// exited (whatever it wrote before exiting has been sent by then; output of
/// background children still holding the pipes afterwards is dropped). While
/// an exec runs, the connection accepts only `StdinData` / `StdinEof`; other
/// requests get `Error` (`Busy`). If the client disconnects while the process
/// runs, the agent sends SIGHUP to its process group (the exec is a session
/// leader, as after a terminal hangup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; a program without `/` is looked up in the
    /// `PATH` of the process's environment.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to (or replacing entries of) the default
    /// environment `PATH=/usr/sbin:/usr/bin:/sbin:/bin`, `HOME=/root`,
    /// `TERM=dumb`.
    pub env: Vec<String>,
    /// Working directory; `None` runs in the agent's (`/` in a node).
    pub cwd: Option<String>,
    /// Whether stdin comes from the client (`StdinData` / `StdinEof`);
    /// otherwise it is `/dev/null`.
    pub stdin: bool,
}

/// A message from the agent to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Must stay variant 0.
    Hello {
        protocol_version: u32,
        software_version: String,
    },
    /// Must stay variant 1.
    Error {
        kind: ErrorKind,
        message: String,
    },
    Ok,
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitStatus),
    ProcessList(Vec<ProcessInfo>),
    Load(LoadInfo),
    /// The reply to `Checkpoint`: the encoded image
    /// ([`crate::image::ProcessImage::to_bytes`]) and every present page with
    /// its guest frame, listed or left to the VMM's walk; the
    /// [`crate::image::PageKind::Data`] ones, in address order, are the
    /// pages of the image's `pages` runs. With a walk, the agent's runs are
    /// those of its listed pages only: the VMM adds the walked ones.
    Checkpointed {
        image: Vec<u8>,
        pages: Pages,
    },
    /// The reply to `PrepareRestore`: the new process and, in the order of
    /// the image's `pages` runs, the frame each saved page must be written
    /// to: listed, or a [`crate::image::WalkMode::Populated`] walk of
    /// exactly those runs.
    RestorePrepared {
        pid: u32,
        pages: Pages,
    },
    /// The reply to `FinishRestore`: the restored process runs.
    Restored {
        pid: u32,
    },
    /// The reply to `PrecopyRound`: the present (first round) or dirtied
    /// pages with their frames, as of the moment the process was stopped.
    PrecopyPages {
        pages: Pages,
    },
    /// A signal was sent to a deputy (see `BecomeDeputy`); it must reach
    /// the migrated process.
    DeputySignal {
        signal: i32,
    },
}

impl Response {
    /// The variant's name, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "Hello",
            Response::Error { .. } => "Error",
            Response::Ok => "Ok",
            Response::Started { .. } => "Started",
            Response::Stdout(_) => "Stdout",
            Response::Stderr(_) => "Stderr",
            Response::Exited(_) => "Exited",
            Response::ProcessList(_) => "ProcessList",
            Response::Load(_) => "Load",
            Response::Checkpointed { .. } => "Checkpointed",
            Response::RestorePrepared { .. } => "RestorePrepared",
            Response::Restored { .. } => "Restored",
            Response::PrecopyPages { .. } => "PrecopyPages",
            Response::DeputySignal { .. } => "DeputySignal",
        }
    }
}

/// What kind of failure an `Error` reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peers speak different protocol versions; the agent closes.
    VersionMismatch,
    /// The first request was not `Hello`; the agent closes.
    HelloRequired,
    /// A request variant this agent does not know (a newer host).
    UnknownRequest,
    /// A request that could not be decoded or has invalid arguments.
    BadRequest,
    /// A request that is not valid now (e.g. `Exec` while one runs).
    Busy,
    /// The process named by the request does not exist.
    NoSuchProcess,
    /// The exec'd program could not be started.
    SpawnFailed,
    /// Any other failure of the operation (the message says what).
    Failed,
    /// The process cannot be checkpointed (the message lists why).
    Refused,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::VersionMismatch => "version mismatch",
            ErrorKind::HelloRequired => "hello required",
            ErrorKind::UnknownRequest => "unknown request",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::Busy => "busy",
            ErrorKind::NoSuchProcess => "no such process",
            ErrorKind::SpawnFailed => "spawn failed",
            ErrorKind::Failed => "failed",
            ErrorKind::Refused => "refused",
        };
        f.write_str(s)
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It called exit with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal { signal: i32, core_dumped: bool },
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal {
                signal,
                core_dumped: false,
            } => write!(f, "killed by signal {signal}"),
            ExitStatus::Signal {
                signal,
                core_dumped: true,
            } => {
                write!(f, "killed by signal {signal} (core dumped)")
            }
        }
    }
}

/// One process of the node, as `Ps` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    /// The state letter of /proc/PID/stat (R, S, D, Z, T, t, ...).
    pub state: char,
    /// The kernel's short name of the process (/proc/PID/comm).
    pub comm: String,
    /// Its arguments (empty for kernel threads and zombies).
    pub argv: Vec<String>,
    /// User plus system CPU time, in milliseconds.
    pub cpu_time_ms: u64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
    pub migratable: Migratability,
    /// For a deputy (see `Request::BecomeDeputy`): the node its migrated
    /// process runs on now.
    pub remote: Option<String>,
}

/// Whether a process can be migrated to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Migratability {
    Migratable,
    /// It cannot, for these reasons (never empty).
    NotMigratable(Vec<MigrationObstacle>),
}

/// Why a process cannot be migrated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationObstacle {
    /// It is PID 1.
    Init,
    /// It is the agent itself.
    Agent,
    KernelThread,
    /// It has exited and waits to be reaped.
    Zombie,
    MultiThreaded {
        threads: u32,
    },
    /// It has a writable shared mapping (which another process may share).
    SharedWritableMapping {
        path: String,
    },
    /// It has a System V shared memory segment attached.
    SysvSharedMemory,
    Sockets {
        count: u32,
    },
    /// It has open devices other than the console, a tty or /dev/null
    /// and friends.
    Devices {
        paths: Vec<String>,
    },
    /// A file it has open was deleted (or replaced) since it was opened: a
    /// target could not reopen it by path.
    DeletedFile {
        fd: i32,
        path: String,
    },
    /// It has open fds of kinds that cannot be recreated (eventfd, epoll,
    /// signalfd, timerfd, ...): the /proc/PID/fd link targets.
    SpecialFiles {
        kinds: Vec<String>,
    },
    /// It has POSIX timers (`timer_create`), which a restorer cannot
    /// recreate with their IDs.
    PosixTimers {
        count: u32,
    },
    /// It is being traced by this PID.
    Traced {
        tracer: u32,
    },
    /// The agent could not inspect it (the error says why).
    Uninspectable {
        error: String,
    },
}

impl fmt::Display for MigrationObstacle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationObstacle::Init => f.write_str("is PID 1 (init)"),
            MigrationObstacle::Agent => f.write_str("is the agent"),
            MigrationObstacle::KernelThread => f.write_str("is a kernel thread"),
            MigrationObstacle::Zombie => f.write_str("has exited (zombie)"),
            MigrationObstacle::MultiThreaded { threads } => {
                write!(f, "is multi-threaded ({threads} threads)")
            }
            MigrationObstacle::SharedWritableMapping { path } => {
                write!(f, "has a shared writable mapping of {path}")
            }
            MigrationObstacle::SysvSharedMemory => {
                f.write_str("has System V shared memory attached")
            }
            MigrationObstacle::Sockets { count } => write!(f, "has {count} open socket(s)"),
            MigrationObstacle::Devices { paths } => {
                write!(f, "has open devices: {}", paths.join(", "))
            }
            MigrationObstacle::DeletedFile { fd, path } => {
                write!(f, "has fd {fd} open on {path}, which was deleted while open (it cannot be reopened by path)")
            }
            MigrationObstacle::SpecialFiles { kinds } => {
                write!(f, "has open special files: {}", kinds.join(", "))
            }
            MigrationObstacle::PosixTimers { count } => {
                write!(f, "has {count} POSIX timer(s) (timer_create), which cannot be restored")
            }
            MigrationObstacle::Traced { tracer } => write!(f, "is traced by PID {tracer}"),
            MigrationObstacle::Uninspectable { error } => write!(f, "cannot be inspected: {error}"),
        }
    }
}

/// The load of a node, as `Load` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadInfo {
    /// Load averages over 1, 5 and 15 minutes.
    pub load_avg: [f32; 3],
    /// Threads of user space currently running or runnable, not counting
    /// the agent's own or kernel threads.
    pub runnable_tasks: u32,
    /// Tasks (threads) that exist.
    pub total_tasks: u32,
    /// Online CPUs.
    pub cpus: u32,
    pub mem_total_bytes: u64,
    pub mem_free_bytes: u64,
    pub mem_available_bytes: u64,
}
