//! `pmivmm soak`: self-checking jobs migrate back and forth between running
//! nodes for a while, with faults injected into random migrations through
//! the target's fault file (see `migration::target::fault_point`). At the
//! end every job must have finished with the output and exit status of an
//! uninterrupted run of the same command, or still run, correctly so far, on
//! exactly one node (at most its deputy beside it at home): none lost,
//! duplicated or corrupted.
//!
//! An `exit` fault kills the target VMM with its VM, and everything running
//! there: it is armed only on a node other than the home (which holds every
//! job's deputy and output stream) where no other job runs, and the
//! reference runs are then on the home. The soak starts the node again as it
//! was started (see [`NodeLaunch`]) before it goes on.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use pmivmm_proto::{ExecEvent, ExecRequest, ExitStatus, ProcessInfo};

use crate::control::{self, NodeState};
use crate::lab;
use crate::rundir::{self, NodePaths};

/// How long a node started again after an `exit` fault may take to boot.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a VMM hit by an `exit` fault may take to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(30);
/// Past the planned wait for the jobs, how long the soak waits for one of
/// them (or a reference run) to print something more.
const PROGRESS_WAIT: Duration = Duration::from_secs(120);

/// Faults injected into the target of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultKind {
    /// The target closes the link.
    Drop,
    /// The target sleeps longer than the source waits for its answer.
    Stall,
    /// The target's next frame has a flipped bit; the source's
    /// authentication rejects it.
    Corrupt,
    /// The target VMM exits at once, with its VM; the soak starts the node
    /// again.
    Exit,
    /// No faults (alone in `--faults`).
    None,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::Drop => "drop",
            FaultKind::Stall => "stall",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Exit => "exit",
            FaultKind::None => "none",
        }
    }

    /// The migration points where this kind is injected: every point for
    /// `drop` and `exit`; `stall` where the source gives up (offer) and
    /// where it only waits (commit); `corrupt` on the two messages the
    /// target sends.
    fn points(self) -> &'static [&'static str] {
        match self {
            FaultKind::Drop | FaultKind::Exit => &["offer", "image", "commit", "running"],
            FaultKind::Stall => &["offer", "commit"],
            FaultKind::Corrupt => &["offer", "running"],
            FaultKind::None => &[],
        }
    }
}

/// The soak command's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Running nodes of this host, comma-separated (two at least); the jobs
    /// start on the first, their home.
    #[arg(long, value_delimiter = ',', required = true, value_name = "A,B[,C...]")]
    pub nodes: Vec<String>,
    /// Self-checking jobs (counter, memory, signals, fpu in turn), each
    /// beside an uninterrupted reference run of the same command on the
    /// last node (on the first with `exit` faults).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub jobs: u64,
    /// Seconds during which jobs migrate; the jobs are sized to run about
    /// as long on idle nodes, and are then checked and waited for.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(10..))]
    pub duration: u64,
    /// Seed of the random choices (job, target, fault, pauses).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fault kinds, one injected (kind and point at random) into every other
    /// migration, the first included; comma-separated (`none` for no faults;
    /// `exit` is not a default: it reboots nodes).
    #[arg(long, value_delimiter = ',', default_value = "drop,stall,corrupt")]
    pub faults: Vec<FaultKind>,
}

/// The counts of a soak.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SoakReport {
    pub migrations: usize,
    /// Migrations after which the process ran on the target (including
    /// those resolved in doubt).
    pub moved: usize,
    /// Of `moved`: the link broke after the commit and the source asked.
    pub in_doubt_resolved: usize,
    /// The migration failed and the process ran on at the source.
    pub failed_resumed: usize,
    /// Migrations that failed any other way (see the log).
    pub other_errors: usize,
    pub faults_armed: usize,
    pub faults_fired: usize,
    /// Nodes started again after an `exit` fault.
    pub restarts: usize,
    pub jobs: usize,
    /// Finished with the output and exit status of the reference run.
    pub finished_ok: usize,
    /// Still running on exactly one node, its output so far correct.
    pub still_running: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub corrupted: usize,
}

impl SoakReport {
    /// Nothing lost, duplicated or corrupted.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.corrupted == 0
    }
}

