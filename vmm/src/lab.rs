//! `pmivmm lab up N` / `pmivmm lab down`: a cluster of N node VMs on this
//! machine, for trying the cluster out without N machines.
//!
//! Each node `labI` (I = 1..N) runs in its own network namespace
//! `pmivmm-lab-nI`, whose `eth0` (10.77.0.(10+I)/24) is one end of a veth
//! pair; the host end `pmlabI` is a port of the bridge `pmivmm-lab0`
//! (10.77.0.1/24 on the host, multicast snooping off: every port gets the
//! discovery beacons). Every node listens for peers on 10.77.0.(10+I):7000
//! and finds the others by their multicast beacons on the bridge
//! (`--discover`, no `--join`), so they form one cluster whose discovery,
//! gossip and migrations cross real (virtual) links. Nothing is routed or
//! NATed out of 10.77.0.0/24.
//!
//! The run directories are not per namespace (`ip netns exec` keeps the
//! host's /run), so `pmivmm exec/ps/cluster --node labI` work from the host.
//! Node consoles and VMM logs go to `<run dir base>/.lab/` (a name no node
//! can have, so `pmivmm nodes` does not mistake it for a node).
//!
//! The pure parts (names, addresses, the `ip` commands of `up` and `down`)
//! are functions of the node count or of what exists, unit tested below; the
//! code that runs them is separate.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::membership::Health;
use crate::cluster::ClusterView;
use crate::config::ShareConfig;
use crate::control::{self, NodeState};
use crate::rundir::{self, NodePaths};

/// Largest lab (2 cores and the emulated guest kernel make more impractical).
pub const MAX_NODES: u32 = 8;
/// The host's bridge.
pub const BRIDGE: &str = "pmivmm-lab0";
/// The host's address on the bridge.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const PREFIX_LEN: u8 = 24;
/// Every node's peer port (each has its own address).
pub const PEER_PORT: u16 = 7000;
/// Stop grace `lab down` gives each node before the VM is forced down.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `pmivmm lab ...`.
#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Start N node VMs (1-8) on this machine, each in its own network
    /// namespace on the bridge pmivmm-lab0 (10.77.0.0/24), that find each
    /// other by multicast discovery and form one cluster; waits until all
    /// are ready (root only).
    Up {
        /// Number of nodes: lab1 .. labN.
        #[arg(value_name = "N")]
        nodes: u32,
        /// Guest RAM of each node, in MiB or with a unit (256M, 1G).
        #[arg(long, default_value = "256M", value_parser = crate::config::parse_mem_mib)]
        mem: u64,
        /// Share a host directory with every node (mounted at the same path)
        /// [default: the directory pmivmm runs in, as for `pmivmm --node`].
        #[arg(long, value_name = "DIR", conflicts_with = "no_share")]
        share: Option<PathBuf>,
        /// Share nothing with the nodes.
        #[arg(long)]
        no_share: bool,
        /// Give up waiting for the nodes after this many seconds (they keep
        /// running; `pmivmm lab down` stops them).
        #[arg(long, value_name = "SECONDS", default_value_t = 900)]
        timeout: u64,
    },
    /// Stop every lab node and remove the namespaces, veths and the bridge
    /// (also after a partial `up` or a crash).
    Down,
}

/// Runs a `pmivmm lab` command.
pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up { nodes, mem, share, no_share, timeout } => {
            up(&UpOptions { nodes, mem_mib: mem, share, no_share, timeout: Duration::from_secs(timeout) })
        }
        LabCommand::Down => down(),
    }
}

// ---------------------------------------------------------------------------
// Pure helpers: names, addresses, commands.

/// Node `lab<index>` of the lab (index 1..=MAX_NODES).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabNode(pub u32);

impl LabNode {
    /// All nodes of a lab of `n`.
    pub fn all(n: u32) -> impl Iterator<Item = LabNode> {
        (1..=n).map(LabNode)
    }

    /// The node's name (and run directory).
    pub fn name(self) -> String {
        format!("lab{}", self.0)
    }

    /// Its network namespace.
    pub fn netns(self) -> String {
        format!("pmivmm-lab-n{}", self.0)
    }

