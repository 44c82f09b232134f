//! Runs a node VM: builds it, runs its vCPU on its own thread, connects the
//! console, reports when the guest agent is ready, and stops it on timeout.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use vmm_sys_util::signal::Killable;
use vmm_sys_util::terminal::Terminal;

use crate::config::{ConsoleConfig, VmConfig};
use crate::control::{self, server::NodeHandle};
use crate::cluster::cpu_use::CpuClock;
use crate::profile::{self, Samples, SymbolTable};
use crate::rundir::NodePaths;
use crate::devices::lock;
use crate::devices::serial::{ConsoleEvents, ConsoleSink, SerialDevice};
use crate::vcpu::{self, StopCause, StopRequest, Vcpu, VmExit};
use crate::cluster::discovery::Discovery;
use crate::cluster::{self, ClusterState};
use crate::migration::{self, MigrationNode};
use crate::peer::ClusterKey;
use crate::seccomp::{self, ThreadKind};
use crate::vm;

/// Ctrl-A, the console escape key; Ctrl-A x stops the node.
const ESCAPE: u8 = 0x01;
/// How often the supervisor checks for the agent, stop requests and timeout.
const TICK: Duration = Duration::from_millis(100);

/// Boots the node and runs it until the guest stops or the VMM is told to.
pub fn run(config: &VmConfig) -> anyhow::Result<VmExit> {
    let started = Instant::now();
    let events = ConsoleEvents::new(started);
    let out: Box<dyn Write + Send> = match &config.console {
        ConsoleConfig::Stdio => Box::new(io::stdout()),
        ConsoleConfig::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open console file {}", p.display()))?,
        ),
    };
    let paths = NodePaths::new(&config.name)?;
    let _run_dir = paths.create()?;
    let control_listener = UnixListener::bind(paths.control())
        .with_context(|| format!("cannot create the control socket {}", paths.control().display()))?;
    let vm = vm::build(config, ConsoleSink::new(out, events.clone()))?;
    let (runtime, migration) = start_peer_listener(config, &paths, &vm.memory)?;
    tracing::info!(
        node = %config.name,
        mem_mib = config.mem_mib,
        "booting {} with {}",
        config.kernel.display(),
        config.initrd.display()
    );
    tracing::debug!("kernel command line: {}", vm.cmdline);

    vcpu::install_kick_handler()?;
    let stop = Arc::new(StopRequest::default());
    let (done_tx, done_rx) = mpsc::channel();
    let mut vcpu = Vcpu::new(vm.vcpu, vm.pio.clone(), vm.mmio.clone(), stop.clone(), {
        let events = events.clone();
        Box::new(move || events.panicked())
    });
    control::server::spawn(
        control_listener,
        NodeHandle::new(
            config.name.clone(),
            config.mem_mib,
            started,
            config.vsock.as_ref().map(|v| v.guest_cid),
            config.vsock.as_ref().map(|v| v.socket_path.clone()),
            events.clone(),
            stop.clone(),
            vm.memory.clone(),
            migration.clone(),
        ),
    )
    .context("cannot start the control server")?;
    let symbols = match &config.profile {
        Some(p) => {
            vcpu.enable_profiling();
            Some(SymbolTable::from_system_map(
                &std::fs::read_to_string(&p.system_map)
                    .with_context(|| format!("cannot read the System.map {}", p.system_map.display()))?,
            ))
        }
        None => None,
    };
    // Everything is set up: from here on every thread is filtered, and the
    // vCPU thread (and each device thread, on activation) narrows its own.
    seccomp::install_process(config.seccomp)?;
    let vcpu_thread = thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            if let Err(e) = seccomp::install_thread(ThreadKind::Vcpu) {
                tracing::warn!("vCPU: {e}; the thread keeps the VMM's filter");
            }
            let r = vcpu.run();
            let _ = done_tx.send((r, vcpu.stats, vcpu.take_samples()));
        })
        .context("cannot start the vCPU thread")?;
    match CpuClock::of(&vcpu_thread) {
        Ok(clock) => {
            let _ = migration.cluster.vcpu_clock.set(clock);
        }
        Err(e) => tracing::warn!("no CPU clock of the vCPU thread ({e}): the node gossips a CPU use of 0%"),
    }
    let profile_interval = config.profile.as_ref().map(|p| p.interval);
    let mut next_sample = Instant::now();

    let _raw_terminal = match config.console {
        ConsoleConfig::Stdio if io::stdin().is_terminal() => {
            Some(forward_stdin(vm.serial.clone(), stop.clone())?)
        }
        _ => None,
    };

    let mut agent_reported = false;
    let (result, stats, samples) = loop {
        let wait = match profile_interval {
            Some(_) => next_sample.saturating_duration_since(Instant::now()),
            None => TICK,
        };
        match done_rx.recv_timeout(wait) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("the vCPU thread died"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !agent_reported {
            if let Some((t, line)) = events.wait_ready(Duration::ZERO) {
                tracing::info!(node = %config.name, "guest agent ready after {:.1} s: {line}", t.as_secs_f64());
                agent_reported = true;
            }
        }
        if config.timeout.is_some_and(|t| started.elapsed() >= t) {
            stop.request(StopCause::Timeout);
        }
        let sample_due = profile_interval.is_some_and(|_| Instant::now() >= next_sample);
        if let Some(i) = profile_interval.filter(|_| sample_due) {
            next_sample += i;
        }
        if stop.is_requested() || sample_due {
            // A failed kick only means the thread is already gone.
            let _ = vcpu_thread.kill(vcpu::kick_signal());
        }
    };
    let _ = vcpu_thread.join();
    if let (Some(samples), Some(symbols), Some(profile)) = (samples, symbols, &config.profile) {
        // Boot and what came after are different questions: split at ready.
        let ready = events.milestones().agent_ready.unwrap_or(Duration::MAX);
        let (boot, after): (Vec<_>, Vec<_>) = samples.0.into_iter().partition(|(t, _)| *t <= ready);
        eprintln!("--- until the agent was ready");
        eprint!("{}", profile::report(&Samples(boot), &symbols, profile.top, profile.interval));
        eprintln!("--- after the agent was ready");
        eprint!("{}", profile::report(&Samples(after), &symbols, profile.top, profile.interval));
    }
    if let Some(pv) = &vm.pv {
        let pv = lock(pv);
        tracing::info!(
            node = %config.name,
            "paravirtual memory: the VMM cleared {} guest pages, made {} copies ({} KiB) and {} strided stores ({} elements)",
            pv.cleared,
            pv.copies,
            pv.copied / 1024,
            pv.strides,
            pv.stride_elements
        );
    }
    // Threads of deputies and migrations may still wait on the peer runtime
    // (a link's read with a timeout): shutting it down under them makes
    // their timers panic. The process ends after this and its exit closes
    // the links, so the runtime is left to it.
    std::mem::forget(runtime);
    if seccomp::sigsys::refused() > 0 {
        tracing::warn!(
            node = %config.name,
            "seccomp refused {} system calls (see the lines above; please report them)",
            seccomp::sigsys::refused()
        );
    }
    let exit = result?;
    tracing::info!(
        node = %config.name,
        "{} after {:.1} s ({} exits: {} port I/O, {} MMIO, {} FWAIT steps)",
        exit.describe(),
        started.elapsed().as_secs_f64(),
        stats.exits,
        stats.pio,
        stats.mmio,
        stats.fwait_steps
    );
    Ok(exit)
}