/// What a job's `exec` stream delivered so far.
#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The exit status, or why the stream from the agent broke.
    end: Option<Result<ExitStatus, String>>,
}

/// A command run through the agent of its home node, as `pmivmm exec` runs
/// one, its output captured.
struct Job {
    argv: Vec<String>,
    /// The last argument, unique to the job: finds its instances in `ps`.
    tag: String,
    pid: u32,
    captured: Arc<Mutex<Captured>>,
}

fn lock(c: &Mutex<Captured>) -> std::sync::MutexGuard<'_, Captured> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

impl Job {
    fn start(node: &str, argv: Vec<String>, env: Vec<String>) -> anyhow::Result<Job> {
        let tag = argv.last().cloned().unwrap_or_default();
        let req = ExecRequest { argv: argv.clone(), env, cwd: None, stdin: false };
        let session = super::agent(node)?.exec(req).with_context(|| format!("cannot start {}", argv.join(" ")))?;
        let pid = session.pid();
        let captured = Arc::new(Mutex::new(Captured::default()));
        let sink = captured.clone();
        thread::Builder::new().name("soak-job".into()).spawn(move || {
            // Stdin stays open (unused) as long as the output is read.
            let (mut output, _stdin) = session.split();
            loop {
                let event = output.next_event();
                let mut c = lock(&sink);
                match event {
                    Ok(ExecEvent::Stdout(d)) => c.stdout.extend_from_slice(&d),
                    Ok(ExecEvent::Stderr(d)) => c.stderr.extend_from_slice(&d),
                    Ok(ExecEvent::Exited(status)) => {
                        c.end = Some(Ok(status));
                        return;
                    }
                    Err(e) => {
                        c.end = Some(Err(e.to_string()));
                        return;
                    }
                }
            }
        })?;
        Ok(Job { argv, tag, pid, captured })
    }

    fn ended(&self) -> bool {
        lock(&self.captured).end.is_some()
    }

    fn command(&self) -> String {
        self.argv[..self.argv.len() - 1].join(" ")
    }
}

/// The workload of job `index`, sized for `secs` seconds of an idle node
/// (guest kernel work is emulated on some hosts, and a loaded node runs them
/// several times slower), and its environment. `fpu` runs without AVX: some
/// development hosts' KVM loses the upper halves of YMM registers even in
/// uninterrupted runs.
fn workload(index: u64, secs: u64) -> (Vec<u64>, &'static str, Vec<String>) {
    match index % 4 {
        // 25 ms a tick.
        0 => (vec![secs * 20], "counter", Vec::new()),
        // 4 MiB verified and rewritten, then 20 ms of sleep, a pass.
        1 => (vec![4, secs * 10], "memory", Vec::new()),
        // A signal and 20 ms of sleep an iteration.
        2 => (vec![secs * 10], "signals", Vec::new()),
        // ~25 ms of floating point a round.
        _ => (vec![secs * 10], "fpu", vec!["NOAVX=1".into()]),
    }
}

/// Every non-zombie process of `nodes`, with its node.
fn snapshot(nodes: &[String]) -> anyhow::Result<Vec<(String, ProcessInfo)>> {
    let mut all = Vec::new();
    for node in nodes {
        let procs = super::agent(node)?.ps().with_context(|| format!("ps on node {node}"))?;
        all.extend(procs.into_iter().filter(|p| p.state != 'Z').map(|p| (node.clone(), p)));
    }
    Ok(all)
}

/// Where a job's instances are.
#[derive(Debug, PartialEq, Eq)]
enum Placement {
    /// No instance and no deputy.
    Gone,
    /// One live instance, and the deputy at home if it runs elsewhere or
    /// runs at home under a new PID.
    Runs { node: String, pid: u32 },
    /// More than one live instance.
    Duplicated(String),
    /// A deputy without its process, or one in the wrong place.
    Inconsistent(String),
}

