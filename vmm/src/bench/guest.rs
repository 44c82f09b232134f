//! Guest micro-benchmark: the cost of the operations that differ most
//! between a guest whose kernel is emulated (kvm_pvm) and the host, side by
//! side. The `guestbench` workload (images/workloads/guestbench.c) runs in
//! the node and, the same static binary, on the host; both count TSC
//! cycles with user-mode RDTSC (native in the guest), converted here with the
//! host's TSC rate. The restore path's cost per page comes from a real
//! checkpoint and restore of the `memory` workload (bench checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::commands::tables;
use crate::config::cache_dir;
use crate::rundir::NodePaths;

pub struct GuestBench {
    pub node: String,
    /// Size of the process checkpointed and restored for the restore row.
    pub restore_mib: u64,
}

/// The workloads binary images/build.sh leaves next to the initramfs.
pub fn workloads_binary() -> PathBuf {
    cache_dir().join("pmivmm-workloads")
}

/// One op as guestbench reports it: repetitions and cycles, or why not.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    Cycles { count: u64, cycles: u64 },
    Unsupported(String),
}

/// Parses guestbench output (`OP COUNT CYCLES [note]` per line).
pub fn parse(out: &str) -> anyhow::Result<BTreeMap<String, Measured>> {
    let mut ops = BTreeMap::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.splitn(4, ' ');
        let (Some(op), Some(count), Some(cycles)) = (f.next(), f.next(), f.next()) else {
            bail!("guestbench: unexpected line {line:?}");
        };
        let m = if cycles == "-" {
            Measured::Unsupported(f.next().unwrap_or("unsupported").to_owned())
        } else {
            let count = count.parse().with_context(|| format!("guestbench: bad count in {line:?}"))?;
            let cycles = cycles.parse().with_context(|| format!("guestbench: bad cycles in {line:?}"))?;
            anyhow::ensure!(count > 0, "guestbench: zero count in {line:?}");
            Measured::Cycles { count, cycles }
        };
        ops.insert(op.to_owned(), m);
    }
    Ok(ops)
}

/// The host's TSC rate, in cycles per second, against CLOCK_MONOTONIC.
fn tsc_hz() -> f64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it.
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(300));
    let (t1, c1) = (Instant::now(), rdtsc());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

/// Per-op time in microseconds.
fn per_op_us(m: &Measured, hz: f64) -> Option<f64> {
    match m {
        Measured::Cycles { count, cycles } => Some(*cycles as f64 / *count as f64 / hz * 1e6),
        Measured::Unsupported(_) => None,
    }
}

fn fmt_us(us: Option<f64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us >= 100_000.0 => format!("{:.2} s", us / 1e6),
        Some(us) if us >= 100.0 => format!("{:.2} ms", us / 1e3),
        Some(us) => format!("{us:.2} us"),
    }
}

