//! Harness for integration tests that boot real node VMs.
//!
//! Tests run the `pmivmm` binary from the same cargo profile directory as the
//! test executable (scripts/test.sh builds it first) with the kernel and
//! initramfs from the build cache. There is no skipping: without /dev/kvm,
//! a kernel or an initramfs, every KVM test fails with a message that says
//! what is missing.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Time a node gets to boot to agent-ready on the development hosts (~45 s
/// when alone; two boots share two cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The pmivmm binary next to the test executable (target/<profile>/pmivmm).
pub fn pmivmm_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("pmivmm");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build --release -p pmivmm`; scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Fails the test unless /dev/kvm can be opened.
pub fn require_kvm() {
    if let Err(e) = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("KVM tests need a usable /dev/kvm ({e}); they are never skipped");
    }
}

/// Where [`scratch_dir`] makes the directory `name`.
fn scratch_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pmivmm-test-{}-{name}", std::process::id()))
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = scratch_path(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Runs `pmivmm` with `args`, feeding `stdin`, and returns its output.
pub fn pmivmm_with_input(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(pmivmm_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pmivmm");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait pmivmm");
    let _ = writer.join();
    out
}

/// Runs `pmivmm` with `args` to completion and returns (status, stdout, stderr).
pub fn run_pmivmm(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(pmivmm_bin()).args(args).output().expect("run pmivmm");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A node VM started by a test. Killed when dropped.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    child: Child,
}

impl Node {
    /// Starts `pmivmm --node` named `t<pid>-<tag>`, with its console and log
    /// in a scratch directory. The VMM is killed if the thread that started
    /// it exits. It shares nothing unless `extra` has a `--share` (the
    /// default share, the test's working directory, is not the tests' to use).
    pub fn start(tag: &str, extra: &[&str]) -> Node {
        let no_share: &[&str] = if extra.contains(&"--share") { &[] } else { &["--no-share"] };
        Node::spawn(tag, None, &[extra, no_share].concat())
    }

    /// Starts a node like [`Node::start`], run in `cwd` and given the
    /// default share, which is then `cwd`.
    pub fn start_in(tag: &str, cwd: &Path, extra: &[&str]) -> Node {
        Node::spawn(tag, Some(cwd), extra)
    }

    fn spawn(tag: &str, cwd: Option<&Path>, extra: &[&str]) -> Node {
        require_kvm();
        let name = &format!("t{}-{tag}", std::process::id());
        let dir = scratch_dir(tag);
        let console = dir.join("console.log");
        let log = fs::File::create(dir.join("vmm.log")).expect("vmm log");
        let mut cmd = Command::new(pmivmm_bin());
        cmd.args(["--node", "--name", name, "--console"])
            .arg(&console)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn pmivmm");
        Node { name: name.to_owned(), dir, child }
    }

    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    pub fn vmm_log(&self) -> String {
        fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default()
    }

    /// Waits until the console shows `needle`; fails the test (showing the
    /// console and VMM log) on timeout or if the VMM exits first.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.console().contains(needle) {
                return;
            }
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "node {} exited ({st}) before its console showed {needle:?}\n--- console\n{}\n--- vmm log\n{}",
                    self.name,
                    self.console(),
                    self.vmm_log()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "node {}: no {needle:?} on the console after {timeout:?}\n--- console\n{}\n--- vmm log\n{}",
                    self.name,
                    self.console(),
                    self.vmm_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the VMM to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if start.elapsed() > timeout {
                panic!(
                    "node {} still running after {timeout:?}\n--- console\n{}\n--- vmm log\n{}",
                    self.name,
                    self.console(),
                    self.vmm_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node shared by all tests of a test binary, booted on first use and
/// killed when the test process exits (it is started from a thread that
/// lives as long as the process, with PR_SET_PDEATHSIG). Returns its name.
pub fn shared_node(tag: &str) -> &'static str {
    shared_node_with(tag, &[])
}

/// Like [`shared_node`], one node per `tag`, started with `extra` arguments.
pub fn shared_node_with(tag: &str, extra: &[&str]) -> &'static str {
    static NODES: Mutex<BTreeMap<String, &'static OnceLock<Result<String, String>>>> = Mutex::new(BTreeMap::new());
    let cell: &'static OnceLock<Result<String, String>> = NODES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(tag.to_owned())
        .or_insert_with(|| Box::leak(Box::new(OnceLock::new())));
    let r = cell.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let tag = tag.to_owned();
        let mut args: Vec<String> = vec!["--timeout".into(), "1800".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        std::thread::Builder::new()
            .name("shared-node".into())
            .spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut node = Node::start(&tag, &args);
                let name = node.name.clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    node.wait_console("pmivmm-agent ready", BOOT_TIMEOUT)
                }));
                let _ = tx.send(r.map(|()| name).map_err(|e| {
                    e.downcast_ref::<String>().cloned().unwrap_or_else(|| "boot failed".into())
                }));
                // Keep the node (and this thread) alive until the process exits.
                let _keep = node;
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn shared-node thread");
        rx.recv().map_err(|e| e.to_string()).and_then(|r| r)
    });
    match r {
        Ok(name) => name,
        Err(e) => panic!("the shared test node did not boot: {e}"),
    }
}

/// The VMM log of the shared node `tag` ([`shared_node_with`]) so far.
pub fn shared_node_log(tag: &str) -> String {
    fs::read_to_string(scratch_path(tag).join("vmm.log")).unwrap_or_default()
}

type AgentClient = pmivmm_proto::AgentClient<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream>;

/// A connection to the agent of running node `node`.
pub fn agent(node: &str) -> AgentClient {
    let paths = pmivmm::rundir::NodePaths::existing(node).expect("node run directory");
    AgentClient::connect(&paths.vsock()).expect("connect to the agent")
}

/// Process `pid` of `node`, unless it does not exist or is a zombie.
pub fn process(node: &str, pid: u32) -> Option<pmivmm_proto::ProcessInfo> {
    agent(node).ps().unwrap().into_iter().find(|p| p.pid == pid && p.state != 'Z')
}

/// The peer address of running node `node`, once its VMM has published it.
pub fn peer_addr(node: &str) -> String {
    let start = Instant::now();
    loop {
        if let Ok(p) = pmivmm::rundir::NodePaths::existing(node) {
            if let Ok(a) = fs::read_to_string(p.peer_addr()) {
                return a.trim().to_owned();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "node {node} published no peer address");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Output and exit code of an uninterrupted run of `cmd` on `node`.
pub fn reference(node: &str, cmd: &str) -> (i32, String) {
    Job::start(node, cmd).finish()
}

/// A workload run with `pmivmm exec` on a node; its stdout collected as it
/// comes.
pub struct Job {
    child: Child,
    pub pid: u32,
    stdout: Arc<Mutex<String>>,
    reader: JoinHandle<()>,
}

impl Job {
    pub fn start(node: &str, cmd: &str) -> Job {
        // sh prints its PID and execs the workload, which keeps that PID.
        let script = format!("echo PID $$ >&2; exec {cmd}");
        let mut child = Command::new(pmivmm_bin())
            .args(["exec", "--node", node, "-n", "--cwd", "/tmp", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run pmivmm exec");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let pid = line.trim().strip_prefix("PID ").and_then(|p| p.parse().ok());
        let pid = pid.unwrap_or_else(|| panic!("no PID line from the job: {line:?}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().unwrap();
        let collected = stdout.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            if !rest.is_empty() {
                eprintln!("job stderr: {rest}");
            }
        });
        Job { child, pid, stdout, reader }
    }

    /// Waits until the job has written something (startup done).
    pub fn wait_output(&self) {
        let start = Instant::now();
        while self.stdout.lock().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(120), "the job wrote nothing in 120 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the end: (exit code of `pmivmm exec`, stdout).
    pub fn finish(mut self) -> (i32, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < Duration::from_secs(600), "job still running after 600 s");
            std::thread::sleep(Duration::from_millis(100));
        };
        self.reader.join().unwrap();
        let out = self.stdout.lock().unwrap().clone();
        (status.code().unwrap_or(-1), out)
    }
}


/// The `fpu` workload command for this host: x87, SSE and AVX state, but
/// without AVX on the development hosts' kvm_pvm, whose guests lose the upper
/// halves of the YMM registers on interrupts and task switches (even
/// uninterrupted runs of the AVX part give different checksums from run to
/// run there: seen 4529930e.., a6502132.., d31dca03..).
pub fn fpu_command(rounds: u32) -> String {
    let kvm_pvm = Path::new("/sys/module/kvm_pvm").exists();
    format!("{}fpu {rounds}", if kvm_pvm { "env NOAVX=1 " } else { "" })
}

/// A random delay between `lo` and `hi` ms (xorshift of the clock).
pub fn random_delay(lo: u64, hi: u64) -> Duration {
    let mut x = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    Duration::from_millis(lo + x % (hi - lo))
}