fn place(job: &Job, home: &str, snap: &[(String, ProcessInfo)]) -> Placement {
    let mine: Vec<&(String, ProcessInfo)> = snap.iter().filter(|(_, p)| p.argv.last() == Some(&job.tag)).collect();
    let (deputies, live): (Vec<_>, Vec<_>) = mine.into_iter().partition(|(_, p)| p.remote.is_some());
    let list = |v: &[&(String, ProcessInfo)]| v.iter().map(|(n, p)| format!("{n}:{}", p.pid)).collect::<Vec<_>>();
    if live.len() > 1 {
        return Placement::Duplicated(format!("live on {:?}, deputies {:?}", list(&live), list(&deputies)));
    }
    let deputy_ok = match deputies.as_slice() {
        [] => true,
        [(node, p)] => node == home && p.pid == job.pid,
        _ => false,
    };
    match live.first() {
        None if deputies.is_empty() => Placement::Gone,
        Some((node, p)) if deputy_ok && deputies.is_empty() == (node == home && p.pid == job.pid) => {
            Placement::Runs { node: node.clone(), pid: p.pid }
        }
        _ => Placement::Inconsistent(format!("live on {:?}, deputies {:?}", list(&live), list(&deputies))),
    }
}

/// The placement of `job` once it is consistent (a process that just
/// exited or moved leaves its deputy for a moment), or after 10 s.
fn settled_place(job: &Job, home: &str, nodes: &[String]) -> anyhow::Result<Placement> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let placement = place(job, home, &snapshot(nodes)?);
        if matches!(placement, Placement::Runs { .. } | Placement::Gone) || Instant::now() > deadline {
            return Ok(placement);
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// How one migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Moved,
    InDoubtResolved,
    FailedResumed,
    OtherError,
}

/// The counts of the migrations with one kind of fault (or none).
#[derive(Default)]
struct FaultRow {
    migrations: usize,
    fired: usize,
    outcomes: BTreeMap<&'static str, usize>,
}

/// The fault file of node `target` (read by its VMM at each migration point).
fn fault_file(target: &str) -> anyhow::Result<PathBuf> {
    Ok(NodePaths::existing(target)?.dir.join("fault"))
}

/// How a node's VMM was started, read from `/proc` while it runs: to start
/// the node again the same way after an `exit` fault (same name, memory and
/// options, `--join` included; same working directory, the default share;
/// same environment, `PMIVMM_RUN_DIR` and `PMIVMM_CACHE` included).
struct NodeLaunch {
    name: String,
    exe: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
    /// The VMM running now, and its handle once the soak started it.
    pid: u32,
    child: Option<Child>,
}

impl NodeLaunch {
    fn read(name: &str) -> anyhow::Result<NodeLaunch> {
        let paths = NodePaths::existing(name)?;
        let pid = control::status(&paths.control()).with_context(|| format!("status of node {name}"))?.vmm_pid;
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let read = |file: &str| {
            let path = proc.join(file);
            fs::read(&path).with_context(|| format!("cannot read {} (the VMM of node {name})", path.display()))
        };
        let words = |bytes: Vec<u8>| -> Vec<Vec<u8>> {
            bytes.split(|&b| b == 0).filter(|w| !w.is_empty()).map(<[u8]>::to_vec).collect()
        };
        let args = words(read("cmdline")?).into_iter().skip(1).map(OsString::from_vec).collect();
        let env = words(read("environ")?)
            .into_iter()
            .filter_map(|kv| {
                let eq = kv.iter().position(|&b| b == b'=')?;
                Some((OsString::from_vec(kv[..eq].to_vec()), OsString::from_vec(kv[eq + 1..].to_vec())))
            })
            .collect();
        let link = |file: &str| {
            let path = proc.join(file);
            fs::read_link(&path).with_context(|| format!("cannot read {} (the VMM of node {name})", path.display()))
        };
        anyhow::ensure!(
            link("ns/net")? == Path::new("/proc/self/ns/net").read_link()?,
            "node {name} runs in another network namespace (a lab node): an exit fault could not start it again"
        );
        // A binary rebuilt since the node started is run from the same path.
        let exe = link("exe")?;
        let exe = match exe.as_os_str().as_bytes().strip_suffix(b" (deleted)") {
            Some(path) => PathBuf::from(OsString::from_vec(path.to_vec())),
            None => exe,
        };
        Ok(NodeLaunch { name: name.to_owned(), exe, args, cwd: link("cwd")?, env, pid, child: None })
    }

