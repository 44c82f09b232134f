//! Live migration of guest processes between node VMs.
//!
//! The source VMM freezes nothing while it copies: pre-copy rounds
//! ([`source`]) read the pages of the running process straight out of guest
//! RAM and stream them to the target over an authenticated peer link
//! ([`crate::peer`], messages in [`protocol`]); only the last, small round
//! runs with the process frozen. The target ([`target`]) keeps the pages
//! ([`pages`]) until the image arrives, has its agent rebuild the process,
//! writes the pages into the new frames and lets it run.
//!
//! Home and deputy (openMosix style): the node where a process started stays
//! its home. After a migration from home, the frozen original becomes its
//! deputy ([`deputy`]): it keeps the PID, so its parent can wait for it, and
//! `ps` at home shows it with the node it runs on. The node running the
//! process relays its output and exit status home and delivers the signals
//! sent to the deputy ([`relay`]).
//!
//! Failure safety: the source keeps the frozen original until the target
//! answers `Running`. Any failure before `Commit` resumes it. If the link
//! breaks after `Commit`, the source asks the target (`Query`) whether the
//! process runs; the target decides atomically (a `Query` aborts a migration
//! not yet started), so the process runs on exactly one node. A target VMM
//! that cannot be reached at all has lost its VM, and the process with it:
//! the original resumes.

pub mod deputy;
pub mod link;
pub mod pages;
pub mod protocol;
pub mod relay;
pub mod server;
pub mod source;
pub mod target;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pmivmm_proto::ClientError;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use vm_memory::GuestMemoryMmap;

use crate::agent::{self, AgentError};
use crate::cluster::ClusterState;
use crate::peer::ClusterKey;

pub use crate::agent::Agent;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reach(#[from] AgentError),
    #[error("{0}")]
    Agent(ClientError),
    #[error("peer link: {0}")]
    Link(#[from] crate::peer::Error),
    #[error("the peer sent nothing for {0:?}")]
    PeerTimeout(Duration),
    #[error("the peer closed the link")]
    PeerClosed,
    #[error("the peer sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("invalid message from the peer: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("invalid layout from the peer: {0}")]
    BadLayout(#[from] pmivmm_proto::prelayout::PreLayoutError),
    #[error("the agent sent an invalid process image: {0}")]
    BadImage(pmivmm_proto::image::ImageError),
    #[error(transparent)]
    Frames(#[from] crate::checkpoint::frames::FrameError),
    #[error(transparent)]
    Store(#[from] pages::StoreError),
    #[error("the target refused the process: {0}")]
    Refused(String),
    #[error("unknown target {0:?}: give a running node's name, an address host:port, or `home`")]
    UnknownTarget(String),
    #[error("PID {0} runs at its home node; `home` only moves a process that migrated here")]
    AlreadyHome(u32),
    #[error("the target is this node")]
    SelfTarget,
    #[error("node {0} accepts no migrated processes (blocked)")]
    Blocked(String),
    #[error("no deputy {0:#x} at this node")]
    NoDeputy(u64),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0} (the process was not moved)")]
    NotMoved(Box<Error>),
    #[error("the process runs on the target, but its home could not take over: {0}")]
    AfterCommit(Box<Error>),
}

impl Error {
    fn unexpected(expected: &'static str, got: &protocol::PeerMsg) -> Error {
        Error::Unexpected { expected, got: got.name() }
    }
}

/// What a migration did, for the CLI and benchmarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub pid: u32,
    pub comm: String,
    /// The target node's name and the process's PID there.
    pub target: String,
    pub remote_pid: u32,
    /// Pages sent in each pre-copy round (the process running).
    pub precopy_rounds: Vec<u64>,
    /// Pages sent with the process frozen.
    pub frozen_pages: u64,
    pub bytes_sent: u64,
    /// Pre-copy rounds, the process running.
    pub precopy_us: u64,
    /// From the freeze until the target reported the process running.
    pub frozen_us: u64,
    /// Of the freeze: the target restoring the process (its guest kernel
    /// building the address space and faulting the pages in).
    pub target_restore_us: u64,
    pub total_us: u64,
}

/// What the migration code of one node knows and shares.
pub struct MigrationNode {
    pub name: String,
    /// The address peers reach this node at (`host:port`).
    pub addr: String,
    pub key: ClusterKey,
    pub memory: GuestMemoryMmap,
    pub vsock: Option<PathBuf>,
    pub rt: Handle,
    /// The fault-injection file of the failure-safety tests (see
    /// `target::fault_point`).
    pub fault_file: Option<PathBuf>,
    /// Deputies of processes that started here and run elsewhere, by token.
    deputies: Mutex<HashMap<u64, Arc<deputy::DeputyHandle>>>,
    /// Processes that migrated here, by local PID.
    relays: Mutex<HashMap<u32, relay::RelayHandle>>,
    /// Migrations received, by id.
    outcomes: Mutex<HashMap<u64, target::Outcome>>,
    /// Pages the stores of incoming migrations hold together: guest RAM
    /// and one batch.
    page_budget: Arc<pages::PageBudget>,
    /// Membership, loads, pins, the balancer's state.
    pub cluster: ClusterState,
}

impl MigrationNode {
    #[allow(clippy::too_many_arguments, reason = "the node's parts, one per field")]
    pub fn new(
        name: String,
        addr: String,
        key: ClusterKey,
        memory: GuestMemoryMmap,
        vsock: Option<PathBuf>,
        rt: Handle,
        fault_file: Option<PathBuf>,
        cluster: ClusterState,
    ) -> Arc<Self> {
        Arc::new(MigrationNode {
            name,
            addr,
            key,
            vsock,
            rt,
            fault_file,
            deputies: Mutex::default(),
            relays: Mutex::default(),
            outcomes: Mutex::default(),
            page_budget: pages::PageBudget::new(
                crate::guest_ram::ram_frames(&memory) as usize + protocol::PAGES_PER_BATCH,
            ),
            memory,
            cluster,
        })
    }

    /// Bytes of guest RAM.
    pub fn agent(&self) -> Result<Agent, Error> {
        Ok(agent::connect(self.vsock.as_deref())?)
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// A random 64-bit identifier (migration ids, deputy tokens; peers are
/// authenticated, so they need to be unique, not secret).
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}