fn run_on_host(binary: &Path) -> anyhow::Result<String> {
    use std::os::unix::process::CommandExt;
    let out = Command::new(binary)
        .arg0("guestbench")
        .output()
        .with_context(|| format!("running {} on the host (build it with images/build.sh)", binary.display()))?;
    anyhow::ensure!(out.status.success(), "guestbench on the host failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// 4 KiB pages in a 2 MiB transparent huge page.
const HUGE_SUBPAGES: f64 = 512.0;

const OPS: [(&str, &str); 7] = [
    ("syscall", "syscall (getppid)"),
    ("fork_wait", "fork + wait"),
    ("exec", "exec (posix_spawn /bin/true + wait)"),
    ("touch_4k", "first touch of 4 KiB"),
    ("populate_64m", "populate 64 MiB (MAP_POPULATE)"),
    ("huge_2m", "2 MiB huge page fault"),
    ("pipe_16m", "pipe copy of 16 MiB"),
];

pub fn run(b: &GuestBench) -> anyhow::Result<()> {
    let paths = NodePaths::existing(&b.node)?;
    let hz = tsc_hz();
    eprintln!("bench guest: host TSC {:.0} MHz; running guestbench in {} (a minute or two where guest kernels are emulated)...", hz / 1e6, b.node);
    let started = Instant::now();
    let guest = parse(&super::sh(&paths.vsock(), "guestbench")?)?;
    let guest_wall = started.elapsed();
    let host = parse(&run_on_host(&workloads_binary())?)?;

    let mut rows = Vec::new();
    for (op, label) in OPS {
        let g = guest.get(op).with_context(|| format!("guestbench in the node reported no {op}"))?;
        let h = host.get(op).and_then(|m| per_op_us(m, hz));
        let gu = per_op_us(g, hz);
        let ratio = match (gu, h) {
            (Some(g), Some(h)) if h > 0.0 => format!("{:.0}x", g / h),
            _ => "-".into(),
        };
        let note = match g {
            Measured::Unsupported(why) => why.clone(),
            Measured::Cycles { .. } => String::new(),
        };
        rows.push(vec![label.to_owned(), fmt_us(gu), fmt_us(h), ratio, note]);
    }
    // A first touch inside a transparent huge page costs its share of the
    // one 2 MiB fault (what large anonymous memory pays).
    let per_4k_of_huge = |m: Option<&Measured>| m.and_then(|m| per_op_us(m, hz)).map(|us| us / HUGE_SUBPAGES);
    let touch_huge = per_4k_of_huge(guest.get("huge_2m"));
    rows.push(vec![
        "first touch of 4 KiB inside a huge page".into(),
        fmt_us(touch_huge),
        fmt_us(per_4k_of_huge(host.get("huge_2m"))),
        "-".into(),
        "2 MiB huge page fault / 512".into(),
    ]);
    eprintln!("bench guest: checkpoint + restore of a {} MiB process for the restore path...", b.restore_mib);
    let (_, restore) = super::checkpoint::one(&b.node, &paths, b.restore_mib, true)?;
    let pages = restore.data_pages.max(1);
    rows.push(vec![
        format!("restore: guest work per page ({pages} pages)"),
        fmt_us(Some(restore.prepare_us as f64 / pages as f64)),
        "-".into(),
        "-".into(),
        "agent building the process, pages faulted in".into(),
    ]);
    rows.push(vec![
        format!("restore of a {} MiB process", b.restore_mib),
        fmt_us(Some(restore.total_us as f64)),
        "-".into(),
        "-".into(),
        "directory read, process built, pages written, resumed".into(),
    ]);
    println!(
        "guest (node {}) vs host, per operation; guestbench in the node took {:.1} s of wall time",
        b.node,
        guest_wall.as_secs_f64()
    );
    print!("{}", tables::render(&["OPERATION", "GUEST", "HOST", "GUEST/HOST", "NOTE"], rows));
    let touch = guest.get("touch_4k").and_then(|m| per_op_us(m, hz));
    let populate = guest.get("populate_64m").and_then(|m| per_op_us(m, hz));
    println!(
        "goals (issue 9): first touch of 4 KiB <= 0.3 ms: {} (own mapping), {} (inside a huge page); \
         populate 256 MiB <= 5 s: {} (4x the 64 MiB figure); restore of a 64 MiB process <= 3 s: {} \
         ({} MiB measured); boot to agent-ready <= 15 s: see `pmivmm bench boot`",
        fmt_us(touch),
        fmt_us(touch_huge),
        fmt_us(populate.map(|p| 4.0 * p)),
        fmt_us(Some(restore.total_us as f64 * 64.0 / b.restore_mib.max(1) as f64)),
        b.restore_mib,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guestbench_output() {
        let ops = parse("syscall 200 103267\nhuge_2m 0 - no transparent huge pages in this kernel\n\n").unwrap();
        assert_eq!(ops["syscall"], Measured::Cycles { count: 200, cycles: 103267 });
        assert_eq!(ops["huge_2m"], Measured::Unsupported("no transparent huge pages in this kernel".into()));
        assert!(parse("syscall 200").is_err());
        assert!(parse("syscall x 1").is_err());
        assert!(parse("syscall 0 5").is_err());
    }

    #[test]
    fn per_op_time_and_format() {
        let m = Measured::Cycles { count: 4, cycles: 4_000_000 };
        assert_eq!(per_op_us(&m, 1e9), Some(1000.0));
        assert_eq!(fmt_us(Some(1000.0)), "1.00 ms");
        assert_eq!(fmt_us(Some(2.5)), "2.50 us");
        assert_eq!(fmt_us(Some(3e6)), "3.00 s");
        assert_eq!(fmt_us(None), "-");
    }
}