    /// Whether the VMM is gone (waiting for it at most [`EXIT_WAIT`]).
    fn exited(&mut self) -> bool {
        let start = Instant::now();
        loop {
            let gone = match &mut self.child {
                Some(child) => child.try_wait().map_or(true, |status| status.is_some()),
                None => !lab::pid_alive(self.pid),
            };
            if gone || start.elapsed() > EXIT_WAIT {
                return gone;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the node again, detached, its output appended to `log`;
    /// returns once its agent is ready, with the time that took.
    fn restart(&mut self, log: &Path) -> anyhow::Result<Duration> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .current_dir(&self.cwd)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        lab::detach(&mut cmd);
        let start = Instant::now();
        let child = cmd.spawn().with_context(|| format!("cannot start {}", self.exe.display()))?;
        self.pid = child.id();
        let child = self.child.insert(child);
        let paths = NodePaths::new(&self.name)?;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("node {} exited ({status}) while starting again; see {}", self.name, log.display());
            }
            if control::status(&paths.control()).is_ok_and(|s| s.vmm_pid == self.pid && s.state == NodeState::Ready) {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < RESTART_TIMEOUT,
                "node {} not ready {} s after it was started again; see {}",
                self.name,
                RESTART_TIMEOUT.as_secs(),
                log.display()
            );
            thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Runs the soak and prints its tables; the counts are returned.
pub fn run(args: &SoakArgs) -> anyhow::Result<SoakReport> {
    let nodes = &args.nodes;
    anyhow::ensure!(nodes.len() >= 2, "a soak needs two nodes at least (--nodes a,b)");
    for (i, n) in nodes.iter().enumerate() {
        anyhow::ensure!(!nodes[..i].contains(n), "node {n} is named twice in --nodes");
        NodePaths::existing(n).with_context(|| format!("node {n} is not running on this host (see `pmivmm nodes`)"))?;
    }
    let home = nodes[0].as_str();
    // The reference runs do not load the home, where every job starts,
    // unless a node may be killed: the home never is.
    let exits = args.faults.contains(&FaultKind::Exit);
    let reference_node = if exits { home } else { nodes[nodes.len() - 1].as_str() };
    let mut launches = BTreeMap::new();
    if exits {
        for node in &nodes[1..] {
            launches.insert(node.as_str(), NodeLaunch::read(node)?);
        }
    }
    let restart_log = |node: &str| -> anyhow::Result<PathBuf> {
        let dir = rundir::base().join(".soak");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir.join(format!("{node}.log")))
    };
    let mut faults: Vec<(FaultKind, &str)> = Vec::new();
    for &kind in &args.faults {
        for &point in kind.points() {
            if !faults.contains(&(kind, point)) {
                faults.push((kind, point));
            }
        }
    }
    let mut rng = fastrand::Rng::with_seed(args.seed);

    // The jobs, and one uninterrupted reference run per distinct command.
    let mut jobs = Vec::new();
    let mut references: BTreeMap<Vec<String>, Job> = BTreeMap::new();
    for i in 0..args.jobs {
        // Two thirds, all or four thirds of the soak.
        let secs = args.duration * (2 + i % 3) / 3;
        let (numbers, prog, env) = workload(i, secs);
        let mut argv: Vec<String> =
            std::iter::once(prog.to_owned()).chain(numbers.iter().map(u64::to_string)).collect();
        if !references.contains_key(&argv) {
            let tagged = [argv.clone(), vec![format!("soak{}.ref{i}", args.seed)]].concat();
            references.insert(argv.clone(), Job::start(reference_node, tagged, env.clone())?);
        }
        argv.push(format!("soak{}.job{i}", args.seed));
        jobs.push(Job::start(home, argv, env)?);
    }
    let armable: Vec<String> = faults.iter().map(|(k, p)| format!("{}@{p}", k.name())).collect();
    println!(
        "soak: {} jobs on {home}, migrating among {} for {} s (seed {}), faults: {}; references on {reference_node}",
        jobs.len(),
        nodes.join(", "),
        args.duration,
        args.seed,
        if armable.is_empty() { "none".to_owned() } else { armable.join(" ") }
    );

    let mut report = SoakReport { jobs: jobs.len(), ..SoakReport::default() };
    let mut rows: BTreeMap<String, FaultRow> = BTreeMap::new();
    let mut moves = vec![0usize; jobs.len()];
    let mut places: Vec<Option<(String, u32)>> = jobs.iter().map(|j| Some((home.to_owned(), j.pid))).collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(args.duration) {
        thread::sleep(Duration::from_millis(rng.u64(200..1000)));
        // `ps` on a busy node takes seconds: where each job runs is known
        // from the outcomes, and asked only after a migration in doubt.
        let running: Vec<usize> = (0..jobs.len()).filter(|&i| !jobs[i].ended() && places[i].is_some()).collect();
        if running.is_empty() {
            if jobs.iter().all(Job::ended) {
                println!("soak: every job ended after {:.0} s", start.elapsed().as_secs_f64());
                break;
            }
            continue;
        }
        let index = running[rng.usize(..running.len())];
        let Some((source, pid)) = places[index].clone() else { continue };
        let targets: Vec<&String> = nodes.iter().filter(|n| **n != source).collect();
        let target = targets[rng.usize(..targets.len())].as_str();
        // A process away from home goes back with `home`, as a user sends it.
        let target_arg = if target == home { "home" } else { target };
        // An `exit` takes down whatever runs on the target: only where no
        // other job runs (or may run, its place unknown), never the home.
        let others_there = (0..jobs.len())
            .any(|j| j != index && !jobs[j].ended() && places[j].as_ref().is_none_or(|(node, _)| node == target));
        let allowed: Vec<(FaultKind, &str)> = faults
            .iter()
            .copied()
            .filter(|(kind, _)| *kind != FaultKind::Exit || (target != home && !others_there))
            .collect();
        // Every other migration has a fault, starting with the first
        // (migrations are slow on emulated hosts: a short soak still sees
        // both kinds).
        let fault = match allowed.is_empty() || report.migrations % 2 == 1 {
            true => None,
            false => Some(allowed[rng.usize(..allowed.len())]),
        };
        let file = fault_file(target)?;
        if let Some((kind, point)) = fault {
            std::fs::write(&file, format!("{point} {}", kind.name()))
                .with_context(|| format!("cannot arm a fault in {}", file.display()))?;
            report.faults_armed += 1;
        }
        let began = Instant::now();
        let result = super::migrate::migrate(&source, pid, target_arg, true);
        let took = began.elapsed();
        // A fault fires once and removes its file; one that did not fire
        // must not hit the next migration.
        let fired = fault.is_some() && !file.exists();
        if fault.is_some() && !fired {
            let _ = std::fs::remove_file(&file);
        }
        let outcome = match &result {
            Ok(r) if r.remote_pid == 0 => Outcome::InDoubtResolved,
            Ok(_) => Outcome::Moved,
            Err(e) if format!("{e:#}").contains("not moved") => Outcome::FailedResumed,
            Err(_) => Outcome::OtherError,
        };
        report.migrations += 1;
        report.faults_fired += usize::from(fired);
        match outcome {
            Outcome::Moved => report.moved += 1,
            Outcome::InDoubtResolved => {
                report.moved += 1;
                report.in_doubt_resolved += 1;
            }
            Outcome::FailedResumed => report.failed_resumed += 1,
            Outcome::OtherError => report.other_errors += 1,
        }
        if matches!(outcome, Outcome::Moved | Outcome::InDoubtResolved) {
            moves[index] += 1;
        }
        let label = match fault {
            Some((kind, point)) => format!("{}@{point}", kind.name()),
            None => "none".to_owned(),
        };
        let row = rows.entry(label.clone()).or_default();
        row.migrations += 1;
        row.fired += usize::from(fired);
        *row.outcomes.entry(outcome_name(outcome)).or_default() += 1;
        // Where the process runs now, checked after a migration in doubt.
        let mut found = String::new();
        match (&result, outcome) {
            (Ok(r), Outcome::Moved) => places[index] = Some((target.to_owned(), r.remote_pid)),
            (_, Outcome::InDoubtResolved) => {
                places[index] = match settled_place(&jobs[index], home, nodes)? {
                    Placement::Runs { node, pid } if node == target => Some((node, pid)),
                    Placement::Gone if jobs[index].ended() => None,
                    other => {
                        found = format!("; EXPECTED ON {target}, FOUND {other:?}");
                        None
                    }
                }
            }
            _ => {}
        }
        // Why, unless it is the fault's doing (a job that just ended, say).
        let why = match &result {
            Err(e) if outcome == Outcome::OtherError || !fired => format!(": {e:#}"),
            _ => String::new(),
        };
        println!(
            "[{:6.1} s] job {index} ({}) PID {pid} {source} -> {target_arg}, fault {label}{}: {} in {:.1} s\
             {why}{found}",
            start.elapsed().as_secs_f64(),
            jobs[index].argv[0],
            if fault.is_some() && !fired { " (did not fire)" } else { "" },
            outcome_name(outcome),
            took.as_secs_f64(),
        );
        if let (Some((FaultKind::Exit, _)), true) = (fault, fired) {
            let launch = launches.get_mut(target).context("an exit fault on a node that cannot be started again")?;
            anyhow::ensure!(launch.exited(), "node {target}: its VMM did not exit on the fault");
            let booted = launch.restart(&restart_log(target)?)?;
            report.restarts += 1;
            println!(
                "[{:6.1} s] node {target} started again (VMM PID {}), ready after {:.1} s",
                start.elapsed().as_secs_f64(),
                launch.pid,
                booted.as_secs_f64()
            );
        }
    }

    // Where the jobs are when the migrations stop, then their ends.
    println!("soak: migrations stopped after {:.0} s; waiting for the jobs", start.elapsed().as_secs_f64());
    // Then longer while they make progress: a loaded node runs them many
    // times slower (and a deputy writes its process's output line by line).
    let wait_until = Instant::now() + Duration::from_secs(args.duration * 2 + 60);
    let all = jobs.iter().chain(references.values());
    let printed = || all.clone().map(|j| lock(&j.captured).stdout.len()).sum::<usize>();
    let mut progress = (printed(), Instant::now());
    while !all.clone().all(Job::ended) && (Instant::now() < wait_until || progress.1.elapsed() < PROGRESS_WAIT) {
        thread::sleep(Duration::from_millis(500));
        if printed() != progress.0 {
            progress = (printed(), Instant::now());
        }
    }
    let snap = snapshot(nodes)?;
    let mut job_rows = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let reference = &references[&job.argv[..job.argv.len() - 1]];
        let verdict = check(job, reference, home, nodes, &snap)?;
        match verdict {
            Verdict::FinishedOk => report.finished_ok += 1,
            Verdict::StillRunning(_) => report.still_running += 1,
            Verdict::Lost(_) => report.lost += 1,
            Verdict::Duplicated(_) => report.duplicated += 1,
            Verdict::Corrupted(_) => report.corrupted += 1,
        }
        job_rows.push(vec![i.to_string(), job.command(), moves[i].to_string(), verdict.to_string()]);
    }
    print_tables(&report, &rows, job_rows);
    // Leftovers go (a signal to a deputy reaches its process).
    for job in jobs.iter().filter(|j| !j.ended()) {
        super::agent(home)?.kill(job.pid, libc::SIGKILL)?;
    }
    for job in references.values().filter(|j| !j.ended()) {
        super::agent(reference_node)?.kill(job.pid, libc::SIGKILL)?;
    }
    Ok(report)
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Moved => "moved",
        Outcome::InDoubtResolved => "in doubt, resolved: moved",
        Outcome::FailedResumed => "failed, resumed at the source",
        Outcome::OtherError => "ERROR",
    }
}

