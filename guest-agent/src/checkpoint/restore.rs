//! Restore: rebuild a process from an image in a child built for it.
//!
//! [`start_restore_child`] starts the restore stub (a program of a few
//! instructions, see [`super::stub`]) with the restored process's stdio; it
//! asks to be traced and stops. [`prepare_restore`] builds the process in
//! it (a migration target starts it while the pages still arrive, and may
//! map and populate the process's private anonymous memory in it ahead of
//! the image with [`pre_layout`]: the restore keeps the image's VMAs that
//! lie there as they are, with their pages). From then on the child only
//! runs injected syscalls: a small scratch area holding `syscall; int3` is
//! mapped at an address the image does not use, the umask and name are
//! set, everything else of its address space is unmapped, the vdso/vvar
//! are moved to the image's addresses if they differ, the image's VMAs are
//! recreated and the pages that will receive contents are populated (but
//! for those laid out ahead); their frames are
//! returned. [`finish_restore`] then restores descriptors, cwd, limits,
//! signals, the alternate signal stack, the personality, FPU state, the
//! interval timers (last, so that they start as close as possible to the
//! process), unmaps the scratch area, sets the registers and detaches.
//! Injected syscalls go in batches where they can ([`Batch`]: one stop of
//! the child for many; an injection costs 30-50 ms in the emulated guest
//! kernel of the development hosts).
//!
//! A [`RestoredChild`] that is dropped before [`finish_restore`] succeeded is
//! killed: there is never a half-restored process. The child is traced with
//! `PTRACE_O_EXITKILL`, so it also dies if the agent does.

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc::Receiver;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::ptrace::Options;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use pmivmm_proto::image::{
    FdKind, ImageError, Pages, ProcessImage, Vma, VmaKind, PAGE_SIZE, PROT_WRITE, USER_SPACE_END,
};
use pmivmm_proto::prelayout::{merge_close, PreLayout, PreLayoutError, Span};
use pmivmm_proto::ExitStatus;

use crate::priority;

