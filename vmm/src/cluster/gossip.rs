//! The node's cluster loops: every [`ROUND`] it bumps its heartbeat and
//! exchanges tables (with its last known load and its vCPU's use over the
//! round) with every known member (and
//! the `--join` and discovered seeds) over short peer links (push-pull);
//! another loop reads the load from its agent every [`LOAD_POLL`] and lets
//! its balancer send one process away.
//!
//! Why not a gossip crate (chitchat, foca): both speak their own UDP
//! protocols without our cluster-key authentication; clusters here are a
//! handful of nodes, for which all-to-all push-pull over the authenticated
//! peer links we already have is simpler and as fast to converge.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pmivmm_proto::{ClientError, LoadInfo};

use super::balancer::{self, History, Policy};
use super::cpu_use::CpuUse;
use super::membership::{LoadSamples, NodeLoad};
use super::InFlight;
use crate::devices::lock;
use crate::migration::protocol::PeerMsg;
use crate::agent::Agent;
use crate::migration::{source, Error, MigrationNode};
use crate::peer::PeerLink;

pub const ROUND: Duration = Duration::from_millis(500);
/// How often the agent is asked for the load (and the balancer decides).
/// Each request costs the emulated guest of the development hosts far more
/// than its share of vCPU time suggests (vsock packets, interrupts, a
/// wake-up): asked every 0.5 s, a member ran a CPU-bound job 2.3x slower
/// than a node alone (`burn 50`: 15 s against 6.6 s).
const LOAD_POLL: Duration = Duration::from_secs(2);
/// Gossip must not wait long for a member that is gone.
const GOSSIP_TIMEOUT: Duration = Duration::from_secs(1);

fn node_load(info: &LoadInfo) -> NodeLoad {
    NodeLoad {
        runnable: info.runnable_tasks,
        cpus: info.cpus,
        mem_free_mib: info.mem_available_bytes >> 20,
        cpu_percent: 0,
    }
}

/// Starts the cluster loops of `node`, each on its own thread: gossip at a
/// steady pace (its heartbeat must not wait for a busy guest), and the load
/// poll with the balancer.
pub fn start(node: Arc<MigrationNode>) -> std::io::Result<()> {
    let gossiper = node.clone();
    thread::Builder::new().name("gossip".into()).spawn(move || gossip(&gossiper))?;
    thread::Builder::new().name("balancer".into()).spawn(move || poll_and_balance(&node))?;
    Ok(())
}

fn gossip(node: &Arc<MigrationNode>) {
    let mut cpu = CpuUse::default();
    loop {
        let started = Instant::now();
        let cluster = &node.cluster;
        let cpu_percent = cluster.vcpu_clock.get().and_then(|c| c.now()).and_then(|t| cpu.sample(t, started));
        let load = NodeLoad { cpu_percent: cpu_percent.unwrap_or(0), ..*lock(&cluster.load) };
        lock(&cluster.table).tick(load, cluster.is_blocked(), started);
        exchange(node);
        thread::sleep(ROUND.saturating_sub(started.elapsed()));
    }
}

/// Reads the node's load from its agent (which a loaded guest answers
/// slowly) every [`LOAD_POLL`] and lets the balancer act.
fn poll_and_balance(node: &Arc<MigrationNode>) {
    let mut history = History::default();
    let policy = Policy::default();
    let mut agent = AgentLink::default();
    let mut samples = LoadSamples::default();
    loop {
        let started = Instant::now();
        let cluster = &node.cluster;
        // A node alone does not ask its agent (guest kernel time is precious
        // on emulated hosts).
        let alone = cluster.seeds(Instant::now()).is_empty() && lock(&cluster.table).peers().is_empty();
        let load = match alone {
            true => None,
            false => agent.ask(node, |a| a.load()).map(|i| samples.push(node_load(&i))),
        };
        if let Some(load) = load {
            *lock(&cluster.load) = load;
        }
        let may_balance = cluster.auto_balance.load(Ordering::SeqCst)
            && !cluster.busy.load(Ordering::SeqCst);
        if let Some(load) = load.filter(|_| may_balance) {
            balance(node, &load, &mut agent, &mut history, &policy);
        }
        thread::sleep(LOAD_POLL.saturating_sub(started.elapsed()));
    }
}

/// The balancer's connection to its agent, kept open between polls: on the
/// emulated development hosts a new connection (vsock connect, a thread in
/// the agent, the handshake) costs the guest ~0.4 s of vCPU, so connecting
/// for each poll kept an idle member's vCPU busy.
#[derive(Default)]
struct AgentLink(Option<Agent>);