#[derive(Debug)]
enum Verdict {
    FinishedOk,
    StillRunning(String),
    Lost(String),
    Duplicated(String),
    Corrupted(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::FinishedOk => write!(f, "finished, correct"),
            Verdict::StillRunning(node) => write!(f, "still running on {node}, correct so far"),
            Verdict::Lost(why) => write!(f, "LOST: {why}"),
            Verdict::Duplicated(why) => write!(f, "DUPLICATED: {why}"),
            Verdict::Corrupted(why) => write!(f, "CORRUPTED: {why}"),
        }
    }
}

/// The verdict on `job`, against its uninterrupted `reference`.
fn check(
    job: &Job,
    reference: &Job,
    home: &str,
    nodes: &[String],
    snap: &[(String, ProcessInfo)],
) -> anyhow::Result<Verdict> {
    let r = lock(&reference.captured);
    let expected = match &r.end {
        Some(Ok(ExitStatus::Code(0))) if String::from_utf8_lossy(&r.stdout).contains("RESULT") => &r.stdout,
        other => anyhow::bail!(
            "the uninterrupted reference run of `{}` failed ({other:?}): {}{}",
            job.command(),
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ),
    };
    let placement = place(job, home, snap);
    let c = lock(&job.captured);
    let differs = |got: &[u8]| {
        let (got, want) = (String::from_utf8_lossy(got), String::from_utf8_lossy(expected));
        let (got, want): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
        let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        format!(
            "output differs from the reference at line {}: {:?} where {:?} was expected ({} lines, {} expected)",
            at + 1,
            got.get(at..got.len().min(at + 3)).unwrap_or_default(),
            want.get(at..want.len().min(at + 3)).unwrap_or_default(),
            got.len(),
            want.len()
        )
    };
    Ok(match (&c.end, placement) {
        (_, Placement::Duplicated(why)) => Verdict::Duplicated(why),
        (Some(Ok(_)), Placement::Runs { node, pid }) => {
            Verdict::Duplicated(format!("it exited, yet PID {pid} still runs on {node}"))
        }
        (Some(Ok(ExitStatus::Code(0))), _) if c.stdout == *expected => Verdict::FinishedOk,
        (Some(Ok(status)), _) if c.stdout == *expected => Verdict::Corrupted(format!("{status}")),
        (Some(Ok(status)), _) => Verdict::Corrupted(format!("{status}, {}", differs(&c.stdout))),
        (Some(Err(e)), _) => Verdict::Lost(format!("its output stream from {home} broke: {e}")),
        (None, Placement::Runs { node, .. }) if expected.starts_with(&c.stdout) => Verdict::StillRunning(node),
        (None, Placement::Runs { .. }) => Verdict::Corrupted(differs(&c.stdout)),
        (None, Placement::Gone) => {
            // It may have ended just now: its status is on the way.
            drop(c);
            thread::sleep(Duration::from_secs(2));
            match job.ended() {
                true => return check(job, reference, home, nodes, &snapshot(nodes)?),
                false => Verdict::Lost("no instance on any node and no exit status".into()),
            }
        }
        (None, Placement::Inconsistent(why)) => Verdict::Lost(why),
    })
}