use super::capture::{set_itimers, KERNEL_SIGACTION_LEN, SIGSET_LEN, SS_AUTODISARM, STACK_T_LEN};
use super::inject::{InjectError, Injector, Syscall, BATCH_ENTRY_LEN, BATCH_RUNNER};
use super::pagemap::{Pagemap, PagemapError};
use super::pagetables::{MmTables, PageTablesError};
use super::procfs::{self, MapsEntry, ProcfsError};
use super::rlimits::{self, RlimitError};
use super::stub;
use super::tracee::{regs_from_image, PtraceError, Tracee};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid image: {0}")]
    Image(#[from] ImageError),
    #[error("mapped file {path}: {reason}")]
    MappedFile { path: String, reason: String },
    #[error("no free address range for the {len}-byte scratch area")]
    NoScratchSpace { len: u64 },
    #[error("cannot start the restore child: {0}")]
    Start(Errno),
    #[error("cannot set the nice value: {0}")]
    Nice(Errno),
    #[error("the restore child did not stop for the agent: {0}")]
    ChildStart(&'static str),
    #[error("the restore child's scratch area went to {got:#x}, not {wanted:#x}")]
    Scratch { wanted: u64, got: u64 },
    #[error("{what}: {len} bytes of data do not fit in the restore's scratch area")]
    BatchData { what: String, len: usize },
    #[error("{path} was opened as fd {got}, not {wanted}")]
    FdNumber { path: String, wanted: u64, got: u64 },
    #[error("vdso: {0}")]
    Vdso(String),
    #[error("setting resource limit {resource}: {errno}")]
    Rlimit { resource: u32, errno: Errno },
    #[error(transparent)]
    ReadRlimit(#[from] RlimitError),
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    #[error(transparent)]
    PageTables(#[from] PageTablesError),
    #[error("invalid layout: {0}")]
    PreLayout(#[from] PreLayoutError),
    #[error("the restore child was laid out already")]
    LaidOut,
    #[error("a region laid out ahead went to {got:#x}, not {wanted:#x}")]
    LaidOutElsewhere { wanted: u64, got: u64 },
}

/// Scratch area: page 0 holds the code, the rest is data for injected
/// syscalls (paths, structures; a batch's table, then its data).
const SCRATCH_LEN: u64 = 16 * PAGE_SIZE;
const SCRATCH_CODE: [u8; 3] = [0x0f, 0x05, 0xcc]; // syscall; int3
/// Where [`BATCH_RUNNER`] lies in the scratch area.
const RUNNER_OFFSET: u64 = 16;
/// Calls in one batch table, at the start of the data pages ...
const BATCH_CALLS: usize = 256;
/// ... followed by the batch's data.
const BATCH_DATA_LEN: usize = (SCRATCH_LEN - PAGE_SIZE) as usize - BATCH_CALLS * BATCH_ENTRY_LEN;
/// Lowest address the scratch area may use (above any `mmap_min_addr`).
const SCRATCH_MIN: u64 = 1 << 20;


/// A child being restored, stopped under ptrace. Killed when dropped unless
/// [`finish_restore`] let it run.
pub struct RestoredChild {
    tracee: Tracee,
    injector: Injector,
    /// The stub's mappings, read when it started (before the scratch area
    /// was mapped): they do not change while it waits for an image.
    stub_maps: Vec<MapsEntry>,
    /// The resource limits it inherited from the agent, read when it
    /// started: `(resource, soft, hard)`.
    inherited_limits: Vec<(u32, u64, u64)>,
    scratch: u64,
    /// Regions [`pre_layout`] mapped, and the ranges it populated in them.
    prelaid: Vec<Span>,
    populated: Vec<Span>,
    widened: Widened,
    running: bool,
    /// Its exit status, from the agent's reaper (when it runs).
    exit: Option<Receiver<ExitStatus>>,
}

impl RestoredChild {
    pub fn pid(&self) -> i32 {
        self.tracee.pid.as_raw()
    }

    /// Where its exit status will arrive, if the agent's reaper runs: it
    /// was registered with the fork, before the child could exit.
    pub fn take_exit_status(&mut self) -> Option<Receiver<ExitStatus>> {
        self.exit.take()
    }

    fn data(&self) -> u64 {
        self.scratch + PAGE_SIZE
    }

    /// Maps the scratch area at `scratch` with its code, and injects from
    /// there on.
    fn map_scratch(&mut self, scratch: u64) -> Result<(), RestoreError> {
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let got = self.injector.call(
            || "mmap of the scratch area".into(),
            libc::SYS_mmap,
            &[scratch, SCRATCH_LEN, prot, flags, u64::MAX, 0],
        )?;
        if got != scratch {
            return Err(RestoreError::Scratch { wanted: scratch, got });
        }
        self.injector.poke(scratch, &SCRATCH_CODE)?;
        self.injector.poke(scratch + RUNNER_OFFSET, &BATCH_RUNNER)?;
        self.injector = self.injector.moved_to(scratch);
        self.scratch = scratch;
        Ok(())
    }
}

/// Syscalls injected into a [`RestoredChild`] together, in order, with one
/// stop of the child per [`BATCH_CALLS`] (see [`Injector::batch`]). A call's
/// data (paths, structures) is copied into the scratch area with it. The
/// first call that fails ends the batch with an error naming it.
struct Batch<'c> {
    child: &'c RestoredChild,
    calls: Vec<Syscall>,
    what: Vec<String>,
    data: Vec<u8>,
    results: Vec<u64>,
}

impl<'c> Batch<'c> {
    fn new(child: &'c RestoredChild) -> Self {
        Batch { child, calls: Vec::new(), what: Vec::new(), data: Vec::new(), results: Vec::new() }
    }

    fn table(&self) -> u64 {
        self.child.data()
    }

    /// Adds syscall `nr`; `what` names it in an error. Returns the call's
    /// place in the results of [`Self::run`].
    fn push(&mut self, what: String, nr: i64, args: &[u64]) -> Result<usize, RestoreError> {
        if self.calls.len() == BATCH_CALLS {
            self.flush()?;
        }
        self.calls.push(Syscall::new(nr, args));
        self.what.push(what);
        Ok(self.results.len() + self.calls.len() - 1)
    }

    /// Adds syscall `nr` whose argument `data_arg` points at a copy of
    /// `data` in the scratch area (`args[data_arg]` is replaced).
    fn push_with_data(
        &mut self,
        what: String,
        nr: i64,
        args: &[u64],
        data_arg: usize,
        data: &[u8],
    ) -> Result<usize, RestoreError> {
        // Aligned for structures.
        let at = self.data.len().next_multiple_of(8);
        if at + data.len() > BATCH_DATA_LEN || self.calls.len() == BATCH_CALLS {
            self.flush()?;
            if data.len() > BATCH_DATA_LEN {
                return Err(RestoreError::BatchData { what, len: data.len() });
            }
        }
        let at = self.data.len().next_multiple_of(8);
        self.data.resize(at, 0);
        self.data.extend_from_slice(data);
        let mut args = args.to_vec();
        args[data_arg] = self.table() + (BATCH_CALLS * BATCH_ENTRY_LEN + at) as u64;
        self.push(what, nr, &args)
    }

    /// Adds syscall `nr` whose first argument is `path`.
    fn push_with_path(&mut self, what: &str, nr: i64, path: &str, args: &[u64]) -> Result<usize, RestoreError> {
        let mut bytes = path.as_bytes().to_vec();
        bytes.push(0);
        let mut all = vec![0];
        all.extend_from_slice(args);
        self.push_with_data(format!("{what} {path}"), nr, &all, 0, &bytes)
    }

    fn flush(&mut self) -> Result<(), RestoreError> {
        let injector = &self.child.injector;
        if !self.data.is_empty() {
            injector.poke(self.table() + (BATCH_CALLS * BATCH_ENTRY_LEN) as u64, &self.data)?;
        }
        let runner = self.child.scratch + RUNNER_OFFSET;
        let results = injector.batch_checked(runner, self.table(), &self.calls, &self.what)?;
        self.results.extend(results);
        self.calls.clear();
        self.what.clear();
        self.data.clear();
        Ok(())
    }

    /// Runs what is left; returns the results of all calls, in order.
    fn run(mut self) -> Result<Vec<u64>, RestoreError> {
        self.flush()?;
        Ok(self.results)
    }
}

impl Drop for RestoredChild {
    fn drop(&mut self) {
        if !self.running {
            self.tracee.kill();
        }
    }
}

/// Maps the regions of `layout` in `child` (private, anonymous, read-write)
/// and populates its ranges, ahead of the image: [`prepare_restore`] keeps
/// the image's private anonymous VMAs that lie in them as they are (a
/// migration target does this while the process still runs at its
/// source). Regions that would cover the child's own mappings are left out,
/// with what they would populate. On an error they are unmapped again
/// (best effort: the restore unmaps everything it does not keep anyway)
/// and nothing counts as laid out.
pub fn pre_layout(child: &mut RestoredChild, layout: &PreLayout) -> Result<(), RestoreError> {
    layout.validate(u64::MAX)?;
    if !child.prelaid.is_empty() {
        return Err(RestoreError::LaidOut);
    }
    let mut own: Vec<Span> = stub_ranges(&child.stub_maps).collect();
    own.push((child.scratch, child.scratch + SCRATCH_LEN));
    let regions: Vec<Span> = layout
        .regions
        .iter()
        .copied()
        .filter(|&r| !own.iter().any(|&o| overlap(r, o)))
        .collect();
    let populate = match populate_write_supported() {
        true => intersect(&layout.populate, &regions),
        // Faulting pages in by writes costs a stop per page: the restore
        // does it for the pages it needs.
        false => Vec::new(),
    };
    let mut batch = Batch::new(child);
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let mut mmaps = Vec::with_capacity(regions.len());
    for &(start, end) in &regions {
        let what = format!("mmap of {start:#x}-{end:#x} (laid out ahead)");
        mmaps.push((batch.push(what, libc::SYS_mmap, &[start, end - start, prot, flags, u64::MAX, 0])?, start));
    }
    for &(start, end) in &populate {
        let what = format!("MADV_POPULATE_WRITE of {start:#x}-{end:#x} (laid out ahead)");
        batch.push(what, libc::SYS_madvise, &[start, end - start, libc::MADV_POPULATE_WRITE as u64])?;
    }
    // A kernel before 4.17 takes MAP_FIXED_NOREPLACE for a hint.
    let placed = batch.run().and_then(|results| {
        match mmaps.iter().find(|&&(call, start)| results[call] != start) {
            Some(&(call, wanted)) => Err(RestoreError::LaidOutElsewhere { wanted, got: results[call] }),
            None => Ok(()),
        }
    });
    if let Err(e) = placed {
        let mut batch = Batch::new(child);
        for &(start, end) in &regions {
            let what = format!("munmap of {start:#x}-{end:#x} (laid out ahead)");
            batch.push(what, libc::SYS_munmap, &[start, end - start])?;
        }
        let _ = batch.run();
        return Err(e);
    }
    child.prelaid = regions;
    child.populated = populate;
    Ok(())
}

/// Gives `child` ([`start_restore_child`]) the image's memory layout.
/// Returns the child and, in the order of [`ProcessImage::pages`], the
/// frame of every page that must receive saved contents (`page_walk`: as a
/// walk for the VMM, where the kernel allows).
pub fn prepare_restore(
    image: &ProcessImage,
    mut child: RestoredChild,
    page_walk: bool,
) -> Result<(RestoredChild, Pages), RestoreError> {
    image.validate()?;
    check_mapped_files(image)?;
    let maps = std::mem::take(&mut child.stub_maps);
    let vdso: Vec<&MapsEntry> = maps.iter().filter(|m| m.is_vdso_family()).collect();
    let mut occupied: Vec<(u64, u64)> = image.vmas.iter().map(|v| (v.start, v.end)).collect();
    let started_with = (child.scratch, child.scratch + SCRATCH_LEN);
    if occupied.iter().any(|&vma| overlap(vma, started_with)) {
        // The process needs the place of the scratch area mapped at the
        // start: a new one, elsewhere. The munmaps below remove the old one.
        occupied.extend(stub_ranges(&maps));
        occupied.extend(child.prelaid.iter().copied());
        occupied.push(started_with);
        child.map_scratch(find_scratch(&mut occupied)?)?;
    }
    let mut batch = Batch::new(&child);
    batch.push("umask".into(), libc::SYS_umask, &[image.umask as u64])?;
    let mut comm = image.comm.as_bytes().to_vec();
    comm.push(0);
    batch.push_with_data("prctl(PR_SET_NAME)".into(), libc::SYS_prctl, &[libc::PR_SET_NAME as u64, 0], 1, &comm)?;

    // The image's private anonymous memory stays where it was laid out
    // ahead, with the pages populated there. Everything else but the
    // scratch area and the vdso goes.
    let kept: Vec<Span> = image
        .vmas
        .iter()
        .filter(|vma| laid_out(vma, &child.prelaid))
        .map(|vma| (vma.start, vma.end))
        .collect();
    let mut keep: Vec<(u64, u64)> = vdso.iter().map(|m| (m.start, m.end)).collect();
    keep.push((child.scratch, child.scratch + SCRATCH_LEN));
    keep.extend(&kept);
    keep.sort_unstable();
    let mut from = 0;
    for (start, end) in keep
        .iter()
        .copied()
        .chain([(USER_SPACE_END, USER_SPACE_END)])
    {
        if start > from {
            batch.push(format!("munmap {from:#x}-{start:#x}"), libc::SYS_munmap, &[from, start - from])?;
        }
        from = end;
    }
    // The layout in the same batch (one stop of the child instead of one per
    // step; each stop costs tens of ms where guest kernel code is emulated).
    place_vdso(&mut batch, image, &vdso)?;
    let (mut opened, widened) = map_vmas(&mut batch, image, &kept)?;
    opened.push(set_mm(&mut batch, image)?);
    let populate_in_batch = populate_write_supported();
    if populate_in_batch {
        push_populate(&mut batch, image, &intersect(&child.populated, &kept))?;
    }
    let results = batch.run()?;
    check_fd_numbers(&results, &opened)?;
    child.widened = widened;
    if !populate_in_batch {
        populate_by_writes(&child, image)?;
    }

    let pages = match MmTables::read(child.pid(), page_walk)? {
        Some(tables) => Pages {
            listed: Vec::new(),
            walk: Some(tables.walk_runs(&image.pages)),
        },
        None => {
            let mut frames = Vec::with_capacity(image.page_count() as usize);
            Pagemap::open(child.pid())?.frames(&image.pages, &mut frames)?;
            Pages {
                listed: frames,
                walk: None,
            }
        }
    };
    Ok((child, pages))
}

/// Restores the rest of the process (its memory holds the saved pages by
/// now) and lets it run. Returns its PID.
pub fn finish_restore(mut child: RestoredChild, image: &ProcessImage) -> Result<i32, RestoreError> {
    let mut batch = Batch::new(&child);
    let opened = restore_fds(&mut batch, image)?;
    batch.push_with_path("chdir", libc::SYS_chdir, &image.cwd, &[])?;
    restore_signals(&mut batch, image)?;
    restore_altstack(&mut batch, image)?;
    // SAFETY: personality(0xffffffff) only reads the agent's persona, which
    // the child inherited.
    let inherited = unsafe { libc::personality(0xffff_ffff) } as u32;
    if image.personality != inherited {
        let what = format!("personality({:#x})", image.personality);
        batch.push(what, libc::SYS_personality, &[image.personality as u64])?;
    }
    if let Some(r) = &image.rseq {
        let args = [r.pointer, r.size as u64, 0, r.signature as u64];
        batch.push("rseq registration".into(), libc::SYS_rseq, &args)?;
    }
    for &(start, end, prot) in &child.widened {
        batch.push(format!("mprotect {start:#x}-{end:#x}"), libc::SYS_mprotect, &[start, end - start, prot as u64])?;
    }
    let results = batch.run()?;
    check_fd_numbers(&results, &opened)?;
    // The child inherited the agent's limits: set only those that differ.
    for r in &image.rlimits {
        if child.inherited_limits.contains(&(r.resource, r.soft, r.hard)) {
            continue;
        }
        let limit = libc::rlimit64 {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: prlimit64 reads one valid rlimit64 and writes nothing.
        let rc =
            unsafe { libc::prlimit64(child.pid(), r.resource as _, &limit, std::ptr::null_mut()) };
        Errno::result(rc).map_err(|errno| RestoreError::Rlimit {
            resource: r.resource,
            errno,
        })?;
    }
    child.tracee.set_fpu(&image.fpu)?;
    set_itimers(&child.injector, child.data(), &image.itimers)?;
    let scratch = child.scratch;
    child.injector.call(
        || "munmap of the scratch area".into(),
        libc::SYS_munmap,
        &[scratch, SCRATCH_LEN],
    )?;
    child.tracee.set_sigmask(image.signals.blocked)?;
    child.tracee.set_regs(&regs_from_image(&image.regs))?;
    // Built at the agent's priority, it runs at its own.
    priority::set_nice(child.pid(), image.nice).map_err(RestoreError::Nice)?;
    child.tracee.detach()?;
    child.running = true;
    Ok(child.pid())
}

/// The files the image maps must be the ones it mapped on the source.
fn check_mapped_files(image: &ProcessImage) -> Result<(), RestoreError> {
    for vma in &image.vmas {
        if let VmaKind::File {
            path,
            size,
            mtime_ns,
        } = &vma.kind
        {
            let bad = |reason: String| RestoreError::MappedFile {
                path: path.clone(),
                reason,
            };
            let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
            let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            if meta.size() != *size || mtime != *mtime_ns {
                return Err(bad(format!(
                    "size/mtime {}/{mtime} differ from the image's {size}/{mtime_ns}",
                    meta.size()
                )));
            }
        }
    }
    Ok(())
}

/// The ranges of `maps` in user space (not the vsyscall page).
fn stub_ranges(maps: &[MapsEntry]) -> impl Iterator<Item = (u64, u64)> + '_ {
    maps.iter()
        .filter(|m| m.end <= USER_SPACE_END)
        .map(|m| (m.start, m.end))
}

/// Whether `vma` is private anonymous memory inside a region [`pre_layout`]
/// mapped (`prelaid`), which the restore keeps. The main stack is mapped
/// again: it grows down.
fn laid_out(vma: &Vma, prelaid: &[Span]) -> bool {
    !vma.shared
        && matches!(vma.kind, VmaKind::Anonymous | VmaKind::Heap)
        && prelaid.iter().any(|&(start, end)| start <= vma.start && vma.end <= end)
}

fn overlap(a: Span, b: Span) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// The parts of `a` that lie in `b` (both sorted, not overlapping).
fn intersect(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        let (start, end) = (x.0.max(y.0), x.1.min(y.1));
        if start < end {
            out.push((start, end));
        }
        if x.1 < y.1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The parts of `a` outside `b` (both sorted, not overlapping).
fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    for &(mut start, end) in a {
        let mut j = b.partition_point(|r| r.1 <= start);
        while start < end {
            match b.get(j) {
                Some(&(taken_start, taken_end)) if taken_start < end => {
                    if taken_start > start {
                        out.push((start, taken_start));
                    }
                    start = start.max(taken_end);
                    j += 1;
                }
                _ => {
                    out.push((start, end));
                    break;
                }
            }
        }
    }
    out
}

/// A place for the scratch area clear of the `occupied` ranges.
fn find_scratch(occupied: &mut [(u64, u64)]) -> Result<u64, RestoreError> {
    find_free(occupied, SCRATCH_LEN).ok_or(RestoreError::NoScratchSpace { len: SCRATCH_LEN })
}

/// The lowest page-aligned address at or above [`SCRATCH_MIN`] where `len`
/// bytes fit between the `occupied` ranges (which get sorted).
fn find_free(occupied: &mut [(u64, u64)], len: u64) -> Option<u64> {
    occupied.sort_unstable();
    let mut candidate = SCRATCH_MIN;
    for &(start, end) in occupied.iter() {
        if start >= candidate + len {
            break;
        }
        candidate = candidate.max(end.div_ceil(PAGE_SIZE) * PAGE_SIZE);
    }
    (candidate + len <= USER_SPACE_END).then_some(candidate)
}

/// Starts the child a restore builds the process in: the restore stub,
/// waited for until it stopped itself under the tracing of this thread,
/// `stdio` its fds 0-2 (dropping it kills it).
pub fn start_restore_child(stdio: [BorrowedFd<'_>; 3]) -> Result<RestoredChild, RestoreError> {
    let spawn = || stub::spawn(stdio).map_err(RestoreError::Start);
    // With the agent's reaper running, the child is registered as traced
    // before the reaper can see its first stop (see crate::reaper).
    let (pid, exit) = match crate::reaper::running() {
        Some(reaper) => reaper.spawn_traced(spawn).map(|(pid, exit)| (pid, Some(exit)))?,
        None => (spawn()?, None),
    };
    let tracee = Tracee { pid: Pid::from_raw(pid) };
    let injector = |regs| Injector::new(tracee, regs, stub::syscall_insn());
    let mut child = RestoredChild {
        tracee,
        injector: injector(regs_from_image(&Default::default())),
        stub_maps: Vec::new(),
        inherited_limits: Vec::new(),
        scratch: 0,
        prelaid: Vec::new(),
        populated: Vec::new(),
        widened: Vec::new(),
        running: false,
        exit,
    };
    match tracee.wait() {
        Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
        Ok(status) | Err(PtraceError::Gone { status, .. }) => {
            return Err(RestoreError::ChildStart(match status {
                WaitStatus::Exited(_, stub::EXIT_TRACEME_FAILED) => "PTRACE_TRACEME failed",
                WaitStatus::Exited(_, stub::EXIT_RESUMED) => "it was resumed from its stop",
                _ => "it ended before its stop",
            }))
        }
        Err(e) => return Err(e.into()),
    }
    tracee.set_options(Options::PTRACE_O_TRACESYSGOOD | Options::PTRACE_O_EXITKILL)?;
    child.injector = injector(tracee.regs()?);
    // What does not depend on the image is done now, before a migrating
    // process is frozen: reading the stub's mappings and limits and mapping
    // the scratch area (at the lowest free place, which processes rarely
    // use; moved by the restore if the image needs it).
    child.stub_maps = procfs::maps(pid)?;
    child.inherited_limits = rlimits::of(pid)?;
    let scratch = find_scratch(&mut stub_ranges(&child.stub_maps).collect::<Vec<_>>())?;
    child.map_scratch(scratch)?;
    Ok(child)
}

/// Names and ranges of the vdso and its vvar pages, by address.
fn vdso_family<'a>(entries: impl Iterator<Item = (&'a str, u64, u64)>) -> Vec<(&'a str, u64, u64)> {
    let mut out: Vec<_> = entries.collect();
    out.sort_by_key(|e| e.1);
    out
}

/// Moves the child's vdso and vvar to the image's addresses (they match
/// when both nodes boot with `norandmaps`), or drops them if the image has
/// none. The layouts must be the same kernel's.
fn place_vdso(batch: &mut Batch, image: &ProcessImage, own: &[&MapsEntry]) -> Result<(), RestoreError> {
    let own = vdso_family(own.iter().map(|m| (m.name.as_str(), m.start, m.end)));
    let wanted = vdso_family(image.vmas.iter().filter_map(|v| match &v.kind {
        VmaKind::Vdso => Some(("[vdso]", v.start, v.end)),
        VmaKind::Vvar { name } => Some((name.as_str(), v.start, v.end)),
        _ => None,
    }));
    if wanted.is_empty() {
        for &(name, start, end) in &own {
            batch.push(format!("munmap of {name}"), libc::SYS_munmap, &[start, end - start])?;
        }
        return Ok(());
    }
    let (Some(own_vdso), Some(wanted_vdso)) = (
        own.iter().find(|e| e.0 == "[vdso]"),
        wanted.iter().find(|e| e.0 == "[vdso]"),
    ) else {
        return Err(RestoreError::Vdso(
            "the image or this node has vvar pages but no vdso".into(),
        ));
    };
    let delta = wanted_vdso.1.wrapping_sub(own_vdso.1);
    let same_layout = own.len() == wanted.len()
        && own
            .iter()
            .zip(&wanted)
            .all(|(o, w)| o.0 == w.0 && o.2 - o.1 == w.2 - w.1 && o.1.wrapping_add(delta) == w.1);
    if !same_layout {
        return Err(RestoreError::Vdso(format!(
            "layout {wanted:x?} differs from this kernel's {own:x?}"
        )));
    }
    if delta == 0 {
        return Ok(());
    }
    if wanted
        .iter()
        .any(|w| own.iter().any(|o| w.1 < o.2 && o.1 < w.2))
    {
        return Err(RestoreError::Vdso(format!(
            "moving {own:x?} to {wanted:x?} would overlap"
        )));
    }
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    for (o, w) in own.iter().zip(&wanted) {
        let len = o.2 - o.1;
        let what = format!("mremap of {} to {:#x}", o.0, w.1);
        batch.push(what, libc::SYS_mremap, &[o.1, len, len, flags, w.1])?;
    }
    Ok(())
}

/// Whether saved pages go into `vma` (they are written after mapping, so a
/// read-only VMA is mapped writable until `finish_restore`).
fn receives_pages(image: &ProcessImage, vma: &Vma) -> bool {
    let i = image.pages.partition_point(|r| r.end() <= vma.start);
    image.pages.get(i).is_some_and(|r| r.start < vma.end)
}

/// VMAs mapped writable to receive contents: (start, end, real prot).
type Widened = Vec<(u64, u64, u8)>;

/// An open in a batch: its call, the number it must return (the child has
/// no descriptor above 2 while its layout is built, so each open returns
/// the lowest free number, known in advance) and the path.
type PredictedOpen<'i> = (usize, u64, &'i str);

/// The first descriptor the child's opens return.
const FIRST_FREE_FD: u64 = 3;

/// Adds the mmaps of the image's VMAs to `batch`, with the opens of their
/// files (the mmaps use the numbers the opens will return) and the closes;
/// the `kept` VMAs, mapped read-write by [`pre_layout`], only get their
/// protection. Returns the opens, to check once the batch ran, and the VMAs
/// mapped writable to receive pages (`RestoredChild::widened`).
fn map_vmas<'i>(
    batch: &mut Batch,
    image: &'i ProcessImage,
    kept: &[Span],
) -> Result<(Vec<PredictedOpen<'i>>, Widened), RestoreError> {
    // The files first: consecutive VMAs of one file share one open.
    fn file_of(vma: &Vma) -> Option<&str> {
        match &vma.kind {
            VmaKind::File { path, .. } => Some(path.as_str()),
            _ => None,
        }
    }
    let mut files: Vec<&str> = Vec::new();
    let mut previous = None;
    for path in image.vmas.iter().map(file_of) {
        if let Some(path) = path.filter(|&p| previous != Some(p)) {
            files.push(path);
        }
        previous = path;
    }
    let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    let mut opened = Vec::with_capacity(files.len());
    for (path, fd) in files.iter().zip(FIRST_FREE_FD..) {
        opened.push((batch.push_with_path("open", libc::SYS_open, path, &[flags])?, fd, *path));
    }
    let fds: Vec<u64> = opened.iter().map(|&(_, fd, _)| fd).collect();

    let mut widened = Vec::new();
    let mut file = None;
    let mut previous = None;
    for vma in &image.vmas {
        let mut prot = vma.prot;
        if receives_pages(image, vma) && prot & PROT_WRITE == 0 {
            prot |= PROT_WRITE;
            widened.push((vma.start, vma.end, vma.prot));
        }
        let len = vma.end - vma.start;
        if kept.binary_search(&(vma.start, vma.end)).is_ok() {
            if prot != (libc::PROT_READ | libc::PROT_WRITE) as u8 {
                let what = format!("mprotect of {:#x}-{:#x} (laid out ahead)", vma.start, vma.end);
                batch.push(what, libc::SYS_mprotect, &[vma.start, len, prot as u64])?;
            }
            continue;
        }
        let what = format!("mmap of {:#x}-{:#x} ({:?})", vma.start, vma.end, vma.kind);
        let fixed = libc::MAP_FIXED as u64;
        let path = file_of(vma);
        if path.is_some() && path != previous {
            file = Some(file.map_or(0, |f| f + 1));
        }
        previous = path;
        match (&vma.kind, file) {
            (VmaKind::Vdso | VmaKind::Vvar { .. }, _) => {}
            (VmaKind::File { .. }, Some(file)) => {
                let share = if vma.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE } as u64;
                let args = [vma.start, len, prot as u64, share | fixed, fds[file], vma.offset];
                batch.push(what, libc::SYS_mmap, &args)?;
            }
            (kind, _) => {
                let grows = if *kind == VmaKind::Stack { libc::MAP_GROWSDOWN } else { 0 };
                let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | grows) as u64 | fixed;
                batch.push(what, libc::SYS_mmap, &[vma.start, len, prot as u64, flags, u64::MAX, 0])?;
            }
        }
    }
    for (path, fd) in files.iter().zip(&fds) {
        batch.push(format!("close of {path}"), libc::SYS_close, &[*fd])?;
    }
    Ok((opened, widened))
}

