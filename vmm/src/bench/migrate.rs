//! `pmivmm bench migrate`: the migration data path and real migrations.
//!
//! Data path (no VM needed): `MIB` MiB of pages are read by frame out of
//! one guest-RAM mapping, streamed over an authenticated peer link on
//! loopback, checked and kept by the receiver, and written by frame into a
//! second guest-RAM mapping, with the very functions a migration uses
//! (`source::stream_pages`, `target::receive_pages` / `write_received`).
//! Frames are scattered (every other frame, in a permutation: no two are
//! neighbours, even in the frame order the source reads them in), as in a
//! long-running guest. The same run measures a memcpy of the same bytes,
//! the copies out of and into scattered frames on their own, plain loopback
//! TCP and the bare peer link, the baselines the ratios refer to. The data
//! path's time includes the target faulting in fresh memory for the pages
//! it holds (on these VM hosts ~1 s per GiB, a third less since the link
//! faults a frame's buffer in with one call) and writing them into frames
//! after `Commit`. All of it runs `--repeat` times, each run with its own
//! baselines: the table gives minimum and median times, and each ratio is
//! the median of the runs' ratios to plain TCP in the same run (single
//! runs on these shared hosts vary by ±30%). The destination frames are
//! cleared before each run's data path, which must fill them.
//!
//! Real migrations (with `--from A --to B`, two running nodes): a small
//! process (and, with `--process-mib`, larger ones) migrated with and
//! without pre-copy: end-to-end time, the time it stays frozen, and the
//! part of that the target needs after `Commit`.

use std::time::Instant;

use anyhow::Context;
use pmivmm_proto::image::{PageKind, PageRef, PAGE_SIZE};
use pmivmm_proto::{AgentClient, ExecEvent};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::min_median;
use crate::checkpoint::frames;
use crate::commands::tables;
use crate::control;
use crate::migration::link;
use crate::migration::pages::{PageBudget, PageStore};
use crate::migration::protocol::{PeerMsg, PAGES_PER_BATCH};
use crate::migration::{source, target};
use crate::peer::{ClusterKey, PeerLink};
use crate::rundir::NodePaths;

pub struct MigrateBench {
    /// Size of the data-path transfer.
    pub mib: u64,
    /// Data-path runs (each with its own baselines).
    pub repeat: usize,
    /// Two running nodes for real migrations.
    pub nodes: Option<(String, String)>,
    /// Real migrations per mode and process.
    pub runs: usize,
    /// The processes migrated, by MiB: 0 is a `counter`, N is `memory N`.
    pub process_mib: Vec<u64>,
}

const BASE_VADDR: u64 = 0x7f00_0000_0000;

fn mbps(bytes: u64, secs: f64) -> String {
    format!("{:.0}", bytes as f64 / secs / 1e6)
}

/// The `i`th of `n` pages: its frame is every other frame of `2 n`, in a
/// fixed permutation (an odd multiplier modulo a power of two). No two
/// frames are neighbours, even in frame order, as in a long-running guest.
fn page(i: u64, n: u64) -> PageRef {
    let pfn = 2 * (i.wrapping_mul(0x9e37_79b9) & (n - 1)) + 1;
    PageRef { vaddr: BASE_VADDR + i * PAGE_SIZE, pfn, kind: PageKind::Data, dirty: true }
}

fn guest_ram(bytes: u64) -> anyhow::Result<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).context("cannot map the benchmark's guest RAM")
}

/// One run's times, in seconds.
struct DataPathRun {
    memcpy: f64,
    read_frames: f64,
    write_frames: f64,
    plain: f64,
    bare: f64,
    path: f64,
    written: f64,
}

