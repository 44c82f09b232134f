//! The node VMM runs under its seccomp filters (docs/hardening.md): every
//! thread is filtered, the vCPU and vsock threads with a second filter of
//! their own, nothing the node does is refused, and `--seccomp off` turns
//! them off.

use std::fs;
use std::time::{Duration, Instant};

use pmivmm_tests::{run_pmivmm, Node, BOOT_TIMEOUT};

/// The VMM pid of node `name`, from `pmivmm nodes`.
fn vmm_pid(name: &str) -> Option<u32> {
    let (_, out, _) = run_pmivmm(&["nodes"]);
    let line = out.lines().find(|l| l.split_whitespace().next() == Some(name))?;
    line.split_whitespace().find_map(|w| w.parse().ok())
}

/// (thread name, Seccomp mode, number of filters) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let field = |status: &str, key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(u32::MAX)
    };
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the VMM's threads")
        .flatten()
        .filter_map(|t| {
            let status = fs::read_to_string(t.path().join("status")).ok()?;
            let name = fs::read_to_string(t.path().join("comm")).ok()?.trim().to_owned();
            Some((name, field(&status, "Seccomp:"), field(&status, "Seccomp_filters:")))
        })
        .collect()
}

#[test]
fn every_vmm_thread_is_filtered() {
    let mut node = Node::start("seccomp-on", &["--timeout", "600"]);
    let name = node.name.clone();
    node.wait_console("pmivmm-agent ready", BOOT_TIMEOUT);
    // The agent answering over vsock activated the device threads.
    let (st, out, err) = run_pmivmm(&["exec", "--node", &name, "-n", "--", "echo", "hi"]);
    assert!(st.success() && out == "hi\n", "{err}");
    let pid = vmm_pid(&name).expect("the node's VMM pid");
    let threads = threads(pid);
    for (thread, mode, filters) in &threads {
        // 2: SECCOMP_MODE_FILTER.
        assert_eq!(*mode, 2, "thread {thread} of the VMM is not filtered: {threads:?}");
        let own = thread == "vcpu0" || thread == "vsock";
        assert!(*filters >= if own { 2 } else { 1 }, "thread {thread}: {threads:?}");
    }
    for kind in ["vcpu0", "vsock", "peer", "control"] {
        assert!(threads.iter().any(|(t, ..)| t == kind), "no {kind} thread in {threads:?}");
    }
    let (st, _, err) = run_pmivmm(&["stop", "--node", &name]);
    assert!(st.success(), "{err}");
    assert_eq!(node.wait_exit(Duration::from_secs(60)).code(), Some(0), "{}", node.vmm_log());
    assert!(!node.vmm_log().contains("seccomp refused"), "{}", node.vmm_log());
}

#[test]
fn seccomp_off_installs_no_filter() {
    let node = Node::start("seccomp-off", &["--timeout", "120", "--seccomp", "off"]);
    let start = Instant::now();
    let pid = loop {
        if let Some(pid) = vmm_pid(&node.name) {
            break pid;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{}", node.vmm_log());
        std::thread::sleep(Duration::from_millis(200));
    };
    // Give the VMM time to reach the point where it would install them.
    std::thread::sleep(Duration::from_secs(2));
    assert!(threads(pid).iter().all(|&(_, mode, _)| mode == 0), "{:?}", threads(pid));
    assert!(!node.vmm_log().contains("seccomp filters installed"));
}
