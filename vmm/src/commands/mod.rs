//! The `pmivmm` subcommands that talk to running nodes: through the node's
//! hybrid vsock to its guest agent (exec, ps, load, kill) or through its
//! control socket to the VMM (stop, nodes).

pub mod checkpoint;
pub mod cluster;
pub mod migrate;
pub mod mon;
pub mod soak;
mod exec;
pub mod tables;

pub use exec::exec;

use std::time::{Duration, Instant};

use anyhow::Context;
use pmivmm_proto::{AgentClient, Migratability, MigrationObstacle};

use crate::control;
use crate::rundir::{self, NodePaths};

use crate::agent::Agent as Client;

/// Connects to the agent of the running node `name`.
fn agent(name: &str) -> anyhow::Result<Client> {
    let paths = NodePaths::existing(name)?;
    AgentClient::connect(&paths.vsock())
        .with_context(|| format!("cannot reach the guest agent of node {name} (is it still booting? see `pmivmm nodes`)"))
}

/// `pmivmm ps`: the processes of node `name` (or of every node running on
/// this host), where each runs (a deputy's process runs on another node)
/// and whether they could migrate; kernel threads only with `all`.
pub fn ps(name: Option<&str>, all: bool) -> anyhow::Result<()> {
    let names = match name {
        Some(n) => vec![n.to_owned()],
        None => crate::rundir::list(&crate::rundir::base()),
    };
    let mut rows = Vec::new();
    for node in &names {
        let procs = match agent(node).and_then(|mut a| Ok(a.ps()?)) {
            Ok(p) => p,
            Err(e) if name.is_none() => {
                eprintln!("pmivmm: {node}: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let is_kernel_thread = |p: &&pmivmm_proto::ProcessInfo| {
            matches!(&p.migratable, Migratability::NotMigratable(o) if o.contains(&MigrationObstacle::KernelThread))
        };
        rows.extend(procs.iter().filter(|p| all || !is_kernel_thread(p)).map(|p| {
            let (migrate, why) = match &p.migratable {
                Migratability::Migratable => ("yes".to_owned(), String::new()),
                Migratability::NotMigratable(obstacles) => (
                    "no".to_owned(),
                    obstacles.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                ),
            };
            let cmd = if p.argv.is_empty() { format!("[{}]", p.comm) } else { p.argv.join(" ") };
            vec![
                node.clone(),
                p.pid.to_string(),
                p.ppid.to_string(),
                p.state.to_string(),
                p.remote.clone().unwrap_or_else(|| node.clone()),
                tables::cpu_time(p.cpu_time_ms),
                tables::bytes(p.rss_bytes),
                migrate,
                cmd,
                why,
            ]
        }));
    }
    let header = ["NODE", "PID", "PPID", "S", "RUNS ON", "TIME", "RSS", "MIGRATE", "COMMAND", "WHY NOT"];
    print!("{}", tables::render(&header, rows));
    Ok(())
}

/// `pmivmm load`: the node's load.
pub fn load(name: &str) -> anyhow::Result<()> {
    let l = agent(name)?.load()?;
    println!(
        "load average {:.2} {:.2} {:.2}, {} runnable of {} tasks, {} cpu(s), memory {} total, {} free, {} available",
        l.load_avg[0],
        l.load_avg[1],
        l.load_avg[2],
        l.runnable_tasks,
        l.total_tasks,
        l.cpus,
        tables::bytes(l.mem_total_bytes),
        tables::bytes(l.mem_free_bytes),
        tables::bytes(l.mem_available_bytes)
    );
    Ok(())
}

/// `pmivmm kill`: sends a signal to a process of the node.
pub fn kill(name: &str, pid: u32, signal: i32) -> anyhow::Result<()> {
    agent(name)?.kill(pid, signal)?;
    Ok(())
}

/// `pmivmm stop`: powers the node off and waits until its VMM has exited.
pub fn stop(name: &str, timeout: Duration) -> anyhow::Result<()> {
    let paths = NodePaths::existing(name)?;
    control::stop(&paths.control(), timeout)?;
    eprintln!("pmivmm: stopping node {name}...");
    let start = Instant::now();
    // The VMM removes its run directory when it exits; allow it the grace
    // period plus time to tear down.
    while paths.dir.exists() {
        anyhow::ensure!(
            start.elapsed() < timeout + Duration::from_secs(15),
            "node {name} did not stop within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("pmivmm: node {name} stopped after {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// A run directory whose control socket did not answer a status request: a
/// node that is just starting (its directory is seconds old), one whose VMM
/// is busy (its control socket still accepts connections: a long checkpoint
/// or restore, a loaded host) or one whose VMM died (nothing listens any
/// more); only the last is removed.
fn stale(base: &std::path::Path, name: &str) -> String {
    let dir = base.join(name);
    if NodePaths::under(base, name).is_ok_and(|p| p.listening()) {
        return "busy (control socket accepts but does not answer)".into();
    }
    let age = std::fs::metadata(&dir).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
    if age.is_some_and(|a| a > Duration::from_secs(30)) && std::fs::remove_dir_all(&dir).is_ok() {
        "dead (VMM gone; removed its run directory)".into()
    } else {
        "starting or dead (control socket does not answer)".into()
    }
}

/// `pmivmm nodes`: the nodes running on this host.
pub fn nodes() -> anyhow::Result<()> {
    let base = rundir::base();
    let rows = rundir::list(&base).into_iter().map(|name| {
        let control = NodePaths::under(&base, &name).map(|p| p.control());
        match control.map_err(anyhow::Error::from).and_then(|c| Ok(control::status(&c)?)) {
            Ok(s) => vec![
                s.name,
                s.state.to_string(),
                s.vmm_pid.to_string(),
                format!("{} MiB", s.mem_mib),
                tables::duration(Duration::from_millis(s.uptime_ms)),
                s.ready_after_ms
                    .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                s.guest_cid.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            ],
            Err(_) => vec![name.clone(), stale(&base, &name)],
        }
    });
    print!("{}", tables::render(&["NAME", "STATE", "VMM PID", "MEMORY", "UPTIME", "BOOTED IN", "CID"], rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose control socket accepts but does not answer (busy, or
    /// speaking another control version) keeps its run directory; one where
    /// nothing listens any more loses it once it is old enough.
    #[test]
    fn only_dead_nodes_lose_their_run_directory() {
        let base = std::env::temp_dir().join(format!("pmivmm-stale-{}", std::process::id()));
        let busy = NodePaths::under(&base, "busy").unwrap();
        let _guard = busy.create().unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(busy.control()).unwrap();
        assert!(stale(&base, "busy").starts_with("busy"));
        assert!(busy.dir.is_dir());
        // Nothing listens: young directories are kept (a node starting).
        let dead = NodePaths::under(&base, "dead").unwrap();
        let _dead_guard = dead.create().unwrap();
        assert!(stale(&base, "dead").starts_with("starting or dead"));
        assert!(dead.dir.is_dir());
        let _ = std::fs::remove_dir_all(&base);
    }
}