/// Each open of a batch returned the number its later calls used.
fn check_fd_numbers(results: &[u64], opened: &[PredictedOpen]) -> Result<(), RestoreError> {
    for &(call, wanted, path) in opened {
        if results[call] != wanted {
            return Err(RestoreError::FdNumber { path: path.to_owned(), wanted, got: results[call] });
        }
    }
    Ok(())
}

/// Whether this kernel has `MADV_POPULATE_WRITE` (Linux 5.14, built with
/// CONFIG_ADVISE_SYSCALLS): probed once on a page of the agent's own (the
/// restore child runs on the same kernel).
fn populate_write_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let len = PAGE_SIZE as usize;
        let mut buf = vec![0u8; 2 * len];
        let page = buf.as_mut_ptr().wrapping_add(buf.as_ptr().align_offset(len));
        // SAFETY: `page` is a page-aligned page inside `buf`, which is ours;
        // MADV_POPULATE_WRITE only faults it in, no byte changes.
        unsafe { libc::madvise(page.cast(), len, libc::MADV_POPULATE_WRITE) == 0 }
    })
}

/// Faults in (writably) every page that will receive contents, but those
/// in the `populated` ranges, with few `MADV_POPULATE_WRITE` calls pushed
/// onto the layout's `batch` (no stop of its own): runs within one VMA
/// separated by small gaps are merged.
fn push_populate(batch: &mut Batch, image: &ProcessImage, populated: &[Span]) -> Result<(), RestoreError> {
    let mut pieces = Vec::new();
    for run in &image.pages {
        let mut start = run.start;
        // A run may cross VMA boundaries: cut it there.
        while start < run.end() {
            let vma = image.vma_at(start).expect("validated: pages lie in VMAs");
            let end = run.end().min(vma.end);
            pieces.push((vma.start, (start, end)));
            start = end;
        }
    }
    for (start, end) in subtract(&merge_close(pieces), populated) {
        let what = format!("MADV_POPULATE_WRITE of {start:#x}-{end:#x}");
        batch.push(what, libc::SYS_madvise, &[start, end - start, libc::MADV_POPULATE_WRITE as u64])?;
    }
    Ok(())
}

