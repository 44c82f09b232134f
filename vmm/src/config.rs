//! Configuration of a node VM, separate from the code that builds it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::devices::virtio::p9;

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The VMM's stdout (and stdin to the guest when it is a terminal).
    Stdio,
    /// Appended to a file.
    File(PathBuf),
}

/// Whether to add the command-line workarounds for the development hosts'
/// paravirtualized KVM (see `crate::cmdline::HOST_COMPAT_ARGS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCompat {
    /// On when the host's /dev/kvm is kvm_pvm, off otherwise.
    Auto,
    On,
    Off,
}

impl HostCompat {
    /// Resolves `Auto` by looking for the kvm_pvm module.
    pub fn enabled(self) -> bool {
        match self {
            HostCompat::On => true,
            HostCompat::Off => false,
            HostCompat::Auto => std::path::Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// The node VMM's seccomp filters (see `crate::seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// System calls outside the allow-lists fail with ENOSYS and are logged.
    Enforce,
    /// Every call is allowed; the kernel logs the ones outside the lists.
    Log,
    /// No filters.
    Off,
}

/// Guest profiling (see `crate::profile`).
#[derive(Debug, Clone)]
pub struct ProfileConfig {
    pub system_map: PathBuf,
    pub interval: Duration,
    /// How many functions each part of the report lists.
    pub top: usize,
}

/// Everything needed to boot one node VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Node name (used in logs and, later, for its run directory).
    pub name: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// ELF vmlinux.
    pub kernel: PathBuf,
    /// Uncompressed cpio initramfs.
    pub initrd: PathBuf,
    /// Extra kernel arguments.
    pub extra_cmdline: String,
    pub console: ConsoleConfig,
    pub host_compat: HostCompat,
    /// Offer the paravirtual memory interface (vmm/src/devices/pv.rs) when
    /// host compatibility is on.
    pub paravirt_memory: bool,
    /// Stop the VM after this long (exit code 124).
    pub timeout: Option<Duration>,
    /// Sample the guest RIP at this interval and print a profile resolved
    /// with this System.map when the node stops.
    pub profile: Option<ProfileConfig>,
    /// The virtio-vsock channel to the guest agent; None: no vsock device.
    pub vsock: Option<VsockConfig>,
    /// A host directory shared into the guest over virtio-9p; None: no share.
    pub share: Option<ShareConfig>,
    /// Where the node listens for other nodes' VMMs.
    pub peer: PeerConfig,
    /// Seccomp filters of the VMM's threads, installed once it is set up.
    pub seccomp: SeccompMode,
}

/// The node's peer listener (migrations in, deputy links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// `host:port` to listen on (port 0: any free port).
    pub listen: String,
    /// The cluster key file (created, mode 0600, if missing).
    pub cluster_key: PathBuf,
    /// Peer addresses of cluster members to join through.
    pub join: Vec<String>,
    /// The multicast group to send discovery beacons to and hear other
    /// nodes' on; None: no discovery.
    pub discover: Option<std::net::SocketAddrV4>,
    /// Send processes to less-loaded nodes automatically.
    pub balance: bool,
}

/// A host directory the guest mounts (virtio-9p, 9P2000.L) at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// The shared directory; the guest cannot reach anything outside it.
    pub host_dir: PathBuf,
    /// The virtio-9p mount tag the guest's /init mounts.
    pub tag: String,
}

impl ShareConfig {
    /// The mount tag when nothing else is asked for.
    pub const DEFAULT_TAG: &'static str = "pmivmm";

    /// Shares `host_dir` under the default tag.
    pub fn new(host_dir: PathBuf) -> Self {
        ShareConfig { host_dir, tag: Self::DEFAULT_TAG.to_owned() }
    }

    /// The share of a node started without `--share`: the directory pmivmm runs in, as a command run
    /// from there sees it. Named as the shell names it (`$PWD`, symlinks kept, when that is the same
    /// directory), so that the guest finds the user's files at the path the user knows. Err says why
    /// that directory cannot be shared (`/`, a directory the guest needs for itself, a path the
    /// kernel command line cannot carry).
    pub fn working_dir() -> Result<Self, p9::Error> {
        let cwd = std::env::current_dir().map_err(|source| p9::Error::Dir { path: ".".into(), source })?;
        let same_dir = |p: &Path| {
            let (a, b) = (std::fs::metadata(p), std::fs::metadata(&cwd));
            matches!((a, b), (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()))
        };
        let dir = match std::env::var_os("PWD").map(PathBuf::from) {
            Some(pwd) if pwd.is_absolute() && same_dir(&pwd) => pwd,
            _ => cwd,
        };
        let share = ShareConfig::new(dir);
        p9::guest_path(&share)?;
        Ok(share)
    }
}

