//! Who is in the cluster, and how loaded each node is: a table every node
//! keeps and gossips (push-pull, see [`super::gossip`]).
//!
//! Each node owns its own entry and bumps its heartbeat every round; a
//! received entry replaces the known one when its heartbeat is higher. A
//! member whose heartbeat has not moved for [`SUSPECT_AFTER`] is suspect
//! (no processes are sent to it), and after [`DEAD_AFTER`] it is dead and
//! forgotten. Entries come from peers (authenticated, but still checked:
//! names, addresses and the table size are bounded).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rundir::validate_name;

pub const SUSPECT_AFTER: Duration = Duration::from_secs(3);
pub const DEAD_AFTER: Duration = Duration::from_secs(8);
/// Largest cluster a table may describe.
pub const MAX_MEMBERS: usize = 256;
const MAX_ADDR_LEN: usize = 256;

/// A node's load, as its agent reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Tasks runnable now (running or waiting for a CPU), the agent excluded.
    pub runnable: u32,
    pub cpus: u32,
    pub mem_free_mib: u64,
    /// How busy its vCPU was over the last gossip round, in percent
    /// (measured by its VMM, see [`super::cpu_use`]).
    pub cpu_percent: u8,
}

/// How many load samples [`LoadSamples`] keeps (4 s at the balancer's pace).
const LOAD_SAMPLES: usize = 2;

/// A node's recent loads. The runnable count it gossips is the least of the
/// last [`LOAD_SAMPLES`]: a kernel thread that happens to run (vsock
/// packets, a migration's page faults) is counted too, and a CPU-bound job
/// set would see it as one more job on an idle node and send it nothing;
/// jobs are runnable in every sample.
#[derive(Default)]
pub struct LoadSamples(std::collections::VecDeque<u32>);

impl LoadSamples {
    /// Adds `load`'s sample; returns `load` with the smoothed count.
    pub fn push(&mut self, load: NodeLoad) -> NodeLoad {
        if self.0.len() == LOAD_SAMPLES {
            self.0.pop_front();
        }
        self.0.push_back(load.runnable);
        NodeLoad { runnable: self.0.iter().copied().min().unwrap_or(load.runnable), ..load }
    }
}

/// One node, as gossiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// Its peer address (`host:port`).
    pub addr: String,
    pub heartbeat: u64,
    pub load: NodeLoad,
    /// It accepts no migrated processes.
    pub blocked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Alive,
    Suspect,
}

/// A member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub member: Member,
    pub health: Health,
    /// Since its heartbeat last moved.
    pub silent_ms: u64,
    /// This node itself.
    pub me: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("a gossip table of {0} members (at most {MAX_MEMBERS})")]
    TooLarge(usize),
    #[error("a gossiped member has an invalid name {0:?}")]
    Name(String),
    #[error("member {0} has an invalid address")]
    Addr(String),
    #[error("member {0} reports a CPU use of {1}% (at most 100)")]
    CpuUse(String, u8),
}

struct Entry {
    member: Member,
    heard: Instant,
}

/// The table of one node.
pub struct Membership {
    me: String,
    entries: BTreeMap<String, Entry>,
}

impl Membership {
    pub fn new(me: Member) -> Self {
        let name = me.name.clone();
        let mut entries = BTreeMap::new();
        entries.insert(name.clone(), Entry { member: me, heard: Instant::now() });
        Membership { me: name, entries }
    }

    /// This node's own entry.
    pub fn me(&self) -> &Member {
        &self.entries[&self.me].member
    }

    /// Updates this node's entry for a new round.
    pub fn tick(&mut self, load: NodeLoad, blocked: bool, now: Instant) {
        let e = self.entries.get_mut(&self.me).expect("own entry");
        e.member.heartbeat += 1;
        e.member.load = load;
        e.member.blocked = blocked;
        e.heard = now;
        let dead: Vec<String> = self
            .entries
            .iter()
            .filter(|(name, e)| **name != self.me && now.duration_since(e.heard) >= DEAD_AFTER)
            .map(|(name, _)| name.clone())
            .collect();
        for name in dead {
            tracing::warn!("cluster: {name} is dead (silent for {DEAD_AFTER:?}); removed");
            self.entries.remove(&name);
        }
    }

    /// Merges a table received from a peer (checked first, as a whole).
    pub fn merge(&mut self, members: &[Member], now: Instant) -> Result<(), TableError> {
        if members.len() > MAX_MEMBERS {
            return Err(TableError::TooLarge(members.len()));
        }
        for m in members {
            validate_name(&m.name).map_err(|_| TableError::Name(m.name.clone()))?;
            if m.addr.is_empty() || m.addr.len() > MAX_ADDR_LEN {
                return Err(TableError::Addr(m.name.clone()));
            }
            if m.load.cpu_percent > 100 {
                return Err(TableError::CpuUse(m.name.clone(), m.load.cpu_percent));
            }
        }
        for m in members {
            if m.name == self.me {
                continue;
            }
            let full = self.entries.len() >= MAX_MEMBERS;
            match self.entries.get_mut(&m.name) {
                Some(e) if e.member.heartbeat >= m.heartbeat => {}
                Some(e) => *e = Entry { member: m.clone(), heard: now },
                None if !full => {
                    tracing::info!("cluster: {} ({}) joined", m.name, m.addr);
                    self.entries.insert(m.name.clone(), Entry { member: m.clone(), heard: now });
                }
                None => {}
            }
        }
        Ok(())
    }