fn data_path(mib: u64, repeat: usize) -> anyhow::Result<()> {
    let n = (mib << 20) / PAGE_SIZE;
    anyhow::ensure!(n.is_power_of_two(), "--mib must be a power of two");
    anyhow::ensure!(repeat > 0, "--repeat must be 1 or more");
    let bytes = n * PAGE_SIZE;
    let ram = 2 * bytes + 2 * PAGE_SIZE;
    eprintln!("bench migrate: preparing 2 x {} MiB of guest RAM...", ram >> 20);
    let src = guest_ram(ram)?;
    let mut dst = guest_ram(ram)?;
    let pattern: Vec<u8> = (0..(1u64 << 20)).map(|i| (i * 31 + i / 4096) as u8).collect();
    for off in (0..ram).step_by(pattern.len()) {
        let len = pattern.len().min((ram - off) as usize);
        src.write_slice(&pattern[..len], GuestAddress(off))?;
    }
    let pages: Vec<PageRef> = (0..n).map(|i| page(i, n)).collect();
    let mut runs = Vec::new();
    for run in 1..=repeat {
        eprintln!("bench migrate: run {run} of {repeat}: baselines, then the data path ({mib} MiB each)...");
        let (done, measured) = data_path_run(&src, dst, &pages)?;
        eprintln!("bench migrate: run {run}: data path {:.3} s, plain TCP {:.3} s", measured.path, measured.plain);
        dst = done;
        runs.push(measured);
    }

    let rate = |secs: f64| bytes as f64 / secs;
    let row = |what: &str, secs: fn(&DataPathRun) -> f64, vs_tcp: bool| {
        let (min, median) = min_median(runs.iter().map(secs).collect()).unwrap_or_default();
        let ratios = runs.iter().map(|r| rate(secs(r)) / rate(r.plain) * 100.0).collect();
        let ratio = match min_median(ratios) {
            Some((_, median)) if vs_tcp => format!("{median:.0}%"),
            _ => "-".into(),
        };
        vec![what.into(), format!("{min:.3}"), format!("{median:.3}"), mbps(bytes, median), ratio]
    };
    let rows = vec![
        row("memcpy of the same bytes", |r| r.memcpy, false),
        row("  read by frame out of guest RAM (source)", |r| r.read_frames, false),
        row("  written by frame into guest RAM (target)", |r| r.write_frames, false),
        row("plain TCP, loopback", |r| r.plain, true),
        row("peer link (AES-256-GCM frames)", |r| r.bare, true),
        row("migration data path (guest RAM -> link -> guest RAM)", |r| r.path, true),
        row("  of which writing into frames after Commit", |r| r.written, false),
    ];
    println!(
        "moving {mib} MiB ({n} pages, scattered frames) on this host, {repeat} run(s); \
         MB/s at the median; VS TCP: the median of each run's ratio to plain TCP in that run"
    );
    print!("{}", tables::render(&["TRANSFER", "MIN s", "MEDIAN s", "MB/s", "VS TCP"], rows));
    Ok(())
}

/// One run of every transfer; `dst` is handed back with the source's pages
/// in it, put there by the data path (checked).
fn data_path_run(
    src: &GuestMemoryMmap,
    dst: GuestMemoryMmap,
    pages: &[PageRef],
) -> anyhow::Result<(GuestMemoryMmap, DataPathRun)> {
    let n = pages.len();
    let bytes = n as u64 * PAGE_SIZE;

    // Baseline: a memcpy of the same bytes.
    let mut a = vec![1u8; bytes as usize];
    let b = vec![2u8; bytes as usize];
    let t = Instant::now();
    a.copy_from_slice(&b);
    let memcpy = t.elapsed().as_secs_f64();
    std::hint::black_box(&a);
    drop((a, b));

    // The copies at both ends on their own: frames into a batch buffer
    // (what the source does piece by piece) and back into frames (what the
    // target does after the image arrived).
    let mut batch = vec![0u8; PAGES_PER_BATCH * PAGE_SIZE as usize];
    let t = Instant::now();
    for chunk in pages.chunks(PAGES_PER_BATCH) {
        frames::read_pages(src, chunk, &mut batch[..chunk.len() * PAGE_SIZE as usize])?;
    }
    let read_frames = t.elapsed().as_secs_f64();
    // `batch` (one batch's pages) into the frames of every batch.
    let write_frames_from = |batch: &[u8]| -> anyhow::Result<()> {
        for chunk in pages.chunks(PAGES_PER_BATCH) {
            frames::write_pages(&dst, chunk, &batch[..chunk.len() * PAGE_SIZE as usize])?;
        }
        Ok(())
    };
    let t = Instant::now();
    write_frames_from(&batch)?;
    let write_frames = t.elapsed().as_secs_f64();
    // Cleared: what the baseline (or an earlier run's data path) left there
    // must not count; only this run's data path may fill them for the check
    // at the end.
    batch.fill(0);
    write_frames_from(&batch)?;
    drop(batch);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (plain, bare) = rt.block_on(crate::peer::bench_throughput(bytes))?;

    let key = ClusterKey::generate()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let handle = rt.handle().clone();
    let receiver_key = key.clone();
    let receiver_pages = pages.to_vec();
    // Returns the destination and how long writing the pages took.
    let receiver = std::thread::spawn(move || -> anyhow::Result<(GuestMemoryMmap, f64)> {
        let (stream, _) = handle.block_on(listener.accept())?;
        let link = handle.block_on(PeerLink::accept(stream, &receiver_key, "bench-target", link::CONNECT_TIMEOUT))?;
        let (_, mut rx, _tx) = link::split(&handle, link);
        let mut store = PageStore::new(n, PageBudget::new(n));
        loop {
            match rx.expect(std::time::Duration::from_secs(60))? {
                (PeerMsg::Pages { vaddrs }, data) => target::receive_pages(&mut store, &vaddrs, data)?,
                (PeerMsg::Commit, _) => break,
                (other, _) => anyhow::bail!("unexpected {}", other.name()),
            }
        }
        let t = Instant::now();
        target::write_received(&dst, &store, &receiver_pages)?;
        Ok((dst, t.elapsed().as_secs_f64()))
    });
    let (_, _rx, mut tx) = link::connect(rt.handle(), &addr, &key, "bench-source")?;
    let t = Instant::now();
    source::stream_pages(src, &mut tx, pages)?;
    tx.send(&PeerMsg::Commit)?;
    let (dst, written) = receiver.join().map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
    let path = t.elapsed().as_secs_f64();
    verify(src, &dst, pages)?;
    let run = DataPathRun {
        memcpy,
        read_frames,
        write_frames,
        plain: bytes as f64 / plain,
        bare: bytes as f64 / bare,
        path,
        written,
    };
    Ok((dst, run))
}