impl AgentLink {
    /// One request; after an error the next request connects again.
    fn ask<T>(&mut self, node: &MigrationNode, request: impl FnOnce(&mut Agent) -> Result<T, ClientError>) -> Option<T> {
        let agent = match &mut self.0 {
            Some(agent) => agent,
            None => match node.agent() {
                Ok(agent) => self.0.insert(agent),
                Err(e) => {
                    tracing::debug!("balancer: agent: {e}");
                    return None;
                }
            },
        };
        match request(agent) {
            Ok(answer) => Some(answer),
            Err(e) => {
                tracing::debug!("balancer: agent: {e}");
                self.0 = None;
                None
            }
        }
    }
}

/// One push-pull exchange with every member and seed.
fn exchange(node: &Arc<MigrationNode>) {
    let (ours, mut peers) = {
        let table = lock(&node.cluster.table);
        (table.gossip(Instant::now()), table.peers().into_iter().map(|(_, addr)| addr).collect::<Vec<_>>())
    };
    for seed in node.cluster.seeds(Instant::now()) {
        if !peers.contains(&seed) && seed != node.addr {
            peers.push(seed);
        }
    }
    for addr in peers {
        match gossip_with(node, &addr, &ours) {
            Ok(theirs) => {
                if let Err(e) = lock(&node.cluster.table).merge(&theirs, Instant::now()) {
                    tracing::warn!("cluster: table from {addr} refused: {e}");
                }
            }
            Err(e) => tracing::debug!("cluster: gossip with {addr}: {e}"),
        }
    }
}

fn gossip_with(node: &MigrationNode, addr: &str, ours: &[super::membership::Member]) -> Result<Vec<super::membership::Member>, Error> {
    node.rt.block_on(async {
        let mut link = PeerLink::connect(addr, &node.key, &node.name, GOSSIP_TIMEOUT).await?;
        link.send(&PeerMsg::Gossip { members: ours.to_vec() }).await?;
        match tokio::time::timeout(GOSSIP_TIMEOUT, link.recv::<PeerMsg>()).await {
            Ok(Ok(Some((PeerMsg::Gossip { members }, _)))) => Ok(members),
            Ok(Ok(Some((other, _)))) => Err(Error::Unexpected { expected: "Gossip", got: other.name() }),
            Ok(Ok(None)) => Err(Error::PeerClosed),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::PeerTimeout(GOSSIP_TIMEOUT)),
        }
    })
}

/// Sends one process away if the balancer finds one.
fn balance(
    node: &Arc<MigrationNode>,
    load: &super::membership::NodeLoad,
    agent: &mut AgentLink,
    history: &mut History,
    policy: &Policy,
) {
    let now = Instant::now();
    let members = lock(&node.cluster.table).view(now);
    // The process list costs the guest much more than the load (which the
    // guest kernel counts without the agent or kernel threads): ask for it
    // only when some member should receive a process.
    let Some(to) = balancer::target(load, &members, history, policy, now) else { return };
    let Some(procs) = agent.ask(node, |a| a.ps()) else { return };
    // Pinned processes stay, and so do those that just arrived (no
    // ping-pong between nodes).
    let pinned = |pid| node.cluster.is_pinned(pid) || node.arrived_within(pid, policy.cooldown);
    let Some(p) = balancer::process(&procs, &pinned, history, policy, now) else { return };
    let (pid, comm, target, target_addr) = (p.pid, p.comm.clone(), to.member.name.clone(), to.member.addr.clone());
    tracing::info!("balancer: {} runnable on {} CPU(s) here; sending PID {pid} ({comm}) to {target}", load.runnable, load.cpus);
    history.sent(to, policy, now);
    history.moved.insert(pid, now);
    // The migration runs on its own thread: gossip must go on meanwhile.
    node.cluster.busy.store(true, Ordering::SeqCst);
    let mover = node.clone();
    let spawned = thread::Builder::new().name("balancer".into()).spawn(move || {
        let node = &mover;
        let flight = InFlight { pid, comm, target: target.clone(), automatic: true };
        let _flight = node.cluster.start_migration(flight);
        match source::migrate(node, pid, &target_addr, source::Options { precopy: true }) {
            Ok(r) => tracing::info!("balancer: PID {pid} runs on {} as PID {}", r.target, r.remote_pid),
            Err(e) => tracing::warn!("balancer: moving PID {pid} to {target} failed: {e}"),
        }
        // The next decision counts this process at its target (History::sent).
        node.cluster.busy.store(false, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        tracing::warn!("balancer: cannot start a migration thread: {e}");
        node.cluster.busy.store(false, Ordering::SeqCst);
    }
}