    /// The host end of its veth pair (a bridge port). The namespace end is
    /// `eth0`.
    pub fn veth(self) -> String {
        format!("pmlab{}", self.0)
    }

    /// Its address in 10.77.0.0/24.
    pub fn ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, (10 + self.0) as u8)
    }

    /// Where its VMM listens for peers.
    pub fn peer_addr(self) -> String {
        format!("{}:{PEER_PORT}", self.ip())
    }

    /// The node `name` stands for, if it is a lab node name (lab1..lab8).
    pub fn from_name(name: &str) -> Option<LabNode> {
        let i: u32 = name.strip_prefix("lab")?.parse().ok()?;
        let canonical = format!("lab{i}") == name;
        (canonical && (1..=MAX_NODES).contains(&i)).then_some(LabNode(i))
    }

    /// The lab node whose namespace this is.
    pub fn from_netns(ns: &str) -> Option<LabNode> {
        LabNode::from_name(&format!("lab{}", ns.strip_prefix("pmivmm-lab-n")?))
    }

    /// The lab node whose host veth this is.
    pub fn from_veth(link: &str) -> Option<LabNode> {
        LabNode::from_name(&format!("lab{}", link.strip_prefix("pmlab")?))
    }
}

/// Checks the node count of `lab up`.
pub fn check_count(n: u32) -> Result<(), String> {
    if (1..=MAX_NODES).contains(&n) {
        Ok(())
    } else {
        Err(format!("a lab has 1 to {MAX_NODES} nodes, not {n}"))
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// The `ip` commands (arguments after `ip`) that build the network of a lab
/// of `n` nodes, in order.
pub fn up_commands(n: u32) -> Vec<Vec<String>> {
    let host = format!("{HOST_ADDR}/{PREFIX_LEN}");
    let mut cmds = vec![
        args(&["link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0"]),
        args(&["addr", "add", &host, "dev", BRIDGE]),
        args(&["link", "set", BRIDGE, "up"]),
    ];
    for node in LabNode::all(n) {
        let (ns, veth) = (node.netns(), node.veth());
        let addr = format!("{}/{PREFIX_LEN}", node.ip());
        cmds.extend([
            args(&["netns", "add", &ns]),
            args(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]),
            args(&["link", "set", &veth, "master", BRIDGE]),
            args(&["link", "set", &veth, "up"]),
            args(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]),
            args(&["-n", &ns, "link", "set", "eth0", "up"]),
            args(&["-n", &ns, "link", "set", "lo", "up"]),
        ]);
    }
    cmds
}

/// What of a lab exists on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Present {
    /// Lab namespaces, by node.
    pub netns: BTreeSet<LabNode>,
    /// Host veths of lab nodes.
    pub veths: BTreeSet<LabNode>,
    pub bridge: bool,
}

impl Present {
    /// From the output of `ip netns list` and `ip -o link show`.
    pub fn parse(netns_list: &str, links: &str) -> Present {
        let link_names = link_names(links);
        Present {
            netns: netns_names(netns_list).iter().filter_map(|n| LabNode::from_netns(n)).collect(),
            veths: link_names.iter().filter_map(|l| LabNode::from_veth(l)).collect(),
            bridge: link_names.iter().any(|l| l == BRIDGE),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.veths.is_empty() && !self.bridge
    }

    /// One line: what there is.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.netns.is_empty() {
            parts.push(format!("namespaces {}", join(self.netns.iter().map(|n| n.netns()))));
        }
        if !self.veths.is_empty() {
            parts.push(format!("veths {}", join(self.veths.iter().map(|n| n.veth()))));
        }
        if self.bridge {
            parts.push(format!("bridge {BRIDGE}"));
        }
        parts.join(", ")
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(" ")
}

/// Namespace names in `ip netns list` output (`name` or `name (id: 3)`).
pub fn netns_names(output: &str) -> Vec<String> {
    output.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
}