/// Binds the node's peer listener, publishes its address in the run
/// directory and serves migrations on a tokio runtime of its own.
fn start_peer_listener(
    config: &VmConfig,
    paths: &NodePaths,
    memory: &vm_memory::GuestMemoryMmap,
) -> anyhow::Result<(tokio::runtime::Runtime, Arc<MigrationNode>)> {
    let key = ClusterKey::load_or_create(&config.peer.cluster_key)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("peer")
        .enable_all()
        .build()
        .context("cannot start the peer runtime")?;
    let listener = std::net::TcpListener::bind(&config.peer.listen)
        .with_context(|| format!("cannot listen for peers on {}", config.peer.listen))?;
    listener.set_nonblocking(true).context("peer listener")?;
    let local = listener.local_addr().context("peer listener")?;
    let discovery = config.peer.discover.map(|group| Discovery::open(group, local)).transpose()?;
    let addr = local.to_string();
    std::fs::write(paths.peer_addr(), format!("{addr}\n"))
        .with_context(|| format!("cannot write {}", paths.peer_addr().display()))?;
    let fingerprint = key.fingerprint();
    let migration = MigrationNode::new(
        config.name.clone(),
        addr.clone(),
        key,
        memory.clone(),
        config.vsock.as_ref().map(|v| v.socket_path.clone()),
        runtime.handle().clone(),
        Some(paths.dir.join("fault")),
        ClusterState::new(&config.name, &addr, config.peer.join.clone(), config.peer.balance),
    );
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(listener).context("peer listener")?
    };
    runtime.spawn(migration::server::serve(listener, migration.clone()));
    cluster::gossip::start(migration.clone()).context("cannot start the cluster loop")?;
    if let Some(discovery) = discovery {
        discovery.start(migration.clone()).context("cannot start discovery")?;
    }
    tracing::info!(node = %config.name, "listening for peers on {addr} (cluster key {fingerprint})");
    Ok((runtime, migration))
}

/// Puts the terminal in raw mode (restored when the guard drops) and feeds
/// keystrokes to the guest console; Ctrl-A x stops the node, Ctrl-A Ctrl-A
/// sends one Ctrl-A.
fn forward_stdin(
    serial: Arc<std::sync::Mutex<SerialDevice>>,
    stop: Arc<StopRequest>,
) -> anyhow::Result<RawTerminal> {
    let guard = RawTerminal::enable()?;
    // Read through a duplicate of fd 0: a blocked read on io::stdin() would
    // hold its lock and keep the guard from restoring the terminal.
    let mut input_fd = std::fs::File::from(
        std::os::fd::AsFd::as_fd(&io::stdin()).try_clone_to_owned().context("cannot duplicate stdin")?,
    );
    eprintln!("pmivmm: interactive console; press Ctrl-A x to stop the node\r");
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut escaped = false;
            let mut buf = [0u8; 64];
            while let Ok(n) = input_fd.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut input = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    match (escaped, b) {
                        (false, ESCAPE) => escaped = true,
                        (true, b'x') => {
                            stop.request(StopCause::User);
                            return;
                        }
                        (true, _) => {
                            escaped = false;
                            input.push(b);
                        }
                        (false, _) => input.push(b),
                    }
                }
                let mut rest = &input[..];
                while !rest.is_empty() {
                    let n = lock(&serial).enqueue_input(rest);
                    rest = &rest[n..];
                    if n == 0 {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .context("cannot start the console input thread")?;
    Ok(guard)
}

/// Raw mode on stdin for the lifetime of the value.
struct RawTerminal;

impl RawTerminal {
    fn enable() -> anyhow::Result<Self> {
        io::stdin().lock().set_raw_mode().context("cannot put the terminal in raw mode")?;
        Ok(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = io::stdin().lock().set_canon_mode();
    }
}