/// The fallback of [`push_populate`] on kernels without
/// `MADV_POPULATE_WRITE` (see [`populate_write_supported`]): one byte
/// written through /proc/PID/mem per page (the tracer may write there; a
/// write breaks copy-on-write like a fault would). The byte's value does not
/// matter: every such page is overwritten with its saved contents.
fn populate_by_writes(child: &RestoredChild, image: &ProcessImage) -> Result<(), RestoreError> {
    use std::os::unix::fs::FileExt;
    let pid = child.pid();
    let io_err = |addr: u64, e: std::io::Error| {
        RestoreError::Inject(InjectError::Memory {
            op: "/proc/PID/mem populate",
            pid,
            addr,
            len: 1,
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })
    };
    let mem = std::fs::File::options()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| io_err(0, e))?;
    for run in &image.pages {
        for i in 0..run.count {
            let addr = run.start + i * PAGE_SIZE;
            mem.write_all_at(&[0], addr).map_err(|e| io_err(addr, e))?;
        }
    }
    Ok(())
}

/// `struct prctl_mm_map` (linux/prctl.h).
#[repr(C)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}

const PR_SET_MM_MAP: u64 = 14;

/// Adds to `batch` what sets code/data/brk/stack/args boundaries and the
/// executable: one `prctl(PR_SET_MM, PR_SET_MM_MAP)` (needs
/// CONFIG_CHECKPOINT_RESTORE) between an open of the executable and its
/// close. Comes after the mmaps (the kernel checks the boundaries against
/// the VMAs) and their closes (the open returns the first free number).
/// Returns the open, to check once the batch ran.
fn set_mm<'i>(batch: &mut Batch, image: &'i ProcessImage) -> Result<PredictedOpen<'i>, RestoreError> {
    let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    let exe_fd = FIRST_FREE_FD;
    let open = batch.push_with_path("open", libc::SYS_open, &image.exe, &[flags])?;
    let m = &image.mm;
    let map = PrctlMmMap {
        start_code: m.start_code,
        end_code: m.end_code,
        start_data: m.start_data,
        end_data: m.end_data,
        start_brk: m.start_brk,
        brk: m.brk,
        start_stack: m.start_stack,
        arg_start: m.arg_start,
        arg_end: m.arg_end,
        env_start: m.env_start,
        env_end: m.env_end,
        auxv: 0,
        auxv_size: 0,
        exe_fd: exe_fd as u32,
    };
    // SAFETY: PrctlMmMap is repr(C) plain data without padding (twelve u64
    // and two u32 fields), alive for the whole use of `bytes`.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&map as *const PrctlMmMap).cast::<u8>(),
            std::mem::size_of::<PrctlMmMap>(),
        )
    };
    let args = [libc::PR_SET_MM as u64, PR_SET_MM_MAP, 0, bytes.len() as u64];
    batch.push_with_data("prctl(PR_SET_MM_MAP)".into(), libc::SYS_prctl, &args, 2, bytes)?;
    batch.push("close of the executable".into(), libc::SYS_close, &[exe_fd])?;
    Ok((open, exe_fd, image.exe.as_str()))
}

