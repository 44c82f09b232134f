//! The paravirtual channel with a real node VM: exec with output, stdin and
//! exit status, ps, load, kill, concurrent connections, large transfers.
//! All tests share one node (a boot costs ~45 s on the development hosts).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pmivmm_proto::AgentClient;
use pmivmm_tests::{pmivmm_bin, pmivmm_with_input, run_pmivmm, shared_node};

fn agent(node: &str) -> AgentClient<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream> {
    let paths = pmivmm::rundir::NodePaths::existing(node).expect("node run directory");
    AgentClient::connect(&paths.vsock()).expect("connect to the agent")
}

#[test]
fn exec_returns_output_and_exit_status() {
    let node = shared_node("chan");
    let (st, out, err) = run_pmivmm(&["exec", "--node", node, "-n", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(st.code(), Some(7), "stderr: {err}");
    assert_eq!(out, "out\n");
    assert_eq!(err, "err\n");
}

#[test]
fn exec_reports_a_signal_as_128_plus_signal() {
    let node = shared_node("chan");
    let (st, _, err) = run_pmivmm(&["exec", "--node", node, "-n", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(st.code(), Some(128 + 9), "{err}");
}

#[test]
fn exec_of_a_missing_program_is_a_clear_error() {
    let node = shared_node("chan");
    let (st, _, err) = run_pmivmm(&["exec", "--node", node, "-n", "--", "/no/such/program"]);
    assert_ne!(st.code(), Some(0));
    assert!(err.contains("/no/such/program"), "{err}");
}

#[test]
fn stdin_and_stdout_carry_a_megabyte_intact() {
    let node = shared_node("chan");
    // Pseudo-random bytes (xorshift), so that a dropped or reordered chunk shows.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let out = pmivmm_with_input(&["exec", "--node", node, "--", "cat"], &data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "output differs from input");
}

#[test]
fn concurrent_execs_each_get_their_own_output() {
    let node = shared_node("chan");
    let children: Vec<_> = (0..6)
        .map(|i| {
            Command::new(pmivmm_bin())
                .args(["exec", "--node", node, "-n", "--", "sh", "-c", &format!("echo conn-{i}; exit {i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(i as i32), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("conn-{i}\n"));
    }
}

#[test]
fn ps_shows_a_running_sleep_as_migratable() {
    let node = shared_node("chan");
    let mut sleeper = Command::new(pmivmm_bin())
        .args(["exec", "--node", node, "-n", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // Columns: NODE PID PPID S RUNS-ON TIME RSS MIGRATE COMMAND. Until its
    // start is done (exec costs ~0.5 s of emulated kernel time here) the
    // sleep is runnable; then it sleeps.
    let line = loop {
        let (st, out, err) = run_pmivmm(&["ps", "--node", node]);
        assert!(st.success(), "{err}");
        let line = out.lines().find(|l| l.contains("sleep 600"));
        if let Some(l) = line.filter(|l| l.split_whitespace().nth(3) == Some("S")) {
            break l.to_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no sleeping sleep in ps:\n{out}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((cols[0], cols[4]), (node, node), "{line}");
    assert_eq!(cols[7], "yes", "{line}");
    let pid: u32 = cols[1].parse().unwrap();
    // Dropping the client connection hangs the process up.
    sleeper.kill().unwrap();
    let _ = sleeper.wait();
    let start = Instant::now();
    while agent(node).ps().unwrap().iter().any(|p| p.pid == pid) {
        assert!(start.elapsed() < Duration::from_secs(30), "sleep {pid} survived its client");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn load_rises_while_a_busy_loop_runs_and_falls_to_zero() {
    let node = shared_node("chan");
    let mut busy = Command::new(pmivmm_bin())
        .args(["exec", "--node", node, "-n", "--", "sh", "-c", "while :; do :; done"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let l = agent(node).load().unwrap();
        // The loop is one runnable task (the agent answering is none).
        if l.runnable_tasks >= 1 && l.load_avg[0] > 0.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "load never rose: {l:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    busy.kill().unwrap();
    let _ = busy.wait();
    // Once nothing runs, the count is 0: neither the asking agent nor the
    // kernel's vsock worker that carried the request counts (other tests
    // share the node, so this may take until they are done).
    let start = Instant::now();
    loop {
        let l = agent(node).load().unwrap();
        if l.runnable_tasks == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "an idle node still reports load: {l:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn killing_a_missing_pid_is_a_clear_error() {
    let node = shared_node("chan");
    let (st, _, err) = run_pmivmm(&["kill", "--node", node, "999999"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("999999"), "{err}");
}

#[test]
fn kill_stops_a_process() {
    let node = shared_node("chan");
    let mut c = Command::new(pmivmm_bin())
        .args(["exec", "--node", node, "-n", "--", "sleep", "601"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pid = loop {
        let found = agent(node).ps().unwrap().into_iter().find(|p| p.argv.join(" ") == "sleep 601");
        if let Some(p) = found {
            break p.pid;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "sleep 601 never showed in ps");
        std::thread::sleep(Duration::from_millis(300));
    };
    let (st, _, err) = run_pmivmm(&["kill", "--node", node, "-s", "9", &pid.to_string()]);
    assert!(st.success(), "{err}");
    assert_eq!(c.wait().unwrap().code(), Some(128 + 9));
}

#[test]
fn unknown_node_is_a_clear_error() {
    let (st, _, err) = run_pmivmm(&["exec", "--node", "no-such-node", "--", "true"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("no node named no-such-node"), "{err}");
}
