//! Seccomp filters of the node VMM (rust-vmm `seccompiler`), Firecracker
//! style: an allow-list of system calls per kind of thread.
//!
//! Once the node is set up (KVM fds open, guest RAM mapped, sockets bound,
//! threads started), [`install_process`] puts the [`ThreadKind::Vmm`]
//! filter on every thread of the process at once (TSYNC); threads created
//! later inherit it. The vCPU thread and each device thread then add their
//! own, narrower filter on top ([`install_thread`]): a system call must
//! pass every filter of its thread.
//!
//! The VMM holds users' running processes, so a system call missing from a
//! list must not kill it: in [`SeccompMode::Enforce`] a refused call
//! returns `ENOSYS` (which the code reports as an error, and which libc and
//! std treat as "not supported here" where they have a fallback), and a
//! SIGSYS handler logs its number on stderr ([`sigsys`]). In
//! [`SeccompMode::Log`] every call is allowed and the kernel logs the ones
//! the lists lack (`dmesg`, audit type 1326), for finding them.

mod lists;
pub mod sigsys;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

pub use crate::config::SeccompMode;

/// Kinds of threads, each with its allow-list ([`lists`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Every thread: the main thread, the control server, the peer runtime,
    /// gossip, migrations; the union of all lists.
    Vmm,
    /// The vCPU thread: KVM_RUN and the devices it emulates.
    Vcpu,
    /// The vsock device thread: its epoll, Unix sockets.
    Vsock,
    /// The 9p device thread: file system calls in the share.
    P9,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vsock => "vsock",
            ThreadKind::P9 => "9p",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {kind} threads: {source}")]
    Build { kind: &'static str, source: seccompiler::BackendError },
    #[error("cannot compile the seccomp filter of the {kind} threads: {source}")]
    Compile { kind: &'static str, source: seccompiler::BackendError },
    #[error("cannot install the seccomp filter of the {kind} threads: {source}")]
    Install { kind: &'static str, source: seccompiler::Error },
    #[error("cannot install the handler of refused system calls: {0}")]
    Handler(#[source] std::io::Error),
}

/// The mode the process filter was installed with, once it is.
static PROCESS_MODE: OnceLock<SeccompMode> = OnceLock::new();

/// The BPF program of `kind` in `mode` (`None` for [`SeccompMode::Off`]).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = lists::rules(kind)
        .map_err(|source| Error::Build { kind: kind.name(), source })?
        .into_iter()
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, lists::ARCH)
        .map_err(|source| Error::Build { kind: kind.name(), source })?;
    filter.try_into().map(Some).map_err(|source| Error::Compile { kind: kind.name(), source })
}

/// Puts the [`ThreadKind::Vmm`] filter on every thread of the process.
pub fn install_process(mode: SeccompMode) -> Result<(), Error> {
    let Some(program) = program(ThreadKind::Vmm, mode)? else { return Ok(()) };
    sigsys::install().map_err(Error::Handler)?;
    seccompiler::apply_filter_all_threads(&program).map_err(|source| Error::Install { kind: "vmm", source })?;
    let _ = PROCESS_MODE.set(mode);
    tracing::info!("seccomp filters installed ({mode:?} mode)");
    Ok(())
}

/// Adds the filter of `kind` to the calling thread, if the process has
/// one (in the unit tests and with `--seccomp off` it has none).
pub fn install_thread(kind: ThreadKind) -> Result<(), Error> {
    let Some(&mode) = PROCESS_MODE.get() else { return Ok(()) };
    let Some(program) = program(kind, mode)? else { return Ok(()) };
    seccompiler::apply_filter(&program).map_err(|source| Error::Install { kind: kind.name(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Vsock, ThreadKind::P9] {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                assert!(!program(kind, mode).unwrap().unwrap().is_empty());
            }
            assert!(program(kind, SeccompMode::Off).unwrap().is_none());
        }
    }

    #[test]
    fn the_vmm_list_holds_every_other_list() {
        let vmm: Vec<i64> = lists::rules(ThreadKind::Vmm).unwrap().into_iter().map(|(nr, _)| nr).collect();
        for kind in [ThreadKind::Vcpu, ThreadKind::Vsock, ThreadKind::P9] {
            for (nr, _) in lists::rules(kind).unwrap() {
                assert!(vmm.contains(&nr), "system call {nr} of {kind:?} is not in the vmm list");
            }
        }
    }

    /// A refused call in a child process: ENOSYS and a log line, not death.
    #[test]
    fn a_refused_call_returns_enosys() {
        // SAFETY: the child only makes system calls and exits (no locks
        // held by other threads are taken: no allocation after fork).
        let program = program(ThreadKind::Vcpu, SeccompMode::Enforce).unwrap().unwrap();
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                sigsys::install().ok()?;
                seccompiler::apply_filter(&program).ok()?;
                // SAFETY: mkdir on a string constant; refused by the vCPU list.
                let rc = unsafe { libc::mkdir(c"/nonexistent-pmivmm-seccomp-test".as_ptr(), 0o700) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                (rc == -1 && errno == Some(libc::ENOSYS)).then_some(())
            })();
            // SAFETY: exits the child without running the parent's destructors.
            unsafe { libc::_exit(if code.is_some() { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
    }
}
