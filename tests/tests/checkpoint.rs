//! Checkpoint and restore of guest processes on a real node VM: the VMM
//! reads and writes the pages in guest RAM by frame number.
//!
//! Every workload (images/workloads, in the initramfs as /bin/<name>) runs
//! once uninterrupted, then once with its output redirected to a file in the
//! guest, checkpointed once it has written its first line plus a short
//! random delay (the original is killed),
//! restored, and run to the end: the file must equal the uninterrupted
//! output. One shared node; the round trips run one at a time (a workload
//! must still be running when its checkpoint is taken, and parallel guest
//! work slows everything: a first touch of a page costs ~5 ms here).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pmivmm_proto::AgentClient;
use pmivmm_tests::{random_delay, run_pmivmm, scratch_dir, shared_node};

static SERIAL: Mutex<()> = Mutex::new(());

fn node() -> &'static str {
    shared_node("ckpt")
}

fn agent(node: &str) -> AgentClient<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream> {
    let paths = pmivmm::rundir::NodePaths::existing(node).expect("node run directory");
    AgentClient::connect(&paths.vsock()).expect("connect to the agent")
}

/// Runs `script` with sh in the node; returns its stdout (it must succeed).
fn sh(node: &str, script: &str) -> String {
    let (st, out, err) = run_pmivmm(&["exec", "--node", node, "-n", "--", "sh", "-c", script]);
    assert!(st.success(), "`{script}` failed ({st}): {err}");
    out
}

/// Starts `cmd` in the background in the node with stdout and stderr going
/// to `out`; returns its PID (it is reparented to the agent).
fn launch(node: &str, cmd: &str, out: &str) -> u32 {
    let pid = sh(node, &format!("cd /tmp && {cmd} > {out} 2>&1 & echo $!"));
    pid.trim().parse().unwrap_or_else(|_| panic!("no PID from the launcher: {pid:?}"))
}

/// Whether `pid` exists in the node and has not exited.
fn alive(node: &str, pid: u32) -> Option<char> {
    agent(node).ps().unwrap().into_iter().find(|p| p.pid == pid).map(|p| p.state).filter(|&s| s != 'Z')
}