/// Interface names in `ip -o link show` output (`7: pmlab1@if2: <...> ...`).
pub fn link_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The `ip` commands that remove what `present` lists: each namespace (its
/// `eth0`, and with it the veth pair, goes along), host veths left without a
/// namespace, then the bridge.
pub fn down_commands(present: &Present) -> Vec<Vec<String>> {
    let mut cmds: Vec<Vec<String>> = present.netns.iter().map(|n| args(&["netns", "delete", &n.netns()])).collect();
    cmds.extend(
        present.veths.iter().filter(|n| !present.netns.contains(n)).map(|n| args(&["link", "delete", &n.veth()])),
    );
    if present.bridge {
        cmds.push(args(&["link", "delete", BRIDGE]));
    }
    cmds
}

/// The command line (after `ip`) that starts `node` in its namespace.
pub fn node_command(exe: &Path, node: LabNode, mem_mib: u64, share: Option<&Path>, log_dir: &Path) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec!["netns".into(), "exec".into(), node.netns().into(), exe.into()];
    let mut push = |words: &[&str]| argv.extend(words.iter().map(OsString::from));
    push(&["--node", "--name", &node.name(), "--mem", &format!("{mem_mib}M"), "--listen", &node.peer_addr()]);
    push(&["--discover"]);
    argv.push("--console".into());
    argv.push(console_file(log_dir, node).into());
    // Explicit either way: the node's own default would be the directory `ip` runs it in.
    match share {
        Some(dir) => {
            argv.push("--share".into());
            argv.push(dir.into());
        }
        None => argv.push("--no-share".into()),
    }
    argv
}

/// The guest console of `node`.
pub fn console_file(log_dir: &Path, node: LabNode) -> PathBuf {
    log_dir.join(format!("{}.console", node.name()))
}

/// The VMM's own output (stdout and stderr) of `node`.
pub fn log_file(log_dir: &Path, node: LabNode) -> PathBuf {
    log_dir.join(format!("{}.log", node.name()))
}

/// Where the consoles and logs go.
pub fn log_dir() -> PathBuf {
    rundir::base().join(".lab")
}

/// How many members `view` shows alive, of how many.
pub fn alive(view: &ClusterView) -> (usize, usize) {
    (view.members.iter().filter(|m| m.health == Health::Alive).count(), view.members.len())
}

/// Every member of `view` has reported its load (a member's first entry
/// may come before its first load sample).
pub fn loads_known(view: &ClusterView) -> bool {
    view.members.iter().all(|m| m.member.load.cpus > 0)
}

// ---------------------------------------------------------------------------
// Running it.

struct UpOptions {
    nodes: u32,
    mem_mib: u64,
    share: Option<PathBuf>,
    no_share: bool,
    timeout: Duration,
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("pmivmm lab creates network namespaces and a bridge: run it as root");
    }
    Ok(())
}

