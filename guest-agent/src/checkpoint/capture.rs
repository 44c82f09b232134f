//! Checkpoint: freeze a process with ptrace and describe it.
//!
//! The process is refused (and left running, untouched) when it cannot
//! migrate. Otherwise it stays frozen after [`capture`] until the caller
//! either resumes it ([`resume_original`], the migration failed) or kills it
//! ([`kill_original`], the target confirmed). Any error during capture
//! resumes it. All three calls for one process must come from one thread.
//! The scratch page of the injected syscalls stays mapped in the frozen
//! process ([`LeftScratch`]): a process killed after its migration needs no
//! munmap (one stop of the freeze less, 40-80 ms in the emulated guest
//! kernel of these hosts), [`resume_original`] removes it, and a deputy,
//! which never runs its own code again, keeps it.
//!
//! Syscalls are costly in the guest: /proc files are read once each, the
//! pagemap once per run of neighbouring VMAs, resource limits with
//! prlimit(2) and the argument and environment areas with one
//! process_vm_readv each (cheaper than their /proc files), and only what
//! the kernel shows nowhere else is read with syscalls injected into the
//! process: `brk(0)` (the kernel's exact break), then, with a scratch page
//! mapped for their results, one `rt_sigaction` per caught signal
//! (handlers, flags and masks; ignored signals are known from `SigIgn`),
//! `sigaltstack` and one `setitimer` per interval timer.
//!
//! `setitimer` with a zero value reads a timer and disarms it at once: the
//! timers of a captured process stand still, so no expiry falls between
//! reading them and reading the pending signals, and none reaches a
//! deputy. [`resume_original`] re-arms them; a killed original or a deputy
//! keeps them disarmed (the restored process has them).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use libc::user_regs_struct;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pmivmm_proto::image::{
    limits, page_runs, AltStack, FdKind, FileDescriptor, Itimer, MmLayout, PageKind, Pages,
    ProcessImage, Rlimit, Select, SigAction, SigInfo, SignalState, Vma, VmaKind, WalkMode,
    IMAGE_VERSION, MAX_SIGNAL, PAGE_SIZE, PROT_READ, PROT_WRITE,
};
use pmivmm_proto::MigrationObstacle;