/// Reopens files by path at their descriptor number and offset, and
/// duplicates the descriptors that shared an open file. The child has no
/// descriptor above 2, so each `open` returns the lowest free number, which
/// is known in advance: a file whose number is not that one is opened there
/// and moved. Returns, for every open, its call in `batch`, the number it
/// must return and the path (checked once the batch ran).
fn restore_fds<'i>(batch: &mut Batch, image: &'i ProcessImage) -> Result<Vec<PredictedOpen<'i>>, RestoreError> {
    let mut used: BTreeSet<u64> = (0..3).collect();
    let lowest_free = |used: &BTreeSet<u64>| (0..).find(|fd| !used.contains(fd)).expect("a free number");
    let mut opened = Vec::new();
    for f in &image.fds {
        let (path, flags, offset) = match &f.kind {
            FdKind::Stdio => continue,
            FdKind::Dup { of, cloexec } => {
                let cloexec = if *cloexec { libc::O_CLOEXEC as u64 } else { 0 };
                let what = format!("dup3 of fd {of} to {}", f.fd);
                batch.push(what, libc::SYS_dup3, &[*of as u64, f.fd as u64, cloexec])?;
                used.insert(f.fd as u64);
                continue;
            }
            FdKind::Path { path, flags, offset } => (path, flags, offset),
        };
        let open_flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY);
        let fd = lowest_free(&used);
        opened.push((batch.push_with_path("open", libc::SYS_open, path, &[open_flags as u64])?, fd, path.as_str()));
        if *offset != 0 {
            batch.push(format!("lseek of {path}"), libc::SYS_lseek, &[fd, *offset, libc::SEEK_SET as u64])?;
        }
        if fd != f.fd as u64 {
            let cloexec = (flags & libc::O_CLOEXEC) as u64;
            batch.push(format!("dup3 of {path} to {}", f.fd), libc::SYS_dup3, &[fd, f.fd as u64, cloexec])?;
            batch.push(format!("close of {path}"), libc::SYS_close, &[fd])?;
        }
        used.insert(f.fd as u64);
    }
    Ok(opened)
}

