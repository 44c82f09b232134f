//! The agent's server on a Unix socket, exercised through the protocol
//! client (and raw frames where the client would refuse to misbehave).
//!
//! The agent's reaper waits for every child of this test process, so these
//! tests start processes only through the agent.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pmivmm_agent::checkpoint::ProcMem;
use pmivmm_agent::connection::Actions;
use pmivmm_agent::server::serve;
use pmivmm_proto::frame::{read_frame, read_payload, write_frame};
use pmivmm_proto::image::{PageRun, ProcessImage};
use pmivmm_proto::{
    AgentClient, ClientError, DeputyControl, DeputyEvent, DeputyEvents, ErrorKind, ExecEvent,
    ExecRequest, ExitStatus, Migratability, MigrationObstacle, Request, Response, PROTOCOL_VERSION,
    VERSION,
};

mod common;

static POWER_OFFS: AtomicUsize = AtomicUsize::new(0);

fn fake_power_off() {
    POWER_OFFS.fetch_add(1, Ordering::SeqCst);
}

/// One agent per test binary, on a socket in a fresh temp dir.
fn agent_socket() -> &'static Path {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pmivmm-agent-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            serve(
                listener,
                Actions {
                    power_off: fake_power_off,
                },
            )
        });
        path
    })
}

type Client = AgentClient<UnixStream, UnixStream>;

fn client() -> Client {
    AgentClient::over_unix_stream(UnixStream::connect(agent_socket()).unwrap()).unwrap()
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: vec![],
        cwd: None,
        stdin: false,
    }
}

fn sh(script: &str) -> ExecRequest {
    exec(&["sh", "-c", script])
}

/// Execs `argv` from a bash that first closes the fds this test process
/// leaks to its children (cargo's jobserver pipe), which would make the
/// program unmigratable.
fn migratable(argv: &[&str]) -> ExecRequest {
    let script = format!(
        "for fd in $(ls /proc/$$/fd); do [ $fd -gt 2 ] && eval \"exec $fd>&-\"; done; exec {}",
        argv.join(" ")
    );
    exec(&["bash", "-c", &script])
}

/// Execs workload `name` (see images/workloads) as [`migratable`] does.
/// The workloads are built through the agent: its reaper would take the
/// exit status of a build started here.
fn workload(name: &str, args: &[&str]) -> ExecRequest {
    let path = common::workload_built_by(name, |script, dir| {
        let argv = [script.to_str().unwrap(), dir.to_str().unwrap()];
        let out = client()
            .exec(exec(&argv))
            .unwrap()
            .wait_with_output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status, ExitStatus::Code(0), "build.sh failed: {stderr}");
    });
    let mut argv = vec![path.to_str().unwrap()];
    argv.extend_from_slice(args);
    migratable(&argv)
}

/// Reads more of an exec's stdout into `out` unless it holds `text`
/// already (output comes in chunks of several lines).
fn read_more<R: std::io::Read, W: std::io::Write>(
    session: &mut pmivmm_proto::ExecSession<R, W>,
    out: &mut String,
    text: &str,
) {
    if !out.contains(text) {
        *out += &read_until(session, text);
    }
}

