//! Host tests of the engine with the workloads of images/workloads/: every
//! workload is checkpointed at a random moment, restored in a fresh child
//! (page contents moved through /proc/PID/mem instead of guest frames) and
//! must print exactly what an uninterrupted run prints.
//!
//! They need root (ptrace of any process, PFNs in pagemap, PR_SET_MM_MAP)
//! and fail, not skip, without it.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use pmivmm_proto::image::{
    FdKind, FpuKind, FpuState, ImageError, Itimer, PageKind, PageRef, PageRun, Pages, ProcessImage,
    FXSAVE_AREA_LEN, PAGE_SIZE,
};
use pmivmm_proto::image::VmaKind;
use pmivmm_proto::prelayout::PreLayout;
use pmivmm_proto::MigrationObstacle;

use super::capture::FAIL_AT;
use super::*;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::{work_dir, workload, PageCopies};

/// A restore child with `stdio`, prepared from `image` (no page walk).
fn start_and_prepare(
    image: &ProcessImage,
    stdio: [std::os::fd::BorrowedFd<'_>; 3],
) -> Result<(RestoredChild, Pages), RestoreError> {
    prepare_restore(image, start_restore_child(stdio)?, false)
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the checkpoint/restore tests need root (ptrace of other processes, PFNs in /proc/PID/pagemap, PR_SET_MM_MAP)"
    );
}

/// A pseudo-random delay in `range` (the moment of the checkpoint).
fn random_delay(range: std::ops::Range<u64>) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(range.start + nanos % (range.end - range.start))
}

struct Workload {
    child: Child,
    out: PathBuf,
}

