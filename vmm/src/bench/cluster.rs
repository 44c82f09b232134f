//! `pmivmm bench cluster`: a job set of CPU-bound processes (`burn`, more
//! of them than the node has CPUs) started on one node of a cluster, run
//! once with that node's balancer off (everything stays on it) and once on
//! (jobs spread to idle members): wall time of the whole set, the speedup,
//! and how soon the first job left.

use std::time::{Duration, Instant};

use anyhow::Context;
use pmivmm_proto::ExitStatus;

use crate::commands::tables;
use crate::control::{self, ClusterAction};
use crate::rundir::NodePaths;

pub struct ClusterBench {
    pub node: String,
    pub jobs: usize,
    /// Work per job, in `burn` units (~0.1 s of CPU each).
    pub units: u32,
}

/// Runs the job set; returns the wall time, the time until the balancer
/// first sent a job away, how many it sent, and the jobs' last output lines.
fn job_set(paths: &NodePaths, b: &ClusterBench) -> anyhow::Result<(Duration, Option<Duration>, u64, Vec<String>)> {
    let start = Instant::now();
    let mut sessions = Vec::new();
    for _ in 0..b.jobs {
        sessions.push(super::start(&paths.vsock(), &["burn", &b.units.to_string()])?);
    }
    let waiters: Vec<_> = sessions
        .into_iter()
        .map(|s| std::thread::spawn(move || s.wait_with_output()))
        .collect();
    // Watched through the VMM's control socket: asking the agent (`ps`)
    // would cost the guest's vCPU, which the jobs need.
    let before = control::cluster(&paths.control())?.auto_migrations;
    let mut first_move = None;
    while waiters.iter().any(|w| !w.is_finished()) {
        if first_move.is_none() && control::cluster(&paths.control())?.auto_migrations > before {
            first_move = Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let wall = start.elapsed();
    let moved = control::cluster(&paths.control())?.auto_migrations - before;
    let mut results = Vec::new();
    for w in waiters {
        let out = w.join().map_err(|_| anyhow::anyhow!("a job waiter panicked"))??;
        anyhow::ensure!(out.status == ExitStatus::Code(0), "a job failed: {}", out.status);
        results.push(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned());
    }
    Ok((wall, first_move, moved, results))
}

pub fn run(b: &ClusterBench) -> anyhow::Result<()> {
    let paths = NodePaths::existing(&b.node)?;
    let view = control::cluster(&paths.control())?;
    let others = view.members.iter().filter(|m| !m.me).count();
    anyhow::ensure!(others > 0, "node {} has no cluster members: start others with --join", b.node);
    let mut rows = Vec::new();
    let mut walls = Vec::new();
    let mut reference: Option<Vec<String>> = None;
    for on in [false, true] {
        control::control(&paths.control(), ClusterAction::Balance { on })?;
        eprintln!("bench cluster: {} jobs of {} units on {}, balancing {}...", b.jobs, b.units, b.node, if on { "on" } else { "off" });
        let (wall, first, moved, results) = job_set(&paths, b).with_context(|| format!("job set on {}", b.node))?;
        match &reference {
            Some(r) => anyhow::ensure!(*r == results, "results differ between the runs"),
            None => reference = Some(results),
        }
        walls.push(wall.as_secs_f64());
        rows.push(vec![
            if on { format!("balanced over {} nodes", others + 1) } else { "one node (balancer off)".into() },
            format!("{:.1}", wall.as_secs_f64()),
            moved.to_string(),
            first.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64())),
        ]);
    }
    control::control(&paths.control(), ClusterAction::Balance { on: view.auto_balance })?;
    println!("{} CPU-bound jobs (`burn {}`) started on {}; times in s", b.jobs, b.units, b.node);
    print!("{}", tables::render(&["RUN", "WALL", "MIGRATIONS", "FIRST MOVE STARTED AFTER"], rows));
    println!("speedup: {:.2}x (results identical)", walls[0] / walls[1]);
    Ok(())
}