/// Reads an exec's events until its stdout contains `text`; returns the
/// stdout read.
fn read_until<R: std::io::Read, W: std::io::Write>(
    session: &mut pmivmm_proto::ExecSession<R, W>,
    text: &str,
) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(text) {
        match session.next_event().unwrap() {
            ExecEvent::Stdout(data) => out.extend_from_slice(&data),
            ExecEvent::Stderr(data) => panic!("stderr: {}", String::from_utf8_lossy(&data)),
            ExecEvent::Exited(status) => {
                panic!(
                    "exited ({status}) before {text:?}: {}",
                    String::from_utf8_lossy(&out)
                )
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// A raw connection that has said hello.
fn raw() -> UnixStream {
    let mut s = UnixStream::connect(agent_socket()).unwrap();
    let hello = Request::Hello {
        protocol_version: PROTOCOL_VERSION,
        software_version: "test".into(),
    };
    write_frame(&mut s, &hello).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Some(Response::Hello { .. })
    ));
    s
}

fn reply(s: &mut UnixStream) -> Response {
    read_frame(s).unwrap().expect("agent closed the connection")
}

fn agent_error(result: Result<impl std::fmt::Debug, ClientError>) -> (ErrorKind, String) {
    match result {
        Err(ClientError::Agent { kind, message }) => (kind, message),
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[test]
fn hello_reports_the_agent_version() {
    assert_eq!(client().agent_version(), VERSION);
}

#[test]
fn exec_streams_output_and_exit_code() {
    let out = client()
        .exec(sh("echo out; echo err >&2; exit 3"))
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status, ExitStatus::Code(3));
}

#[test]
fn exec_uses_env_cwd_and_default_path() {
    let req = ExecRequest {
        env: vec!["FOO=bar".into(), "TERM=vt100".into()],
        cwd: Some("/tmp".into()),
        ..sh("echo $FOO $TERM $HOME; pwd; echo $PATH")
    };
    let out = client().exec(req).unwrap().wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "bar vt100 /root\n/tmp\n/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    assert_eq!(out.status, ExitStatus::Code(0));
}

#[test]
fn exec_reports_a_killing_signal() {
    let out = client()
        .exec(sh("kill -9 $$"))
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Signal {
            signal: 9,
            core_dumped: false
        }
    );
}

#[test]
fn exec_of_a_missing_program_is_a_spawn_error() {
    let (kind, message) = agent_error(
        client()
            .exec(exec(&["no-such-program-pmivmm"]))
            .map(|s| s.pid()),
    );
    assert_eq!(kind, ErrorKind::SpawnFailed);
    assert!(
        message.contains("no-such-program-pmivmm: not found in PATH"),
        "{message}"
    );
    let (kind, _) = agent_error(client().exec(exec(&[])).map(|s| s.pid()));
    assert_eq!(kind, ErrorKind::BadRequest);
}

#[test]
fn exec_forwards_stdin_from_another_thread() {
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let session = client()
        .exec(ExecRequest {
            stdin: true,
            ..exec(&["cat"])
        })
        .unwrap();
    let (mut output, mut stdin) = session.split();
    let sent = input.clone();
    let feeder = std::thread::spawn(move || {
        stdin.write(&sent).unwrap();
        stdin.close().unwrap();
    });
    let mut echoed = Vec::new();
    loop {
        match output.next_event().unwrap() {
            ExecEvent::Stdout(data) => echoed.extend_from_slice(&data),
            ExecEvent::Stderr(data) => panic!("stderr: {}", String::from_utf8_lossy(&data)),
            ExecEvent::Exited(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
        }
    }
    feeder.join().unwrap();
    assert!(
        echoed == input,
        "cat echoed {} of {} bytes, or different ones",
        echoed.len(),
        input.len()
    );
}

#[test]
fn concurrent_execs_each_get_their_own_output() {
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let script = format!("sleep 0.2; echo {i}; echo e{i} >&2; exit {i}");
                client()
                    .exec(sh(&script))
                    .unwrap()
                    .wait_with_output()
                    .unwrap()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let out = t.join().unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
        assert_eq!(out.stderr, format!("e{i}\n").as_bytes());
        assert_eq!(out.status, ExitStatus::Code(i as i32));
    }
}

#[test]
fn large_output_arrives_intact_in_many_frames() {
    const LEN: usize = 8 << 20;
    let mut session = client()
        .exec(sh(&format!("yes 0123456789abcdef | head -c {LEN}")))
        .unwrap();
    let (mut received, mut frames) = (Vec::with_capacity(LEN), 0);
    loop {
        match session.next_event().unwrap() {
            ExecEvent::Stdout(data) => {
                received.extend_from_slice(&data);
                frames += 1;
            }
            ExecEvent::Stderr(data) => panic!("stderr: {}", String::from_utf8_lossy(&data)),
            ExecEvent::Exited(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
        }
    }
    assert_eq!(received.len(), LEN);
    assert!(
        received
            .chunks(17)
            .all(|c| b"0123456789abcdef\n".starts_with(c)),
        "corrupted output"
    );
    assert!(frames > 8, "output came in only {frames} frames");
}

#[test]
fn exited_is_not_held_back_by_background_children() {
    let start = Instant::now();
    let out = client()
        .exec(sh("sleep 5 & echo started"))
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert_eq!(out.stdout, b"started\n");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn ps_shows_a_sleeping_process_as_migratable_and_kill_ends_it() {
    let mut session = client().exec(exec(&["sleep", "30"])).unwrap();
    let pid = session.pid();
    // Let the spawned child exec sleep.
    let deadline = Instant::now() + Duration::from_secs(5);
    let sleep = loop {
        let list = client().ps().unwrap();
        if let Some(p) = list.iter().find(|p| p.pid == pid && p.comm == "sleep") {
            let me = list
                .iter()
                .find(|p| p.pid == std::process::id())
                .expect("ps lists the agent");
            let Migratability::NotMigratable(why) = &me.migratable else {
                panic!("agent is migratable")
            };
            assert!(why.contains(&MigrationObstacle::Agent), "{why:?}");
            assert!(why.iter().any(
                |o| matches!(o, MigrationObstacle::MultiThreaded { threads } if *threads > 1)
            ));
            break p.clone();
        }
        assert!(Instant::now() < deadline, "sleep {pid} not in ps");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(sleep.argv, ["sleep", "30"]);
    assert_eq!(sleep.ppid, std::process::id());
    assert!(sleep.rss_bytes > 0);
    assert_eq!(sleep.migratable, Migratability::Migratable);

    client().kill(pid, 15).unwrap();
    assert_eq!(
        session.next_event().unwrap(),
        ExecEvent::Exited(ExitStatus::Signal {
            signal: 15,
            core_dumped: false
        })
    );
}

#[test]
fn kill_of_a_missing_pid_says_so() {
    let pid = 4_194_000;
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let (kind, message) = agent_error(client().kill(pid, 9));
    assert_eq!(kind, ErrorKind::NoSuchProcess);
    assert_eq!(message, format!("no process with PID {pid}"));
    let (kind, _) = agent_error(client().kill(123, 12345));
    assert_eq!(kind, ErrorKind::BadRequest);
    let (kind, _) = agent_error(client().kill(std::process::id(), 15));
    assert_eq!(kind, ErrorKind::BadRequest);
}

/// The load comes from /proc/pmivmm_load, which only the node kernel has
/// (patch 0011; the KVM tests check the figures there): elsewhere the
/// answer says what is missing.
#[test]
fn load_reports_this_machine_or_what_its_kernel_lacks() {
    match client().load() {
        Ok(load) => {
            assert!(Path::new("/proc/pmivmm_load").exists());
            assert!(load.cpus >= 1);
            assert!(load.total_tasks >= load.runnable_tasks && load.total_tasks > 0);
            assert!(load.mem_total_bytes >= load.mem_available_bytes);
        }
        Err(e) => {
            assert!(!Path::new("/proc/pmivmm_load").exists(), "{e}");
            let (kind, message) = agent_error(Err::<(), _>(e));
            assert_eq!(kind, ErrorKind::Failed);
            assert!(message.contains("/proc/pmivmm_load") && message.contains("patch 0011"), "{message}");
        }
    }
}

#[test]
fn client_disconnect_hangs_up_the_exec() {
    let session = client().exec(exec(&["sleep", "30"])).unwrap();
    let pid = session.pid();
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "sleep {pid} survived its client");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unknown_and_garbage_requests_get_errors_and_the_connection_lives_on() {
    let mut s = raw();
    // A request variant from a newer protocol.
    let mut frame = 2u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[Request::VARIANTS as u8, 7]);
    std::io::Write::write_all(&mut s, &frame).unwrap();
    match reply(&mut s) {
        Response::Error {
            kind: ErrorKind::UnknownRequest,
            message,
        } => {
            let expected = format!("unknown request variant {}", Request::VARIANTS);
            assert!(message.contains(&expected), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Garbage: a Kill with a truncated signal.
    let mut frame = 2u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[6, 42]);
    std::io::Write::write_all(&mut s, &frame).unwrap();
    assert!(matches!(
        reply(&mut s),
        Response::Error {
            kind: ErrorKind::BadRequest,
            ..
        }
    ));
    write_frame(&mut s, &Request::Ps).unwrap();
    assert!(matches!(reply(&mut s), Response::ProcessList(_)));
}

#[test]
fn oversized_frame_gets_an_error_and_the_connection_closes() {
    let mut s = raw();
    std::io::Write::write_all(&mut s, &u32::MAX.to_le_bytes()).unwrap();
    match reply(&mut s) {
        Response::Error {
            kind: ErrorKind::BadRequest,
            message,
        } => assert!(message.contains("exceeds")),
        other => panic!("{other:?}"),
    }
    assert!(read_payload(&mut s).unwrap().is_none());
}

#[test]
fn version_mismatch_is_refused_and_closed() {
    let mut s = UnixStream::connect(agent_socket()).unwrap();
    let hello = Request::Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        software_version: "9.9".into(),
    };
    write_frame(&mut s, &hello).unwrap();
    match reply(&mut s) {
        Response::Error {
            kind: ErrorKind::VersionMismatch,
            message,
        } => {
            assert!(
                message.contains(&format!("protocol version {PROTOCOL_VERSION}")),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(read_payload(&mut s).unwrap().is_none());
}

#[test]
fn first_request_must_be_hello() {
    let mut s = UnixStream::connect(agent_socket()).unwrap();
    write_frame(&mut s, &Request::Ps).unwrap();
    assert!(matches!(
        reply(&mut s),
        Response::Error {
            kind: ErrorKind::HelloRequired,
            ..
        }
    ));
    assert!(read_payload(&mut s).unwrap().is_none());
}

#[test]
fn requests_during_an_exec_are_refused_as_busy() {
    let mut s = raw();
    write_frame(&mut s, &Request::Exec(exec(&["sleep", "1"]))).unwrap();
    let Response::Started { pid } = reply(&mut s) else {
        panic!("not started")
    };
    write_frame(&mut s, &Request::Ps).unwrap();
    assert!(matches!(
        reply(&mut s),
        Response::Error {
            kind: ErrorKind::Busy,
            ..
        }
    ));
    assert!(matches!(
        reply(&mut s),
        Response::Exited(ExitStatus::Code(0))
    ));
    // Afterwards the connection takes requests again.
    write_frame(&mut s, &Request::Kill { pid, signal: 0 }).unwrap();
    assert!(matches!(
        reply(&mut s),
        Response::Error {
            kind: ErrorKind::NoSuchProcess,
            ..
        }
    ));
}

#[test]
fn poweroff_is_answered_then_performed() {
    let before = POWER_OFFS.load(Ordering::SeqCst);
    client().poweroff().unwrap();
    // The agent powers off right after sending the reply.
    let deadline = Instant::now() + Duration::from_secs(5);
    while POWER_OFFS.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "power_off was not called");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tracer_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("TracerPid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checkpoint and restore requests through the protocol, with the reaper
/// running (it must leave tracees' stops to their tracer), and the cleanup
/// of a client that goes away midway.
#[test]
fn checkpoint_requests_and_clients_that_leave_midway() {
    let mut session = client().exec(migratable(&["sleep", "60"])).unwrap();
    let pid = session.pid();
    wait_until("sleep has exec'd", || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.ends_with("sleep"))
    });

    // A client that leaves while its checkpoint holds the process frozen:
    // the process is resumed.
    let mut c = client();
    let (image, pages) = c.checkpoint(pid, true).unwrap();
    assert!(!pages.listed.is_empty());
    assert_ne!(tracer_pid(pid), Some(0), "not frozen under ptrace");
    assert!(matches!(
        c.checkpoint(pid, true),
        Err(ClientError::Agent {
            kind: ErrorKind::Busy,
            ..
        })
    ));
    drop(c);
    wait_until("the original is resumed", || tracer_pid(pid) == Some(0));

    // A client that leaves after PrepareRestore: the half-built child dies.
    let mut c = client();
    let (child, frames) = c.prepare_restore(image, false, true).unwrap();
    assert!(!frames.listed.is_empty());
    assert!(Path::new(&format!("/proc/{child}")).exists());
    drop(c);
    wait_until("the half-restored child is gone", || {
        !Path::new(&format!("/proc/{child}")).exists()
    });

    // Requests that make no sense on this connection, and refusals.
    let mut c = client();
    assert!(matches!(
        c.finish_restore(),
        Err(ClientError::Agent {
            kind: ErrorKind::BadRequest,
            ..
        })
    ));
    assert!(matches!(
        c.kill_original(pid),
        Err(ClientError::Agent {
            kind: ErrorKind::BadRequest,
            ..
        })
    ));
    assert!(matches!(
        c.checkpoint(999_999_999, true),
        Err(ClientError::Agent {
            kind: ErrorKind::NoSuchProcess,
            ..
        })
    ));
    match c.checkpoint(1, true) {
        Err(ClientError::Agent {
            kind: ErrorKind::Refused,
            message,
        }) => {
            assert!(message.contains("PID 1 (init)"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.prepare_restore(vec![1, 2, 3], false, true),
        Err(ClientError::Agent {
            kind: ErrorKind::BadRequest,
            ..
        })
    ));

    // Checkpoint then kill: the exec session still learns how its process
    // ended (the reaper hands a tracee's exit to both).
    c.checkpoint(pid, true).unwrap();
    c.kill_original(pid).unwrap();
    loop {
        match session.next_event().unwrap() {
            ExecEvent::Exited(status) => {
                assert_eq!(
                    status,
                    ExitStatus::Signal {
                        signal: 9,
                        core_dumped: false
                    }
                );
                break;
            }
            _ => continue,
        }
    }
}

/// Waits until `pid`, started by an exec of [`workload`], runs `name`.
fn wait_for_exec(pid: u32, name: &str) {
    wait_until(&format!("{name} has exec'd"), || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.ends_with(name))
    });
}

/// The output of an uninterrupted run of workload `name`.
fn uninterrupted(name: &str, args: &[&str]) -> String {
    let out = client()
        .exec(workload(name, args))
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(0), "{name} failed on its own");
    String::from_utf8(out.stdout).unwrap()
}

/// `signals` sends itself a signal every 20 ms: seized between pre-copy
/// rounds, it stops at each, and the agent must pass them on at once (the
/// reaper wakes the connection) for it to make progress. Checkpointed and
/// resumed, it ends as an uninterrupted run does.
#[test]
fn precopy_rounds_pass_the_running_process_its_signals() {
    let expected = uninterrupted("signals", &["60"]);
    let mut session = client().exec(workload("signals", &["60"])).unwrap();
    let pid = session.pid();
    wait_for_exec(pid, "signals");
    let mut out = read_until(&mut session, "iter 2 ");

    let mut c = client();
    let first = c.precopy_round(pid, true, true).unwrap();
    assert!(!first.listed.is_empty() && first.listed.iter().all(|p| p.dirty));
    assert_ne!(tracer_pid(pid), Some(0), "not seized");
    read_more(&mut session, &mut out, "iter 12 ");
    let second = c.precopy_round(pid, false, true).unwrap();
    assert!(
        !second.listed.is_empty(),
        "the process ran: its stack at least is dirty"
    );
    assert!(matches!(
        c.precopy_round(pid + 1_000_000, false, true),
        Err(ClientError::Agent {
            kind: ErrorKind::NoSuchProcess,
            ..
        })
    ));
    match c.precopy_round(1, true, true) {
        Err(ClientError::Agent {
            kind: ErrorKind::Refused,
            message,
        }) => assert!(message.contains("PID 1 (init)"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.precopy_round(std::process::id(), false, true),
        Err(ClientError::Agent {
            kind: ErrorKind::BadRequest,
            ..
        })
    ));
    read_more(&mut session, &mut out, "iter 20 ");

    let (_, pages) = c.checkpoint(pid, true).unwrap();
    assert!(!pages.listed.is_empty());
    c.resume_original(pid).unwrap();
    let rest = session.wait_with_output().unwrap();
    assert_eq!(rest.status, ExitStatus::Code(0));
    out += &String::from_utf8(rest.stdout).unwrap();
    assert_eq!(out, expected);
}

/// A client that leaves during a pre-copy: the process is let go and runs
/// to its normal end.
#[test]
fn precopied_process_is_let_go_when_its_client_leaves() {
    // Long enough to still run when its output has come (once a second).
    let expected = uninterrupted("counter", &["200"]);
    let mut session = client().exec(workload("counter", &["200"])).unwrap();
    let pid = session.pid();
    wait_for_exec(pid, "counter");
    let mut out = read_until(&mut session, "tick 1\n");
    let mut c = client();
    c.precopy_round(pid, true, true).unwrap();
    c.precopy_round(pid, false, true).unwrap();
    drop(c);
    wait_until("the process is let go", || tracer_pid(pid) == Some(0));
    let rest = session.wait_with_output().unwrap();
    assert_eq!(rest.status, ExitStatus::Code(0));
    out += &String::from_utf8(rest.stdout).unwrap();
    assert_eq!(out, expected);
}

/// The contents of one page of `mem`.
fn read_page(mem: &ProcMem, vaddr: u64) -> Vec<u8> {
    mem.read_runs(&[PageRun {
        start: vaddr,
        count: 1,
    }])
    .unwrap()
}

/// A migration within one agent, as two VMMs run it: pre-copy rounds of
/// `signals` (pages copied through /proc/PID/mem, like the VMM copies
/// frames), checkpoint, kill; restore with forwarded stdio. The restored
/// process's output and exit status stream on the restoring connection,
/// which refuses other requests meanwhile. What the original printed up to
/// the checkpoint and what the restored one printed make an uninterrupted
/// run's output.
#[test]
fn restored_process_streams_its_output_on_the_restoring_connection() {
    let expected = uninterrupted("signals", &["60"]);
    let mut session = client().exec(workload("signals", &["60"])).unwrap();
    let pid = session.pid();
    wait_for_exec(pid, "signals");
    let mut out = read_until(&mut session, "iter 2 ");

    let mut c = client();
    let mem = ProcMem::open(pid as i32).unwrap();
    let read = |vaddr| read_page(&mem, vaddr);
    let mut copies = common::PageCopies::default();
    copies.round(&c.precopy_round(pid, true, true).unwrap(), read);
    read_more(&mut session, &mut out, "iter 10 ");
    copies.round(&c.precopy_round(pid, false, true).unwrap(), read);
    let (image_bytes, pages) = c.checkpoint(pid, true).unwrap();
    let image = ProcessImage::from_bytes(&image_bytes).unwrap();
    let data = copies.finish(&image, &pages, read);
    c.kill_original(pid).unwrap();
    let end = session.wait_with_output().unwrap();
    assert_eq!(
        end.status,
        ExitStatus::Signal {
            signal: 9,
            core_dumped: false
        }
    );
    out += &String::from_utf8(end.stdout).unwrap();

    let stream = UnixStream::connect(agent_socket()).unwrap();
    let mut probe = stream.try_clone().unwrap();
    let mut r = AgentClient::over_unix_stream(stream).unwrap();
    let (restored_pid, frames) = r.prepare_restore(image_bytes, true, true).unwrap();
    assert_eq!(frames.listed.len() as u64, image.page_count());
    ProcMem::open(restored_pid as i32)
        .unwrap()
        .write_runs(&image.pages, &data)
        .unwrap();
    let mut restored = r.finish_restore_streaming().unwrap();
    assert_eq!(restored.pid(), restored_pid);
    write_frame(&mut probe, &Request::Ps).unwrap();
    let mut busy = false;
    loop {
        match restored.next_event() {
            Ok(ExecEvent::Stdout(data)) => out += &String::from_utf8(data).unwrap(),
            Ok(ExecEvent::Stderr(data)) => panic!("stderr: {}", String::from_utf8_lossy(&data)),
            Ok(ExecEvent::Exited(status)) => {
                assert_eq!(status, ExitStatus::Code(0), "{out}");
                break;
            }
            Err(ClientError::Agent {
                kind: ErrorKind::Busy,
                ..
            }) => busy = true,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy, "Ps was not refused while the output streamed");
    assert_eq!(out, expected);
}

/// A bash, exec'd through the agent, whose child `sleep 60` is to become a
/// deputy: it prints the child's PID, waits for it and prints how it ended
/// (`status N`, 128 + the signal for a killed child; bash's own report of
/// a killed child is silenced).
fn parent_of_a_sleeper() -> (pmivmm_proto::ExecSession<UnixStream, UnixStream>, u32) {
    let script = "'sleep 60 & echo child $!; wait $! 2>/dev/null; echo status $?'";
    let mut session = client().exec(migratable(&["bash", "-c", script])).unwrap();
    let out = read_until(&mut session, "\n");
    let child = out
        .strip_prefix("child ")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no child PID in {out:?}"));
    wait_for_exec(child, "sleep");
    (session, child)
}

/// Freezes `pid` by a checkpoint and makes it the deputy of a process on
/// node "n2".
fn deputy_of(pid: u32) -> (DeputyEvents<UnixStream>, DeputyControl<UnixStream>) {
    let mut c = client();
    c.checkpoint(pid, true).unwrap();
    c.become_deputy(pid, "n2".into()).unwrap()
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill takes plain integers.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

/// A deputy writes the migrated process's output to its own stdout (the
/// exec's pipe here), reports the signals sent to it without taking them
/// (it stays frozen, even by SIGSTOP) and ends with the exit code its
/// migrated process ended with, which its parent sees.
#[test]
fn deputy_relays_output_and_signals_and_exits_with_the_code() {
    let (mut parent, child) = parent_of_a_sleeper();
    let (mut events, mut control) = deputy_of(child);
    // Other tests run deputies at the same time: only this test's
    // processes are looked at.
    let ps = client().ps().unwrap();
    let info = ps.iter().find(|p| p.pid == child).expect("deputy in ps");
    assert_eq!(info.remote.as_deref(), Some("n2"));
    let shell = ps.iter().find(|p| p.pid == parent.pid()).expect("the deputy's parent in ps");
    assert_eq!(shell.remote, None);

    control.output(1, b"from afar\n").unwrap();
    assert_eq!(read_until(&mut parent, "\n"), "from afar\n");
    control.output(3, b"x").unwrap();
    assert!(matches!(
        events.next_event(),
        Err(ClientError::Agent {
            kind: ErrorKind::BadRequest,
            ..
        })
    ));

    let rt = 40;
    for signal in [libc::SIGTERM, libc::SIGSTOP, libc::SIGCONT, rt, rt] {
        send_signal(child, signal);
        assert_eq!(events.next_event().unwrap(), DeputyEvent::Signal(signal));
    }
    let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap();
    assert!(
        state.contains(") t "),
        "deputy not in its ptrace stop: {state}"
    );
    assert_ne!(tracer_pid(child), Some(0));

    control.exit(ExitStatus::Code(7)).unwrap();
    assert_eq!(events.next_event().unwrap(), DeputyEvent::Ended);
    assert_eq!(read_until(&mut parent, "\n"), "status 7\n");
    assert_eq!(
        parent.next_event().unwrap(),
        ExecEvent::Exited(ExitStatus::Code(0))
    );
    assert!(client().ps().unwrap().iter().all(|p| p.pid != child));
}

/// A deputy ends by the signal its migrated process was killed by, and
/// a deputy whose host connection closes is killed.
#[test]
fn deputy_ends_by_a_signal_or_dies_with_its_connection() {
    let (mut parent, child) = parent_of_a_sleeper();
    let (mut events, mut control) = deputy_of(child);
    let term = ExitStatus::Signal {
        signal: libc::SIGTERM,
        core_dumped: false,
    };
    let not_fatal = ExitStatus::Signal {
        signal: libc::SIGCHLD,
        core_dumped: false,
    };
    control.exit(not_fatal).unwrap();
    assert!(matches!(
        events.next_event(),
        Err(ClientError::Agent {
            kind: ErrorKind::BadRequest,
            ..
        })
    ));
    control.exit(term).unwrap();
    assert_eq!(events.next_event().unwrap(), DeputyEvent::Ended);
    assert_eq!(read_until(&mut parent, "\n"), "status 143\n");

    let (mut parent, child) = parent_of_a_sleeper();
    drop(deputy_of(child));
    assert_eq!(read_until(&mut parent, "\n"), "status 137\n");
}

/// Signals pending in a process when it was checkpointed travel in its
/// image: its deputy does not forward them again. `signals` keeps SIGUSR2,
/// three SIGRTMIN+1 and a SIGRTMIN+2 pending all along; only the SIGUSR1
/// sent to the deputy afterwards is reported. Its parent (the agent, here)
/// sees the exit code.
#[test]
fn deputy_does_not_forward_the_signals_its_image_carried() {
    let mut session = client().exec(workload("signals", &["200"])).unwrap();
    let pid = session.pid();
    wait_for_exec(pid, "signals");
    read_until(&mut session, "iter 2 ");
    let (mut events, mut control) = deputy_of(pid);
    send_signal(pid, libc::SIGUSR1);
    assert_eq!(
        events.next_event().unwrap(),
        DeputyEvent::Signal(libc::SIGUSR1)
    );
    control.exit(ExitStatus::Code(0)).unwrap();
    assert_eq!(events.next_event().unwrap(), DeputyEvent::Ended);
    loop {
        match session.next_event().unwrap() {
            ExecEvent::Exited(status) => break assert_eq!(status, ExitStatus::Code(0)),
            _ => continue,
        }
    }
}