impl Workload {
    /// Starts `name` with stdout (and stderr) appended to a fresh file.
    fn start(tag: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> Workload {
        let dir = work_dir().join("runs");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(format!("{tag}-{}.out", std::process::id()));
        let file = File::create(&out).unwrap();
        let mut command = Command::new(workload(name));
        // SAFETY: close_range is async-signal-safe; the inherited cargo
        // jobserver pipe would make the workload unmigratable.
        unsafe {
            command.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Workload { child, out }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap()
    }

    /// Waits until `memory` has printed one more "pass N ok" line.
    fn wait_for_next_pass(&self) {
        let passes = self.output().matches(" ok\n").count();
        self.wait_for(&format!("pass {} ok\n", passes + 1));
    }

    /// Waits until the output contains `text`.
    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared: {}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Waits (at most 30 s) for `pid`, a child of ours, and returns its status.
fn wait_exit(pid: i32) -> WaitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).unwrap() {
            WaitStatus::StillAlive => {
                if Instant::now() > deadline {
                    let _ = nix::sys::signal::kill(
                        Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    panic!("PID {pid} did not finish");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            status => return status,
        }
    }
}

/// The output of a run without checkpoint.
fn uninterrupted(tag: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut w = Workload::start(&format!("{tag}-plain"), name, args, env);
    assert!(
        w.child.wait().unwrap().success(),
        "{name} failed on its own: {}",
        w.output()
    );
    w.output()
}

/// Checkpoints a running workload, kills it, restores it and returns its
/// complete output once the restored process exited successfully.
/// `adjust` may change the image between capture and restore.
fn migrate(w: Workload, adjust: impl FnOnce(&mut ProcessImage)) -> String {
    let pid = w.pid();
    let (image, pages, _) = capture(pid, false).unwrap_or_else(|e| panic!("capture failed: {e}"));
    let data_refs = pages.listed.iter().filter(|p| p.kind == PageKind::Data).count() as u64;
    assert_eq!(data_refs, image.page_count());
    assert!(
        pages.listed.iter().all(|p| p.pfn != 0),
        "pages without frame numbers"
    );
    assert!(pages.listed.iter().all(|p| p.dirty), "no round ran: all dirty");
    let data = ProcMem::open(pid).unwrap().read_runs(&image.pages).unwrap();
    kill_original(pid).unwrap();
    restore(&w, image, &data, adjust)
}

/// Restores a checkpointed (and killed) workload from its image and page
/// contents, and returns its complete output once the restored process
/// exited successfully.
fn restore(
    w: &Workload,
    image: ProcessImage,
    data: &[u8],
    adjust: impl FnOnce(&mut ProcessImage),
) -> String {
    restore_laid_out(w, image, data, adjust, |_, _| Vec::new())
}

/// [`restore`], with `lay_out` called on the started child before the
/// image is prepared in it: the frames it returns must still hold their
/// pages after the preparation.
fn restore_laid_out(
    w: &Workload,
    image: ProcessImage,
    data: &[u8],
    adjust: impl FnOnce(&mut ProcessImage),
    lay_out: impl FnOnce(&mut RestoredChild, &ProcessImage) -> Vec<PageRef>,
) -> String {
    // The image crosses the network: encode, decode, validate.
    let mut image = ProcessImage::from_bytes(&image.to_bytes()).unwrap();
    adjust(&mut image);
    let out = OpenOptions::new().append(true).open(&w.out).unwrap();
    let null = File::open("/dev/null").unwrap();
    let mut child = start_restore_child([null.as_fd(), out.as_fd(), out.as_fd()]).unwrap();
    let kept = lay_out(&mut child, &image);
    let (child, frames) = prepare_restore(&image, child, false)
        .unwrap_or_else(|e| panic!("prepare_restore failed: {e}"));
    assert_eq!(frames.listed.len() as u64, image.page_count());
    for page in kept {
        assert!(frames.listed.contains(&page), "{page:?} moved: not kept where it was laid out");
    }
    ProcMem::open(child.pid())
        .unwrap()
        .write_runs(&image.pages, data)
        .unwrap();
    let restored =
        finish_restore(child, &image).unwrap_or_else(|e| panic!("finish_restore failed: {e}"));
    let status = wait_exit(restored);
    let output = w.output();
    assert_eq!(
        status,
        WaitStatus::Exited(Pid::from_raw(restored), 0),
        "restored process failed: {output}"
    );
    output
}

/// Runs `name` uninterrupted and migrated, and compares the outputs.
fn round_trip(
    tag: &str,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    delay: std::ops::Range<u64>,
) {
    require_root();
    let expected = uninterrupted(tag, name, args, env);
    let w = Workload::start(tag, name, args, env);
    std::thread::sleep(random_delay(delay));
    let got = migrate(w, |_| {});
    assert_eq!(got, expected);
    assert!(got.lines().last().unwrap().starts_with("RESULT "));
}

#[test]
fn counter_round_trips() {
    round_trip("counter", "counter", &[], &[], 50..700);
}

#[test]
fn patterned_memory_round_trips() {
    round_trip("memory", "memory", &["4"], &[], 50..350);
}

#[test]
fn brk_round_trips() {
    round_trip("brk", "brk", &[], &[], 50..500);
}

#[test]
fn fpu_state_round_trips() {
    round_trip("fpu", "fpu", &[], &[], 50..400);
}

/// Nodes boot with `noxsave`: the state is then only the FXSAVE area, set
/// with NT_PRFPREG. Simulated here by cutting a captured XSAVE area down.
#[test]
fn fxsave_only_fpu_state_round_trips() {
    require_root();
    let env = [("NOAVX", "1")];
    let expected = uninterrupted("fxsave", "fpu", &[], &env);
    let w = Workload::start("fxsave", "fpu", &[], &env);
    std::thread::sleep(random_delay(50..250));
    let got = migrate(w, |image| {
        image.fpu = FpuState {
            kind: FpuKind::Fxsave,
            area: image.fpu.area[..FXSAVE_AREA_LEN].to_vec(),
        };
    });
    assert_eq!(got, expected);
}

#[test]
fn signals_round_trip() {
    round_trip("signals", "signals", &[], &[], 50..500);
}

#[test]
fn mprotected_regions_round_trip() {
    round_trip("mprotect", "mprotect", &[], &[], 50..450);
}

/// The restore child maps its scratch area at the lowest free place when it
/// starts, before it has the image; a process with a mapping there gets
/// the scratch area moved (an empty anonymous VMA at 1 MiB, added to a
/// counter's image, restores).
#[test]
fn process_mapped_where_the_scratch_area_was_round_trips() {
    require_root();
    let expected = uninterrupted("scratch-place", "counter", &[], &[]);
    let w = Workload::start("scratch-place", "counter", &[], &[]);
    std::thread::sleep(random_delay(50..700));
    let got = migrate(w, |image| {
        assert!(image.vmas[0].start >= 2 << 20, "{:#x}", image.vmas[0].start);
        let vma = pmivmm_proto::image::Vma {
            start: 1 << 20,
            end: (1 << 20) + 64 * PAGE_SIZE,
            prot: (libc::PROT_READ | libc::PROT_WRITE) as u8,
            shared: false,
            offset: 0,
            kind: pmivmm_proto::image::VmaKind::Anonymous,
        };
        image.vmas.insert(0, vma);
    });
    assert_eq!(got, expected);
}

/// A restore child laid out ahead ([`pre_layout`]) from the image's private
/// anonymous memory and present pages, as a migration target does it from
/// the first pre-copy round, plus a region the image does not have, or
/// with every region a page short (then nothing is kept), restores the
/// process; where the image's VMAs lie in the regions, they are kept with
/// the pages populated in them. A layout the kernel refuses (a 16 TiB
/// region: more than the host has, with the default overcommit policy)
/// leaves the child as it was.
#[test]
fn process_laid_out_ahead_round_trips() {
    require_root();
    let expected = uninterrupted("laid-out", "mprotect", &[], &[]);
    for short in [false, true] {
        let w = Workload::start("laid-out", "mprotect", &[], &[]);
        std::thread::sleep(random_delay(50..450));
        let pid = w.pid();
        let (image, _, _) = capture(pid, false).unwrap();
        let data = ProcMem::open(pid).unwrap().read_runs(&image.pages).unwrap();
        kill_original(pid).unwrap();
        let got = restore_laid_out(&w, image, &data, |_| {}, |child, image| {
            let mut regions: Vec<(u64, u64)> = image
                .vmas
                .iter()
                .filter(|v| super::pagetables::MmTables::walks(v))
                .map(|v| (v.start, v.end - if short { PAGE_SIZE } else { 0 }))
                .collect();
            let stray = (0x5000_0000_0000, 0x5000_0000_0000 + 16 * PAGE_SIZE);
            regions.push(stray);
            let vaddrs = image.pages.iter().flat_map(|r| (r.start..r.end()).step_by(PAGE_SIZE as usize));
            let layout = PreLayout::of(&regions, vaddrs.chain([stray.0]));
            assert!(layout.populate.contains(&(stray.0, stray.0 + PAGE_SIZE)));
            if short {
                let mut refused = layout.clone();
                refused.regions.push((0x6000_0000_0000, 0x7000_0000_0000));
                refused.regions.sort_unstable();
                assert!(pre_layout(child, &refused).is_err(), "a 16 TiB region was mapped");
            }
            pre_layout(child, &layout).unwrap();
            assert!(matches!(pre_layout(child, &layout), Err(RestoreError::LaidOut)));
            if short {
                return Vec::new();
            }
            // The pages populated in the image's private anonymous VMAs.
            let runs: Vec<PageRun> = image
                .pages
                .iter()
                .filter(|r| image.vma_at(r.start).is_some_and(|v| !v.shared && matches!(v.kind, VmaKind::Anonymous | VmaKind::Heap)))
                .copied()
                .collect();
            assert!(!runs.is_empty());
            let mut frames = Vec::new();
            super::pagemap::Pagemap::open(child.pid()).unwrap().frames(&runs, &mut frames).unwrap();
            frames
        });
        assert_eq!(got, expected, "short regions: {short}");
    }
}

#[test]
fn sleeping_process_round_trips() {
    round_trip("sleeper", "sleeper", &[], &[], 50..900);
}

/// Interval timers (periodic real, virtual and profiling, then a one-shot
/// alarm), a handler on the alternate signal stack and a personality flag.
#[test]
fn timers_round_trip() {
    round_trip("timers", "timers", &["30"], &[], 50..1600);
}

/// A periodic ITIMER_REAL that expired while its SIGALRM is blocked reads
/// as stopped until the signal is taken (the kernel restarts it then): it
/// must run on after the restore, the signal still pending.
#[test]
fn expired_timer_with_its_signal_pending_round_trips() {
    require_root();
    let expected = uninterrupted("timers-held", "timers", &["20"], &[]);
    let w = Workload::start("timers-held", "timers", &["20"], &[]);
    w.wait_for("holding SIGALRM\n");
    std::thread::sleep(Duration::from_millis(60));
    let mut captured = None;
    let got = migrate(w, |image| captured = Some(image.clone()));
    let image = captured.unwrap();
    let period = Itimer {
        value_us: 20_000,
        interval_us: 20_000,
    };
    assert_eq!(image.itimers[0], period);
    let pending = &image.signals.pending_process;
    assert!(pending.iter().any(|s| s.signo == libc::SIGALRM as u32));
    assert_eq!(got, expected);
}

/// The capture reads the timers by disarming them: an original that is
/// resumed runs on with them re-armed (here the periodic ITIMER_REAL the
/// workload waits for).
#[test]
fn resumed_original_keeps_its_timers() {
    require_root();
    let expected = uninterrupted("timers-resume", "timers", &["20"], &[]);
    let mut w = Workload::start("timers-resume", "timers", &["20"], &[]);
    w.wait_for("real tick 2\n");
    let (image, _, scratch) = capture(w.pid(), false).unwrap();
    assert!(image.itimers[0].value_us > 0 && image.itimers[0].interval_us == 20_000);
    assert!(image.sigaltstack.is_some_and(|s| s.size == 64 << 10));
    assert_eq!(image.personality, libc::ADDR_NO_RANDOMIZE as u32);
    std::thread::sleep(Duration::from_millis(100));
    resume_original(w.pid(), &image.itimers, scratch).unwrap();
    assert!(w.child.wait().unwrap().success(), "{}", w.output());
    assert_eq!(w.output(), expected);
}

#[test]
fn file_offsets_round_trip() {
    let target = work_dir().join(format!("files-{}.data", std::process::id()));
    round_trip("files", "files", &[target.to_str().unwrap()], &[], 50..500);
}

/// Descriptors that share one open file (`dup2`, and the harness's stdout
/// and stderr) are captured as duplicates; O_APPEND is kept.
#[test]
fn shared_and_appending_descriptors_are_captured_as_such() {
    require_root();
    let target = work_dir().join(format!("files-dup-{}.data", std::process::id()));
    let w = Workload::start("files-dup", "files", &[target.to_str().unwrap()], &[]);
    w.wait_for("wrote 1\n");
    let (image, _, _) = capture(w.pid(), false).unwrap_or_else(|e| panic!("capture failed: {e}"));
    kill_original(w.pid()).unwrap();
    let kind = |fd| {
        image
            .fds
            .iter()
            .find(|f| f.fd == fd)
            .map(|f| f.kind.clone())
    };
    let dup = |of| Some(FdKind::Dup { of, cloexec: false });
    assert_eq!(kind(2), dup(1));
    assert_eq!(kind(11), dup(10));
    assert!(matches!(kind(3), Some(FdKind::Path { flags, .. }) if flags & libc::O_APPEND != 0));
    assert!(
        matches!(kind(4), Some(FdKind::Path { flags, .. }) if flags & libc::O_ACCMODE == libc::O_RDWR)
    );
}

/// Starts `hold MODE`, expects capture and a first pre-copy round to refuse
/// it naming `expected`, and checks that it was left running, untraced, and
/// finishes normally.
fn refused(mode: &str, expected: impl Fn(&MigrationObstacle) -> bool) {
    require_root();
    let mut w = Workload::start(&format!("hold-{mode}"), "hold", &[mode], &[]);
    w.wait_for("alive 1\n");
    let check = |what: &str, result: Result<(), CheckpointError>| match result {
        Err(CheckpointError::Refused { obstacles, .. }) => {
            assert!(
                obstacles.iter().any(&expected),
                "unexpected obstacles {obstacles:?}"
            )
        }
        other => panic!("{what} of hold {mode} was not refused: {other:?}"),
    };
    check("capture", capture(w.pid(), false).map(drop));
    check(
        "pre-copy",
        Precopy::start(w.pid(), false).map(|(p, _)| p.release()),
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid())).unwrap();
    assert!(status.contains("TracerPid:\t0\n"), "still traced: {status}");
    assert!(w.child.wait().unwrap().success());
    assert!(w.output().ends_with("alive 199\nRESULT 200\n"));
}

#[test]
fn multi_threaded_process_is_refused() {
    refused("thread", |o| {
        matches!(o, MigrationObstacle::MultiThreaded { threads: 2 })
    });
}

#[test]
fn process_with_a_socket_is_refused() {
    refused("socket", |o| {
        matches!(o, MigrationObstacle::Sockets { count: 1 })
    });
}

#[test]
fn shared_memory_is_refused() {
    refused("shm", |o| {
        matches!(o, MigrationObstacle::SharedWritableMapping { .. })
    });
    refused("sysv", |o| matches!(o, MigrationObstacle::SysvSharedMemory));
}

#[test]
fn pipes_and_devices_beyond_stdio_are_refused() {
    refused(
        "pipe",
        |o| matches!(o, MigrationObstacle::SpecialFiles { kinds } if kinds[0].starts_with("pipe:")),
    );
    refused(
        "device",
        |o| matches!(o, MigrationObstacle::Devices { paths } if paths == &["/dev/urandom"]),
    );
}

#[test]
fn posix_timers_are_refused() {
    refused("timer", |o| {
        matches!(o, MigrationObstacle::PosixTimers { count: 1 })
    });
}

#[test]
fn file_deleted_while_open_is_refused() {
    refused(
        "deleted",
        |o| matches!(o, MigrationObstacle::DeletedFile { path, .. } if path.starts_with("/tmp/pmivmm-hold-")),
    );
}

/// A capture that fails half-way (syscalls already injected, the timers
/// disarmed) resumes the process, which then runs to the same end as an
/// uninterrupted one.
#[test]
fn failed_capture_resumes_the_original() {
    require_root();
    let expected = uninterrupted("failpoint", "timers", &["20"], &[]);
    let mut w = Workload::start("failpoint", "timers", &["20"], &[]);
    std::thread::sleep(random_delay(50..1500));
    FAIL_AT.with(|f| f.set(Some("after-injection")));
    let result = capture(w.pid(), false);
    FAIL_AT.with(|f| f.set(None));
    assert!(matches!(
        result,
        Err(CheckpointError::FailPoint("after-injection"))
    ));
    assert!(w.child.wait().unwrap().success());
    assert_eq!(w.output(), expected);
}

/// A captured process that is resumed (the migration failed) runs on.
#[test]
fn resumed_original_runs_on() {
    require_root();
    let expected = uninterrupted("resume", "memory", &["2"], &[]);
    let mut w = Workload::start("resume", "memory", &["2"], &[]);
    std::thread::sleep(random_delay(50..300));
    let (image, _, scratch) = capture(w.pid(), false).unwrap();
    let mapped = |pid| procfs::maps(pid).unwrap().iter().any(|m| m.start == scratch.0);
    assert!(mapped(w.pid()), "the capture left its scratch page mapped");
    std::thread::sleep(Duration::from_millis(100));
    resume_original(w.pid(), &image.itimers, scratch).unwrap();
    assert!(!mapped(w.pid()), "the resumed process still has the scratch page");
    assert!(w.child.wait().unwrap().success());
    assert_eq!(w.output(), expected);
}

/// The buffer `memory 1` rewrites in every pass: its only anonymous mapping
/// of more than 1 MiB.
fn memory_buffer(pid: i32) -> BTreeSet<u64> {
    let maps = procfs::maps(pid).unwrap();
    let buffer = maps
        .iter()
        .find(|m| m.name.is_empty() && m.end - m.start > 1 << 20)
        .expect("memory has no 1 MiB buffer");
    (buffer.start..buffer.end)
        .step_by(PAGE_SIZE as usize)
        .collect()
}

fn addresses(pages: &Pages) -> BTreeSet<u64> {
    pages.listed.iter().map(|p| p.vaddr).collect()
}

/// The contents of one page of `mem`.
fn read_page(mem: &ProcMem, vaddr: u64) -> Vec<u8> {
    mem.read_runs(&[PageRun {
        start: vaddr,
        count: 1,
    }])
    .unwrap()
}

/// A round reports the pages written since the previous one: `memory`
/// rewrites its 1 MiB buffer in every pass and little else (its stack). On
/// a kernel without soft-dirty tracking every present page is reported
/// instead (and the code pages prove it). The process, let go after the
/// rounds, ends as an uninterrupted run does.
#[test]
fn precopy_rounds_report_the_pages_written_since_the_last() {
    require_root();
    let args = ["1", "60"];
    let expected = uninterrupted("precopy", "memory", &args, &[]);
    let mut w = Workload::start("precopy", "memory", &args, &[]);
    w.wait_for("pass 1 ok\n");
    let buffer = memory_buffer(w.pid());

    let (precopy, first) = Precopy::start(w.pid(), false).unwrap();
    assert!(buffer.is_subset(&addresses(&first)));
    assert!(first.listed.iter().any(|p| p.kind == PageKind::CleanFile));
    assert!(first.listed.iter().all(|p| p.dirty && p.pfn != 0));
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid())).unwrap();
    assert!(
        !status.contains("TracerPid:\t0\n"),
        "not seized between rounds"
    );

