//! Share benchmark: write and read throughput of a file in a node's shared
//! directory (virtio-9p), from the guest, beside the same operation on the
//! host in the same run. The guest runs busybox `dd` with 1 MiB blocks; a
//! `count=0` run of the same command measures what is not the copy (exec,
//! open, close) and is subtracted. The host writes and reads the same size
//! in the same directory with the same 1 MiB write(2)s and read(2)s, in
//! this process (a few milliseconds, which the noise of starting a program
//! would swamp). The CPU time of the node's vCPU thread (the guest, its
//! kernel emulated on the development hosts) and of the VMM's 9p thread (the
//! host's side of every request) show where the time goes.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use pmivmm_proto::{ExecEvent, ExitStatus};

use crate::commands::tables;
use crate::control;
use crate::rundir::NodePaths;

/// Block size of every read and write (dd's bs=1M).
const BLOCK: usize = 1 << 20;
/// Runs of each host measurement (the fastest counts).
const HOST_RUNS: usize = 5;

pub struct ShareBench {
    pub node: String,
    /// Size of the file written and read, in MiB.
    pub mib: u64,
}

/// The node's 9p mount: where (the same path as on the host) and its msize.
#[derive(Debug, PartialEq)]
pub struct ShareMount {
    pub dir: PathBuf,
    pub msize: Option<u64>,
}

/// Finds the 9p mount in the text of the guest's /proc/mounts.
pub fn find_mount(mounts: &str) -> Option<ShareMount> {
    mounts.lines().find_map(|line| {
        let mut f = line.split(' ');
        let (_tag, dir, fstype, options) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let msize = options.split(',').find_map(|o| o.strip_prefix("msize=")?.parse().ok());
        (fstype == "9p").then(|| ShareMount { dir: dir.into(), msize })
    })
}

/// CPU seconds of the VMM's threads: the vCPU and the 9p device thread.
#[derive(Debug, Default, Clone, Copy)]
struct ThreadCpu {
    vcpu: f64,
    p9: f64,
}

impl ThreadCpu {
    /// Reads the run time of every thread of the VMM (/proc/PID/task/TID:
    /// `comm`, and `schedstat`, whose first field is nanoseconds on a CPU).
    fn read(vmm_pid: u32) -> anyhow::Result<ThreadCpu> {
        let mut cpu = ThreadCpu::default();
        let tasks = format!("/proc/{vmm_pid}/task");
        for task in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
            let dir = task?.path();
            let (Ok(comm), Ok(schedstat)) =
                (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("schedstat")))
            else {
                continue; // the thread ended
            };
            let ns: f64 = schedstat.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
            match comm.trim_end() {
                "vcpu0" => cpu.vcpu += ns / 1e9,
                "9p" => cpu.p9 += ns / 1e9,
                _ => {}
            }
        }
        Ok(cpu)
    }

    fn since(self, before: ThreadCpu) -> ThreadCpu {
        ThreadCpu { vcpu: self.vcpu - before.vcpu, p9: self.p9 - before.p9 }
    }
}

/// One timed operation: seconds of the copy (overhead subtracted) and,
/// in the guest, the thread CPU it took.
struct Timed {
    secs: f64,
    cpu: ThreadCpu,
}

impl Timed {
    /// What `self` took beyond `overhead` (the same command without the
    /// copy); an error when the difference is lost in the noise.
    fn beyond(&self, overhead: &Timed) -> anyhow::Result<Timed> {
        let secs = self.secs - overhead.secs;
        anyhow::ensure!(
            secs > 0.0,
            "the copy took no measurable time ({:.3} s with it, {:.3} s without): use a larger --mib",
            self.secs,
            overhead.secs
        );
        Ok(Timed { secs, cpu: self.cpu.since(overhead.cpu) })
    }
}

