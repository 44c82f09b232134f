//! Serves the control socket of a running node.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pmivmm_proto::frame::{read_frame, write_frame};
use pmivmm_proto::AgentClient;
use vm_memory::GuestMemoryMmap;

use super::{ClusterAction, ControlRequest, ControlResponse, NodeState, NodeStatus, CONTROL_VERSION};
use crate::cluster::InFlight;
use crate::checkpoint;
use crate::migration::{self, MigrationNode};
use crate::devices::serial::ConsoleEvents;
use crate::vcpu::{StopCause, StopRequest};

/// Longest grace period a stop request may ask for.
const MAX_GRACE: Duration = Duration::from_secs(600);
/// A control client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the control server knows about its node.
pub struct NodeHandle {
    pub name: String,
    pub mem_mib: u64,
    pub started: Instant,
    pub guest_cid: Option<u64>,
    /// The hybrid-vsock socket, to reach the agent.
    pub vsock: Option<PathBuf>,
    pub console: Arc<ConsoleEvents>,
    pub stop: Arc<StopRequest>,
    /// Guest RAM (a cheap clone of the VM's mapping), for checkpoint and
    /// restore to copy pages by frame number.
    pub memory: GuestMemoryMmap,
    /// Migration state and peers.
    pub migration: Arc<MigrationNode>,
    stopping: AtomicBool,
}

impl NodeHandle {
    #[allow(clippy::too_many_arguments, reason = "the node's parts, one per field")]
    pub fn new(
        name: String,
        mem_mib: u64,
        started: Instant,
        guest_cid: Option<u64>,
        vsock: Option<PathBuf>,
        console: Arc<ConsoleEvents>,
        stop: Arc<StopRequest>,
        memory: GuestMemoryMmap,
        migration: Arc<MigrationNode>,
    ) -> Arc<Self> {
        Arc::new(NodeHandle {
            name,
            mem_mib,
            started,
            guest_cid,
            vsock,
            console,
            stop,
            memory,
            migration,
            stopping: AtomicBool::new(false),
        })
    }

    fn status(&self) -> NodeStatus {
        let m = self.console.milestones();
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let state = if self.stopping.load(Ordering::SeqCst) {
            NodeState::Stopping
        } else if m.agent_ready.is_some() {
            NodeState::Ready
        } else {
            NodeState::Booting
        };
        NodeStatus {
            name: self.name.clone(),
            state,
            vmm_pid: std::process::id(),
            mem_mib: self.mem_mib,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            first_output_ms: ms(m.first_output),
            init_ms: ms(m.init),
            ready_after_ms: ms(m.agent_ready),
            guest_cid: self.guest_cid,
        }
    }

    /// Asks the agent to power the guest off; forces the VM down if the
    /// agent cannot be reached or the guest is still running after `grace`.
    fn begin_stop(self: &Arc<Self>, grace: Duration) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let node = self.clone();
        let spawned = thread::Builder::new().name("stop".into()).spawn(move || {
            // A guest still booting has no agent to ask (and a connection
            // attempt would wait for it): the VM stops at once.
            let ready = node.console.milestones().agent_ready.is_some();
            let asked = match node.vsock.as_ref().filter(|_| ready) {
                Some(path) => match AgentClient::connect(path).and_then(|mut c| c.poweroff()) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(node = %node.name, "agent did not take the power-off request: {e}");
                        false
                    }
                },
                None => false,
            };
            if asked {
                tracing::info!(node = %node.name, "guest agent is powering off");
                thread::sleep(grace);
                tracing::warn!(node = %node.name, "guest still running {grace:?} after power-off; stopping the VM");
            }
            node.stop.request(StopCause::Control);
        });
        if spawned.is_err() {
            self.stop.request(StopCause::Control);
        }
    }
}

/// Accepts control connections on `listener` until the process ends.
pub fn spawn(listener: UnixListener, node: Arc<NodeHandle>) -> std::io::Result<()> {
    thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let node = node.clone();
                    let _ = thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || serve(stream, &node));
                }
                Err(e) => tracing::warn!("control socket accept: {e}"),
            }
        }
    })?;
    Ok(())
}

fn serve(mut stream: UnixStream, node: &Arc<NodeHandle>) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    loop {
        let req = match read_frame::<_, ControlRequest>(&mut stream) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = write_frame(&mut stream, &ControlResponse::Error(format!("bad request: {e}")));
                return;
            }
        };
        let resp = handle(req, node);
        if write_frame(&mut stream, &resp).is_err() {
            return;
        }
    }
}

