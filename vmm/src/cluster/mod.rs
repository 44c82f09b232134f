//! The cluster: membership and load gossip ([`membership`], [`gossip`]) and
//! automatic load balancing ([`balancer`]), on top of migration.
//!
//! A node started with `--join ADDR` gossips with that node; through it, it
//! learns everyone else (and everyone learns it). Each node then runs its
//! own balancer, openMosix style: no coordinator.

pub mod balancer;
pub mod gossip;
pub mod membership;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::devices::lock;
use membership::{Member, MemberView, Membership, NodeLoad};

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
    pub seeds: Vec<String>,
    /// Arrivals are refused.
    pub blocked: AtomicBool,
    pub auto_balance: AtomicBool,
    /// The balancer's migration runs.
    pub busy: AtomicBool,
    /// The load the agent reported last.
    pub load: Mutex<NodeLoad>,
    pinned: Mutex<HashSet<u32>>,
    in_flight: Mutex<Vec<InFlight>>,
    auto_migrations: Mutex<u64>,
}

impl ClusterState {
    pub fn new(name: &str, addr: &str, seeds: Vec<String>, auto_balance: bool) -> Self {
        let me = Member { name: name.into(), addr: addr.into(), heartbeat: 0, load: NodeLoad::default(), blocked: false };
        ClusterState {
            table: Mutex::new(Membership::new(me)),
            seeds,
            blocked: AtomicBool::new(false),
            auto_balance: AtomicBool::new(auto_balance),
            busy: AtomicBool::new(false),
            load: Mutex::default(),
            pinned: Mutex::default(),
            in_flight: Mutex::default(),
            auto_migrations: Mutex::default(),
        }
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
