//! `pmivmm cluster` and the cluster controls (openMosix's mosctl):
//! answered by the node's VMM over its control socket.

use crate::cluster::membership::Health;
use crate::cluster::ClusterView;
use crate::commands::tables;
use crate::control::{self, ClusterAction};
use crate::rundir::NodePaths;

/// The table `pmivmm cluster` prints.
pub fn describe(v: &ClusterView) -> String {
    let rows = v.members.iter().map(|m| {
        let mut state = match m.health {
            Health::Alive => "alive".to_owned(),
            Health::Suspect => "suspect".to_owned(),
        };
        if m.member.blocked {
            state.push_str(", blocked");
        }
        vec![
            format!("{}{}", m.member.name, if m.me { " *" } else { "" }),
            m.member.addr.clone(),
            state,
            m.member.load.runnable.to_string(),
            m.member.load.cpus.to_string(),
            format!("{}%", m.member.load.cpu_percent),
            format!("{} MiB", m.member.load.mem_free_mib),
            format!("{:.1} s", m.silent_ms as f64 / 1000.0),
        ]
    });
    let mut out = tables::render(&["NODE", "ADDRESS", "STATE", "RUNNABLE", "CPUS", "CPU USE", "FREE", "HEARD"], rows);
    out.push_str(&format!(
        "automatic balancing: {} ({} migrations so far); pinned here: {}\n",
        if v.auto_balance { "on" } else { "off" },
        v.auto_migrations,
        if v.pinned.is_empty() { "none".to_owned() } else { format!("{:?}", v.pinned) }
    ));
    for f in &v.in_flight {
        out.push_str(&format!(
            "migrating PID {} {} to {}{}\n",
            f.pid,
            f.comm,
            f.target,
            if f.automatic { " (balancer)" } else { "" }
        ));
    }
    out
}

/// `pmivmm cluster --node N`.
pub fn show(name: &str) -> anyhow::Result<()> {
    let paths = NodePaths::existing(name)?;
    print!("{}", describe(&control::cluster(&paths.control())?));
    Ok(())
}

/// One of the controls.
pub fn apply(name: &str, action: ClusterAction) -> anyhow::Result<()> {
    let paths = NodePaths::existing(name)?;
    println!("{name}: {}", control::control(&paths.control(), action)?);
    Ok(())
}
