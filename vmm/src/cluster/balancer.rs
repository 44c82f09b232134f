//! The load-balancing decision, openMosix style: each node decides by
//! itself, from the gossiped loads, whether to send one of its processes to
//! a less-loaded node, and which.
//!
//! Rules (see [`Policy`]): a node sends only when it has more runnable tasks
//! than CPUs, and only to an alive, unblocked node that stays less loaded
//! than this one after receiving the process (per CPU), so two nodes never
//! trade a process back and forth. The process must be running, migratable,
//! not pinned, have used [`Policy::min_cpu`] of CPU (short-lived and
//! I/O-bound processes stay), be small enough to move quickly
//! ([`Policy::max_rss`], the cost model: a page costs milliseconds to
//! restore on emulated guests), and not have moved within
//! [`Policy::cooldown`]. A node that just received processes from here
//! counts them in its load for [`Policy::settle`], until its gossiped load
//! shows them: the next process can follow as soon as the last one arrived,
//! without sending too many to one node.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pmivmm_proto::{Migratability, ProcessInfo};

use super::membership::{Health, MemberView, NodeLoad};

#[derive(Debug, Clone)]
pub struct Policy {
    pub min_cpu: Duration,
    pub max_rss: u64,
    pub cooldown: Duration,
    pub settle: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_cpu: Duration::from_millis(1000),
            max_rss: 64 << 20,
            cooldown: Duration::from_secs(30),
            // A node's load is polled every 2 s and gossiped as the least
            // of its last 2 samples: 4-5 s until a process it received shows.
            settle: Duration::from_secs(6),
        }
    }
}

/// What the balancer remembers between rounds.
#[derive(Default)]
pub struct History {
    /// When each PID last moved (from or to here).
    pub moved: HashMap<u32, Instant>,
    /// The processes each node received from here lately.
    sent_to: HashMap<String, Sent>,
}

/// What this node sent to a member lately.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// When the last process went.
    at: Instant,
    /// The member's load (runnable tasks) with the processes sent.
    runnable: u32,
}

impl History {
    /// A member's runnable tasks: as gossiped, or with the processes sent
    /// to it within `policy.settle` if its gossip does not show them yet.
    pub fn runnable(&self, member: &MemberView, policy: &Policy, now: Instant) -> u32 {
        let gossiped = member.member.load.runnable;
        match self.sent_to.get(&member.member.name) {
            Some(sent) if now.duration_since(sent.at) < policy.settle => gossiped.max(sent.runnable),
            _ => gossiped,
        }
    }

    /// Remembers that a process went to `member`.
    pub fn sent(&mut self, member: &MemberView, policy: &Policy, now: Instant) {
        let runnable = self.runnable(member, policy, now) + 1;
        self.sent_to.insert(member.member.name.clone(), Sent { at: now, runnable });
    }
}

/// Load per CPU, in runnable tasks.
fn per_cpu(runnable: u32, cpus: u32) -> f64 {
    runnable as f64 / cpus.max(1) as f64
}

/// The member that should receive a process from this node (`me`'s load),
/// if any: the least loaded of those that stay less loaded than this node
/// after receiving one. Decided from the gossiped loads alone, before the
/// process list (which costs the guest far more) is asked for.
pub fn target<'a>(
    me: &NodeLoad,
    members: &'a [MemberView],
    history: &History,
    policy: &Policy,
    now: Instant,
) -> Option<&'a MemberView> {
    if me.runnable <= me.cpus.max(1) {
        return None;
    }
    let after_sending = per_cpu(me.runnable - 1, me.cpus);
    members
        .iter()
        .filter(|v| !v.me && v.health == Health::Alive && !v.member.blocked)
        .map(|v| (v, history.runnable(v, policy, now)))
        .filter(|(v, runnable)| per_cpu(runnable + 1, v.member.load.cpus) <= after_sending)
        .min_by(|(a, ra), (b, rb)| per_cpu(*ra, a.member.load.cpus).total_cmp(&per_cpu(*rb, b.member.load.cpus)))
        .map(|(v, _)| v)
}