/// Runs `ip ARGS`; its stdout, or an error with its stderr.
fn ip(argv: &[String]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(argv).stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!("the `ip` command is missing: install iproute2 (apt-get install iproute2)")
        } else {
            anyhow::anyhow!("cannot run `ip`: {e}")
        }
    })?;
    if !out.status.success() {
        bail!("`ip {}` failed ({}): {}", argv.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_ip() -> anyhow::Result<()> {
    ip(&args(&["-V"])).map(drop)
}

/// What of a lab exists now.
fn present() -> anyhow::Result<Present> {
    Ok(Present::parse(&ip(&args(&["netns", "list"]))?, &ip(&args(&["-o", "link", "show"]))?))
}

/// Lab nodes with a run directory on this host.
fn lab_run_dirs() -> Vec<LabNode> {
    rundir::list(&rundir::base()).iter().filter_map(|n| LabNode::from_name(n)).collect()
}

fn up(opts: &UpOptions) -> anyhow::Result<()> {
    check_count(opts.nodes).map_err(anyhow::Error::msg)?;
    require_root()?;
    require_ip()?;
    let found = present()?;
    let running = lab_run_dirs();
    if !found.is_empty() || !running.is_empty() {
        let mut what = found.describe();
        if !running.is_empty() {
            if !what.is_empty() {
                what.push_str(", ");
            }
            what.push_str(&format!("nodes {}", join(running.iter().map(|n| n.name()))));
        }
        bail!("a lab is already up (or left over): found {what}; `pmivmm lab down` removes it");
    }
    for (what, path) in [("guest kernel", crate::config::default_kernel()), ("initramfs", crate::config::default_initrd())] {
        anyhow::ensure!(path.exists(), "no {what} at {} (scripts/node.sh builds it)", path.display());
    }
    let share = share_dir(opts.share.as_deref(), opts.no_share)?;
    let exe = std::env::current_exe().context("cannot find the pmivmm binary")?;
    let logs = log_dir();
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    let start = Instant::now();
    let n = opts.nodes;
    println!("pmivmm lab: {n} node(s) of {} MiB on bridge {BRIDGE} ({HOST_ADDR}/{PREFIX_LEN})", opts.mem_mib);
    if let Some(d) = &share {
        println!("  share: {} (mounted at the same path in every node)", d.display());
    }
    let cmds = up_commands(n);
    for cmd in &cmds {
        if let Err(e) = ip(cmd) {
            eprintln!("pmivmm lab: setting up the network failed; removing what was made");
            let _ = remove_network();
            return Err(e);
        }
    }
    println!("  network: {} ip commands, namespaces pmivmm-lab-n1..n{n}", cmds.len());

    let mut children = Vec::new();
    for node in LabNode::all(n) {
        let child = spawn_node(&exe, node, opts.mem_mib, share.as_deref(), &logs)
            .with_context(|| format!("cannot start node {}; `pmivmm lab down` removes the lab", node.name()))?;
        println!("  started {} at {} (VMM pid {}, console {})", node.name(), node.peer_addr(), child.id(), console_file(&logs, node).display());
        children.push((node, child));
    }
    println!("waiting for the nodes to boot (~1 min each on emulated KVM; Ctrl-C stops waiting, the nodes go on)");
    let view = wait_ready(n, &mut children, &logs, start, opts.timeout).map_err(|e| {
        e.context(format!(
            "the lab is left as it is for a look (logs in {}); `pmivmm lab down` removes it",
            logs.display()
        ))
    })?;
    println!("lab up in {:.1} s\n", start.elapsed().as_secs_f64());
    print!("{}", crate::commands::cluster::describe(&view));
    println!(
        "\nnodes lab1..lab{n} at 10.77.0.11..{} (peer port {PEER_PORT}), consoles and logs in {}\n\
         try:  pmivmm exec --node lab2 -- uname -a\n      pmivmm ps\n      pmivmm mon --node lab1\n\
         stop: pmivmm lab down",
        LabNode(n).ip().octets()[3],
        logs.display()
    );
    Ok(())
}

/// The directory every node shares: `share`, or without it and without
/// `no_share` the directory pmivmm runs in when it can be shared. Checked
/// as the nodes will check it, before anything is set up.
fn share_dir(share: Option<&Path>, no_share: bool) -> anyhow::Result<Option<PathBuf>> {
    let dir = match (share, no_share) {
        (Some(d), _) => fs::canonicalize(d).with_context(|| format!("cannot share {}", d.display()))?,
        (None, true) => return Ok(None),
        (None, false) => match ShareConfig::working_dir() {
            Ok(s) => s.host_dir,
            Err(why) => {
                println!("pmivmm lab: no share: {why} (--share DIR shares another)");
                return Ok(None);
            }
        },
    };
    anyhow::ensure!(dir.is_dir(), "cannot share {}: not a directory", dir.display());
    crate::devices::virtio::p9::guest_path(&ShareConfig::new(dir.clone()))?;
    Ok(Some(dir))
}

/// Starts `node` in its namespace, detached: its own session, stdin from
/// /dev/null, output to its log; it outlives `lab up`.
fn spawn_node(exe: &Path, node: LabNode, mem_mib: u64, share: Option<&Path>, logs: &Path) -> anyhow::Result<Child> {
    // A fresh console and log per lab (the node appends to its console).
    let _ = fs::remove_file(console_file(logs, node));
    let log_path = log_file(logs, node);
    let log = File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(node_command(exe, node, mem_mib, share, logs))
        .env("NO_COLOR", "1") // plain log files
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    detach(&mut cmd);
    Ok(cmd.spawn()?)
}

/// Makes `cmd` start in a session of its own: signals of our terminal (a
/// Ctrl-C) do not reach it, and it outlives us.
pub fn detach(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(io::Error::last_os_error()) } else { Ok(()) });
    }
}

