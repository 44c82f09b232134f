//! The allow-lists, per [`ThreadKind`]: what the code of each kind of
//! thread was seen to call (strace of a node booting, running commands,
//! migrating and checkpointing; `--seccomp log` runs of the integration
//! tests), grouped by purpose. Arguments are checked where a call can do
//! very different things: `ioctl` only for KVM and terminal/socket
//! requests, `socket` only for Unix, IPv4 and IPv6 stream sockets.

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule, TargetArch};

use super::ThreadKind;

pub const ARCH: TargetArch = TargetArch::x86_64;

/// Every thread: memory, threads' own bookkeeping, futexes, signals, time,
/// logging, exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The vCPU thread: `ioctl` (KVM, see [`ioctl_rules`]) and what the
/// emulated devices do: console output, interrupt and queue eventfds (the
/// transport duplicates them when the driver activates a device).
const VCPU: &[i64] = &[libc::SYS_fcntl, libc::SYS_dup, libc::SYS_fsync, libc::SYS_fdatasync];

/// Event loops of device threads and the peer runtime.
const EVENTS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
];

/// Sockets: the vsock muxer's Unix sockets, peer links, control socket.
const SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fcntl,
];

/// Files: the 9p share, checkpoint directories, the run directory.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_readlink,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_lgetxattr,
    libc::SYS_llistxattr,
    libc::SYS_getcwd,
];

/// Everything else the VMM's own threads do after setup: threads (peer
/// runtime, migrations, control connections), pipes, process metadata.
const VMM: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_tid_address,
    libc::SYS_prctl,
    // Threads add their own filter on top of the process's.
    libc::SYS_seccomp,
    libc::SYS_rt_sigaction,
    libc::SYS_sched_setaffinity,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_socketpair,
    libc::SYS_pipe2,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_times,
    libc::SYS_kill,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_memfd_create,
];

/// The system calls of `kind` with their argument rules (an empty rule
/// list allows every argument).
pub fn rules(kind: ThreadKind) -> Result<Vec<(i64, Vec<SeccompRule>)>, BackendError> {
    let groups: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[COMMON, VCPU],
        ThreadKind::Vsock => &[COMMON, EVENTS, SOCKETS],
        ThreadKind::P9 => &[COMMON, EVENTS, FILES],
        ThreadKind::Vmm => &[COMMON, VCPU, EVENTS, SOCKETS, FILES, VMM],
    };
    let mut calls: Vec<i64> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    calls.sort_unstable();
    calls.dedup();
    let mut rules: Vec<(i64, Vec<SeccompRule>)> = calls.into_iter().map(|nr| (nr, Vec::new())).collect();
    rules.push((libc::SYS_ioctl, ioctl_rules(kind)?));
    if matches!(kind, ThreadKind::Vsock | ThreadKind::Vmm) {
        rules.push((libc::SYS_socket, socket_rules()?));
    }
    Ok(rules)
}

/// `ioctl` requests by type (bits 8..16 of the request): KVM (0xAE) for
/// the vCPU and the VMM; terminal and socket requests (`'T'`: TCGETS,
/// TCSETS, FIONBIO, FIOCLEX, TIOCGWINSZ) for the others.
fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, BackendError> {
    const KVM: u64 = 0xae;
    const TERMINAL: u64 = b'T' as u64;
    let types: &[u64] = match kind {
        ThreadKind::Vcpu => &[KVM],
        ThreadKind::Vsock | ThreadKind::P9 => &[TERMINAL],
        ThreadKind::Vmm => &[KVM, TERMINAL],
    };
    types
        .iter()
        .map(|&ty| {
            let condition = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), ty << 8)?;
            SeccompRule::new(vec![condition])
        })
        .collect()
}

/// `socket` for the families the VMM uses: Unix, IPv4, IPv6.
fn socket_rules() -> Result<Vec<SeccompRule>, BackendError> {
    [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
        .iter()
        .map(|&family| {
            let condition = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family as u64)?;
            SeccompRule::new(vec![condition])
        })
        .collect()
}
