//! Live migration between real node VMs.
//!
//! Nodes A (home), B and C share a host directory; D exists to be killed
//! by a fault. Workloads run with `pmivmm exec` on A, so their stdout and exit
//! status reach the test through A's agent: after a migration they come
//! through the deputy at A, relayed from where the process runs. Each
//! migrated run must give exactly the output and exit status of an
//! uninterrupted run. One migration at a time (guest kernel work is
//! emulated and slow here; parallel migrations only add noise).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use pmivmm_tests::{
    process, random_delay, reference, run_pmivmm, scratch_dir, shared_node_log, shared_node_with, Job,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn share() -> &'static str {
    static SHARE: OnceLock<String> = OnceLock::new();
    SHARE.get_or_init(|| scratch_dir("mig-share").to_str().unwrap().to_owned())
}

/// Boots A, B and C together (their boots overlap) and returns their names.
fn nodes() -> (&'static str, &'static str, &'static str) {
    let boot = |tag: &'static str| std::thread::spawn(move || shared_node_with(tag, &["--share", share()]));
    let (a, b, c) = (boot("mig-a"), boot("mig-b"), boot("mig-c"));
    (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
}

fn migrate(node: &str, pid: u32, target: &str, extra: &[&str]) -> (bool, String, String) {
    let pid = pid.to_string();
    let mut args = vec!["migrate", "--node", node, &pid, target];
    args.extend_from_slice(extra);
    let (st, out, err) = run_pmivmm(&args);
    (st.success(), out, err)
}

fn migrated_pid(report: &str) -> u32 {
    let after = report.split(" as PID ").nth(1).unwrap_or_else(|| panic!("no PID in {report:?}"));
    after.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// Runs `cmd` on A uninterrupted, then again, migrated to B mid-run; the
/// outputs and exit codes must match.
fn migrated_run(name: &str, cmd: &str) {
    let (a, b, _) = nodes();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let expected = reference(a, &cmd.replace('@', "ref"));
    assert!(expected.1.contains("RESULT"), "{name}: uninterrupted run: {expected:?}");
    let job = Job::start(a, &cmd.replace('@', "mig"));
    job.wait_output();
    std::thread::sleep(random_delay(0, 250));
    let (ok, report, err) = migrate(a, job.pid, b, &[]);
    assert!(ok, "{name}: migration of PID {} failed: {err}", job.pid);
    eprintln!("{name}: {}", report.trim());
    let deputy = process(a, job.pid).expect("the deputy is gone");
    assert_eq!(deputy.remote.as_deref(), Some(b), "{name}: ps at home does not show where it runs");
    let (_, ps, _) = run_pmivmm(&["ps", "--node", a]);
    match ps.lines().find(|l| l.split_whitespace().nth(1) == Some(&job.pid.to_string())) {
        Some(line) => assert!(line.contains(b), "{name}: `pmivmm ps` at home: {ps}"),
        // A short workload may have ended by now.
        None => assert!(process(a, job.pid).is_none(), "{name}: `pmivmm ps` at home misses it: {ps}"),
    }
    assert!(report.contains(&format!(" to {b} as PID ")), "{name}: {report}");
    let got = job.finish();
    assert_eq!(got, expected, "{name}: the migrated run differs from the uninterrupted one");
}

#[test]
fn counter_migrates() {
    migrated_run("counter", "counter 120");
}

/// Also: the target lays the process's memory out ahead (12 MiB: above
/// the source's threshold of 8), from the first pre-copy round, while it
/// still runs at the source.
#[test]
fn patterned_memory_migrates() {
    migrated_run("memory", "memory 12 80");
    let log = shared_node_log("mig-b");
    let target = log.lines().rfind(|l| l.contains(": memory runs here as PID "));
    assert!(
        target.is_some_and(|line| line.contains("laid out ahead in ")),
        "B did not lay the process out ahead: {target:?}"
    );
}

#[test]
fn brk_growth_migrates() {
    migrated_run("brk", "brk");
}

#[test]
fn signal_state_migrates() {
    migrated_run("signals", "signals 120");
}

/// x87, SSE and (except on kvm_pvm, see `fpu_command`) AVX state.
#[test]
fn fpu_state_migrates() {
    migrated_run("fpu", &pmivmm_tests::fpu_command(150));
}

#[test]
fn open_files_in_the_share_migrate() {
    let out = PathBuf::from(share()).join("files.@.dat");
    migrated_run("files", &format!("files {} 120", out.display()));
    let read = |tag: &str| std::fs::read(share().to_owned() + &format!("/files.{tag}.dat")).unwrap();
    assert_eq!(read("mig"), read("ref"), "the migrated run's file differs");
}

/// Starts `counter 300` on A, moves it to B and from there on to `next`
/// (`extra`: options of that second move). Returns the output of an
/// uninterrupted run, the job and the second move's report.
fn moved_twice(a: &str, b: &str, next: &str, extra: &[&str]) -> ((i32, String), Job, String) {
    let expected = reference(a, "counter 300");
    let job = Job::start(a, "counter 300");
    job.wait_output();
    let (ok, report, err) = migrate(a, job.pid, b, &[]);
    assert!(ok, "A -> B: {err}");
    let on_b = migrated_pid(&report);
    std::thread::sleep(random_delay(100, 400));
    let (ok, report, err) = migrate(b, on_b, next, extra);
    assert!(ok, "B -> {next}: {err}");
    eprintln!("{}", report.trim());
    assert!(process(b, on_b).is_none(), "the copy on B still runs after it moved to {next}");
    (expected, job, report)
}

#[test]
fn a_process_moves_on_and_comes_home() {
    let (a, b, _) = nodes();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (expected, job, report) = moved_twice(a, b, "home", &["--no-precopy"]);
    let back = migrated_pid(&report);
    assert!(process(a, back).is_some(), "PID {back} does not run at home");
    assert_eq!(job.finish(), expected, "A -> B -> A changed the output");
}

#[test]
fn a_process_moves_from_node_to_node() {
    let (a, b, c) = nodes();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (expected, job, report) = moved_twice(a, b, c, &[]);
    let on_c = migrated_pid(&report);
    assert!(process(c, on_c).is_some(), "PID {on_c} does not run on C");
    let deputy = process(a, job.pid).expect("the deputy at home is gone");
    assert_eq!(deputy.remote.as_deref(), Some(c), "ps at home does not show that it runs on C now");
    assert_eq!(job.finish(), expected, "A -> B -> C changed the output");
}

#[test]
fn signals_to_the_deputy_reach_the_process() {
    let (a, b, _) = nodes();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let job = Job::start(a, "counter 100000");
    job.wait_output();
    let (ok, report, err) = migrate(a, job.pid, b, &[]);
    assert!(ok, "{err}");
    let remote = migrated_pid(&report);
    let (st, _, err) = run_pmivmm(&["kill", "--node", a, "-s", "15", &job.pid.to_string()]);
    assert!(st.success(), "kill: {err}");
    let home_pid = job.pid;
    let (code, out) = job.finish();
    assert_eq!(code, 128 + 15, "exit status of a process killed by SIGTERM on {b}: {code}; output {out}");
    assert!(process(b, remote).is_none(), "the process still runs on {b}");
    assert!(process(a, home_pid).is_none(), "the deputy still exists");
}

/// A fault armed in a node's next incoming migration; disarmed when dropped,
/// so a fault that did not fire (a test that failed before reaching it)
/// cannot hit the next test's migration.
struct ArmedFault(PathBuf);

impl Drop for ArmedFault {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Arms a fault in `node`'s next incoming migration.
fn arm_fault(node: &str, fault: &str) -> ArmedFault {
    let path = pmivmm::rundir::NodePaths::existing(node).unwrap().dir.join("fault");
    std::fs::write(&path, fault).unwrap();
    ArmedFault(path)
}

#[test]
fn failed_migrations_leave_the_process_running_at_home() {
    let (a, b, _) = nodes();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let expected = reference(a, "counter 250");
    let job = Job::start(a, "counter 250");
    job.wait_output();
    for point in ["offer", "image", "commit"] {
        let _fault = arm_fault(b, &format!("{point} drop"));
        let (ok, _, err) = migrate(a, job.pid, b, &[]);
        assert!(!ok, "the migration with a fault at {point} succeeded");
        assert!(err.contains("not moved"), "{point}: {err}");
        let p = process(a, job.pid).unwrap_or_else(|| panic!("{point}: the process is gone"));
        assert!(p.remote.is_none() && matches!(p.state, 'R' | 'S'), "{point}: state {} at home", p.state);
    }
    // The link drops after the process started on B: the source asks B and
    // learns that it runs there.
    let _fault = arm_fault(b, "running drop");
    let (ok, report, err) = migrate(a, job.pid, b, &[]);
    assert!(ok, "in-doubt migration: {err}");
    eprintln!("{}", report.trim());
    assert_eq!(job.finish(), expected, "a failed migration disturbed the process");
}

#[test]
fn a_target_vmm_that_dies_mid_migration_loses_nothing() {
    let (a, _, _) = nodes();
    // Killed by the fault: no other test may use it.
    let d = shared_node_with("mig-d", &["--share", share()]);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let expected = reference(a, "counter 150");
    let job = Job::start(a, "counter 150");
    job.wait_output();
    // D's VMM exits once the process runs there, before it says so.
    let _fault = arm_fault(d, "running exit");
    let (ok, _, err) = migrate(a, job.pid, d, &[]);
    assert!(!ok, "migration to a dying node succeeded");
    assert!(err.contains("not moved"), "{err}");
    assert_eq!(job.finish(), expected, "the process did not finish correctly at home");
}

#[test]
fn bad_targets_fail_cleanly() {
    let (a, _, _) = nodes();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let job = Job::start(a, "counter 40");
    job.wait_output();
    let (ok, _, err) = migrate(a, job.pid, "127.0.0.1:1", &[]);
    assert!(!ok && err.contains("cannot reach") && err.contains("not moved"), "{err}");
    let (ok, _, err) = migrate(a, job.pid, "no-such-node", &[]);
    assert!(!ok && err.contains("no-such-node"), "{err}");
    let (ok, _, err) = migrate(a, 999_999, "127.0.0.1:1", &[]);
    assert!(!ok && err.contains("999999"), "{err}");
    assert_eq!(job.finish().0, 0);
}

#[test]
fn a_peer_without_the_cluster_key_is_refused() {
    let (a, _, _) = nodes();
    let addr = std::fs::read_to_string(pmivmm::rundir::NodePaths::existing(a).unwrap().peer_addr()).unwrap();
    let key_file = scratch_dir("mig-key").join("other.key");
    std::fs::write(&key_file, "ab".repeat(32)).unwrap();
    let key = pmivmm::peer::ClusterKey::load(&key_file).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(pmivmm::peer::PeerLink::connect(addr.trim(), &key, "intruder", Duration::from_secs(10)));
    let e = r.expect_err("a peer with another key was accepted").to_string();
    assert!(e.contains("cluster key"), "{e}");
}