fn wait_gone(node: &str, pid: u32, timeout: Duration) {
    let start = Instant::now();
    while alive(node, pid).is_some() {
        assert!(start.elapsed() < timeout, "PID {pid} still runs after {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn checkpoint(node: &str, pid: u32, dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let pid = pid.to_string();
    let mut args = vec!["checkpoint", "--node", node, &pid, "-o", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (st, out, err) = run_pmivmm(&args);
    (st.success(), out, err)
}

fn restore(node: &str, dir: &Path, extra: &[&str]) -> u32 {
    let mut args = vec!["restore", "--node", node, dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (st, out, err) = run_pmivmm(&args);
    assert!(st.success(), "restore failed: {err}");
    eprintln!("{}", out.trim());
    let after = out.split(" as PID ").nth(1).unwrap_or_else(|| panic!("no PID in {out:?}"));
    after.split(':').next().unwrap().trim().parse().unwrap()
}

/// The uninterrupted run against a checkpointed-and-restored run of `cmd`,
/// its pages found by the VMM's page-table walk.
fn round_trip(name: &str, cmd: &str) {
    round_trip_with(name, cmd, &[]);
}

/// [`round_trip`] with extra arguments for `pmivmm checkpoint` and
/// `pmivmm restore` (`--pagemap`: the guest's pagemap lists every page).
fn round_trip_with(name: &str, cmd: &str, extra: &[&str]) {
    let node = node();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let reference = sh(node, &format!("cd /tmp && {}", cmd.replace("@", "ref")));
    assert!(reference.contains("RESULT"), "{name}: uninterrupted run: {reference}");
    let out = format!("/tmp/{name}.ck.out");
    let pid = launch(node, &cmd.replace("@", "ck"), &out);
    // Checkpoint mid-run: once the workload has written its first line
    // (startup done, memory filled), after a short random delay.
    sh(node, &format!("while [ ! -s {out} ]; do sleep 0.05; done"));
    std::thread::sleep(random_delay(0, 250));
    let dir: PathBuf = scratch_dir(&format!("ck-{name}")).join("ckpt");
    let (ok, report, err) = checkpoint(node, pid, &dir, extra);
    assert!(ok, "{name}: checkpoint of PID {pid} failed: {err}");
    eprintln!("{name}: {}", report.trim());
    let walked: u64 = report
        .split(" found by the VMM's page-table walk")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name}: no walked page count in {report:?}"));
    match extra.contains(&"--pagemap") {
        true => assert_eq!(walked, 0, "{name}: pages walked despite --pagemap"),
        false => assert!(walked > 0, "{name}: no page found by the VMM's page-table walk (the guest kernel's pmivmm_mm?)"),
    }
    assert!(alive(node, pid).is_none(), "{name}: the original still runs after the checkpoint");
    let new_pid = restore(node, &dir, extra);
    wait_gone(node, new_pid, Duration::from_secs(300));
    let got = sh(node, &format!("cat {out}"));
    assert_eq!(got, reference, "{name}: the restored run's output differs from the uninterrupted run");
}

#[test]
fn counter_survives_checkpoint_and_restore() {
    round_trip("counter", "counter 120");
}

#[test]
fn patterned_memory_survives() {
    round_trip("memory", "memory 2 80");
}

#[test]
fn brk_growth_survives() {
    round_trip("brk", "brk");
}

#[test]
fn file_positions_survive() {
    round_trip("files", "files /tmp/files.@.dat 120");
}

#[test]
fn signal_state_survives() {
    round_trip("signals", "signals 120");
}

/// x87, SSE and (except on kvm_pvm, see `fpu_command`) AVX state.
#[test]
fn fpu_and_sse_state_survives() {
    round_trip("fpu", &pmivmm_tests::fpu_command(150));
}

#[test]
fn page_protections_survive() {
    round_trip("mprotect", "mprotect 120");
}

/// The same with every page listed by the guest kernel's pagemap instead
/// of the VMM's walk of the page tables.
#[test]
fn page_protections_survive_with_pagemap() {
    round_trip_with("mprotect-pagemap", "mprotect 120", &["--pagemap"]);
}

/// Relative and absolute sleeps, interrupted by the checkpoint.
#[test]
fn sleeping_process_survives() {
    round_trip("sleeper", "sleeper 20");
}

/// Interval timers (real, virtual, profiling, alarm), a handler on the
/// alternate signal stack and a personality flag.
#[test]
fn timers_and_alternate_stack_survive() {
    round_trip("timers", "timers 60");
}

/// POSIX timers cannot be recreated: refused, and the process runs on.
#[test]
fn posix_timer_is_refused_and_left_running() {
    let node = node();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = "/tmp/hold-timer.out";
    let pid = launch(node, "hold timer", out);
    sh(node, &format!("while [ ! -s {out} ]; do sleep 0.05; done"));
    let dir = scratch_dir("ck-posix-timer").join("ckpt");
    let (ok, _, err) = checkpoint(node, pid, &dir, &[]);
    assert!(!ok);
    assert!(err.contains("refused") && err.contains("1 POSIX timer(s)"), "{err}");
    assert!(!dir.join("descriptor").exists());
    wait_gone(node, pid, Duration::from_secs(120));
    assert!(sh(node, &format!("cat {out}")).ends_with("alive 199\nRESULT 200\n"));
}

#[test]
fn checkpoint_of_a_missing_pid_fails_clearly() {
    let dir = scratch_dir("ck-missing").join("ckpt");
    let (ok, _, err) = checkpoint(node(), 999_999, &dir, &[]);
    assert!(!ok);
    assert!(err.contains("999999") && err.contains("no process"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(!dir.join("descriptor").exists());
}

#[test]
fn checkpoint_of_pid_1_is_refused_with_a_reason() {
    let dir = scratch_dir("ck-init").join("ckpt");
    let (ok, _, err) = checkpoint(node(), 1, &dir, &[]);
    assert!(!ok);
    assert!(err.contains("refused") && err.contains("PID 1 (init)"), "{err}");
    assert!(!dir.join("descriptor").exists());
}

#[test]
fn leave_running_keeps_the_original_and_a_corrupt_copy_is_refused() {
    let node = node();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let reference = sh(node, "counter 60");
    let out = "/tmp/counter-live.out";
    let pid = launch(node, "counter 60", out);
    std::thread::sleep(Duration::from_millis(200));
    let dir = scratch_dir("ck-live").join("ckpt");
    let (ok, report, err) = checkpoint(node, pid, &dir, &["--leave-running"]);
    assert!(ok, "{err}");
    assert!(report.contains("left running"), "{report}");
    let state = alive(node, pid).expect("the original is gone after --leave-running");
    assert!(matches!(state, 'R' | 'S'), "the original is in state {state}");
    wait_gone(node, pid, Duration::from_secs(120));
    assert_eq!(sh(node, &format!("cat {out}")), reference, "the original's output was disturbed");

    // A corrupt copy of that checkpoint: refused by the CLI and by the VMM
    // itself, before anything is started in the guest.
    let before = agent(node).ps().unwrap().len();
    let pages = dir.join("pages.bin");
    let mut bytes = std::fs::read(&pages).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&pages, bytes).unwrap();
    let (st, _, err) = run_pmivmm(&["restore", "--node", node, dir.to_str().unwrap()]);
    assert!(!st.success());
    assert!(err.contains("checksum"), "{err}");
    let control = pmivmm::rundir::NodePaths::existing(node).unwrap().control();
    let e = pmivmm::control::restore(&control, &dir, true).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
    let desc = dir.join("descriptor");
    std::fs::write(&desc, &std::fs::read(&desc).unwrap()[..30]).unwrap();
    let e = pmivmm::control::restore(&control, &dir, true).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    assert_eq!(agent(node).ps().unwrap().len(), before, "a process was started from a corrupt checkpoint");
}
