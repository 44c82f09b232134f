//! Boot benchmark: boots a node N times (one after the other) and reports
//! the time to the first console output, to /init, to agent-ready, the time
//! a clean stop takes, and the VMM's resident memory beyond guest RAM.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::min_median;
use crate::commands::tables;
use crate::control;
use crate::rundir::NodePaths;

/// Options of `pmivmm bench boot`.
pub struct BootBench {
    pub runs: usize,
    pub mem: String,
    /// Extra arguments for `pmivmm --node` (kernel, initrd, cmdline).
    pub node_args: Vec<String>,
}

struct Sample {
    first_output: f64,
    init: f64,
    ready: f64,
    stop: f64,
    rss_beyond_ram: u64,
}

pub fn run(b: &BootBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.runs > 0, "--runs must be at least 1");
    let exe = std::env::current_exe().context("cannot find the pmivmm executable")?;
    let scratch = std::env::temp_dir().join(format!("pmivmm-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut samples = Vec::new();
    for i in 0..b.runs {
        let name = format!("bench-boot-{}-{i}", std::process::id());
        eprintln!("bench boot: run {}/{} (node {name})...", i + 1, b.runs);
        samples.push(one_boot(&exe, &name, &scratch.join(format!("console-{i}.log")), b)?);
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let rows = [
        ("first console output (s)", col(|s| s.first_output)),
        ("/init started (s)", col(|s| s.init)),
        ("agent ready (s)", col(|s| s.ready)),
        ("stop: request to VMM exit (s)", col(|s| s.stop)),
        ("VMM RSS beyond guest RAM (MiB)", col(|s| s.rss_beyond_ram as f64 / (1 << 20) as f64)),
    ];
    let table = rows.into_iter().map(|(what, v)| {
        let (min, med) = min_median(v.clone()).unwrap_or_default();
        let all = v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
        vec![what.to_owned(), format!("{min:.2}"), format!("{med:.2}"), all]
    });
    println!("boot benchmark: {} run(s), --mem {}", b.runs, b.mem);
    print!("{}", tables::render(&["milestone", "min", "median", "runs"], table));
    Ok(())
}

fn one_boot(exe: &PathBuf, name: &str, console: &PathBuf, b: &BootBench) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(["--node", "--name", name, "--mem", &b.mem, "--timeout", "900", "--console"])
        .arg(console)
        .args(&b.node_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start a node")?;
    let paths = NodePaths::new(name)?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            bail!("node {name} exited ({st}) before its agent was ready; console: {}", console.display());
        }
        if let Ok(s) = control::status(&paths.control()) {
            if s.ready_after_ms.is_some() {
                break s;
            }
        }
        if start.elapsed() > Duration::from_secs(900) {
            let _ = child.kill();
            bail!("node {name} not ready after 900 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rss_beyond_ram = rss_beyond_guest_ram(status.vmm_pid, status.mem_mib << 20)?;
    let stop_start = Instant::now();
    control::stop(&paths.control(), Duration::from_secs(60))?;
    let exit = child.wait()?;
    let stop = stop_start.elapsed().as_secs_f64();
    anyhow::ensure!(exit.success(), "node {name} exited with {exit} after a clean stop");
    let secs = |ms: Option<u64>| ms.map_or(f64::NAN, |ms| ms as f64 / 1000.0);
    Ok(Sample {
        first_output: secs(status.first_output_ms),
        init: secs(status.init_ms),
        ready: secs(status.ready_after_ms),
        stop,
        rss_beyond_ram,
    })
}

/// Resident bytes of the VMM outside its guest-RAM mapping(s): the sum of
/// Rss over /proc/PID/smaps, minus mappings at least as large as guest RAM
/// below the MMIO gap (the guest memory regions).
fn rss_beyond_guest_ram(pid: u32, mem_bytes: u64) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let guest_low = mem_bytes.min(crate::arch::layout::MMIO_GAP_START);
    let mut total = 0;
    let mut is_guest = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, e)) = range.split_once('-') {
                if let (Ok(a), Ok(e)) = (u64::from_str_radix(a, 16), u64::from_str_radix(e, 16)) {
                    is_guest = e - a >= guest_low;
                    continue;
                }
            }
        }
        if let Some(kb) = line.strip_prefix("Rss:") {
            if !is_guest {
                total += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    Ok(total)
}
