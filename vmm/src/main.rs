//! The `pmivmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pmivmm::commands;
use pmivmm::control::ClusterAction;
use pmivmm::config::{
    self, ConsoleConfig, HostCompat, PeerConfig, ProfileConfig, SeccompMode, ShareConfig, VmConfig, VsockConfig,
};
use tracing_subscriber::prelude::*;

/// Measures allocations of fuzz inputs (`pmivmm fuzz`); otherwise the
/// system allocator.
#[global_allocator]
static ALLOCATOR: pmivmm::fuzz::alloc::Tracking = pmivmm::fuzz::alloc::Tracking;

#[derive(Parser)]
#[command(
    name = "pmivmm",
    version,
    about = "pmivmm: micro-VM nodes of a process-migration cluster (openMosix, rebuilt on KVM)",
    long_about = "pmivmm runs cluster nodes as KVM micro-VMs. `pmivmm --node` (or `pmivmm node`) \
                  boots one node: our minimal Linux kernel and initramfs with the guest agent.\n\n\
                  Exit codes of a node: 0 the guest powered off, 1 VMM error, 2 guest kernel panic, \
                  3 guest triple fault, 124 timeout, 130 stopped from the console."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per run")]
enum Command {
    /// Boot a node VM (same as `pmivmm --node`).
    Node(NodeArgs),
    /// Run a command in a node, like a local command (output, stdin, exit status).
    Exec {
        #[command(flatten)]
        node: NodeRef,
        /// Working directory in the node.
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment variable (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Do not forward stdin (the command reads /dev/null).
        #[arg(short = 'n', long)]
        no_stdin: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// List the processes of a node (or of every node on this host), where
    /// each runs, and whether each could migrate.
    Ps {
        /// Name of the node [default: every node running on this host].
        #[arg(long = "node", value_name = "NAME")]
        node: Option<String>,
        /// Include kernel threads.
        #[arg(short = 'a', long)]
        all: bool,
    },
    /// Show the load of a node.
    Load {
        #[command(flatten)]
        node: NodeRef,
    },
    /// Send a signal to a process in a node.
    Kill {
        #[command(flatten)]
        node: NodeRef,
        /// Signal number.
        #[arg(short = 's', long, default_value_t = 15)]
        signal: i32,
        pid: u32,
    },
    /// Power a node off and wait until it has stopped.
    Stop {
        #[command(flatten)]
        node: NodeRef,
        /// Seconds to wait for the guest to power off before the VM is stopped.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// List the nodes running on this host.
    Nodes,
    /// Checkpoint a process of a node into a host directory (the VMM reads
    /// its pages straight from guest RAM); the original is killed afterwards.
    Checkpoint {
        #[command(flatten)]
        node: NodeRef,
        /// PID of the process in the node.
        pid: u32,
        /// Directory to write (created; must not hold a checkpoint yet).
        #[arg(short = 'o', long = "output", value_name = "DIR")]
        dir: PathBuf,
        /// Leave the original running instead of killing it.
        #[arg(long)]
        leave_running: bool,
        /// Let the guest kernel list every page (/proc/PID/pagemap) instead
        /// of the VMM walking the process's page tables (slower; for
        /// comparison).
        #[arg(long)]
        pagemap: bool,
    },
    /// Restore a checkpoint directory as a new process of a node.
    Restore {
        #[command(flatten)]
        node: NodeRef,
        /// Directory written by `pmivmm checkpoint`.
        dir: PathBuf,
        /// Let the guest kernel name the frames to fill (/proc/PID/pagemap)
        /// instead of the VMM walking the page tables (slower; for
        /// comparison).
        #[arg(long)]
        pagemap: bool,
    },
    /// Move a running process to another node, live (openMosix's migrate). Its
    /// home keeps a deputy with its PID: output, exit status and signals go
    /// through it. If anything fails, the process runs on where it was.
    Migrate {
        #[command(flatten)]
        node: NodeRef,
        /// PID of the process in the node.
        pid: u32,
        /// Where to: a node name on this host, HOST:PORT of a node's peer
        /// listener, or `home`.
        target: String,
        /// Freeze the process for the whole copy instead of pre-copying its
        /// memory while it runs.
        #[arg(long)]
        no_precopy: bool,
    },
    /// The cluster as a node sees it: members, their load and state, the
    /// balancer, migrations in flight.
    Cluster {
        #[command(flatten)]
        node: NodeRef,
    },
    /// Keep a process on its node: the balancer will not move it.
    Pin {
        #[command(flatten)]
        node: NodeRef,
        pid: u32,
    },
    /// Let a pinned process move again.
    Unpin {
        #[command(flatten)]
        node: NodeRef,
        pid: u32,
    },
    /// Refuse processes from other nodes (`--off` accepts them again).
    Block {
        #[command(flatten)]
        node: NodeRef,
        #[arg(long)]
        off: bool,
    },
    /// Switch the node's automatic balancing on or off.
    Balance {
        #[command(flatten)]
        node: NodeRef,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Send every process that migrated to this node back to its home.
    Expel {
        #[command(flatten)]
        node: NodeRef,
    },
    /// Bring every process that started on this node (and runs elsewhere) home.
    BringHome {
        #[command(flatten)]
        node: NodeRef,
    },
    /// The cluster as a node sees it, live: members, load, balancer,
    /// migrations in flight (a table per interval when not on a terminal).
    Mon {
        #[command(flatten)]
        node: NodeRef,
        /// Refresh interval in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..))]
        interval: u64,
    },
    /// A lab cluster of N node VMs on this machine, each in its own network
    /// namespace on a bridge (root only).
    #[command(subcommand)]
    Lab(pmivmm::lab::LabCommand),
    /// Fuzz the decoders of untrusted input (peer, agent, vsock, mmio, p9,
    /// checkpoint) and report executions, outcome classes and crashes.
    Fuzz(pmivmm::fuzz::command::FuzzArgs),
    /// Migration soak on running nodes: self-checking jobs started on the
    /// first node migrate back and forth for --duration seconds, every other
    /// migration with a fault injected at the target (drop the link, stall,
    /// corrupt a frame; at the offer, image, commit or running point); then
    /// every job must have finished with the output and exit status of an
    /// uninterrupted run, or still run correctly on exactly one node. Prints
    /// the counts; exits 1 if a job was lost, duplicated or corrupted.
    Soak(commands::soak::SoakArgs),
    /// Benchmarks that print tables.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Boot a node N times: time to first output, /init, agent-ready, stop; VMM memory.
    Boot {
        /// Number of boots (one after the other).
        #[arg(short = 'n', long, default_value_t = 3)]
        runs: usize,
        /// Guest RAM of the benchmarked node.
        #[arg(long, default_value = "256M")]
        mem: String,
        /// Extra arguments for `pmivmm --node` (e.g. --kernel PATH), after `--`.
        #[arg(last = true)]
        node_args: Vec<String>,
    },
    /// Checkpoint and restore of 1 MiB and 16 MiB processes on a running node:
    /// freeze time, page copy from/to guest RAM beside memcpy, restore phases.
    Checkpoint {
        #[command(flatten)]
        node: NodeRef,
        /// Process sizes in MiB (repeatable).
        #[arg(long = "mib", default_values_t = [1u64, 16])]
        sizes: Vec<u64>,
    },
    /// Guest vs host cost of syscalls, fork, exec, page faults, populate,
    /// huge pages, pipe copies and the restore path (issue 9's goals).
    Guest {
        #[command(flatten)]
        node: NodeRef,
        /// Size of the process checkpointed and restored for the restore rows
        /// (issue 9's goal is stated for 64 MiB).
        #[arg(long, default_value_t = 64)]
        restore_mib: u64,
    },
    /// Migration: the data path (guest RAM -> authenticated link -> guest RAM)
    /// beside memcpy and plain loopback TCP; with --from/--to, real migrations
    /// of a running process with and without pre-copy (freeze time).
    Migrate {
        /// MiB moved through the data path (a power of two).
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Data-path runs, each with its own baselines: the table gives the
        /// minimum and median times (the hosts are shared and noisy).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Source node for real migrations (needs --to).
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// Target node for real migrations.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Real migrations per mode.
        #[arg(short = 'n', long, default_value_t = 2)]
        runs: usize,
        /// Processes migrated, by their memory in MiB: 0 is a `counter` (a
        /// few pages), N is `memory N` (N MiB, rewritten in passes).
        #[arg(long = "process-mib", value_delimiter = ',', default_values_t = [0u64])]
        process_mib: Vec<u64>,
    },
    /// A CPU-bound job set started on one node of a cluster, without and with
    /// automatic balancing: wall times, speedup, time until the first move.
    Cluster {
        #[command(flatten)]
        node: NodeRef,
        /// Number of jobs (more than the node's CPUs).
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Work per job, in `burn` units (~0.1 s of CPU each).
        #[arg(long, default_value_t = 150)]
        units: u32,
    },
    /// Write and read throughput of a file in a running node's share (virtio-9p)
    /// beside the same dd on the host; where the node's time goes.
    Share {
        #[command(flatten)]
        node: NodeRef,
        /// Size of the file, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: u64,
    },
    /// Throughput and latency of a running node's vsock channel beside a Unix socket.
    Channel {
        #[command(flatten)]
        node: NodeRef,
        /// MiB to move in each direction.
        #[arg(long, default_value_t = 4)]
        mib: usize,
        /// Round trips for the latency figures.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
}

#[derive(Args)]
struct NodeRef {
    /// Name of the node.
    #[arg(long = "node", value_name = "NAME")]
    name: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompatArg {
    /// On when /dev/kvm is the paravirtualized kvm_pvm of the development hosts.
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum SeccompArg {
    /// Refused system calls fail with ENOSYS and are logged on stderr.
    Enforce,
    /// Nothing is refused; the kernel logs calls outside the allow-lists (dmesg).
    Log,
    /// No seccomp filters.
    Off,
}

#[derive(Args)]
struct NodeArgs {
    /// Node name.
    #[arg(long, default_value = "n1")]
    name: String,
    /// Guest RAM, in MiB or with a unit (512M, 2G).
    #[arg(long, default_value = "256M", value_parser = config::parse_mem_mib)]
    mem: u64,
    /// Guest kernel: an uncompressed ELF vmlinux [default: the last one kernel-config/build.sh built]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs: an uncompressed cpio [default: the last one images/build.sh built]
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel arguments (a clearcpuid= here is merged with the host-compat one).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Where the guest console goes: `stdio`, or a file path to append to.
    #[arg(long, default_value = "stdio")]
    console: String,
    /// Kernel arguments that work around the development hosts' paravirtualized KVM.
    #[arg(long, value_enum, default_value = "auto")]
    host_compat: CompatArg,
    /// Do not offer the guest kernel the paravirtual memory interface (page
    /// clearing and copying by the VMM, offered with --host-compat): the
    /// guest then uses its own code (slower where it is emulated).
    #[arg(long)]
    no_paravirt_memory: bool,
    /// Stop the node after this many seconds (exit code 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Sample the guest instruction pointer every N milliseconds and print
    /// where the guest spent its time (by kernel function) when the node stops.
    #[arg(long, value_name = "MS", num_args = 0..=1, default_missing_value = "10")]
    profile: Option<u64>,
    /// System.map used to name kernel functions in the profile
    /// [default: the one next to the kernel]
    #[arg(long)]
    system_map: Option<PathBuf>,
    /// How many functions the profile lists for the boot and for the time after
    #[arg(long, value_name = "N", default_value_t = 30, requires = "profile")]
    profile_top: usize,
    /// Share a host directory with the node (virtio-9p): the guest mounts it at
    /// the same path, read-write; files it creates belong to the user running
    /// pmivmm, and it cannot reach anything outside DIR. [default: the
    /// directory pmivmm runs in, unless that is / or hides a directory the
    /// guest needs (/etc, /usr, ...): then no share]
    #[arg(long, value_name = "DIR", conflicts_with = "no_share")]
    share: Option<PathBuf>,
    /// Share nothing with the node (not even the working directory).
    #[arg(long)]
    no_share: bool,
    /// Address other nodes' VMMs reach this node at for migrations (port 0: any
    /// free port; the chosen address is in the node's run directory).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:0")]
    listen: String,
    /// The cluster key: a file of 64 hex digits that every node of the cluster
    /// shares; peers without it are refused. Created if missing.
    /// [default: cluster.key in the run directory base, shared by this host's nodes]
    #[arg(long, value_name = "FILE")]
    cluster_key: Option<PathBuf>,
    /// Join the cluster of the node listening at HOST:PORT (repeatable); the
    /// node learns all other members from it.
    #[arg(long, value_name = "HOST:PORT")]
    join: Vec<String>,
    /// Find the other nodes on the network of the --listen address (which
    /// must name this node's IPv4 address there, or 127.0.0.1 for the nodes
    /// of this host) by multicast beacons to GROUP:PORT (239.77.0.1:7001
    /// unless given), authenticated with the cluster key, and join them.
    #[arg(
        long,
        value_name = "GROUP:PORT",
        num_args = 0..=1,
        default_missing_value = pmivmm::cluster::discovery::DEFAULT_GROUP,
        value_parser = pmivmm::cluster::discovery::parse_group
    )]
    discover: Option<std::net::SocketAddrV4>,
    /// Do not send processes to less-loaded nodes automatically (they can
    /// still be migrated by hand, and arrive from other nodes).
    #[arg(long)]
    no_balance: bool,
    /// Seccomp filters of the VMM's threads (allow-lists per thread kind),
    /// installed once the node is set up; see docs/hardening.md.
    #[arg(long, value_enum, default_value = "enforce")]
    seccomp: SeccompArg,
}

impl NodeArgs {
    fn into_config(self) -> Result<VmConfig, String> {
        if let Some(t) = self.timeout {
            if !(t.is_finite() && t > 0.0) {
                return Err(format!("--timeout must be a positive number of seconds, not {t}"));
            }
        }
        let paths = pmivmm::rundir::NodePaths::new(&self.name).map_err(|e| e.to_string())?;
        let kernel = self.kernel.unwrap_or_else(config::default_kernel);
        Ok(VmConfig {
            name: self.name,
            mem_mib: self.mem,
            initrd: self.initrd.unwrap_or_else(config::default_initrd),
            extra_cmdline: self.cmdline,
            console: match self.console.as_str() {
                "stdio" | "-" => ConsoleConfig::Stdio,
                p => ConsoleConfig::File(p.into()),
            },
            host_compat: match self.host_compat {
                CompatArg::Auto => HostCompat::Auto,
                CompatArg::On => HostCompat::On,
                CompatArg::Off => HostCompat::Off,
            },
            paravirt_memory: !self.no_paravirt_memory,
            timeout: self.timeout.map(Duration::from_secs_f64),
            profile: match self.profile {
                Some(0) => return Err("--profile needs an interval of at least 1 ms".into()),
                Some(ms) => Some(ProfileConfig {
                    system_map: self.system_map.unwrap_or_else(|| config::default_system_map(&kernel)),
                    interval: Duration::from_millis(ms),
                    top: self.profile_top,
                }),
                None => None,
            },
            kernel,
            vsock: Some(VsockConfig::new(paths.vsock())),
            share: match (self.share, self.no_share) {
                (Some(dir), _) => Some(ShareConfig::new(dir)),
                (None, true) => None,
                (None, false) => ShareConfig::working_dir()
                    .inspect_err(|why| tracing::info!("no share: {why} (--share DIR shares another)"))
                    .ok(),
            },
            peer: PeerConfig {
                listen: self.listen,
                cluster_key: self.cluster_key.unwrap_or_else(pmivmm::rundir::default_cluster_key),
                join: self.join,
                discover: self.discover,
                balance: !self.no_balance,
            },
            seccomp: match self.seccomp {
                SeccompArg::Enforce => SeccompMode::Enforce,
                SeccompArg::Log => SeccompMode::Log,
                SeccompArg::Off => SeccompMode::Off,
            },
        })
    }
}

fn main() -> ExitCode {
    // `pmivmm --node ...` is the documented spelling of `pmivmm node ...`.
    let args = std::env::args().enumerate().map(|(i, a)| if i == 1 && a == "--node" { "node".into() } else { a });
    let cli = Cli::parse_from(args);
    // Fuzz targets log every bad input they refuse: quiet unless asked.
    let default_log = if matches!(cli.command, Command::Fuzz(_)) { "off" } else { "info" };
    let env_filter = tracing_subscriber::EnvFilter::try_from_env("PMIVMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    // Log records of rust-vmm crates come through `log`; those a guest can cause at will are thinned.
    let thinned = tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
        pmivmm::devices::virtio::log_event_allowed(meta.target())
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_filter(env_filter)
                .with_filter(thinned),
        )
        .init();
    let result = match cli.command {
        Command::Node(args) => match args.into_config() {
            Ok(config) => pmivmm::node::run(&config).map(|exit| exit.exit_code()),
            Err(e) => return fail(e),
        },
        Command::Exec { node, cwd, env, no_stdin, argv } => {
            commands::exec(&node.name, argv, env, cwd, !no_stdin)
        }
        Command::Ps { node, all } => commands::ps(node.as_deref(), all).map(|()| 0),
        Command::Load { node } => commands::load(&node.name).map(|()| 0),
        Command::Kill { node, signal, pid } => commands::kill(&node.name, pid, signal).map(|()| 0),
        Command::Stop { node, timeout } => {
            commands::stop(&node.name, Duration::from_secs(timeout)).map(|()| 0)
        }
        Command::Nodes => commands::nodes().map(|()| 0),
        Command::Checkpoint { node, pid, dir, leave_running, pagemap } => {
            commands::checkpoint::checkpoint(&node.name, pid, &dir, leave_running, !pagemap).map(|r| {
                println!("{}", commands::checkpoint::describe_checkpoint(&r, &dir));
                0
            })
        }
        Command::Restore { node, dir, pagemap } => commands::checkpoint::restore(&node.name, &dir, !pagemap).map(|r| {
            println!("{}", commands::checkpoint::describe_restore(&r));
            0
        }),
        Command::Migrate { node, pid, target, no_precopy } => {
            commands::migrate::migrate(&node.name, pid, &target, !no_precopy).map(|r| {
                println!("{}", commands::migrate::describe(&r));
                0
            })
        }
        Command::Cluster { node } => commands::cluster::show(&node.name).map(|()| 0),
        Command::Pin { node, pid } => {
            commands::cluster::apply(&node.name, ClusterAction::Pin { pid, pinned: true }).map(|()| 0)
        }
        Command::Unpin { node, pid } => {
            commands::cluster::apply(&node.name, ClusterAction::Pin { pid, pinned: false }).map(|()| 0)
        }
        Command::Block { node, off } => {
            commands::cluster::apply(&node.name, ClusterAction::Block { blocked: !off }).map(|()| 0)
        }
        Command::Balance { node, state } => {
            commands::cluster::apply(&node.name, ClusterAction::Balance { on: state == "on" }).map(|()| 0)
        }
        Command::Expel { node } => commands::cluster::apply(&node.name, ClusterAction::Expel).map(|()| 0),
        Command::BringHome { node } => commands::cluster::apply(&node.name, ClusterAction::BringHome).map(|()| 0),
        Command::Mon { node, interval } => {
            commands::mon::run(&node.name, Duration::from_millis(interval)).map(|()| 0)
        }
        Command::Lab(cmd) => pmivmm::lab::run(cmd).map(|()| 0),
        Command::Soak(args) => commands::soak::run(&args).map(|r| if r.clean() { 0 } else { 1 }),
        Command::Fuzz(args) => pmivmm::fuzz::command::run(&args).map(|clean| if clean { 0 } else { 1 }),
        Command::Bench(BenchCommand::Boot { runs, mem, node_args }) => {
            pmivmm::bench::boot::run(&pmivmm::bench::boot::BootBench { runs, mem, node_args }).map(|()| 0)
        }
        Command::Bench(BenchCommand::Checkpoint { node, sizes }) => {
            pmivmm::bench::checkpoint::run(&pmivmm::bench::checkpoint::CheckpointBench { node: node.name, sizes_mib: sizes })
                .map(|()| 0)
        }
        Command::Bench(BenchCommand::Guest { node, restore_mib }) => {
            pmivmm::bench::guest::run(&pmivmm::bench::guest::GuestBench { node: node.name, restore_mib }).map(|()| 0)
        }
        Command::Bench(BenchCommand::Migrate { mib, repeat, from, to, runs, process_mib }) => {
            let nodes = from.zip(to);
            let bench = pmivmm::bench::migrate::MigrateBench { mib, repeat, nodes, runs, process_mib };
            pmivmm::bench::migrate::run(&bench).map(|()| 0)
        }
        Command::Bench(BenchCommand::Cluster { node, jobs, units }) => {
            pmivmm::bench::cluster::run(&pmivmm::bench::cluster::ClusterBench { node: node.name, jobs, units }).map(|()| 0)
        }
        Command::Bench(BenchCommand::Share { node, mib }) => {
            pmivmm::bench::share::run(&pmivmm::bench::share::ShareBench { node: node.name, mib }).map(|()| 0)
        }
        Command::Bench(BenchCommand::Channel { node, mib, rounds }) => {
            pmivmm::bench::channel::run(&pmivmm::bench::channel::ChannelBench { node: node.name, mib, rounds })
                .map(|()| 0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => fail(format!("{e:#}")),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("pmivmm: error: {msg}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