    /// What to gossip: every entry not yet suspect (and this node).
    pub fn gossip(&self, now: Instant) -> Vec<Member> {
        self.entries
            .values()
            .filter(|e| now.duration_since(e.heard) < SUSPECT_AFTER)
            .map(|e| e.member.clone())
            .collect()
    }

    /// Everyone, as seen now.
    pub fn view(&self, now: Instant) -> Vec<MemberView> {
        self.entries
            .iter()
            .map(|(name, e)| {
                let silent = now.duration_since(e.heard);
                MemberView {
                    member: e.member.clone(),
                    health: if silent < SUSPECT_AFTER { Health::Alive } else { Health::Suspect },
                    silent_ms: silent.as_millis() as u64,
                    me: *name == self.me,
                }
            })
            .collect()
    }

    /// Peer addresses to gossip with (everyone but this node).
    pub fn peers(&self) -> Vec<(String, String)> {
        self.entries
            .values()
            .filter(|e| e.member.name != self.me)
            .map(|e| (e.member.name.clone(), e.member.addr.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, heartbeat: u64, runnable: u32) -> Member {
        Member {
            name: name.into(),
            addr: format!("127.0.0.1:{}", 7000 + name.len()),
            heartbeat,
            load: NodeLoad { runnable, cpus: 1, mem_free_mib: 100, cpu_percent: 0 },
            blocked: false,
        }
    }

    #[test]
    fn newer_heartbeats_win_and_own_entry_is_kept() {
        let t0 = Instant::now();
        let mut m = Membership::new(member("a", 0, 0));
        m.merge(&[member("b", 5, 1), member("a", 99, 9)], t0).unwrap();
        assert_eq!(m.me().heartbeat, 0, "a peer cannot overwrite this node's entry");
        m.merge(&[member("b", 4, 7)], t0).unwrap();
        assert_eq!(m.view(t0).iter().find(|v| v.member.name == "b").unwrap().member.load.runnable, 1);
        m.merge(&[member("b", 6, 7)], t0).unwrap();
        assert_eq!(m.view(t0).iter().find(|v| v.member.name == "b").unwrap().member.load.runnable, 7);
        assert_eq!(m.peers(), vec![("b".to_owned(), member("b", 0, 0).addr)]);
    }

    #[test]
    fn silent_members_become_suspect_then_dead() {
        let t0 = Instant::now();
        let mut m = Membership::new(member("a", 0, 0));
        m.merge(&[member("b", 1, 0)], t0).unwrap();
        let later = t0 + SUSPECT_AFTER;
        m.tick(NodeLoad::default(), false, later);
        let b = m.view(later).into_iter().find(|v| v.member.name == "b").unwrap();
        assert_eq!(b.health, Health::Suspect);
        assert!(m.gossip(later).iter().all(|x| x.name != "b"), "suspects are not gossiped");
        m.tick(NodeLoad::default(), false, t0 + DEAD_AFTER);
        assert!(m.peers().is_empty());
        assert_eq!(m.me().heartbeat, 2);
    }

    #[test]
    fn hostile_tables_are_refused_whole() {
        let t0 = Instant::now();
        let mut m = Membership::new(member("a", 0, 0));
        let mut bad = member("../x", 1, 0);
        assert!(matches!(m.merge(&[member("b", 1, 0), bad.clone()], t0), Err(TableError::Name(_))));
        assert!(m.peers().is_empty(), "nothing of a refused table is taken");
        bad.name = "c".into();
        bad.addr = String::new();
        assert!(matches!(m.merge(&[bad.clone()], t0), Err(TableError::Addr(_))));
        bad.addr = "127.0.0.1:7000".into();
        bad.load.cpu_percent = 101;
        assert!(matches!(m.merge(&[bad], t0), Err(TableError::CpuUse(_, 101))));
        let many: Vec<Member> = (0..=MAX_MEMBERS).map(|i| member(&format!("n{i}"), 1, 0)).collect();
        assert!(matches!(m.merge(&many, t0), Err(TableError::TooLarge(_))));
    }

    #[test]
    fn load_samples_keep_the_least_recent_runnable_count() {
        let mut samples = LoadSamples::default();
        let load = |runnable| NodeLoad { runnable, cpus: 1, mem_free_mib: 100, cpu_percent: 0 };
        assert_eq!(samples.push(load(2)).runnable, 2);
        assert_eq!(samples.push(load(1)).runnable, 1);
        for _ in 0..LOAD_SAMPLES - 1 {
            assert_eq!(samples.push(load(3)).runnable, 1);
        }
        // The 1 has left the window.
        assert_eq!(samples.push(load(3)), load(3));
    }
}
