//! The VMM's control socket (`<run dir>/<node>/control.sock`): the node's own
//! state and lifecycle, as opposed to the guest agent's requests, which go
//! over vsock. Frames are the agent protocol's framing with their own
//! message types.

pub mod server;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use pmivmm_proto::frame::{read_frame, write_frame, FrameError};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointReport, RestoreReport};
use crate::cluster::ClusterView;
use crate::migration::MigrationReport;

/// Bump on any change to the messages below.
pub const CONTROL_VERSION: u32 = 5;

/// How long a control request may take before the client gives up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Checkpoint and restore run guest kernel work at emulated speed (a
/// restored page costs ~5 ms to fault in on the development hosts).
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    Status { version: u32 },
    /// Power the guest off (through the agent), forcing the VM down after
    /// `grace_ms` if it does not go.
    Stop { version: u32, grace_ms: u64 },
    /// Checkpoint guest process `pid` into directory `dir` (a path on the
    /// host, written by the VMM); kill the original afterwards unless
    /// `leave_running`. `page_walk`: the VMM walks the page tables of
    /// private anonymous memory (otherwise the guest's pagemap lists every
    /// page).
    Checkpoint { version: u32, pid: u32, dir: String, leave_running: bool, page_walk: bool },
    /// Restore the checkpoint in host directory `dir` as a new process
    /// (`page_walk` as for `Checkpoint`).
    Restore { version: u32, dir: String, page_walk: bool },
    /// Migrate guest process `pid` to `target` (node name, `host:port` or
    /// `home`).
    Migrate { version: u32, pid: u32, target: String, precopy: bool },
    /// The cluster as this node sees it.
    Cluster { version: u32 },
    /// One of the cluster controls (openMosix's mosctl).
    Control { version: u32, action: ClusterAction },
}

/// Cluster controls of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterAction {
    /// Keep `pid` on this node (the balancer leaves it) or let it move.
    Pin { pid: u32, pinned: bool },
    /// Refuse (or accept again) processes from other nodes.
    Block { blocked: bool },
    /// Switch the balancer on or off.
    Balance { on: bool },
    /// Send every process that migrated here back to its home.
    Expel,
    /// Ask the hosts of this node's migrated processes to send them home.
    BringHome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// The guest is booting; its agent has not announced itself yet.
    Booting,
    /// The agent is up.
    Ready,
    /// A stop was requested.
    Stopping,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Booting => "booting",
            NodeState::Ready => "ready",
            NodeState::Stopping => "stopping",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub state: NodeState,
    /// PID of the VMM process.
    pub vmm_pid: u32,
    pub mem_mib: u64,
    pub uptime_ms: u64,
    /// Boot milestones, in ms since the VMM started: first console output,
    /// /init started, agent ready.
    pub first_output_ms: Option<u64>,
    pub init_ms: Option<u64>,
    pub ready_after_ms: Option<u64>,
    pub guest_cid: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    Status(NodeStatus),
    Stopping,
    Error(String),
    Checkpointed(CheckpointReport),
    Restored(RestoreReport),
    Migrated(MigrationReport),
    Cluster(ClusterView),
    /// A control was applied; what it did.
    Done(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the node's control socket {path}: {source} (is the node running?)")]
    Connect { path: String, source: std::io::Error },
    #[error("control socket: {0}")]
    Frame(#[from] FrameError),
    #[error("the node closed its control connection without answering")]
    Closed,
    #[error("the node answered: {0}")]
    Node(String),
    #[error("unexpected answer from the node: {0:?}")]
    Unexpected(Box<ControlResponse>),
}

/// Sends one request to the control socket at `path` and returns the answer.
pub fn request(path: &Path, req: &ControlRequest) -> Result<ControlResponse, Error> {
    request_within(path, req, CLIENT_TIMEOUT)
}

fn request_within(path: &Path, req: &ControlRequest, timeout: Duration) -> Result<ControlResponse, Error> {
    let mut s = UnixStream::connect(path)
        .map_err(|source| Error::Connect { path: path.display().to_string(), source })?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    write_frame(&mut s, req)?;
    match read_frame::<_, ControlResponse>(&mut s)? {
        None => Err(Error::Closed),
        Some(ControlResponse::Error(e)) => Err(Error::Node(e)),
        Some(r) => Ok(r),
    }
}

/// The status of the node whose control socket is `path`.
pub fn status(path: &Path) -> Result<NodeStatus, Error> {
    match request(path, &ControlRequest::Status { version: CONTROL_VERSION })? {
        ControlResponse::Status(s) => Ok(s),
        other => Err(Error::Unexpected(Box::new(other))),
    }
}

/// Asks the node to stop.
pub fn stop(path: &Path, grace: Duration) -> Result<(), Error> {
    let req = ControlRequest::Stop { version: CONTROL_VERSION, grace_ms: grace.as_millis() as u64 };
    match request(path, &req)? {
        ControlResponse::Stopping => Ok(()),
        other => Err(Error::Unexpected(Box::new(other))),
    }
}

/// Asks the node to checkpoint guest process `pid` into host directory `dir`.
pub fn checkpoint(
    path: &Path,
    pid: u32,
    dir: &Path,
    leave_running: bool,
    page_walk: bool,
) -> Result<CheckpointReport, Error> {
    let req = ControlRequest::Checkpoint {
        version: CONTROL_VERSION,
        pid,
        dir: dir.display().to_string(),
        leave_running,
        page_walk,
    };
    match request_within(path, &req, CHECKPOINT_TIMEOUT)? {
        ControlResponse::Checkpointed(r) => Ok(r),
        other => Err(Error::Unexpected(Box::new(other))),
    }
}

/// Asks the node to restore the checkpoint in host directory `dir`.
pub fn restore(path: &Path, dir: &Path, page_walk: bool) -> Result<RestoreReport, Error> {
    let req = ControlRequest::Restore { version: CONTROL_VERSION, dir: dir.display().to_string(), page_walk };
    match request_within(path, &req, CHECKPOINT_TIMEOUT)? {
        ControlResponse::Restored(r) => Ok(r),
        other => Err(Error::Unexpected(Box::new(other))),
    }
}

/// Asks the node to migrate guest process `pid` to `target`.
pub fn migrate(path: &Path, pid: u32, target: &str, precopy: bool) -> Result<MigrationReport, Error> {
    let req = ControlRequest::Migrate { version: CONTROL_VERSION, pid, target: target.to_owned(), precopy };
    match request_within(path, &req, CHECKPOINT_TIMEOUT)? {
        ControlResponse::Migrated(r) => Ok(r),
        other => Err(Error::Unexpected(Box::new(other))),
    }
}

/// The cluster as the node at `path` sees it.
pub fn cluster(path: &Path) -> Result<ClusterView, Error> {
    match request(path, &ControlRequest::Cluster { version: CONTROL_VERSION })? {
        ControlResponse::Cluster(v) => Ok(v),
        other => Err(Error::Unexpected(Box::new(other))),
    }
}

/// Applies a cluster control; returns what the node did.
pub fn control(path: &Path, action: ClusterAction) -> Result<String, Error> {
    match request(path, &ControlRequest::Control { version: CONTROL_VERSION, action })? {
        ControlResponse::Done(what) => Ok(what),
        other => Err(Error::Unexpected(Box::new(other))),
    }
}
