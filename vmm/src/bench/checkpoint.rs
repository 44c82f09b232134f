//! Checkpoint benchmark: for processes of a few sizes (the `memory`
//! workload of the initramfs, which fills MIB MiB and keeps rewriting it),
//! checkpoint (original killed), then restore, on a running node, once with
//! the VMM walking the page tables and once with the guest's pagemap
//! listing every page; prints capture, freeze, page read from guest RAM
//! beside a memcpy of the same bytes, and the restore phases.

use std::time::{Duration, Instant};

use anyhow::Context;
use pmivmm_proto::AgentClient;

use super::sh;
use crate::agent::Agent as Client;
use crate::checkpoint::{CheckpointReport, RestoreReport};
use crate::commands::tables;
use crate::control;
use crate::rundir::NodePaths;

pub struct CheckpointBench {
    pub node: String,
    /// Process sizes (MiB of the memory workload's buffer).
    pub sizes_mib: Vec<u64>,
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

fn mbps(bytes: u64, us: u64) -> String {
    if us == 0 {
        "-".into()
    } else {
        format!("{:.0}", bytes as f64 / us as f64)
    }
}

/// One size: start, wait until the buffer is filled, checkpoint, restore
/// (pages found by the VMM's page-table walk, or by pagemap), kill the
/// restored copy.
pub(super) fn one(
    node: &str,
    paths: &NodePaths,
    mib: u64,
    page_walk: bool,
) -> anyhow::Result<(CheckpointReport, RestoreReport)> {
    let vsock = paths.vsock();
    let out = format!("/tmp/bench-memory-{mib}.out");
    let pid: u32 = sh(&vsock, &format!("memory {mib} 1000000 > {out} 2>&1 & echo $!"))?
        .trim()
        .parse()
        .context("no PID from the launcher")?;
    eprintln!("bench checkpoint: {mib} MiB process is PID {pid}; waiting until it has filled its buffer...");
    let start = Instant::now();
    while !sh(&vsock, &format!("grep -q 'pass 1 ok' {out} && echo yes"))?.contains("yes") {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "the {mib} MiB process never filled its buffer");
        std::thread::sleep(Duration::from_millis(500));
    }
    let dir = std::env::temp_dir().join(format!("pmivmm-bench-ckpt-{}-{mib}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let c = control::checkpoint(&paths.control(), pid, &dir, false, page_walk)
        .with_context(|| format!("checkpoint of the {mib} MiB process on {node}"))?;
    eprintln!("bench checkpoint: restoring {mib} MiB...");
    let r = control::restore(&paths.control(), &dir, page_walk);
    let _ = std::fs::remove_dir_all(&dir);
    let r = r?;
    let _ = AgentClient::connect(&vsock).and_then(|mut a: Client| a.kill(r.pid, 9));
    Ok((c, r))
}

pub fn run(b: &CheckpointBench) -> anyhow::Result<()> {
    let paths = NodePaths::existing(&b.node)?;
    let mut rows = Vec::new();
    for &mib in &b.sizes_mib {
        for page_walk in [true, false] {
            let (c, r) = one(&b.node, &paths, mib, page_walk)?;
            rows.push(row(mib, page_walk, &c, &r));
        }
    }
    println!("checkpoint (original killed) and restore of the `memory` workload on node {}; times in ms, rates in MB/s", b.node);
    print!(
        "{}",
        tables::render(
            &[
                "SIZE", "PAGES BY", "PAGES", "CAPTURE", "WALK", "FROZEN", "READ", "READ MB/s", "MEMCPY MB/s",
                "DIR WRITE", "CKPT TOTAL", "PREPARE", "WALK", "WRITE", "WRITE MB/s", "FINISH", "RESTORE TOTAL",
            ],
            rows
        )
    );
    println!(
        "PAGES BY: walk = the agent names the page tables and the VMM walks those of private anonymous memory \
         (pagemap for the rest); pagemap = the guest kernel lists every page. CAPTURE: the agent freezing and \
         describing the process (guest kernel work); WALK: the VMM's page-table walk; FROZEN: until the original \
         was killed; READ/WRITE: the VMM copying the pages from/to guest RAM by frame; PREPARE: the agent building \
         the process and faulting its pages in (milliseconds a page where guest kernels are emulated)."
    );
    Ok(())
}

fn row(mib: u64, page_walk: bool, c: &CheckpointReport, r: &RestoreReport) -> Vec<String> {
    let bytes = c.data_pages * 4096;
    vec![
        format!("{mib} MiB"),
        if page_walk { "walk" } else { "pagemap" }.into(),
        c.data_pages.to_string(),
        ms(c.capture_us),
        ms(c.walk_us),
        ms(c.frozen_us),
        ms(c.read_us),
        mbps(bytes, c.read_us),
        mbps(bytes, c.memcpy_us),
        ms(c.write_us),
        ms(c.total_us),
        ms(r.prepare_us),
        ms(r.walk_us),
        ms(r.write_us),
        mbps(bytes, r.write_us),
        ms(r.finish_us),
        ms(r.total_us),
    ]
}