fn print_tables(report: &SoakReport, rows: &BTreeMap<String, FaultRow>, job_rows: Vec<Vec<String>>) {
    let outcomes = [Outcome::Moved, Outcome::InDoubtResolved, Outcome::FailedResumed, Outcome::OtherError];
    let names = outcomes.map(outcome_name);
    let fault_rows = rows.iter().map(|(label, row)| {
        let mut r = vec![label.clone(), row.migrations.to_string(), row.fired.to_string()];
        r.extend(names.iter().map(|n| row.outcomes.get(n).copied().unwrap_or(0).to_string()));
        r
    });
    println!();
    let header = ["FAULT", "MIGRATIONS", "FIRED", "MOVED", "IN DOUBT, MOVED", "FAILED, RESUMED", "ERRORS"];
    print!("{}", super::tables::render(&header, fault_rows));
    println!();
    print!("{}", super::tables::render(&["JOB", "COMMAND", "MOVES", "VERDICT"], job_rows));
    println!();
    let counts = [
        ("migrations attempted", report.migrations),
        ("succeeded (process moved)", report.moved),
        ("of which in doubt, resolved", report.in_doubt_resolved),
        ("failed, process resumed", report.failed_resumed),
        ("failed otherwise", report.other_errors),
        ("faults armed", report.faults_armed),
        ("faults fired", report.faults_fired),
        ("nodes started again after exit", report.restarts),
        ("jobs", report.jobs),
        ("finished correctly", report.finished_ok),
        ("still running correctly", report.still_running),
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("corrupted", report.corrupted),
    ];
    print!("{}", super::tables::render(&["COUNT", ""], counts.iter().map(|(n, v)| vec![n.to_string(), v.to_string()])));
}