    let mut precopy = precopy;
    for _ in 0..2 {
        w.wait_for_next_pass();
        let (next, pages) = precopy.round(false, false).unwrap();
        precopy = next;
        assert!(buffer.is_subset(&addresses(&pages)), "buffer pages missing");
        assert!(pages.listed.iter().all(|p| p.dirty));
        let extra: Vec<&PageRef> = pages
            .listed
            .iter()
            .filter(|p| !buffer.contains(&p.vaddr))
            .collect();
        if soft_dirty_tracked() {
            assert!(
                extra.len() <= 8 && extra.iter().all(|p| p.kind == PageKind::Data),
                "pages reported beyond the buffer: {extra:x?}"
            );
        } else {
            assert!(extra.iter().any(|p| p.kind == PageKind::CleanFile));
        }
    }
    precopy.release();
    assert!(w.child.wait().unwrap().success());
    assert_eq!(w.output(), expected);
}

/// Pages copied in pre-copy rounds while the process ran, plus those the
/// checkpoint reports dirty (or that were never copied), restore it to the
/// same end as an uninterrupted run: the dirty bits miss no write. The
/// buffer, rewritten since the last round, is dirty; the code is not.
#[test]
fn checkpoint_after_precopy_rounds_restores_from_the_copies() {
    require_root();
    let args = ["1", "60"];
    let expected = uninterrupted("precopy-cr", "memory", &args, &[]);
    let w = Workload::start("precopy-cr", "memory", &args, &[]);
    w.wait_for("pass 1 ok\n");
    let pid = w.pid();
    let mem = ProcMem::open(pid).unwrap();
    let read = |vaddr| read_page(&mem, vaddr);
    let mut copies = PageCopies::default();

    let (mut precopy, pages) = Precopy::start(pid, false).unwrap();
    copies.round(&pages, read);
    for _ in 0..2 {
        w.wait_for_next_pass();
        let (next, pages) = precopy.round(false, false).unwrap();
        precopy = next;
        copies.round(&pages, read);
    }
    w.wait_for_next_pass();
    let (image, pages, _) = precopy.capture(false).unwrap();
    let buffer = memory_buffer(pid);
    assert!(pages
        .listed
        .iter()
        .filter(|p| buffer.contains(&p.vaddr))
        .all(|p| p.dirty));
    if soft_dirty_tracked() {
        let mut code = pages.listed.iter().filter(|p| p.kind == PageKind::CleanFile);
        assert!(code.clone().count() > 0 && code.all(|p| !p.dirty));
    } else {
        assert!(pages.listed.iter().all(|p| p.dirty));
    }
    let data = copies.finish(&image, &pages, read);
    kill_original(pid).unwrap();
    assert_eq!(restore(&w, image, &data, |_| {}), expected);
}