fn restore_signals(batch: &mut Batch, image: &ProcessImage) -> Result<(), RestoreError> {
    let signals = &image.signals;
    for a in &signals.actions {
        let mut act = Vec::with_capacity(KERNEL_SIGACTION_LEN);
        for word in [a.handler, a.flags, a.restorer, a.mask] {
            act.extend_from_slice(&word.to_ne_bytes());
        }
        let what = format!("rt_sigaction({})", a.signo);
        batch.push_with_data(what, libc::SYS_rt_sigaction, &[a.signo as u64, 0, 0, SIGSET_LEN], 1, &act)?;
    }
    let pid = batch.child.pid() as u64;
    let queues = [(false, &signals.pending_thread), (true, &signals.pending_process)];
    for (shared, info) in queues.into_iter().flat_map(|(shared, q)| q.iter().map(move |i| (shared, i))) {
        let sig = info.signo as u64;
        let what = format!("queueing pending signal {sig}");
        if shared {
            batch.push_with_data(what, libc::SYS_rt_sigqueueinfo, &[pid, sig, 0], 2, &info.raw)?;
        } else {
            batch.push_with_data(what, libc::SYS_rt_tgsigqueueinfo, &[pid, pid, sig, 0], 3, &info.raw)?;
        }
    }
    Ok(())
}