/// Directories of the guest that a share mounted on them or on one of their parents would hide
/// (its programs, its configuration, its kernel file systems).
const GUEST_SYSTEM_DIRS: [&str; 9] =
    ["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/etc", "/init", "/dev", "/proc", "/sys"];
/// Guest kernel file systems, where no share can be mounted.
const GUEST_KERNEL_FS: [&str; 3] = ["/dev", "/proc", "/sys"];

/// The guest directory that a share mounted at `dir` (absolute) would hide or lie in, if any.
pub fn guest_dir_in_the_way(dir: &Path) -> Option<&'static str> {
    let hidden = GUEST_SYSTEM_DIRS.iter().find(|d| Path::new(d).starts_with(dir));
    hidden.or_else(|| GUEST_KERNEL_FS.iter().find(|d| dir.starts_with(d))).copied()
}

/// The node's virtio-vsock device and its Unix-socket backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// Listening socket for host-initiated connections (`CONNECT <port>\n`);
    /// guest connections to host port P go to `<socket_path>_P`.
    pub socket_path: PathBuf,
}

impl VsockConfig {
    /// The guest CID when nothing else is asked for.
    pub const DEFAULT_GUEST_CID: u64 = 3;

    /// The default CID with the socket at `socket_path` (the node's
    /// `RunDir::vsock()`).
    pub fn new(socket_path: PathBuf) -> Self {
        VsockConfig { guest_cid: Self::DEFAULT_GUEST_CID, socket_path }
    }
}

/// Parses `256`, `256M`, `256MiB`, `2G`, `2GiB` into MiB.
pub fn parse_mem_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let not_a_size = || format!("'{s}' is not a memory size like 256M or 2G");
    let (num, mult) = match t.find(|c: char| !c.is_ascii_digit()) {
        None => (t, 1),
        Some(i) => {
            let mult = match t[i..].to_ascii_lowercase().as_str() {
                "m" | "mb" | "mib" => 1,
                "g" | "gb" | "gib" => 1024,
                _ if i == 0 => return Err(not_a_size()),
                u => return Err(format!("unknown unit '{u}' in '{s}' (use M or G)")),
            };
            (&t[..i], mult)
        }
    };
    let n: u64 = num.parse().map_err(|_| not_a_size())?;
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// Default locations of the build products, shared with the build scripts:
/// `${PMIVMM_CACHE:-$HOME/.cache/pmivmm}`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PMIVMM_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/pmivmm")
}

/// The kernel `kernel-config/build.sh` built last.
pub fn default_kernel() -> PathBuf {
    cache_dir().join("kernel/current/vmlinux")
}

/// The System.map next to `kernel` (a kernel build tree and the cache both
/// keep it there).
pub fn default_system_map(kernel: &std::path::Path) -> PathBuf {
    kernel.with_file_name("System.map")
}

/// The initramfs `images/build.sh` built last.
pub fn default_initrd() -> PathBuf {
    cache_dir().join("initramfs.cpio")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_that_would_hide_guest_directories() {
        let in_the_way = |d: &str| guest_dir_in_the_way(Path::new(d));
        assert_eq!(in_the_way("/"), Some("/bin"));
        assert_eq!(in_the_way("/usr"), Some("/usr/bin"));
        assert_eq!(in_the_way("/etc"), Some("/etc"));
        assert_eq!(in_the_way("/proc/self"), Some("/proc"));
        assert_eq!(in_the_way("/home/ann/src"), None);
        assert_eq!(in_the_way("/usr/local/src"), None);
        assert_eq!(in_the_way("/tmp"), None);
        assert_eq!(in_the_way("/binaries"), None);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem_mib("256"), Ok(256));
        assert_eq!(parse_mem_mib("256M"), Ok(256));
        assert_eq!(parse_mem_mib("2G"), Ok(2048));
        assert_eq!(parse_mem_mib("1GiB"), Ok(1024));
        assert!(parse_mem_mib("12T").is_err());
        assert!(parse_mem_mib("lots").is_err());
        assert!(parse_mem_mib("99999999999999999999G").is_err());
    }
}