/// The process of this node (`procs`) to send: the one that has run the
/// longest of those that are running, migratable, not pinned, CPU-bound
/// long enough, small enough and did not move lately.
pub fn process<'a>(
    procs: &'a [ProcessInfo],
    pinned: &dyn Fn(u32) -> bool,
    history: &History,
    policy: &Policy,
    now: Instant,
) -> Option<&'a ProcessInfo> {
    procs
        .iter()
        .filter(|p| p.state == 'R' && p.remote.is_none() && p.migratable == Migratability::Migratable)
        .filter(|p| p.cpu_time_ms >= policy.min_cpu.as_millis() as u64 && p.rss_bytes <= policy.max_rss)
        .filter(|p| !pinned(p.pid))
        .filter(|p| history.moved.get(&p.pid).is_none_or(|t| now.duration_since(*t) >= policy.cooldown))
        .max_by_key(|p| p.cpu_time_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::Member;

    fn load(runnable: u32) -> NodeLoad {
        NodeLoad { runnable, cpus: 1, mem_free_mib: 100, cpu_percent: 0 }
    }

    fn node(name: &str, runnable: u32) -> MemberView {
        MemberView {
            member: Member { name: name.into(), addr: format!("{name}:1"), heartbeat: 1, load: load(runnable), blocked: false },
            health: Health::Alive,
            silent_ms: 0,
            me: false,
        }
    }

    fn proc_(pid: u32, cpu_ms: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            ppid: 1,
            state: 'R',
            comm: "job".into(),
            argv: vec!["job".into()],
            cpu_time_ms: cpu_ms,
            rss_bytes: 1 << 20,
            migratable: Migratability::Migratable,
            remote: None,
        }
    }

    /// The PID sent and the node it goes to.
    fn choose(
        me: u32,
        members: &[MemberView],
        procs: &[ProcessInfo],
        pinned: &dyn Fn(u32) -> bool,
        history: &History,
    ) -> Option<(u32, String)> {
        let (policy, now) = (Policy::default(), Instant::now());
        let to = target(&load(me), members, history, &policy, now)?;
        let p = process(procs, pinned, history, &policy, now)?;
        Some((p.pid, to.member.name.clone()))
    }

    fn pick(me: u32, members: &[MemberView], procs: &[ProcessInfo]) -> Option<(u32, String)> {
        choose(me, members, procs, &|_| false, &History::default())
    }

    #[test]
    fn sends_the_longest_running_job_to_the_idlest_node() {
        let d = pick(3, &[node("b", 1), node("c", 0)], &[proc_(10, 2000), proc_(11, 9000)]);
        assert_eq!(d, Some((11, "c".into())));
    }

    #[test]
    fn no_imbalance_no_move() {
        assert_eq!(pick(1, &[node("b", 0)], &[proc_(10, 9000)]), None, "not more runnable than CPUs");
        assert_eq!(pick(2, &[node("b", 1)], &[proc_(10, 9000)]), None, "it would only trade places");
        assert!(pick(2, &[node("b", 0)], &[proc_(10, 9000)]).is_some());
    }

    #[test]
    fn short_big_pinned_sleeping_and_recent_processes_stay() {
        let peers = [node("b", 0)];
        assert_eq!(pick(3, &peers, &[proc_(10, 100)]), None, "short-lived");
        let mut big = proc_(10, 9000);
        big.rss_bytes = 1 << 30;
        assert_eq!(pick(3, &peers, &[big]), None, "too big to move quickly");
        let mut sleeping = proc_(10, 9000);
        sleeping.state = 'S';
        assert_eq!(pick(3, &peers, &[sleeping]), None, "not CPU-bound now");
        let mut deputy = proc_(10, 9000);
        deputy.remote = Some("c".into());
        assert_eq!(pick(3, &peers, &[deputy]), None, "a deputy");
        assert_eq!(choose(3, &peers, &[proc_(10, 9000)], &|p| p == 10, &History::default()), None, "pinned");
        let mut h = History::default();
        h.moved.insert(10, Instant::now());
        assert_eq!(choose(3, &peers, &[proc_(10, 9000)], &|_| false, &h), None, "moved lately");
    }

    #[test]
    fn blocked_and_suspect_nodes_receive_nothing() {
        let mut blocked = node("b", 0);
        blocked.member.blocked = true;
        let mut suspect = node("c", 0);
        suspect.health = Health::Suspect;
        assert_eq!(pick(3, &[blocked, suspect], &[proc_(10, 9000)]), None);
    }

    #[test]
    fn a_node_counts_what_it_was_sent_until_its_gossip_shows_it() {
        let (policy, now) = (Policy::default(), Instant::now());
        let mut h = History::default();
        let b = node("b", 0);
        // 4 jobs here, b idle: two go, one after the other, not a third.
        assert!(target(&load(4), std::slice::from_ref(&b), &h, &policy, now).is_some());
        h.sent(&b, &policy, now);
        assert_eq!(h.runnable(&b, &policy, now), 1);
        assert!(target(&load(3), std::slice::from_ref(&b), &h, &policy, now).is_some());
        h.sent(&b, &policy, now);
        assert!(target(&load(2), std::slice::from_ref(&b), &h, &policy, now).is_none());
        // Its gossip shows one of them so far: both still count.
        assert_eq!(h.runnable(&node("b", 1), &policy, now), 2);
        // Once settled, the gossiped load alone counts.
        let later = now + policy.settle;
        assert_eq!(h.runnable(&b, &policy, later), 0);
        assert!(target(&load(3), &[b], &h, &policy, later).is_some());
    }
}