use super::inject::{
    find_syscall_insn, read_remote, InjectError, Injector, Syscall, BATCH_ENTRY_LEN, BATCH_RUNNER,
};
use super::pagemap::{tracked, Pagemap, PagemapError};
use super::pagetables::{MmTables, PageTablesError};
use super::procfs::{self, MapsEntry, ProcfsError, Stat, Status, PF_KTHREAD};
use super::rlimits::{self, RlimitError};
use super::tracee::{regs_to_image, rewind_interrupted_syscall, PtraceError, Tracee};
use crate::procfs::{deleted_file, nul_separated};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("PID {pid} cannot migrate: it {}", join(obstacles))]
    Refused {
        pid: i32,
        obstacles: Vec<MigrationObstacle>,
    },
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    #[error(transparent)]
    Rlimit(#[from] RlimitError),
    #[error(transparent)]
    PageTables(#[from] PageTablesError),
    #[error("PID {pid}: no `syscall` instruction in its vdso or code to run syscalls with")]
    NoSyscallInsn { pid: i32 },
    #[error("cannot clear the soft-dirty bits of PID {pid}: {source}")]
    ClearRefs { pid: i32, source: std::io::Error },
    #[error("PID {pid} was resumed, but re-arming its interval timers or removing the capture's scratch page failed: {source}")]
    Rearm {
        pid: i32,
        source: Box<CheckpointError>,
    },
    #[error("cannot stat mapped file {path}: {source}")]
    MappedFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot tell whether fds {} and {} of PID {pid} share one open file (kcmp): {source}", fds.0, fds.1)]
    Kcmp {
        pid: i32,
        fds: (i32, i32),
        source: std::io::Error,
    },
    #[cfg(test)]
    #[error("failure injected by a test at {0}")]
    FailPoint(&'static str),
}

fn join(obstacles: &[MigrationObstacle]) -> String {
    obstacles
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; it ")
}

/// `struct sigaction` as `rt_sigaction` reads and writes it on x86_64.
pub const KERNEL_SIGACTION_LEN: usize = 32;
pub const SIGSET_LEN: u64 = 8;
const SIG_IGN: u64 = 1;
/// `struct itimerval` (interval, then value; each seconds and microseconds).
const ITIMERVAL_LEN: usize = 32;
/// `stack_t` of x86_64: `ss_sp`, `ss_flags` (padded), `ss_size`.
pub const STACK_T_LEN: usize = 24;
pub const SS_AUTODISARM: u32 = 1 << 31;

/// The scratch area mapped in the process for the injected reads: the
/// batch runner, its table, then where the results go.
const SCRATCH_LEN: u64 = 2 * PAGE_SIZE;
const SCRATCH_RUNNER: u64 = 0;
const SCRATCH_TABLE: u64 = 64;
/// Entries: brk, one `rt_sigaction` per caught signal, sigaltstack, three
/// setitimer.
const SCRATCH_SIGACTIONS: u64 = SCRATCH_TABLE + (MAX_SIGNAL as u64 + 5) * BATCH_ENTRY_LEN as u64;
const SCRATCH_ALTSTACK: u64 = SCRATCH_SIGACTIONS + MAX_SIGNAL as u64 * KERNEL_SIGACTION_LEN as u64;
const SCRATCH_ITIMERS: u64 = SCRATCH_ALTSTACK + STACK_T_LEN as u64;
/// Never written: the zero `itimerval` that disarms a timer.
const SCRATCH_ZERO_ITIMER: u64 = SCRATCH_ITIMERS + 3 * ITIMERVAL_LEN as u64;
const SCRATCH_USED: usize = SCRATCH_ZERO_ITIMER as usize + ITIMERVAL_LEN;
const _: () = assert!(SCRATCH_USED as u64 <= SCRATCH_LEN && BATCH_RUNNER.len() as u64 <= SCRATCH_TABLE);

/// Freezes `pid` and captures it. Returns the image and every present page
/// with its frame (the VMM copies the [`PageKind::Data`] ones, in order; they
/// are the pages of [`ProcessImage::pages`]), all dirty (no pre-copy round
/// ran). `page_walk`: private anonymous memory is left to the VMM's walk
/// where the kernel allows (see [`present_pages`]).
pub fn capture(
    pid: i32,
    page_walk: bool,
) -> Result<(ProcessImage, Pages, LeftScratch), CheckpointError> {
    check_before_seize(pid)?;
    let (tracee, _) = Tracee::seize_and_interrupt(Pid::from_raw(pid))?;
    capture_stopped(tracee, Select::AllDirty, page_walk)
}

/// The checks that refuse a process before it is even seized.
pub(super) fn check_before_seize(pid: i32) -> Result<(), CheckpointError> {
    let status = procfs::status(pid)?;
    let stat = procfs::stat(pid)?;
    refuse_if_any(pid, process_obstacles(pid, &status, stat.flags))
}

/// Where a capture left its scratch page mapped in the frozen process, for
/// [`resume_original`] to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftScratch(pub(super) u64);

/// Captures a process this thread has seized and stopped, listing its pages
/// as `select` says. It stays frozen; on failure it is let go (detached).
pub(super) fn capture_stopped(
    tracee: Tracee,
    select: Select,
    page_walk: bool,
) -> Result<(ProcessImage, Pages, LeftScratch), CheckpointError> {
    let original = match (tracee.regs(), tracee.sigmask()) {
        (Ok(regs), Ok(mask)) => (regs, mask),
        (Err(e), _) | (_, Err(e)) => {
            let _ = tracee.detach();
            return Err(e.into());
        }
    };
    let mut resumed = original.0;
    let interrupted = rewind_interrupted_syscall(&mut resumed);
    let result = capture_frozen(tracee, &original.0, select, page_walk);
    // Whatever happened, the process gets back its mask and registers (with
    // the syscall it was in rewound: see `rewind_interrupted_syscall`).
    let put_back = tracee
        .set_sigmask(original.1)
        .and_then(|()| tracee.set_regs(&resumed));
    match result.and_then(|captured| put_back.map(|()| captured).map_err(CheckpointError::from)) {
        Ok((mut image, pages, scratch)) => {
            image.regs = regs_to_image(&resumed);
            image.interrupted_syscall = interrupted;
            image.signals.blocked = original.1;
            Ok((image, pages, scratch))
        }
        Err(e) => {
            let _ = tracee.detach();
            Err(e)
        }
    }
}

/// Lets a captured process run on (the migration failed), with its
/// interval timers (the image's `itimers`, disarmed by the capture)
/// re-armed and the capture's scratch page removed.
pub fn resume_original(
    pid: i32,
    itimers: &[Itimer; 3],
    scratch: LeftScratch,
) -> Result<(), CheckpointError> {
    let tracee = Tracee {
        pid: Pid::from_raw(pid),
    };
    let tidied = tidy(tracee, itimers, scratch).map_err(|source| CheckpointError::Rearm {
        pid,
        source: Box::new(source),
    });
    tracee.detach()?;
    tidied
}

/// Sets the interval timers of a captured process and unmaps the scratch
/// page, then puts back its registers and signal mask.
fn tidy(tracee: Tracee, itimers: &[Itimer; 3], scratch: LeftScratch) -> Result<(), CheckpointError> {
    let regs = tracee.regs()?;
    let mask = tracee.sigmask()?;
    let injector = injector_for(tracee)?;
    tracee.set_sigmask(!0)?;
    let tidied = set_itimers(&injector, scratch.0, itimers)
        .map_err(CheckpointError::from)
        .and_then(|()| unmap_scratch(&injector, scratch.0));
    tracee.set_sigmask(mask)?;
    tracee.set_regs(&regs)?;
    tidied
}

/// Kills a captured process (the target confirmed) and collects its end.
pub fn kill_original(pid: i32) -> Result<(), CheckpointError> {
    let pid = Pid::from_raw(pid);
    kill(pid, Signal::SIGKILL).map_err(|errno| PtraceError::Call {
        op: "kill",
        pid: pid.as_raw(),
        errno,
    })?;
    super::tracee::wait_for_end(pid).map_err(|errno| PtraceError::Call {
        op: "wait",
        pid: pid.as_raw(),
        errno,
    })?;
    Ok(())
}

fn refuse_if_any(pid: i32, obstacles: Vec<MigrationObstacle>) -> Result<(), CheckpointError> {
    if obstacles.is_empty() {
        Ok(())
    } else {
        Err(CheckpointError::Refused { pid, obstacles })
    }
}

/// What rules a process out before looking at its resources.
fn process_obstacles(pid: i32, status: &Status, flags: u64) -> Vec<MigrationObstacle> {
    let mut out = Vec::new();
    if pid == 1 {
        out.push(MigrationObstacle::Init);
    }
    if pid == std::process::id() as i32 {
        out.push(MigrationObstacle::Agent);
    }
    if flags & PF_KTHREAD != 0 {
        out.push(MigrationObstacle::KernelThread);
    } else if status.state == 'Z' || status.state == 'X' {
        out.push(MigrationObstacle::Zombie);
    }
    if status.threads > 1 {
        out.push(MigrationObstacle::MultiThreaded {
            threads: status.threads,
        });
    }
    if status.tracer_pid != 0 {
        out.push(MigrationObstacle::Traced {
            tracer: status.tracer_pid as u32,
        });
    }
    out
}

#[cfg(test)]
thread_local! {
    /// Fail points let the tests break a capture half-way.
    pub static FAIL_AT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

fn fail_point(name: &'static str) -> Result<(), CheckpointError> {
    #[cfg(test)]
    if FAIL_AT.with(|f| f.get()) == Some(name) {
        return Err(CheckpointError::FailPoint(name));
    }
    let _ = name;
    Ok(())
}

/// What [`inspect_stopped`] read.
pub(super) struct Inspection {
    pub stat: Stat,
    pub status: Status,
    pub vmas: Vec<Vma>,
    pub fds: Vec<FileDescriptor>,
}

/// Every check that refuses a process, on the stopped process (nothing can
/// change under us: threads, mappings, descriptors). /proc/PID/stat is read
/// here even if it was before the freeze: an execve in between (a process
/// checkpointed right after its launch) replaces every mm field.
pub(super) fn inspect_stopped(pid: i32) -> Result<Inspection, CheckpointError> {
    let stat = procfs::stat(pid)?;
    let status = procfs::status(pid)?;
    let mut obstacles = process_obstacles(
        pid,
        &Status {
            tracer_pid: 0,
            ..status.clone()
        },
        stat.flags,
    );
    let vmas = vmas(&procfs::maps(pid)?, &mut obstacles)?;
    let fds = fds(pid, &mut obstacles)?;
    let count = procfs::posix_timers(pid)?;
    if count > 0 {
        obstacles.push(MigrationObstacle::PosixTimers { count });
    }
    refuse_if_any(pid, obstacles)?;
    Ok(Inspection {
        stat,
        status,
        vmas,
        fds,
    })
}

/// The present pages of `vmas` that `select` asks for: with `tables`, the
/// VMAs that [`MmTables::walks`] as ranges for the VMM's walk, the others
/// read from pagemap.
pub(super) fn present_pages(
    pagemap: &Pagemap,
    vmas: &[Vma],
    select: Select,
    tables: Option<&MmTables>,
) -> Result<Pages, CheckpointError> {
    let (walked, read): (Vec<&Vma>, Vec<&Vma>) = vmas
        .iter()
        .partition(|v| tables.is_some() && MmTables::walks(v));
    let mut listed = Vec::new();
    pagemap.present_pages(&read, select, &mut listed)?;
    let walk = tables.map(|t| t.walk_vmas(WalkMode::Present(tracked(select)), walked));
    Ok(Pages { listed, walk })
}

/// The capture proper, on the frozen process. Its registers and signal mask
/// are put back by the caller.
fn capture_frozen(
    tracee: Tracee,
    regs: &user_regs_struct,
    select: Select,
    page_walk: bool,
) -> Result<(ProcessImage, Pages, LeftScratch), CheckpointError> {
    let pid = tracee.pid.as_raw();
    let Inspection {
        stat,
        status,
        vmas,
        fds,
    } = inspect_stopped(pid)?;
    let exe = procfs::link(pid, "exe")?;
    let argv = strings_at(tracee.pid, stat.arg_start, stat.arg_end)?;
    let environ = strings_at(tracee.pid, stat.env_start, stat.env_end)?;
    let cwd = procfs::link(pid, "cwd")?;
    let limits = rlimits::of(pid)?;
    let personality = procfs::personality(pid)?;
    let fpu = tracee.fpu()?;
    let rseq = tracee.rseq()?;

    // Signals are blocked while syscalls are injected, so that none is
    // delivered half-way; the caller restores the mask.
    tracee.set_sigmask(!0)?;
    let injector = Injector::new(tracee, *regs, syscall_insn(pid, &vmas)?);
    let scratch = map_scratch(&injector)?;
    let found = read_injected(&injector, scratch, &status).and_then(|injected| {
        match pending_and_pages(tracee, &vmas, select, page_walk) {
            Ok(found) => Ok((injected, found)),
            Err(e) => {
                // The process will be resumed: its timers run on (should
                // this fail too, the capture's error is the one to report).
                let _ = set_itimers(&injector, scratch, &injected.itimers);
                Err(e)
            }
        }
    });
    let (injected, (pending_thread, pending_process, pages)) = match found {
        Ok(found) => found,
        Err(e) => {
            let _ = unmap_scratch(&injector, scratch);
            return Err(e);
        }
    };
    let data = page_runs(
        pages
            .listed
            .iter()
            .filter(|p| p.kind == PageKind::Data)
            .map(|p| p.vaddr),
    );
    let image = ProcessImage {
        version: IMAGE_VERSION,
        source_pid: pid,
        comm: status.name,
        exe,
        argv,
        environ,
        // Set by the caller.
        regs: regs_to_image(regs),
        fpu,
        interrupted_syscall: None,
        mm: MmLayout {
            start_code: stat.start_code,
            end_code: stat.end_code,
            start_data: stat.start_data,
            end_data: stat.end_data,
            start_brk: stat.start_brk,
            brk: injected.brk,
            start_stack: stat.start_stack,
            arg_start: stat.arg_start,
            arg_end: stat.arg_end,
            env_start: stat.env_start,
            env_end: stat.env_end,
        },
        vmas,
        pages: data,
        signals: SignalState {
            blocked: 0,
            actions: injected.actions,
            pending_thread,
            pending_process,
        },
        rseq,
        itimers: injected.itimers,
        sigaltstack: injected.sigaltstack,
        personality,
        nice: stat.nice,
        fds,
        cwd,
        umask: status.umask,
        rlimits: limits
            .into_iter()
            .map(|(resource, soft, hard)| Rlimit {
                resource,
                soft,
                hard,
            })
            .collect(),
    };
    Ok((image, pages, LeftScratch(scratch)))
}

/// The NUL-separated strings in `start..end` of the memory of `pid`: its
/// arguments or environment, where /proc/PID/stat says they lie. One
/// process_vm_readv each, where reading /proc/PID/cmdline and environ cost
/// 10-20 ms each in the emulated guest kernel (the same bytes; cmdline also
/// follows a process that wrote its arguments past their end, which the
/// image's record of them does without). More than an image may hold is
/// read only so far that the image is refused for it.
fn strings_at(pid: Pid, start: u64, end: u64) -> Result<Vec<String>, CheckpointError> {
    let len = (end.saturating_sub(start) as usize).min(limits::MAX_ARGS_BYTES + 1);
    let mut buf = vec![0u8; len];
    read_remote(pid, start, &mut buf)?;
    Ok(nul_separated(&buf))
}

/// Pending signals of the thread and of the process (read once the timers
/// stand still), and the present pages of `vmas` that `select` asks for.
fn pending_and_pages(
    tracee: Tracee,
    vmas: &[Vma],
    select: Select,
    page_walk: bool,
) -> Result<(Vec<SigInfo>, Vec<SigInfo>, Pages), CheckpointError> {
    fail_point("after-injection")?;
    let pending_thread = tracee.pending(false)?;
    let pending_process = tracee.pending(true)?;
    let pid = tracee.pid.as_raw();
    let tables = MmTables::read(pid, page_walk)?;
    let pages = present_pages(&Pagemap::open(pid)?, vmas, select, tables.as_ref())?;
    Ok((pending_thread, pending_process, pages))
}

/// The VMAs of a process, noting what cannot be recreated.
pub(super) fn vmas(
    maps: &[MapsEntry],
    obstacles: &mut Vec<MigrationObstacle>,
) -> Result<Vec<Vma>, CheckpointError> {
    let mut files: HashMap<&str, std::fs::Metadata> = HashMap::new();
    let mut special = Vec::new();
    let mut out = Vec::new();
    for m in maps {
        let name = m.name.as_str();
        if name == "[vsyscall]" {
            continue;
        }
        if name.starts_with("/SYSV") {
            obstacles.push(MigrationObstacle::SysvSharedMemory);
            continue;
        }
        if m.shared
            && (m.prot & PROT_WRITE != 0 || !name.starts_with('/') || name.ends_with(" (deleted)"))
        {
            let path = if name.is_empty() { "[anonymous]" } else { name };
            obstacles.push(MigrationObstacle::SharedWritableMapping { path: path.into() });
            continue;
        }
        let kind = match name {
            "" => VmaKind::Anonymous,
            "[heap]" => VmaKind::Heap,
            "[stack]" => VmaKind::Stack,
            "[vdso]" => VmaKind::Vdso,
            n if n.starts_with("[vvar") => VmaKind::Vvar { name: n.into() },
            n if n.starts_with("[anon:") => VmaKind::Anonymous,
            n if n.starts_with('/') && !n.ends_with(" (deleted)") => {
                if !files.contains_key(n) {
                    let meta =
                        std::fs::metadata(n).map_err(|source| CheckpointError::MappedFile {
                            path: n.into(),
                            source,
                        })?;
                    files.insert(n, meta);
                }
                let meta = &files[n];
                if meta.ino() != m.inode {
                    special.push(format!("{n} (mapped, replaced on disk)"));
                    continue;
                }
                VmaKind::File {
                    path: n.into(),
                    size: meta.size(),
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                }
            }
            n => {
                special.push(format!("{n} (mapped)"));
                continue;
            }
        };
        let offset = if matches!(kind, VmaKind::File { .. }) {
            m.offset
        } else {
            0
        };
        out.push(Vma {
            start: m.start,
            end: m.end,
            prot: m.prot,
            shared: m.shared,
            offset,
            kind,
        });
    }
    if !special.is_empty() {
        obstacles.push(MigrationObstacle::SpecialFiles { kinds: special });
    }
    Ok(out)
}

/// Whether a device can be reopened by path on another node.
fn harmless_device(path: &str) -> bool {
    matches!(path, "/dev/null" | "/dev/zero" | "/dev/console") || path.starts_with("/dev/tty")
}

/// The open descriptors of a process, noting what cannot be reopened.
/// Descriptors 0-2 that are regular files are reopened like the others
/// (path, flags, offset: output redirected to a file continues in it);
/// anything else on 0-2 is stdio, which the restorer's caller provides.
/// Descriptors that share one open file (`dup`, `2>&1`) are found with
/// `kcmp` among those with the same path, and restored as duplicates: one
/// offset. A file deleted while open cannot be reopened by path.
fn fds(
    pid: i32,
    obstacles: &mut Vec<MigrationObstacle>,
) -> Result<Vec<FileDescriptor>, CheckpointError> {
    let mut sockets = 0;
    let mut devices = Vec::new();
    let mut special = Vec::new();
    let mut out = Vec::new();
    for fd in procfs::fd_numbers(pid)? {
        let link_path = std::path::PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
        let target = procfs::read_link(&link_path)?;
        if let Some(path) = deleted_file(&target) {
            obstacles.push(MigrationObstacle::DeletedFile {
                fd,
                path: path.into(),
            });
            continue;
        }
        if fd <= 2 {
            let regular = target.starts_with('/')
                && std::fs::metadata(&link_path)
                    .is_ok_and(|m| m.mode() & libc::S_IFMT == libc::S_IFREG);
            let kind = if regular {
                reopen(pid, fd, target, &out)?
            } else {
                FdKind::Stdio
            };
            out.push(FileDescriptor { fd, kind });
            continue;
        }
        if target.starts_with("socket:") {
            sockets += 1;
            continue;
        }
        if !target.starts_with('/') {
            special.push(format!("{target} on fd {fd}"));
            continue;
        }
        let meta = std::fs::metadata(&link_path).map_err(|source| CheckpointError::MappedFile {
            path: target.clone(),
            source,
        })?;
        let file_type = meta.mode() & libc::S_IFMT;
        let reopenable = match file_type {
            libc::S_IFREG | libc::S_IFDIR => true,
            libc::S_IFCHR if harmless_device(&target) => true,
            libc::S_IFCHR | libc::S_IFBLK => {
                devices.push(target);
                continue;
            }
            _ => false,
        };
        if !reopenable {
            special.push(format!("{target} on fd {fd}"));
            continue;
        }
        let kind = reopen(pid, fd, target, &out)?;
        out.push(FileDescriptor { fd, kind });
    }
    if sockets > 0 {
        obstacles.push(MigrationObstacle::Sockets { count: sockets });
    }
    if !devices.is_empty() {
        obstacles.push(MigrationObstacle::Devices { paths: devices });
    }
    if !special.is_empty() {
        obstacles.push(MigrationObstacle::SpecialFiles { kinds: special });
    }
    Ok(out)
}

/// How descriptor `fd` of `pid`, open on `path`, is restored: as a
/// duplicate of an earlier descriptor (in `earlier`) of the same open file,
/// else by path with its flags and offset.
fn reopen(
    pid: i32,
    fd: i32,
    path: String,
    earlier: &[FileDescriptor],
) -> Result<FdKind, CheckpointError> {
    let (offset, flags) = procfs::fdinfo(pid, fd)?;
    for e in earlier {
        if matches!(&e.kind, FdKind::Path { path: p, .. } if *p == path)
            && same_file(pid, e.fd, fd)?
        {
            return Ok(FdKind::Dup {
                of: e.fd,
                cloexec: flags & libc::O_CLOEXEC != 0,
            });
        }
    }
    Ok(FdKind::Path {
        path,
        flags,
        offset,
    })
}

/// `kcmp` type: whether two descriptors refer to one open file description.
const KCMP_FILE: libc::c_int = 0;

/// Whether descriptors `a` and `b` of `pid` share one open file.
fn same_file(pid: i32, a: i32, b: i32) -> Result<bool, CheckpointError> {
    // SAFETY: kcmp only compares kernel objects of the given process; it
    // reads and writes no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    if r < 0 {
        return Err(CheckpointError::Kcmp {
            pid,
            fds: (a, b),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(r == 0)
}

/// An injector for a process this thread holds stopped (a deputy): its
/// registers as they are now as the template, a `syscall` instruction of
/// its vdso or code.
pub(crate) fn injector_for(tracee: Tracee) -> Result<Injector, CheckpointError> {
    let pid = tracee.pid.as_raw();
    let vmas = vmas(&procfs::maps(pid)?, &mut Vec::new())?;
    Ok(Injector::new(
        tracee,
        tracee.regs()?,
        syscall_insn(pid, &vmas)?,
    ))
}

/// Finds a `syscall` instruction in the process: in its vdso (one read),
/// else in its executable mappings.
fn syscall_insn(pid: i32, vmas: &[Vma]) -> Result<u64, CheckpointError> {
    let executable = vmas
        .iter()
        .filter(|v| v.prot & libc::PROT_EXEC as u8 != 0 && v.prot & PROT_READ != 0);
    let (vdso, code): (Vec<&Vma>, Vec<&Vma>) = executable.partition(|v| v.kind == VmaKind::Vdso);
    const MAX_SCAN: u64 = 1 << 20;
    for vma in vdso.into_iter().chain(code) {
        let mut buf = vec![0u8; (vma.end - vma.start).min(MAX_SCAN) as usize];
        super::inject::read_remote(Pid::from_raw(pid), vma.start, &mut buf)?;
        if let Some(off) = find_syscall_insn(&buf) {
            return Ok(vma.start + off as u64);
        }
    }
    Err(CheckpointError::NoSyscallInsn { pid })
}

/// Maps a fresh scratch area in the process, holding [`BATCH_RUNNER`] at
/// [`SCRATCH_RUNNER`]; returns its address.
fn map_scratch(injector: &Injector) -> Result<u64, CheckpointError> {
    let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let scratch = injector.call(
        || "mmap of a scratch area".into(),
        libc::SYS_mmap,
        &[0, SCRATCH_LEN, prot, flags, u64::MAX, 0],
    )?;
    match injector.poke(scratch + SCRATCH_RUNNER, &BATCH_RUNNER) {
        Ok(()) => Ok(scratch),
        Err(e) => {
            let _ = unmap_scratch(injector, scratch);
            Err(e.into())
        }
    }
}

fn unmap_scratch(injector: &Injector, scratch: u64) -> Result<(), CheckpointError> {
    injector.call(
        || "munmap of the scratch area".into(),
        libc::SYS_munmap,
        &[scratch, SCRATCH_LEN],
    )?;
    Ok(())
}

/// What only injected syscalls tell.
struct Injected {
    /// The kernel's exact break, `brk(0)`.
    brk: u64,
    /// Dispositions of every signal that is not `SIG_DFL`.
    actions: Vec<SigAction>,
    sigaltstack: Option<AltStack>,
    /// As they were when `setitimer` disarmed them.
    itimers: [Itimer; 3],
}

/// Reads signal dispositions, the alternate signal stack and the interval
/// timers (disarming them) into `scratch`, a page of the process.
fn read_injected(
    injector: &Injector,
    scratch: u64,
    status: &Status,
) -> Result<Injected, CheckpointError> {
    let is_set = |mask: u64, sig: u32| mask & (1 << (sig - 1)) != 0;
    let caught: Vec<u32> = (1..=MAX_SIGNAL)
        .filter(|&s| is_set(status.sig_caught, s))
        .collect();
    // One batch: brk(0), each caught signal's action, the alternate stack,
    // the timers (read and disarmed).
    let mut calls = vec![Syscall::new(libc::SYS_brk, &[0])];
    let mut what = vec!["brk(0)".to_owned()];
    for (i, &sig) in caught.iter().enumerate() {
        let old = scratch + SCRATCH_SIGACTIONS + (i * KERNEL_SIGACTION_LEN) as u64;
        calls.push(Syscall::new(libc::SYS_rt_sigaction, &[sig as u64, 0, old, SIGSET_LEN]));
        what.push(format!("rt_sigaction({sig})"));
    }
    calls.push(Syscall::new(libc::SYS_sigaltstack, &[0, scratch + SCRATCH_ALTSTACK]));
    what.push("sigaltstack".into());
    for which in 0..3 {
        let old = scratch + SCRATCH_ITIMERS + which * ITIMERVAL_LEN as u64;
        calls.push(Syscall::new(libc::SYS_setitimer, &[which, scratch + SCRATCH_ZERO_ITIMER, old]));
        what.push(format!("setitimer({which}) to read and disarm it"));
    }
    let results = injector.batch_checked(scratch + SCRATCH_RUNNER, scratch + SCRATCH_TABLE, &calls, &what)?;
    let brk = results[0];
    let mut buf = vec![0u8; SCRATCH_USED];
    injector.peek(scratch, &mut buf)?;
    let word = |at: u64| {
        let at = at as usize;
        u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
    };

    let mut actions: Vec<SigAction> = (1..=MAX_SIGNAL)
        .filter(|&s| is_set(status.sig_ignored, s))
        .map(|signo| SigAction {
            signo,
            handler: SIG_IGN,
            flags: 0,
            restorer: 0,
            mask: 0,
        })
        .collect();
    for (i, &signo) in caught.iter().enumerate() {
        let at = SCRATCH_SIGACTIONS + (i * KERNEL_SIGACTION_LEN) as u64;
        actions.push(SigAction {
            signo,
            handler: word(at),
            flags: word(at + 8),
            restorer: word(at + 16),
            mask: word(at + 24),
        });
    }
    actions.sort_by_key(|a| a.signo);

    let ss_flags = word(SCRATCH_ALTSTACK + 8) as u32;
    let sigaltstack = (ss_flags & libc::SS_DISABLE as u32 == 0).then(|| AltStack {
        sp: word(SCRATCH_ALTSTACK),
        size: word(SCRATCH_ALTSTACK + 16),
        autodisarm: ss_flags & SS_AUTODISARM != 0,
    });

    let timeval_us = |at: u64| word(at) * 1_000_000 + word(at + 8);
    let itimers = [0, 1, 2].map(|which| {
        let at = SCRATCH_ITIMERS + which * ITIMERVAL_LEN as u64;
        let interval_us = timeval_us(at);
        let mut value_us = timeval_us(at + 16);
        // A periodic ITIMER_REAL that expired reads 0 until its SIGALRM
        // (pending, and captured) is dequeued: the kernel restarts it only
        // then, and `setitimer` with a zero value would leave it stopped
        // for good. It is kept due one period later instead.
        if which == libc::ITIMER_REAL as u64 && value_us == 0 {
            value_us = interval_us;
        }
        Itimer {
            interval_us,
            value_us,
        }
    });
    Ok(Injected {
        brk,
        actions,
        sigaltstack,
        itimers,
    })
}

/// Sets the interval timers that [`Itimer::is_set`] says, their
/// `itimerval`s written at `at` in the process (`3 * ITIMERVAL_LEN` bytes).
pub(super) fn set_itimers(
    injector: &Injector,
    at: u64,
    itimers: &[Itimer; 3],
) -> Result<(), InjectError> {
    if !itimers.iter().any(Itimer::is_set) {
        return Ok(());
    }
    let mut vals = Vec::with_capacity(3 * ITIMERVAL_LEN);
    for t in itimers {
        for us in [t.interval_us, t.value_us] {
            vals.extend_from_slice(&(us / 1_000_000).to_ne_bytes());
            vals.extend_from_slice(&(us % 1_000_000).to_ne_bytes());
        }
    }
    injector.poke(at, &vals)?;
    for (which, t) in itimers.iter().enumerate() {
        if t.is_set() {
            let new = at + (which * ITIMERVAL_LEN) as u64;
            injector.call(
                || format!("setitimer({which})"),
                libc::SYS_setitimer,
                &[which as u64, new, 0],
            )?;
        }
    }
    Ok(())
}