#[test]
fn corrupt_image_is_rejected_before_forking() {
    require_root();
    let w = Workload::start("corrupt", "counter", &[], &[]);
    w.wait_for("tick 1\n");
    let (image, _, _) = capture(w.pid(), false).unwrap();
    kill_original(w.pid()).unwrap();
    let null = File::open("/dev/null").unwrap();
    let mut bad = image.clone();
    bad.vmas.swap(0, 1);
    let err = start_and_prepare(&bad, [null.as_fd(), null.as_fd(), null.as_fd()])
        .err()
        .expect("accepted");
    assert!(
        matches!(err, RestoreError::Image(ImageError::BadVma { .. })),
        "{err}"
    );
    let mut bytes = image.to_bytes();
    bytes.truncate(bytes.len() - 3);
    assert!(ProcessImage::from_bytes(&bytes).is_err());
}

/// Attaches `strace -c` to the calling thread while `f` runs and returns
/// strace's summary: the cost of `f` in syscalls (each is ~0.4 ms in the
/// guest). Run with `cargo test -p pmivmm-agent syscall_counts -- --ignored
/// --nocapture`.
fn count_syscalls<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let file = work_dir().join(format!("strace-{what}-{}", std::process::id()));
    let tid = nix::unistd::gettid().as_raw().to_string();
    let mut strace = Command::new("strace")
        .args(["-c", "-o", file.to_str().unwrap(), "-p", &tid])
        .stderr(Stdio::null())
        .spawn()
        .expect("strace");
    std::thread::sleep(Duration::from_millis(500));
    let out = f();
    nix::sys::signal::kill(
        Pid::from_raw(strace.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    strace.wait().unwrap();
    println!(
        "== syscalls of {what}\n{}",
        std::fs::read_to_string(&file).unwrap()
    );
    out
}

#[test]
#[ignore = "needs strace; prints syscall counts"]
fn syscall_counts() {
    require_root();
    let w = Workload::start("counts", "counter", &[], &[]);
    w.wait_for("tick 3\n");
    let (image, _, _) = count_syscalls("capture", || capture(w.pid(), false).unwrap());
    let data = ProcMem::open(w.pid())
        .unwrap()
        .read_runs(&image.pages)
        .unwrap();
    kill_original(w.pid()).unwrap();
    println!(
        "{} VMAs, {} data pages in {} runs",
        image.vmas.len(),
        image.page_count(),
        image.pages.len()
    );
    let out = OpenOptions::new().append(true).open(&w.out).unwrap();
    let null = File::open("/dev/null").unwrap();
    let (child, _) = count_syscalls("prepare_restore", || {
        start_and_prepare(&image, [null.as_fd(), out.as_fd(), out.as_fd()]).unwrap()
    });
    ProcMem::open(child.pid())
        .unwrap()
        .write_runs(&image.pages, &data)
        .unwrap();
    let pid = count_syscalls("finish_restore", || finish_restore(child, &image).unwrap());
    assert_eq!(wait_exit(pid), WaitStatus::Exited(Pid::from_raw(pid), 0));
}

#[test]
#[ignore = "needs strace; prints syscall counts"]
fn precopy_syscall_counts() {
    require_root();
    let w = Workload::start("precopy-counts", "memory", &["1", "100"], &[]);
    w.wait_for("pass 1 ok\n");
    let (precopy, pages) = count_syscalls("first pre-copy round", || {
        Precopy::start(w.pid(), false).unwrap()
    });
    println!("first round: {} pages", pages.listed.len());
    w.wait_for_next_pass();
    let (precopy, pages) = count_syscalls("pre-copy round", || precopy.round(false, false).unwrap());
    println!("later round: {} pages", pages.listed.len());
    let (image, pages, _) = count_syscalls("checkpoint after rounds", || precopy.capture(false).unwrap());
    println!(
        "checkpoint: {} pages, {} dirty, {} VMAs",
        pages.listed.len(),
        pages.listed.iter().filter(|p| p.dirty).count(),
        image.vmas.len()
    );
    kill_original(w.pid()).unwrap();
}