/// Sets the image's alternate signal stack, or none: the child inherited
/// the agent thread's.
fn restore_altstack(batch: &mut Batch, image: &ProcessImage) -> Result<(), RestoreError> {
    let (sp, flags, size) = match image.sigaltstack {
        Some(s) => (s.sp, if s.autodisarm { SS_AUTODISARM } else { 0 }, s.size),
        None => (0, libc::SS_DISABLE as u32, 0),
    };
    let mut stack = Vec::with_capacity(STACK_T_LEN);
    for word in [sp, flags as u64, size] {
        stack.extend_from_slice(&word.to_ne_bytes());
    }
    let what = format!("sigaltstack({sp:#x}, {size} bytes)");
    batch.push_with_data(what, libc::SYS_sigaltstack, &[0, 0], 0, &stack).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_free_scratch_space() {
        let p = PAGE_SIZE;
        assert_eq!(find_free(&mut [], 4 * p), Some(SCRATCH_MIN));
        let mut occ = [
            (SCRATCH_MIN + 2 * p, SCRATCH_MIN + 3 * p),
            (0, SCRATCH_MIN + p),
        ];
        assert_eq!(find_free(&mut occ, 4 * p), Some(SCRATCH_MIN + 3 * p));
        let mut occ = [
            (SCRATCH_MIN, SCRATCH_MIN + p),
            (SCRATCH_MIN + 5 * p, SCRATCH_MIN + 6 * p),
        ];
        assert_eq!(find_free(&mut occ, 4 * p), Some(SCRATCH_MIN + p));
        assert_eq!(find_free(&mut [(0, USER_SPACE_END)], p), None);
    }

    #[test]
    fn span_sets_intersect_and_subtract() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 25), (45, 60)];
        assert_eq!(intersect(&a, &b), [(5, 10), (20, 25), (45, 50)]);
        assert_eq!(intersect(&b, &a), [(5, 10), (20, 25), (45, 50)]);
        assert_eq!(subtract(&a, &b), [(0, 5), (25, 30), (40, 45)]);
        assert_eq!(subtract(&[(0, 100)], &[(10, 20), (30, 40)]), [(0, 10), (20, 30), (40, 100)]);
        assert_eq!(subtract(&[(10, 20)], &[(0, 100)]), []);
        assert_eq!(subtract(&a, &[]), a);
        assert_eq!(intersect(&a, &[]), []);
        assert!(overlap((0, 10), (9, 11)) && !overlap((0, 10), (10, 11)));
    }

    #[test]
    fn only_private_anonymous_memory_inside_a_region_is_kept() {
        use super::super::pagetables::tests::vma;
        let prelaid = [(0x10_0000, 0x20_0000)];
        assert!(laid_out(&vma(0x10_0000, 0x20_0000, VmaKind::Anonymous), &prelaid));
        assert!(laid_out(&vma(0x11_0000, 0x12_0000, VmaKind::Heap), &prelaid));
        assert!(!laid_out(&vma(0x1f_0000, 0x21_0000, VmaKind::Anonymous), &prelaid));
        assert!(!laid_out(&vma(0x11_0000, 0x12_0000, VmaKind::Stack), &prelaid));
        let mut shared = vma(0x11_0000, 0x12_0000, VmaKind::Anonymous);
        shared.shared = true;
        assert!(!laid_out(&shared, &prelaid));
        assert!(!laid_out(&vma(0x11_0000, 0x12_0000, VmaKind::Anonymous), &[]));
    }
}