pub fn run(b: &ShareBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.mib > 0, "--mib must be at least 1");
    let paths = NodePaths::existing(&b.node)?;
    let vsock = paths.vsock();
    let vmm_pid = control::status(&paths.control())?.vmm_pid;
    let mounts = super::sh(&vsock, "cat /proc/mounts").context("cannot read the node's mounts")?;
    let Some(mount) = find_mount(&mounts) else {
        bail!("node {} has no share (start it with --share DIR, or without --no-share)", b.node);
    };
    anyhow::ensure!(
        mount.dir.is_dir(),
        "the node's share {} is not a directory here (a node of another host?)",
        mount.dir.display()
    );
    let file = |side: &str| mount.dir.join(format!(".pmivmm-bench-share-{}.{side}", std::process::id()));
    let (guest_file, host_file) = (file("guest"), file("host"));
    let count = b.mib.to_string();
    let write = |f: &Path, count: &str| dd_args("/dev/zero", f, count);
    let read = |f: &Path, count: &str| dd_args(f, "/dev/null", count);

    eprintln!("bench share: {} MiB through {} in node {} and on the host...", b.mib, mount.dir.display(), b.node);
    let result = (|| -> anyhow::Result<_> {
        let guest = |args: &dyn Fn(&str) -> Vec<String>| {
            let overhead = guest_dd(&vsock, vmm_pid, &args("0"))?;
            let full = guest_dd(&vsock, vmm_pid, &args(&count))?;
            full.beyond(&overhead)
        };
        let fastest = |op: &dyn Fn() -> std::io::Result<f64>| {
            (0..HOST_RUNS).try_fold(f64::MAX, |m, _| op().map(|t| m.min(t)))
        };
        let guest_write = guest(&|c| write(&guest_file, c))?;
        let guest_read = guest(&|c| read(&guest_file, c))?;
        let guest_zeros = guest(&|c| dd_args("/dev/zero", "/dev/null", c))?;
        let host_write = fastest(&|| host_write(&host_file, b.mib)).context("writing on the host")?;
        let host_read = fastest(&|| host_read(&host_file)).context("reading on the host")?;
        Ok(([("write", guest_write, host_write), ("read", guest_read, host_read)], guest_zeros))
    })();
    for f in [&guest_file, &host_file] {
        let _ = std::fs::remove_file(f);
    }
    let (results, zeros) = result?;

    let mibps = |secs: f64| b.mib as f64 / secs.max(1e-9);
    let request = mount.msize.unwrap_or(0);
    let requests = if request > 0 { (b.mib << 20).div_ceil(request) } else { 0 };
    let mut rows = Vec::new();
    let node_columns = |t: &Timed, per_request: bool| {
        vec![
            format!("{:.1}", mibps(t.secs)),
            format!("{:.2}", t.secs),
            format!("{:.2}", t.cpu.vcpu),
            format!("{:.2}", t.cpu.p9),
            if per_request && requests > 0 { format!("{:.1}", t.secs * 1e3 / requests as f64) } else { "-".into() },
        ]
    };
    for (what, guest, host) in &results {
        let mut row = vec![
            format!("{what} {} MiB", b.mib),
            format!("{:.0}", mibps(*host)),
            format!("{:.0}x", guest.secs / host.max(1e-9)),
        ];
        row.extend(node_columns(guest, true));
        rows.push(row);
    }
    let mut row = vec!["(/dev/zero to /dev/null)".into(), "-".into(), "-".into()];
    row.extend(node_columns(&zeros, false));
    rows.push(row);
    println!(
        "share benchmark: node {}, {} (9p, msize {}), {} MiB file, 1 MiB blocks; node: dd, its exec and open \
         subtracted; host: fastest of {HOST_RUNS}",
        b.node,
        mount.dir.display(),
        if request > 0 { tables::bytes(request) } else { "?".into() },
        b.mib
    );
    print!(
        "{}",
        tables::render(
            &["operation", "host MiB/s", "node/host", "node MiB/s", "node s", "vCPU s", "9p thread s", "ms/request"],
            rows
        )
    );
    println!(
        "vCPU s: the guest (its kernel: syscalls, the 9p client, pinning dd's buffer, virtio; emulated on kvm_pvm);\n\
         9p thread s: the VMM's side (pread/pwrite straight between the file and guest RAM). ms/request: node time\n\
         per 9P request of up to msize bytes (~{requests} requests each way). The last row is dd without the share:\n\
         the write row includes its reads of /dev/zero (clear_user in the guest kernel)."
    );
    Ok(())
}

