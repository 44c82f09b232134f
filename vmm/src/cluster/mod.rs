//! The cluster: membership and load gossip ([`membership`], [`gossip`]) and
//! automatic load balancing ([`balancer`]), on top of migration.
//!
//! A node started with `--join ADDR` gossips with that node; through it, it
//! learns everyone else (and everyone learns it). A node started with
//! `--discover` also finds the nodes on its network by their multicast
//! beacons ([`discovery`], [`beacon`]). Each node then runs its own
//! balancer, openMosix style: no coordinator.

pub mod balancer;
pub mod beacon;
pub mod cpu_use;
pub mod discovery;
pub mod gossip;
pub mod membership;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::devices::lock;
use membership::{Member, MemberView, Membership, NodeLoad, DEAD_AFTER, MAX_MEMBERS};

/// A discovered peer address is gossiped with while its beacons keep
/// coming, and as long after the last one as a silent member is kept.
pub const DISCOVERED_FOR: Duration = DEAD_AFTER;
/// Most discovered peer addresses kept at a time (more would not fit in a
/// table).
pub const MAX_DISCOVERED: usize = MAX_MEMBERS;

/// A migration this node's balancer or a user started, for `pmivmm mon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub pid: u32,
    pub comm: String,
    pub target: String,
    /// Started by the balancer (not a user).
    pub automatic: bool,
}

/// The cluster as one node sees it (`pmivmm nodes`, `pmivmm mon`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub members: Vec<MemberView>,
    pub in_flight: Vec<InFlight>,
    /// PIDs pinned to this node.
    pub pinned: Vec<u32>,
    /// The balancer sends processes away by itself.
    pub auto_balance: bool,
    /// Migrations this node's balancer started so far.
    pub auto_migrations: u64,
}

/// The cluster state of one node.
pub struct ClusterState {
    pub table: Mutex<Membership>,
    /// Peer addresses from `--join`.
    join: Vec<String>,
    /// Peer addresses from discovery beacons, with when the last one came.
    discovered: Mutex<BTreeMap<String, Instant>>,
    /// Arrivals are refused.
    pub blocked: AtomicBool,
    pub auto_balance: AtomicBool,
    /// The balancer's migration runs.
    pub busy: AtomicBool,
    /// The load the agent reported last.
    pub load: Mutex<NodeLoad>,
    /// The CPU-time clock of the node's vCPU thread, once it runs.
    pub vcpu_clock: OnceLock<cpu_use::CpuClock>,
    pinned: Mutex<HashSet<u32>>,
    in_flight: Mutex<Vec<InFlight>>,
    auto_migrations: Mutex<u64>,
}

impl ClusterState {
    pub fn new(name: &str, addr: &str, join: Vec<String>, auto_balance: bool) -> Self {
        let me = Member { name: name.into(), addr: addr.into(), heartbeat: 0, load: NodeLoad::default(), blocked: false };
        ClusterState {
            table: Mutex::new(Membership::new(me)),
            join,
            discovered: Mutex::default(),
            blocked: AtomicBool::new(false),
            auto_balance: AtomicBool::new(auto_balance),
            busy: AtomicBool::new(false),
            load: Mutex::default(),
            vcpu_clock: OnceLock::new(),
            pinned: Mutex::default(),
            in_flight: Mutex::default(),
            auto_migrations: Mutex::default(),
        }
    }

    /// Notes a beacon from a node listening at `addr`; whether the address
    /// is new (a full list takes no new addresses).
    pub fn discovered(&self, addr: &str, now: Instant) -> bool {
        let mut found = lock(&self.discovered);
        found.retain(|_, heard| now.duration_since(*heard) < DISCOVERED_FOR);
        if let Some(heard) = found.get_mut(addr) {
            *heard = now;
            return false;
        }
        found.len() < MAX_DISCOVERED && found.insert(addr.to_owned(), now).is_none()
    }

    /// Peer addresses to gossip with besides the members: the `--join`
    /// addresses and those discovered lately.
    pub fn seeds(&self, now: Instant) -> Vec<String> {
        let found = lock(&self.discovered);
        let fresh = found.iter().filter(|(_, heard)| now.duration_since(**heard) < DISCOVERED_FOR);
        self.join.iter().cloned().chain(fresh.map(|(addr, _)| addr.clone())).collect()
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }

    pub fn is_pinned(&self, pid: u32) -> bool {
        lock(&self.pinned).contains(&pid)
    }

    /// Pins `pid` to this node (the balancer leaves it) or allows it to move.
    pub fn pin(&self, pid: u32, pinned: bool) {
        let mut set = lock(&self.pinned);
        if pinned {
            set.insert(pid);
        } else {
            set.remove(&pid);
        }
    }

    /// Registers a migration until the guard drops.
    pub fn start_migration(&self, flight: InFlight) -> FlightGuard<'_> {
        if flight.automatic {
            *lock(&self.auto_migrations) += 1;
        }
        let pid = flight.pid;
        lock(&self.in_flight).push(flight);
        FlightGuard { state: self, pid }
    }

    pub fn view(&self) -> ClusterView {
        let mut pinned: Vec<u32> = lock(&self.pinned).iter().copied().collect();
        pinned.sort_unstable();
        ClusterView {
            members: lock(&self.table).view(std::time::Instant::now()),
            in_flight: lock(&self.in_flight).clone(),
            pinned,
            auto_balance: self.auto_balance.load(Ordering::SeqCst),
            auto_migrations: *lock(&self.auto_migrations),
        }
    }
}

/// Removes a migration from the in-flight list when dropped.
pub struct FlightGuard<'a> {
    state: &'a ClusterState,
    pid: u32,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        lock(&self.state.in_flight).retain(|f| f.pid != self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovered_addresses_are_seeds_while_their_beacons_come() {
        let t0 = Instant::now();
        let state = ClusterState::new("a", "10.0.0.1:7000", vec!["10.0.0.9:7000".into()], true);
        assert!(state.discovered("10.0.0.2:7000", t0));
        assert!(!state.discovered("10.0.0.2:7000", t0), "known already");
        assert_eq!(state.seeds(t0), ["10.0.0.9:7000", "10.0.0.2:7000"]);
        let later = t0 + DISCOVERED_FOR / 2;
        assert!(!state.discovered("10.0.0.2:7000", later));
        assert_eq!(state.seeds(t0 + DISCOVERED_FOR).len(), 2, "the last beacon counts");
        assert_eq!(state.seeds(later + DISCOVERED_FOR), ["10.0.0.9:7000"], "--join addresses stay");
        assert!(state.discovered("10.0.0.2:7000", later + DISCOVERED_FOR), "forgotten, so new again");
    }

    #[test]
    fn discovered_addresses_are_bounded() {
        let t0 = Instant::now();
        let state = ClusterState::new("a", "10.0.0.1:7000", vec![], true);
        for i in 0..MAX_DISCOVERED {
            assert!(state.discovered(&format!("10.0.{}.{}:7000", i / 256, i % 256), t0));
        }
        assert!(!state.discovered("10.1.0.0:7000", t0), "a full list takes nothing new");
        assert_eq!(state.seeds(t0).len(), MAX_DISCOVERED);
        // Room again once the old ones are forgotten.
        assert!(state.discovered("10.1.0.0:7000", t0 + DISCOVERED_FOR));
        assert_eq!(state.seeds(t0 + DISCOVERED_FOR), ["10.1.0.0:7000"]);
    }
}