fn handle(req: ControlRequest, node: &Arc<NodeHandle>) -> ControlResponse {
    let version = match req {
        ControlRequest::Status { version }
        | ControlRequest::Stop { version, .. }
        | ControlRequest::Checkpoint { version, .. }
        | ControlRequest::Restore { version, .. }
        | ControlRequest::Migrate { version, .. }
        | ControlRequest::Cluster { version }
        | ControlRequest::Control { version, .. } => version,
    };
    if version != CONTROL_VERSION {
        return ControlResponse::Error(format!(
            "control protocol version {version} is not supported (this VMM speaks {CONTROL_VERSION}); \
             use the pmivmm binary that started the node"
        ));
    }
    match req {
        ControlRequest::Status { .. } => ControlResponse::Status(node.status()),
        ControlRequest::Stop { grace_ms, .. } => {
            node.begin_stop(Duration::from_millis(grace_ms).min(MAX_GRACE));
            ControlResponse::Stopping
        }
        ControlRequest::Checkpoint { pid, dir, leave_running, page_walk, .. } => {
            let vsock = node.vsock.as_deref();
            match checkpoint::checkpoint(&node.memory, vsock, pid, Path::new(&dir), leave_running, page_walk) {
                Ok(report) => {
                    tracing::info!(node = %node.name, "checkpointed PID {pid} into {dir}: {report:?}");
                    ControlResponse::Checkpointed(report)
                }
                Err(e) => ControlResponse::Error(format!("checkpoint of PID {pid} failed: {e}")),
            }
        }
        ControlRequest::Restore { dir, page_walk, .. } => match checkpoint::restore(
            &node.memory,
            node.vsock.as_deref(),
            Path::new(&dir),
            page_walk,
        ) {
            Ok(report) => {
                tracing::info!(node = %node.name, "restored {dir} as PID {}: {report:?}", report.pid);
                ControlResponse::Restored(report)
            }
            Err(e) => ControlResponse::Error(format!("restore of {dir} failed: {e}")),
        },
        ControlRequest::Cluster { .. } => ControlResponse::Cluster(node.migration.cluster.view()),
        ControlRequest::Control { action, .. } => ControlResponse::Done(apply(&node.migration, action)),
        ControlRequest::Migrate { pid, target, precopy, .. } => {
            let _flight = node.migration.cluster.start_migration(InFlight {
                pid,
                comm: String::new(),
                target: target.clone(),
                automatic: false,
            });
            let opts = migration::source::Options { precopy };
            let result = migration::source::resolve(&node.migration, pid, &target)
                .and_then(|addr| migration::source::migrate(&node.migration, pid, &addr, opts));
            match result {
                Ok(report) => ControlResponse::Migrated(report),
                Err(e) => ControlResponse::Error(format!("migration of PID {pid} to {target} failed: {e}")),
            }
        }
    }
}

fn apply(node: &Arc<MigrationNode>, action: ClusterAction) -> String {
    let cluster = &node.cluster;
    match action {
        ClusterAction::Pin { pid, pinned } => {
            cluster.pin(pid, pinned);
            format!("PID {pid} {}", if pinned { "stays on this node" } else { "may move" })
        }
        ClusterAction::Block { blocked } => {
            cluster.blocked.store(blocked, Ordering::SeqCst);
            format!("node {} {} processes from other nodes", node.name, if blocked { "refuses" } else { "accepts" })
        }
        ClusterAction::Balance { on } => {
            cluster.auto_balance.store(on, Ordering::SeqCst);
            format!("automatic balancing {}", if on { "on" } else { "off" })
        }
        ClusterAction::Expel => {
            let visitors = node.visitors();
            let n = visitors.len();
            let node = node.clone();
            let spawned = thread::Builder::new().name("expel".into()).spawn(move || {
                for pid in visitors {
                    let sent = migration::source::resolve(&node, pid, "home").and_then(|addr| {
                        migration::source::migrate(&node, pid, &addr, migration::source::Options { precopy: true })
                    });
                    if let Err(e) = sent {
                        tracing::warn!("expel: PID {pid}: {e}");
                    }
                }
            });
            match spawned {
                Ok(_) => format!("sending {n} process(es) back to their homes"),
                Err(e) => format!("cannot start expelling: {e}"),
            }
        }
        ClusterAction::BringHome => format!("asked for {} process(es) to come home", node.bring_home()),
    }
}