/// `dd` arguments: `count` blocks of 1 MiB from `from` to `to`.
fn dd_args(from: impl AsRef<Path>, to: impl AsRef<Path>, count: &str) -> Vec<String> {
    vec![
        "dd".into(),
        format!("if={}", from.as_ref().display()),
        format!("of={}", to.as_ref().display()),
        "bs=1M".into(),
        format!("count={count}"),
    ]
}

/// Runs busybox dd in the node; seconds from request to exit and the
/// VMM thread CPU it took.
fn guest_dd(vsock: &Path, vmm_pid: u32, args: &[String]) -> anyhow::Result<Timed> {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = ThreadCpu::read(vmm_pid)?;
    let t = Instant::now();
    let mut session = super::start(vsock, &argv)?;
    let mut stderr = Vec::new();
    let status = loop {
        match session.next_event()? {
            ExecEvent::Stdout(_) => {}
            ExecEvent::Stderr(e) => stderr.extend(e),
            ExecEvent::Exited(s) => break s,
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let cpu = ThreadCpu::read(vmm_pid)?.since(before);
    if status != ExitStatus::Code(0) {
        bail!("`{}` in the node ended with {status}: {}", args.join(" "), String::from_utf8_lossy(&stderr).trim());
    }
    Ok(Timed { secs, cpu })
}

/// Writes `mib` MiB of zeros to a new file at `path` in 1 MiB writes;
/// seconds from open to close.
fn host_write(path: &Path, mib: u64) -> std::io::Result<f64> {
    let block = vec![0u8; BLOCK];
    let t = Instant::now();
    let mut f = File::create(path)?;
    for _ in 0..mib {
        f.write_all(&block)?;
    }
    drop(f);
    Ok(t.elapsed().as_secs_f64())
}

/// Reads the file at `path` to its end in 1 MiB reads; seconds from open
/// to close.
fn host_read(path: &Path) -> std::io::Result<f64> {
    let mut block = vec![0u8; BLOCK];
    let t = Instant::now();
    let mut f = File::open(path)?;
    while f.read(&mut block)? > 0 {}
    drop(f);
    Ok(t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_share_in_the_guest_mounts() {
        let mounts = "rootfs / rootfs rw 0 0\nproc /proc proc rw,relatime 0 0\n\
                      pmivmm /work/src 9p rw,sync,dirsync,relatime,access=client,msize=262144,trans=virtio 0 0\n";
        assert_eq!(find_mount(mounts), Some(ShareMount { dir: "/work/src".into(), msize: Some(262144) }));
        assert_eq!(find_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn copy_time_is_what_the_copy_adds() {
        let cpu = |vcpu, p9| ThreadCpu { vcpu, p9 };
        let overhead = Timed { secs: 0.5, cpu: cpu(0.25, 0.0) };
        let copy = Timed { secs: 2.0, cpu: cpu(1.0, 0.5) }.beyond(&overhead).unwrap();
        assert_eq!((copy.secs, copy.cpu.vcpu, copy.cpu.p9), (1.5, 0.75, 0.5));
        // Lost in the noise: no absurd or negative MiB/s.
        let Err(err) = Timed { secs: 0.4, cpu: cpu(0.25, 0.0) }.beyond(&overhead) else { panic!("no error") };
        assert!(err.to_string().contains("use a larger --mib"), "{err}");
    }
}