/// The last `lines` lines of a file, indented, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("    {l}\n")).collect()
}

/// Waits until every node's agent is ready and lab1 sees all of them alive.
fn wait_ready(
    n: u32,
    children: &mut [(LabNode, Child)],
    logs: &Path,
    start: Instant,
    timeout: Duration,
) -> anyhow::Result<ClusterView> {
    let mut ready: BTreeSet<LabNode> = BTreeSet::new();
    let mut last_report = Instant::now();
    let mut last_alive = None;
    let mut all_alive_since: Option<Instant> = None;
    loop {
        for (node, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "node {} exited ({status}) after {:.0} s; the end of {}:\n{}",
                    node.name(),
                    start.elapsed().as_secs_f64(),
                    log_file(logs, *node).display(),
                    tail(&log_file(logs, *node), 8)
                );
            }
            if ready.contains(node) {
                continue;
            }
            let Ok(paths) = NodePaths::new(&node.name()) else { continue };
            if let Ok(s) = control::status(&paths.control()) {
                if s.state == NodeState::Ready {
                    ready.insert(*node);
                    let after = s.ready_after_ms.map(|ms| format!(" (agent ready {:.1} s after start)", ms as f64 / 1000.0));
                    println!(
                        "  [{:>4.0} s] {} ready{}  {}/{n}",
                        start.elapsed().as_secs_f64(),
                        node.name(),
                        after.unwrap_or_default(),
                        ready.len()
                    );
                }
            }
        }
        if ready.len() == n as usize {
            let paths = NodePaths::new(&LabNode(1).name())?;
            if let Ok(view) = control::cluster(&paths.control()) {
                let (up, known) = alive(&view);
                if up == n as usize && known == n as usize {
                    // Wait a little for the load of every member, so that
                    // the table shows it.
                    let since = *all_alive_since.get_or_insert_with(Instant::now);
                    if loads_known(&view) || since.elapsed() > Duration::from_secs(10) {
                        return Ok(view);
                    }
                } else {
                    all_alive_since = None;
                }
                if last_alive != Some(up) {
                    println!("  [{:>4.0} s] lab1 sees {up} of {n} members alive", start.elapsed().as_secs_f64());
                    last_alive = Some(up);
                }
            }
        } else if last_report.elapsed() >= Duration::from_secs(15) {
            let booting: Vec<String> =
                LabNode::all(n).filter(|x| !ready.contains(x)).map(LabNode::name).collect();
            println!("  [{:>4.0} s] booting: {}", start.elapsed().as_secs_f64(), booting.join(" "));
            last_report = Instant::now();
        }
        let _ = io::stdout().flush();
        if start.elapsed() > timeout {
            bail!(
                "timed out after {} s: {} of {n} node(s) ready{}",
                timeout.as_secs(),
                ready.len(),
                if ready.len() == n as usize { ", but lab1 does not see them all alive" } else { "" }
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

fn send(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) of a PID we found in a lab namespace or status.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// PIDs of the processes in a lab namespace.
fn netns_pids(node: LabNode) -> Vec<u32> {
    ip(&args(&["netns", "pids", &node.netns()]))
        .map(|out| out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

fn down() -> anyhow::Result<()> {
    require_root()?;
    require_ip()?;
    let found = present()?;
    let mut nodes: BTreeSet<LabNode> = lab_run_dirs().into_iter().collect();
    nodes.extend(found.netns.iter().copied());
    let mut did = Vec::new();

    // Ask every node to power off; note its VMM's PID for later.
    let mut pids: BTreeMap<u32, String> = BTreeMap::new();
    let mut stopping = Vec::new();
    for node in &nodes {
        let Ok(paths) = NodePaths::new(&node.name()) else { continue };
        if !paths.dir.exists() {
            continue;
        }
        match control::status(&paths.control()) {
            Ok(s) => {
                pids.insert(s.vmm_pid, format!("the VMM of {}", node.name()));
                match control::stop(&paths.control(), STOP_GRACE) {
                    Ok(()) => {
                        println!("stopping {} (VMM pid {})", node.name(), s.vmm_pid);
                        stopping.push(*node);
                    }
                    Err(e) => eprintln!("pmivmm lab: {}: cannot stop it: {e}", node.name()),
                }
            }
            Err(_) => eprintln!("pmivmm lab: {}: its control socket does not answer", node.name()),
        }
    }
    let in_netns = |pids: &mut BTreeMap<u32, String>| {
        for node in &found.netns {
            for p in netns_pids(*node) {
                pids.entry(p).or_insert_with(|| format!("a process in {}", node.netns()));
            }
        }
    };
    in_netns(&mut pids);
    let run_dir_gone = |n: &LabNode| NodePaths::new(&n.name()).map(|p| !p.dir.exists()).unwrap_or(true);
    let start = Instant::now();
    while !(pids.keys().all(|p| !pid_alive(*p)) && stopping.iter().all(run_dir_gone))
        && start.elapsed() < STOP_GRACE + Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let stopped: Vec<String> = stopping.iter().filter(|n| run_dir_gone(n)).map(|n| n.name()).collect();
    if !stopped.is_empty() {
        did.push(format!("stopped {}", stopped.join(" ")));
    }
    // Whatever still runs: the VMMs that did not stop, anything else in a
    // lab namespace.
    in_netns(&mut pids);
    let left: Vec<(u32, String)> = pids.into_iter().filter(|(p, _)| pid_alive(*p)).collect();
    if !left.is_empty() {
        let waited = start.elapsed().as_secs();
        for (p, _) in &left {
            send(*p, libc::SIGKILL);
        }
        let t = Instant::now();
        while left.iter().any(|(p, _)| pid_alive(*p)) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
        for (p, what) in &left {
            did.push(format!("killed pid {p} ({what}; still running {waited} s after the stop request)"));
        }
    }
    // Run directories of VMMs that died without removing them.
    for node in &nodes {
        let Ok(paths) = NodePaths::new(&node.name()) else { continue };
        if paths.dir.exists() && control::status(&paths.control()).is_err() && fs::remove_dir_all(&paths.dir).is_ok() {
            did.push(format!("removed the stale run directory {}", paths.dir.display()));
        }
    }

    let net = remove_network();
    if let Some(net) = net.as_ref().ok().filter(|n| !n.is_empty()) {
        did.push(format!("removed {}", net.describe()));
    }
    if did.is_empty() && net.is_ok() {
        println!("no lab here: nothing to remove");
        return Ok(());
    }
    for d in &did {
        println!("{d}");
    }
    net?;
    println!("(consoles and logs of the last lab stay in {})", log_dir().display());
    Ok(())
}

/// Removes the lab network; returns what there was. The kernel removes a
/// deleted namespace's devices (and so the host end of its veth) in the
/// background: this waits for that, and deletes by hand what stays.
fn remove_network() -> anyhow::Result<Present> {
    let net = present()?;
    let mut left = net.clone();
    let mut failed = Vec::new();
    for round in 0..2 {
        failed.clear();
        for cmd in down_commands(&left) {
            if let Err(e) = ip(&cmd) {
                failed.push(format!("{e:#}"));
            }
        }
        let t = Instant::now();
        left = present()?;
        while !left.is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(200));
            left = present()?;
        }
        if left.is_empty() {
            return Ok(net);
        }
        if round == 0 {
            eprintln!("pmivmm lab: still there after 5 s: {}; deleting again", left.describe());
        }
    }
    bail!("could not remove the lab network: {} still there ({})", left.describe(), failed.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(cmd: &[String]) -> String {
        cmd.join(" ")
    }

    #[test]
    fn names_and_addresses() {
        let n = LabNode(3);
        assert_eq!(n.name(), "lab3");
        assert_eq!(n.netns(), "pmivmm-lab-n3");
        assert_eq!(n.veth(), "pmlab3");
        assert_eq!(n.ip(), Ipv4Addr::new(10, 77, 0, 13));
        assert_eq!(n.peer_addr(), "10.77.0.13:7000");
        assert_eq!(LabNode(MAX_NODES).ip(), Ipv4Addr::new(10, 77, 0, 18));
        // Interface names fit IFNAMSIZ (15 characters).
        assert!(BRIDGE.len() <= 15 && LabNode(MAX_NODES).veth().len() <= 15);
        assert_eq!(LabNode::all(3).collect::<Vec<_>>(), vec![LabNode(1), LabNode(2), LabNode(3)]);
    }

    #[test]
    fn names_back_to_nodes() {
        assert_eq!(LabNode::from_name("lab1"), Some(LabNode(1)));
        assert_eq!(LabNode::from_name("lab8"), Some(LabNode(8)));
        for not in ["lab0", "lab9", "lab01", "lab", "labx", "n1", "lab1x", "lab+1"] {
            assert_eq!(LabNode::from_name(not), None, "{not}");
        }
        assert_eq!(LabNode::from_netns("pmivmm-lab-n2"), Some(LabNode(2)));
        assert_eq!(LabNode::from_netns("other"), None);
        assert_eq!(LabNode::from_veth("pmlab4"), Some(LabNode(4)));
        assert_eq!(LabNode::from_veth("pmivmm-lab0"), None);
    }

    #[test]
    fn node_counts() {
        assert!(check_count(0).is_err());
        assert!(check_count(1).is_ok());
        assert!(check_count(8).is_ok());
        assert!(check_count(9).unwrap_err().contains("1 to 8"));
    }

    #[test]
    fn up_builds_bridge_then_each_namespace() {
        let cmds: Vec<String> = up_commands(2).iter().map(|c| line(c)).collect();
        assert_eq!(
            cmds,
            [
                "link add pmivmm-lab0 type bridge mcast_snooping 0",
                "addr add 10.77.0.1/24 dev pmivmm-lab0",
                "link set pmivmm-lab0 up",
                "netns add pmivmm-lab-n1",
                "link add pmlab1 type veth peer name eth0 netns pmivmm-lab-n1",
                "link set pmlab1 master pmivmm-lab0",
                "link set pmlab1 up",
                "-n pmivmm-lab-n1 addr add 10.77.0.11/24 dev eth0",
                "-n pmivmm-lab-n1 link set eth0 up",
                "-n pmivmm-lab-n1 link set lo up",
                "netns add pmivmm-lab-n2",
                "link add pmlab2 type veth peer name eth0 netns pmivmm-lab-n2",
                "link set pmlab2 master pmivmm-lab0",
                "link set pmlab2 up",
                "-n pmivmm-lab-n2 addr add 10.77.0.12/24 dev eth0",
                "-n pmivmm-lab-n2 link set eth0 up",
                "-n pmivmm-lab-n2 link set lo up",
            ]
        );
        assert_eq!(up_commands(8).len(), 3 + 8 * 7);
        // No routing, forwarding or NAT: only links, addresses, namespaces.
        assert!(up_commands(8).iter().all(|c| !c.iter().any(|w| w == "route" || w.contains("forward"))));
    }

    #[test]
    fn parses_what_exists() {
        let netns = "pmivmm-lab-n2 (id: 1)\npmivmm-lab-n1 (id: 0)\nsomeone-else\n";
        let links = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN\\    link/loopback 00:00\n\
                     4: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400\n\
                     9: pmivmm-lab0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\n\
                     11: pmlab1@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 master pmivmm-lab0\n\
                     13: pmlab3@if2: <BROADCAST,MULTICAST> mtu 1500\n";
        assert_eq!(link_names(links), ["lo", "eth0", "pmivmm-lab0", "pmlab1", "pmlab3"]);
        let p = Present::parse(netns, links);
        assert_eq!(p.netns, [LabNode(1), LabNode(2)].into_iter().collect());
        assert_eq!(p.veths, [LabNode(1), LabNode(3)].into_iter().collect());
        assert!(p.bridge);
        assert_eq!(p.describe(), "namespaces pmivmm-lab-n1 pmivmm-lab-n2, veths pmlab1 pmlab3, bridge pmivmm-lab0");
        assert!(Present::parse("", "4: eth0: <UP> mtu 1400\n").is_empty());
    }

    #[test]
    fn down_removes_only_what_exists() {
        let p = Present {
            netns: [LabNode(1), LabNode(2)].into_iter().collect(),
            veths: [LabNode(1), LabNode(3)].into_iter().collect(),
            bridge: true,
        };
        let cmds: Vec<String> = down_commands(&p).iter().map(|c| line(c)).collect();
        assert_eq!(
            cmds,
            [
                "netns delete pmivmm-lab-n1",
                "netns delete pmivmm-lab-n2",
                // pmlab1 goes with its namespace; pmlab3 lost its own.
                "link delete pmlab3",
                "link delete pmivmm-lab0",
            ]
        );
        assert!(down_commands(&Present::default()).is_empty());
        // Everything `up` makes, `down` removes.
        let all = Present {
            netns: LabNode::all(4).collect(),
            veths: LabNode::all(4).collect(),
            bridge: true,
        };
        assert_eq!(down_commands(&all).len(), 4 + 1);
    }

    #[test]
    fn cluster_views() {
        use crate::cluster::membership::{Member, MemberView, NodeLoad};
        let m = |health, cpus| MemberView {
            member: Member {
                name: "lab1".into(),
                addr: "10.77.0.11:7000".into(),
                heartbeat: 1,
                load: NodeLoad { runnable: 0, cpus, mem_free_mib: 0, cpu_percent: 0 },
                blocked: false,
            },
            health,
            silent_ms: 0,
            me: false,
        };
        let v = |members| ClusterView { members, in_flight: vec![], pinned: vec![], auto_balance: true, auto_migrations: 0 };
        assert_eq!(alive(&v(vec![m(Health::Alive, 1), m(Health::Suspect, 1)])), (1, 2));
        assert!(loads_known(&v(vec![m(Health::Alive, 1), m(Health::Alive, 2)])));
        assert!(!loads_known(&v(vec![m(Health::Alive, 0), m(Health::Alive, 2)])));
    }

    #[test]
    fn shares_the_nodes_would_refuse_are_refused_before_set_up() {
        let err = share_dir(Some(Path::new("/")), false).unwrap_err().to_string();
        assert!(err.contains("the guest's own /bin"), "{err}");
        let dir = std::env::temp_dir().join(format!("pmivmm-lab-share {}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let err = share_dir(Some(&dir), false).unwrap_err().to_string();
        fs::remove_dir(&dir).unwrap();
        assert!(err.contains("without white space"), "{err}");
        assert!(share_dir(Some(Path::new("/no/such/dir")), false).is_err());
        assert_eq!(share_dir(None, true).unwrap(), None);
        let tmp = fs::canonicalize(std::env::temp_dir()).unwrap();
        assert_eq!(share_dir(Some(&tmp), false).unwrap(), Some(tmp));
    }

    #[test]
    fn node_command_lines() {
        let exe = Path::new("/usr/bin/pmivmm");
        let logs = Path::new("/run/pmivmm/.lab");
        let s = |v: Vec<OsString>| v.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert_eq!(
            s(node_command(exe, LabNode(1), 256, None, logs)),
            "netns exec pmivmm-lab-n1 /usr/bin/pmivmm --node --name lab1 --mem 256M --listen 10.77.0.11:7000 \
             --discover --console /run/pmivmm/.lab/lab1.console --no-share"
        );
        assert_eq!(
            s(node_command(exe, LabNode(3), 512, Some(Path::new("/srv/share")), logs)),
            "netns exec pmivmm-lab-n3 /usr/bin/pmivmm --node --name lab3 --mem 512M --listen 10.77.0.13:7000 \
             --discover --console /run/pmivmm/.lab/lab3.console --share /srv/share"
        );
        assert_eq!(log_file(logs, LabNode(2)), Path::new("/run/pmivmm/.lab/lab2.log"));
        // The log directory is no node name, so `pmivmm nodes` skips it.
        assert!(rundir::validate_name(".lab").is_err());
    }
}
