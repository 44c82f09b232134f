//! `pmivmm lab up 2` / `pmivmm lab down` with real node VMs: the nodes find
//! each other by multicast discovery alone (no `--join`), a short job runs
//! on one of them, a longer one on the other shows in `pmivmm ps`, the
//! cluster view shows both, and `lab down` leaves no namespace, veth, bridge
//! or run directory behind.
//!
//! The lab needs root (network namespaces, a bridge); CI runs as root. As
//! every test here, it fails rather than skips when it cannot run, and it
//! never touches a lab it did not make (it fails if one is up).

use std::process::Command;
use std::time::Instant;

use pmivmm::cluster::membership::Health;
use pmivmm::lab::{LabNode, Present};
use pmivmm::rundir::NodePaths;
use pmivmm_tests::{require_kvm, run_pmivmm, Job, BOOT_TIMEOUT};

/// `ip ARGS`' stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What of a lab exists on this host, run directories included.
fn lab_left() -> (Present, Vec<String>) {
    let present = Present::parse(&ip(&["netns", "list"]), &ip(&["-o", "link", "show"]));
    let dirs = LabNode::all(pmivmm::lab::MAX_NODES)
        .map(|n| n.name())
        .filter(|n| NodePaths::new(n).is_ok_and(|p| p.dir.exists()))
        .collect();
    (present, dirs)
}

/// Takes the lab down when dropped (when the test fails before it does).
struct Lab;

impl Lab {
    /// `pmivmm lab down`, timed: (status, stdout, stderr, seconds).
    fn down(self) -> (std::process::ExitStatus, String, String, f64) {
        std::mem::forget(self);
        let start = Instant::now();
        let (st, out, err) = run_pmivmm(&["lab", "down"]);
        (st, out, err, start.elapsed().as_secs_f64())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let (st, out, err) = run_pmivmm(&["lab", "down"]);
        eprintln!("pmivmm lab down ({st}):\n{out}{err}");
    }
}

#[test]
fn a_lab_of_two_discovers_itself_runs_a_job_and_goes_away() {
    require_kvm();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "the lab test needs root (network namespaces and a bridge); it is never skipped");
    let (present, dirs) = lab_left();
    assert!(
        present.is_empty() && dirs.is_empty(),
        "a lab is up already ({} {dirs:?}): not touching it; `pmivmm lab down` removes it",
        present.describe()
    );

    let lab = Lab;
    let start = Instant::now();
    // The two nodes boot side by side, as two test nodes do.
    let timeout = BOOT_TIMEOUT.as_secs().to_string();
    let (st, out, err) = run_pmivmm(&["lab", "up", "2", "--mem", "128M", "--no-share", "--timeout", &timeout]);
    let up_s = start.elapsed().as_secs_f64();
    eprintln!("pmivmm lab up 2 took {up_s:.1} s:\n{out}{err}");
    assert!(st.success(), "pmivmm lab up 2 failed:\n{out}{err}");

    let logs = pmivmm::lab::log_dir();
    for (me, other) in [(LabNode(1), LabNode(2)), (LabNode(2), LabNode(1))] {
        let paths = NodePaths::existing(&me.name()).expect("lab node run directory");
        // Found by discovery: no node was told of another.
        let status = pmivmm::control::status(&paths.control()).expect("lab node status");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", status.vmm_pid)).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        assert!(args.contains(&&b"--discover"[..]) && !args.contains(&&b"--join"[..]), "{args:?}");
        let log = std::fs::read_to_string(pmivmm::lab::log_file(&logs, me)).unwrap_or_default();
        let found = format!("cluster: discovered {} at {}", other.name(), other.peer_addr());
        assert!(log.contains(&found), "no {found:?} in the log of {}:\n{log}", me.name());
        let view = pmivmm::control::cluster(&paths.control()).expect("cluster view");
        for n in [me, other] {
            let m = view.members.iter().find(|m| m.member.name == n.name());
            assert!(m.is_some_and(|m| m.health == Health::Alive), "{} does not see {} alive: {view:?}", me.name(), n.name());
        }
    }

    // A short job on lab1, and a long one on lab2 that `pmivmm ps` (every
    // node of the host) shows, then ended: on a busy host `pmivmm ps` takes
    // its time (30 s seen beside four other node VMs).
    let started = Instant::now();
    let (code, out) = Job::start("lab1", "sleeper 2").finish();
    assert_eq!((code, out.lines().last()), (0, Some("RESULT 4")), "{out}");
    let job = Job::start("lab2", "sleeper 100000");
    job.wait_output();
    let running = started.elapsed().as_secs_f64();
    let (st, ps, err) = run_pmivmm(&["ps"]);
    assert!(st.success(), "{err}");
    eprintln!("job output after {running:.1} s, pmivmm ps after {:.1} s", started.elapsed().as_secs_f64());
    let line = ps.lines().find(|l| l.split_whitespace().take(2).eq(["lab2", job.pid.to_string().as_str()]));
    assert!(line.is_some_and(|l| l.contains("sleeper")), "no sleeper job of lab2 in pmivmm ps:\n{ps}");
    let (st, cluster, err) = run_pmivmm(&["cluster", "--node", "lab1"]);
    assert!(st.success() && cluster.contains("lab2") && cluster.contains("alive"), "{cluster}{err}");
    let (st, _, err) = run_pmivmm(&["kill", "--node", "lab2", "-s", "15", &job.pid.to_string()]);
    assert!(st.success(), "kill: {err}");
    let (code, out) = job.finish();
    assert_eq!(code, 128 + 15, "the job on lab2 was not ended by SIGTERM: {out}");
    eprintln!("jobs, ps and cluster view: {:.1} s", started.elapsed().as_secs_f64());

    let (st, out, err, down_s) = lab.down();
    eprintln!("pmivmm lab down took {down_s:.1} s:\n{out}{err}");
    assert!(st.success(), "pmivmm lab down failed:\n{out}{err}");
    let (present, dirs) = lab_left();
    assert!(present.is_empty() && dirs.is_empty(), "left after lab down: {} {dirs:?}", present.describe());
}