/// The destination frames hold exactly the source frames.
fn verify(src: &GuestMemoryMmap, dst: &GuestMemoryMmap, pages: &[PageRef]) -> anyhow::Result<()> {
    let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
    for p in pages {
        src.read_slice(&mut a, GuestAddress(p.pfn * PAGE_SIZE))?;
        dst.read_slice(&mut b, GuestAddress(p.pfn * PAGE_SIZE))?;
        anyhow::ensure!(a == b, "frame {:#x} differs after the transfer", p.pfn);
    }
    Ok(())
}

use crate::agent::Agent as Client;

/// Starts a long `counter` (`mib` 0) or `memory MIB` on `node` and returns
/// its PID once it printed.
fn start_workload(paths: &NodePaths, mib: u64) -> anyhow::Result<(u32, std::thread::JoinHandle<()>)> {
    let mib = mib.to_string();
    let command: &[&str] = if mib == "0" { &["counter", "1000000"] } else { &["memory", &mib, "1000000"] };
    let mut s = super::start(&paths.vsock(), command)?;
    let pid = s.pid();
    // The first output: the workload is up.
    loop {
        match s.next_event()? {
            ExecEvent::Stdout(_) => break,
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exited(st) => anyhow::bail!("{} exited early ({st})", command.join(" ")),
        }
    }
    // Drain the rest (through the deputy after the migration) until it ends.
    let drain = std::thread::spawn(move || while let Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_)) = s.next_event() {});
    Ok((pid, drain))
}

fn real_migrations(from: &str, to: &str, runs: usize, process_mib: &[u64]) -> anyhow::Result<()> {
    let paths = NodePaths::existing(from)?;
    NodePaths::existing(to)?;
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    let mut rows = Vec::new();
    for (&mib, precopy) in process_mib.iter().flat_map(|mib| [(mib, true), (mib, false)]) {
        for _ in 0..runs {
            let (pid, drain) = start_workload(&paths, mib)?;
            let r = control::migrate(&paths.control(), pid, to, precopy)
                .with_context(|| format!("migrating PID {pid} from {from} to {to}"))?;
            rows.push(vec![
                if precopy { "pre-copy" } else { "stop-and-copy" }.into(),
                if mib == 0 { r.comm.clone() } else { format!("{} {mib} MiB", r.comm) },
                r.precopy_rounds.iter().map(u64::to_string).collect::<Vec<_>>().join("+"),
                r.frozen_pages.to_string(),
                ms(r.precopy_us),
                ms(r.frozen_us),
                ms(r.target_restore_us),
                ms(r.frozen_us.saturating_sub(r.target_restore_us)),
                ms(r.total_us),
                format!("{:.1}", r.bytes_sent as f64 / (1 << 20) as f64),
                match mib {
                    0 => "-".into(),
                    _ => mbps(mib << 20, r.total_us as f64 / 1e6),
                },
            ]);
            // Ends the remote process through its deputy.
            let mut a: Client = AgentClient::connect(&paths.vsock())?;
            a.kill(pid, 9)?;
            let _ = drain.join();
        }
    }
    println!("migrating running processes from {from} to {to}; times in ms");
    print!(
        "{}",
        tables::render(
            &["MODE", "PROCESS", "PRE-COPY PAGES", "FROZEN PAGES", "PRE-COPY", "FROZEN", "TARGET RESTORE", "FROZEN - RESTORE", "TOTAL", "SENT MiB", "MB/s"],
            rows
        )
    );
    println!(
        "FROZEN: from the freeze until the target reported the process running; TARGET RESTORE: of that, the time \
         after Commit: the target's agent rebuilding the process (for a small one mostly injected syscalls, 30-50 ms \
         a stop of the process in the emulated guest kernel of these hosts; a large one: faulting in the pages that \
         were not laid out ahead during pre-copy, and without pre-copy all of them). SENT: page data sent in all, \
         re-sent pages included; MB/s: the process's memory moved per second, end to end (TOTAL)."
    );
    Ok(())
}

pub fn run(b: &MigrateBench) -> anyhow::Result<()> {
    data_path(b.mib, b.repeat)?;
    if let Some((from, to)) = &b.nodes {
        real_migrations(from, to, b.runs, &b.process_mib)?;
    }
    Ok(())
}
