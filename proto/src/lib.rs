//! What the guest agent and the host (VMM, CLI) share: the agent's control
//! protocol and a blocking client for it.
//!
//! The protocol runs over any byte stream (in practice a vsock connection to
//! guest port [`AGENT_VSOCK_PORT`], reached on the host through the VMM's
//! hybrid vsock Unix socket, see [`hybrid_vsock`]). Every message is one
//! frame ([`frame`]): a little-endian `u32` payload length, then a postcard
//! encoded [`Request`] (host to agent) or [`Response`] (agent to host).
//!
//! A connection starts with [`Request::Hello`] / [`Response::Hello`], which
//! checks [`PROTOCOL_VERSION`]; the conversation rules are documented on
//! [`Request`].

pub mod client;
pub mod frame;
pub mod hybrid_vsock;
pub mod image;
pub mod message;
pub mod prelayout;

pub use client::{
    AgentClient, ClientError, CollectedOutput, DeputyControl, DeputyEvent, DeputyEvents, ExecEvent,
    ExecOutput, ExecSession, ExecStdin,
};
pub use frame::{FrameError, MAX_FRAME_LEN};
pub use message::{
    ErrorKind, ExecRequest, ExitStatus, LoadInfo, Migratability, MigrationObstacle, ProcessInfo,
    Request, Response,
};

/// The agent prints a line starting with this on the console once it is up:
/// `pmivmm-agent ready version=<version>`.
pub const AGENT_READY_MARKER: &str = "pmivmm-agent ready";

/// The version of this crate, which agent and VMM report to each other.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version of the wire protocol. Bump it on any change to [`Request`],
/// [`Response`] or the types they carry; both ends must speak the same one.
pub const PROTOCOL_VERSION: u32 = 11;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
