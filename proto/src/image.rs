//! The process image: everything the guest agent captures about a frozen
//! process, except the contents of its memory pages, which the VMM copies
//! straight out of guest RAM by frame number (see [`PageRef`]).
//!
//! An image crosses a trust boundary (it comes from a peer node over the
//! network, or from disk): [`ProcessImage::validate`] must accept it before
//! anything acts on it.
//!
//! Memory is described twice, on purpose:
//! * [`ProcessImage::pages`] lists, as sorted runs, the pages whose saved
//!   contents travel with the image (in that order: the page data stream is
//!   the concatenation of these pages);
//! * a `Vec<PageRef>` (not part of the image) maps pages to guest frames on
//!   one node: on the source, where to read every present page; on the
//!   target, where to write each page of the stream.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The version of the image format. Bump on any change to these types.
pub const IMAGE_VERSION: u32 = 4;

/// The page size of the x86_64 guests.
pub const PAGE_SIZE: u64 = 4096;

/// End of the x86_64 user address space with 4-level paging (`TASK_SIZE`).
pub const USER_SPACE_END: u64 = 0x7fff_ffff_f000;

/// Limits that keep a hostile image from making the restorer allocate or loop
/// without bound. They are far above what a migratable process uses.
pub mod limits {
    /// `vm.max_map_count`'s default.
    pub const MAX_VMAS: usize = 65_530;
    pub const MAX_PAGE_RUNS: usize = 1 << 22;
    pub const MAX_FDS: usize = 65_536;
    pub const MAX_FD_NUMBER: i32 = 1 << 20;
    /// `PATH_MAX` including the terminating NUL.
    pub const MAX_PATH: usize = 4096;
    /// Total bytes of argv plus environment (information only).
    pub const MAX_ARGS_BYTES: usize = 1 << 20;
    /// `TASK_COMM_LEN` without the NUL.
    pub const MAX_COMM: usize = 15;
    pub const MAX_XSAVE_AREA: usize = 64 << 10;
    /// Pending signals kept per queue (the kernel's default `RLIMIT_SIGPENDING`
    /// of a small guest is a few thousand).
    pub const MAX_PENDING: usize = 8192;
    /// Interval timer values: their nanoseconds fit the kernel's `ktime_t`
    /// (~292 years; `alarm(UINT_MAX)` fits).
    pub const MAX_ITIMER_US: u64 = i64::MAX as u64 / 1000;
}

/// Size of the legacy FXSAVE area (`NT_PRFPREG`), also the first part of an
/// XSAVE area.
pub const FXSAVE_AREA_LEN: usize = 512;

/// Size of the kernel's `siginfo_t`.
pub const SIGINFO_LEN: usize = 128;

/// Highest signal number on x86_64 Linux (`_NSIG`).
pub const MAX_SIGNAL: u32 = 64;

/// `RLIM_NLIMITS` on Linux.
pub const RLIMIT_COUNT: u32 = 16;

/// The user code and stack selectors of 64-bit x86 Linux processes.
pub const USER_CS: u64 = 0x33;
pub const USER_SS: u64 = 0x2b;

/// A checkpointed process.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcessImage {
    /// Must be [`IMAGE_VERSION`].
    pub version: u32,
    /// PID on the source node (information only).
    pub source_pid: i32,
    /// `comm` (the thread name, at most 15 bytes).
    pub comm: String,
    /// Path of the executable (`/proc/PID/exe`).
    pub exe: String,
    /// Command line and environment at capture time (information only).
    pub argv: Vec<String>,
    pub environ: Vec<String>,
    /// General registers, already adjusted for syscall restart (see
    /// [`InterruptedSyscall`]): restoring them as they are is correct.
    pub regs: Regs,
    pub fpu: FpuState,
    /// The syscall the process was stopped in, if any (information only).
    pub interrupted_syscall: Option<InterruptedSyscall>,
    pub mm: MmLayout,
    /// Sorted, non-overlapping, page-aligned. `[vsyscall]` is never listed.
    pub vmas: Vec<Vma>,
    /// Pages whose contents travel with the image: sorted, non-overlapping,
    /// each inside a VMA that is not `[vdso]`/`[vvar]`.
    pub pages: Vec<PageRun>,
    pub signals: SignalState,
    /// The registered restartable-sequences area (glibc registers one).
    pub rseq: Option<Rseq>,
    /// The interval timers of `setitimer(2)`, indexed by `ITIMER_REAL`,
    /// `ITIMER_VIRTUAL`, `ITIMER_PROF`. Capture disarms them (reading them
    /// at once), so the time the process stays frozen does not count.
    pub itimers: [Itimer; 3],
    /// The alternate signal stack, if one is set.
    pub sigaltstack: Option<AltStack>,
    /// The execution domain and its flags (`personality(2)`).
    pub personality: u32,
    /// The nice value, -20..19 (a restored process gets it back once it
    /// runs: it is built at the agent's priority).
    pub nice: i32,
    /// Sorted by descriptor number.
    pub fds: Vec<FileDescriptor>,
    pub cwd: String,
    pub umask: u32,
    /// One entry per resource the source reported.
    pub rlimits: Vec<Rlimit>,
}

/// `struct user_regs_struct` of x86_64, field for field.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// Which ptrace register set `area` came from.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FpuKind {
    /// `NT_X86_XSTATE`: an XSAVE area (its first 512 bytes are FXSAVE).
    Xsave,
    /// `NT_PRFPREG`: the 512-byte FXSAVE area (x87, MXCSR, XMM0-15), used
    /// when the kernel runs without XSAVE (the guests boot with `noxsave`).
    Fxsave,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FpuState {
    pub kind: FpuKind,
    pub area: Vec<u8>,
}

/// How a syscall the process was stopped in is resumed. Capture rewinds the
/// instruction pointer onto the `syscall` instruction, as the kernel would on
/// the way back to user mode.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptedSyscall {
    /// The syscall number (`orig_rax`).
    pub nr: u64,
    pub restart: SyscallRestart,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallRestart {
    /// `-ERESTARTSYS`, `-ERESTARTNOINTR`, `-ERESTARTNOHAND`: the same syscall
    /// runs again with the same arguments.
    Again,
    /// `-ERESTART_RESTARTBLOCK` (nanosleep, clock_nanosleep, poll...): the
    /// process resumes with `restart_syscall`. A restored process has no
    /// kernel restart block, so there that returns `EINTR` (as under CRIU):
    /// sleeps must loop on `EINTR` (the remaining time was already stored).
    RestartBlock,
}

/// The mm fields `prctl(PR_SET_MM_MAP)` restores.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MmLayout {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// Protection bits, as in `mmap(2)`.
pub const PROT_READ: u8 = 1;
pub const PROT_WRITE: u8 = 2;
pub const PROT_EXEC: u8 = 4;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u8,
    /// `MAP_SHARED` (only read-only file mappings can be shared).
    pub shared: bool,
    /// File offset (0 for anonymous mappings).
    pub offset: u64,
    pub kind: VmaKind,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum VmaKind {
    Anonymous,
    Heap,
    /// The main stack (grows down).
    Stack,
    /// A file mapping; size and modification time let the target check it
    /// maps the same file.
    File {
        path: String,
        size: u64,
        mtime_ns: i64,
    },
    Vdso,
    /// `[vvar]` and its kin (`[vvar_vclock]`): kernel data next to the vdso.
    /// Never copied; moved together with the vdso.
    Vvar {
        name: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub start: u64,
    pub count: u64,
}

impl PageRun {
    pub fn end(&self) -> u64 {
        self.start + self.count * PAGE_SIZE
    }
}

/// One page of a process and the guest frame that holds it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    pub vaddr: u64,
    /// Page frame number: guest-physical address / [`PAGE_SIZE`].
    pub pfn: u64,
    pub kind: PageKind,
    /// The page's soft-dirty bit: written since the last pre-copy round
    /// cleared the bits (every page is dirty when no round ran).
    pub dirty: bool,
}

/// The pages of a process as the agent reports them: pages it read from
/// /proc/PID/pagemap, and address ranges whose pages the VMM finds itself by
/// walking the process's page tables in guest RAM.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Pages {
    pub listed: Vec<PageRef>,
    pub walk: Option<PageWalk>,
}

/// Address ranges whose pages the VMM finds by walking the process's page
/// tables (the guest kernel tells where they are in /proc/PID/pmivmm_mm):
/// one walk by native code instead of pagemap's per-page work in the guest
/// kernel. The process is stopped while the VMM walks. Everything here is
/// untrusted: the VMM checks the ranges and every table and page frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PageWalk {
    /// Guest-physical address of the top-level page table.
    pub root: u64,
    /// Paging levels: 4 or 5.
    pub levels: u8,
    pub mode: WalkMode,
    /// Sorted, not overlapping, page-aligned user addresses.
    pub ranges: Vec<WalkRange>,
}

/// Pages of private anonymous memory, all [`PageKind::Data`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkRange {
    pub start: u64,
    pub end: u64,
    /// The kernel counts the whole VMA as written (VM_SOFTDIRTY: it is new
    /// or changed since the soft-dirty bits were cleared).
    pub soft_dirty: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkMode {
    /// The present pages that [`Select`] asks for.
    Present(Select),
    /// Every page of the ranges must be present: the frames a restore
    /// writes into (all dirty).
    Populated,
}

/// Which present pages are listed, and what their [`PageRef::dirty`] says.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// Every present page, dirty: no pre-copy round cleared the bits.
    AllDirty,
    /// Every present page, with its soft-dirty bit.
    All,
    /// Only the present pages whose soft-dirty bit is set.
    Dirty,
}

/// Sorted page addresses as runs of consecutive pages.
pub fn page_runs(addrs: impl IntoIterator<Item = u64>) -> Vec<PageRun> {
    let mut out: Vec<PageRun> = Vec::new();
    for addr in addrs {
        match out.last_mut() {
            Some(run) if run.end() == addr => run.count += 1,
            _ => out.push(PageRun {
                start: addr,
                count: 1,
            }),
        }
    }
    out
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Contents must travel (anonymous or modified private file page).
    Data,
    /// An unmodified page of a private file mapping: the file provides it.
    CleanFile,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct SignalState {
    /// Blocked signals (bit `n - 1` for signal `n`).
    pub blocked: u64,
    /// Signals whose disposition is not `SIG_DFL`.
    pub actions: Vec<SigAction>,
    /// Pending signals queued to the thread and to the process.
    pub pending_thread: Vec<SigInfo>,
    pub pending_process: Vec<SigInfo>,
}

/// The kernel's `struct sigaction` for `rt_sigaction` on x86_64.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigAction {
    pub signo: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A queued signal: the kernel's 128-byte `siginfo_t`, as `PTRACE_PEEKSIGINFO`
/// returns it and `rt_sigqueueinfo` takes it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SigInfo {
    pub signo: u32,
    pub raw: Vec<u8>,
}

/// An `rseq(2)` registration.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rseq {
    pub pointer: u64,
    pub size: u32,
    pub signature: u32,
}

/// One interval timer, in microseconds: the time to its next expiry (0:
/// disarmed) and the period it is reloaded with (0: one-shot).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Itimer {
    pub value_us: u64,
    pub interval_us: u64,
}

impl Itimer {
    /// Whether `setitimer` must set it (a fresh process has all three zero).
    pub fn is_set(&self) -> bool {
        self.value_us != 0 || self.interval_us != 0
    }
}

/// A `sigaltstack(2)` registration.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub size: u64,
    /// `SS_AUTODISARM`.
    pub autodisarm: bool,
}

/// The `personality(2)` bits a restorer accepts: the persona (`PER_MASK`)
/// and the flags of linux/personality.h (`UNAME26` to `ADDR_LIMIT_3GB`).
pub const PERSONALITY_BITS: u32 = 0x0fff_00ff;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileDescriptor {
    pub fd: i32,
    pub kind: FdKind,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// Descriptors 0-2, whatever they are: the restorer's caller provides them
    /// (the home node's deputy forwards the data).
    Stdio,
    /// A regular file, directory or harmless device, reopened by path.
    Path {
        path: String,
        flags: i32,
        offset: u64,
    },
    /// Another descriptor of the same open file as `of` (an earlier
    /// [`FdKind::Path`] entry): `dup`ed, so the two share one offset and
    /// one set of flags, as they did. `cloexec` is this descriptor's own.
    Dup { of: i32, cloexec: bool },
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Why an image was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("image format version {found}, this node reads version {IMAGE_VERSION}")]
    Version { found: u32 },
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("VMA {start:#x}-{end:#x}: {reason}")]
    BadVma {
        start: u64,
        end: u64,
        reason: &'static str,
    },
    #[error("page run at {start:#x} ({count} pages): {reason}")]
    BadPageRun {
        start: u64,
        count: u64,
        reason: &'static str,
    },
    #[error("bad path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("bad file descriptor {fd}: {reason}")]
    BadFd { fd: i32, reason: &'static str },
    #[error("bad signal state: {0}")]
    BadSignal(&'static str),
    #[error("bad registers: {0}")]
    BadRegs(&'static str),
    #[error("bad FPU state: {0}")]
    BadFpu(&'static str),
    #[error("bad mm layout: {0}")]
    BadMm(&'static str),
    #[error("bad resource limit {resource}: {reason}")]
    BadRlimit { resource: u32, reason: &'static str },
    #[error("bad {0}")]
    BadField(&'static str),
    #[error("cannot decode the image: {0}")]
    Decode(String),
}

impl ProcessImage {
    /// The image in its wire/disk encoding (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing plain data into a Vec cannot fail")
    }

    /// Decodes and validates an image from the wire or disk.
    pub fn from_bytes(bytes: &[u8]) -> Result<ProcessImage, ImageError> {
        let image: ProcessImage =
            postcard::from_bytes(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
        image.validate()?;
        Ok(image)
    }

    /// Checks everything the restorer relies on. An image that passes can be
    /// restored without the restorer writing outside the child it builds.
    pub fn validate(&self) -> Result<(), ImageError> {
        if self.version != IMAGE_VERSION {
            return Err(ImageError::Version {
                found: self.version,
            });
        }
        if self.comm.len() > limits::MAX_COMM || self.comm.contains('\0') {
            return Err(ImageError::BadField("comm"));
        }
        check_path(&self.exe)?;
        check_path(&self.cwd)?;
        let args: usize = self
            .argv
            .iter()
            .chain(&self.environ)
            .map(|s| s.len() + 1)
            .sum();
        if args > limits::MAX_ARGS_BYTES {
            return Err(ImageError::TooMany {
                what: "argument bytes",
                count: args,
                max: limits::MAX_ARGS_BYTES,
            });
        }
        if self.umask > 0o777 {
            return Err(ImageError::BadField("umask"));
        }
        self.validate_regs()?;
        self.validate_fpu()?;
        self.validate_vmas()?;
        self.validate_pages()?;
        self.validate_mm()?;
        self.validate_signals()?;
        if let Some(r) = &self.rseq {
            if r.pointer >= USER_SPACE_END || !(32..=4096).contains(&r.size) {
                return Err(ImageError::BadField("rseq area"));
            }
        }
        let itimer_ok = |t: &Itimer| {
            t.value_us <= limits::MAX_ITIMER_US && t.interval_us <= limits::MAX_ITIMER_US
        };
        if !self.itimers.iter().all(itimer_ok) {
            return Err(ImageError::BadField("interval timer value"));
        }
        if let Some(s) = &self.sigaltstack {
            if s.size == 0 || s.size > USER_SPACE_END || s.sp > USER_SPACE_END - s.size {
                return Err(ImageError::BadField("alternate signal stack"));
            }
        }
        if self.personality & !PERSONALITY_BITS != 0 {
            return Err(ImageError::BadField("personality"));
        }
        if !(-20..=19).contains(&self.nice) {
            return Err(ImageError::BadField("nice value"));
        }
        self.validate_fds()?;
        self.validate_rlimits()
    }

    /// The VMA that contains `addr`, if any.
    pub fn vma_at(&self, addr: u64) -> Option<&Vma> {
        let i = self.vmas.partition_point(|v| v.end <= addr);
        self.vmas.get(i).filter(|v| v.start <= addr)
    }

    /// Number of pages in [`Self::pages`].
    pub fn page_count(&self) -> u64 {
        self.pages.iter().map(|r| r.count).sum()
    }

    fn validate_regs(&self) -> Result<(), ImageError> {
        let r = &self.regs;
        if r.cs != USER_CS || r.ss != USER_SS {
            return Err(ImageError::BadRegs("not a 64-bit user code/stack segment"));
        }
        if r.fs_base >= USER_SPACE_END || r.gs_base >= USER_SPACE_END {
            return Err(ImageError::BadRegs("fs_base/gs_base outside user space"));
        }
        Ok(())
    }

    fn validate_fpu(&self) -> Result<(), ImageError> {
        let len = self.fpu.area.len();
        let ok = match self.fpu.kind {
            FpuKind::Fxsave => len == FXSAVE_AREA_LEN,
            FpuKind::Xsave => (FXSAVE_AREA_LEN + 64..=limits::MAX_XSAVE_AREA).contains(&len),
        };
        if ok {
            Ok(())
        } else {
            Err(ImageError::BadFpu("area size does not match its kind"))
        }
    }

    fn validate_vmas(&self) -> Result<(), ImageError> {
        if self.vmas.len() > limits::MAX_VMAS {
            return Err(ImageError::TooMany {
                what: "VMAs",
                count: self.vmas.len(),
                max: limits::MAX_VMAS,
            });
        }
        let mut prev_end = 0;
        let mut vdsos = 0;
        for v in &self.vmas {
            let bad = |reason| ImageError::BadVma {
                start: v.start,
                end: v.end,
                reason,
            };
            if v.start % PAGE_SIZE != 0 || v.end % PAGE_SIZE != 0 || v.offset % PAGE_SIZE != 0 {
                return Err(bad("not page-aligned"));
            }
            if v.start >= v.end || v.end > USER_SPACE_END {
                return Err(bad("empty or outside user space"));
            }
            if v.start < prev_end {
                return Err(bad("overlaps or is out of order"));
            }
            prev_end = v.end;
            if v.prot & !(PROT_READ | PROT_WRITE | PROT_EXEC) != 0 {
                return Err(bad("unknown protection bits"));
            }
            match &v.kind {
                VmaKind::File { path, .. } => {
                    check_path(path)?;
                    if v.shared && v.prot & PROT_WRITE != 0 {
                        return Err(bad("writable shared file mapping"));
                    }
                    if v.offset.checked_add(v.end - v.start).is_none() {
                        return Err(bad("file offset overflows"));
                    }
                }
                _ if v.shared => return Err(bad("shared anonymous mapping")),
                VmaKind::Vdso => vdsos += 1,
                VmaKind::Vvar { name } if name.len() > 32 => return Err(bad("vvar name too long")),
                _ => {}
            }
        }
        if vdsos > 1 {
            return Err(ImageError::BadField("more than one [vdso]"));
        }
        Ok(())
    }

    fn validate_pages(&self) -> Result<(), ImageError> {
        if self.pages.len() > limits::MAX_PAGE_RUNS {
            return Err(ImageError::TooMany {
                what: "page runs",
                count: self.pages.len(),
                max: limits::MAX_PAGE_RUNS,
            });
        }
        let mut prev_end = 0;
        for run in &self.pages {
            let bad = |reason| ImageError::BadPageRun {
                start: run.start,
                count: run.count,
                reason,
            };
            if run.start % PAGE_SIZE != 0 || run.count == 0 {
                return Err(bad("unaligned or empty"));
            }
            let end = run
                .count
                .checked_mul(PAGE_SIZE)
                .and_then(|len| run.start.checked_add(len))
                .ok_or_else(|| bad("overflows"))?;
            if run.start < prev_end {
                return Err(bad("overlaps or is out of order"));
            }
            prev_end = end;
            // Every page must lie in a VMA that receives contents; a run may
            // span adjacent VMAs.
            let mut addr = run.start;
            while addr < end {
                let vma = self.vma_at(addr).ok_or_else(|| bad("outside every VMA"))?;
                if matches!(vma.kind, VmaKind::Vdso | VmaKind::Vvar { .. }) || vma.shared {
                    return Err(bad("in a VMA that takes no contents"));
                }
                addr = vma.end;
            }
        }
        Ok(())
    }

    fn validate_mm(&self) -> Result<(), ImageError> {
        let m = &self.mm;
        let fields = [
            m.start_code,
            m.end_code,
            m.start_data,
            m.end_data,
            m.start_brk,
            m.brk,
            m.start_stack,
            m.arg_start,
            m.arg_end,
            m.env_start,
            m.env_end,
        ];
        if fields.iter().any(|&a| a >= USER_SPACE_END) {
            return Err(ImageError::BadMm("address outside user space"));
        }
        if m.start_code > m.end_code
            || m.start_data > m.end_data
            || m.start_brk > m.brk
            || m.arg_start > m.arg_end
            || m.env_start > m.env_end
        {
            return Err(ImageError::BadMm("start after end"));
        }
        Ok(())
    }

    fn validate_signals(&self) -> Result<(), ImageError> {
        let s = &self.signals;
        let mut seen = BTreeSet::new();
        for a in &s.actions {
            if !(1..=MAX_SIGNAL).contains(&a.signo) || a.signo == 9 || a.signo == 19 {
                return Err(ImageError::BadSignal(
                    "action for an invalid signal or SIGKILL/SIGSTOP",
                ));
            }
            if !seen.insert(a.signo) {
                return Err(ImageError::BadSignal("two actions for one signal"));
            }
        }
        for queue in [&s.pending_thread, &s.pending_process] {
            if queue.len() > limits::MAX_PENDING {
                return Err(ImageError::TooMany {
                    what: "pending signals",
                    count: queue.len(),
                    max: limits::MAX_PENDING,
                });
            }
            for info in queue {
                if !(1..=MAX_SIGNAL).contains(&info.signo) || info.raw.len() != SIGINFO_LEN {
                    return Err(ImageError::BadSignal("bad pending siginfo"));
                }
                let raw_signo = u32::from_ne_bytes(info.raw[0..4].try_into().expect("4 bytes"));
                if raw_signo != info.signo {
                    return Err(ImageError::BadSignal("siginfo signal number mismatch"));
                }
            }
        }
        Ok(())
    }

    fn validate_fds(&self) -> Result<(), ImageError> {
        if self.fds.len() > limits::MAX_FDS {
            return Err(ImageError::TooMany {
                what: "file descriptors",
                count: self.fds.len(),
                max: limits::MAX_FDS,
            });
        }
        let mut prev = -1;
        let mut reopened = BTreeSet::new();
        for f in &self.fds {
            let bad = |reason| ImageError::BadFd { fd: f.fd, reason };
            if f.fd <= prev || f.fd >= limits::MAX_FD_NUMBER {
                return Err(bad("out of order, repeated or too large"));
            }
            prev = f.fd;
            match &f.kind {
                FdKind::Stdio if f.fd > 2 => return Err(bad("stdio marker above 2")),
                FdKind::Stdio => {}
                FdKind::Path { path, offset, .. } => {
                    check_path(path)?;
                    if *offset > i64::MAX as u64 {
                        return Err(bad("offset too large"));
                    }
                    reopened.insert(f.fd);
                }
                FdKind::Dup { of, .. } if !reopened.contains(of) => {
                    return Err(bad("duplicate of no earlier file opened by path"))
                }
                FdKind::Dup { .. } => {}
            }
        }
        Ok(())
    }

    fn validate_rlimits(&self) -> Result<(), ImageError> {
        let mut seen = BTreeSet::new();
        for r in &self.rlimits {
            let bad = |reason| ImageError::BadRlimit {
                resource: r.resource,
                reason,
            };
            if r.resource >= RLIMIT_COUNT || !seen.insert(r.resource) {
                return Err(bad("unknown or repeated"));
            }
            if r.soft > r.hard {
                return Err(bad("soft limit above hard limit"));
            }
        }
        Ok(())
    }
}

fn check_path(path: &str) -> Result<(), ImageError> {
    let bad = |reason| ImageError::BadPath {
        path: path.chars().take(200).collect(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(bad("not absolute"));
    }
    if path.len() >= limits::MAX_PATH {
        return Err(bad("too long"));
    }
    if path.contains('\0') {
        return Err(bad("contains NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_pages_into_runs() {
        let r = page_runs([0x1000, 0x2000, 0x3000, 0x5000]);
        let run = |start, count| PageRun { start, count };
        assert_eq!(r, vec![run(0x1000, 3), run(0x5000, 1)]);
        assert!(page_runs([]).is_empty());
    }

    fn sample() -> ProcessImage {
        let vma = |start: u64, end: u64, prot, kind| Vma {
            start,
            end,
            prot,
            shared: false,
            offset: 0,
            kind,
        };
        ProcessImage {
            version: IMAGE_VERSION,
            source_pid: 42,
            comm: "counter".into(),
            exe: "/bin/counter".into(),
            argv: vec!["counter".into()],
            environ: vec![],
            regs: Regs {
                cs: USER_CS,
                ss: USER_SS,
                rip: 0x401000,
                ..Regs::default()
            },
            fpu: FpuState {
                kind: FpuKind::Fxsave,
                area: vec![0; FXSAVE_AREA_LEN],
            },
            interrupted_syscall: None,
            mm: MmLayout {
                start_code: 0x400000,
                end_code: 0x401000,
                start_brk: 0x500000,
                brk: 0x501000,
                ..MmLayout::default()
            },
            vmas: vec![
                vma(
                    0x400000,
                    0x402000,
                    PROT_READ | PROT_EXEC,
                    VmaKind::File {
                        path: "/bin/counter".into(),
                        size: 8192,
                        mtime_ns: 0,
                    },
                ),
                vma(0x500000, 0x501000, PROT_READ | PROT_WRITE, VmaKind::Heap),
                vma(0x501000, 0x503000, PROT_READ, VmaKind::Anonymous),
                vma(
                    0x7ffff7fc1000,
                    0x7ffff7fc3000,
                    PROT_READ | PROT_EXEC,
                    VmaKind::Vdso,
                ),
            ],
            pages: vec![PageRun {
                start: 0x500000,
                count: 2,
            }],
            signals: SignalState::default(),
            rseq: None,
            itimers: [
                Itimer {
                    value_us: 15_000,
                    interval_us: 20_000,
                },
                Itimer::default(),
                Itimer::default(),
            ],
            sigaltstack: Some(AltStack {
                sp: 0x500000,
                size: 4096,
                autodisarm: false,
            }),
            personality: 0x0040000,
            nice: 5,
            fds: vec![FileDescriptor {
                fd: 0,
                kind: FdKind::Stdio,
            }],
            cwd: "/".into(),
            umask: 0o022,
            rlimits: vec![Rlimit {
                resource: 7,
                soft: 1024,
                hard: 4096,
            }],
        }
    }

    #[test]
    fn duplicated_descriptors_follow_their_file() {
        let mut image = sample();
        let path = FdKind::Path {
            path: "/share/out".into(),
            // O_WRONLY | O_APPEND
            flags: 0o2001,
            offset: 12,
        };
        let dup = |of| FdKind::Dup { of, cloexec: true };
        for (fd, kind) in [(1, path), (2, dup(1)), (10, dup(1))] {
            image.fds.push(FileDescriptor { fd, kind });
        }
        image.validate().unwrap();
        assert_eq!(ProcessImage::from_bytes(&image.to_bytes()).unwrap(), image);
    }

    #[test]
    fn a_sane_image_passes_and_survives_postcard() {
        let image = sample();
        image.validate().unwrap();
        let bytes = image.to_bytes();
        assert_eq!(ProcessImage::from_bytes(&bytes).unwrap(), image);
        assert!(matches!(
            ProcessImage::from_bytes(&bytes[..bytes.len() / 2]),
            Err(ImageError::Decode(_))
        ));
        let mut bad = image.clone();
        bad.vmas[1].start += 1;
        assert!(matches!(
            ProcessImage::from_bytes(&bad.to_bytes()),
            Err(ImageError::BadVma { .. })
        ));
    }

    #[test]
    fn corrupt_images_are_rejected() {
        type Corruption = (fn(&mut ProcessImage), &'static str);
        let cases: Vec<Corruption> = vec![
            (|i| i.version = 99, "version"),
            (|i| i.vmas[1].start += 1, "not page-aligned"),
            (|i| i.vmas[2].start = 0x500000, "overlaps"),
            (
                |i| i.vmas[0].end = USER_SPACE_END + PAGE_SIZE,
                "outside user space",
            ),
            (|i| i.vmas[2].shared = true, "shared anonymous"),
            (|i| i.pages[0].count = 4, "outside every VMA"),
            (|i| i.pages[0].count = u64::MAX / 2, "overflows"),
            (
                |i| {
                    i.pages.push(PageRun {
                        start: 0x7ffff7fc1000,
                        count: 1,
                    })
                },
                "takes no contents",
            ),
            (
                |i| {
                    i.pages.insert(
                        0,
                        PageRun {
                            start: 0x501000,
                            count: 1,
                        },
                    )
                },
                "out of order",
            ),
            (
                |i| {
                    i.fds.push(FileDescriptor {
                        fd: 5,
                        kind: FdKind::Stdio,
                    })
                },
                "stdio marker",
            ),
            (
                |i| {
                    i.fds.push(FileDescriptor {
                        fd: 0,
                        kind: FdKind::Stdio,
                    })
                },
                "repeated",
            ),
            (
                |i| {
                    i.fds.push(FileDescriptor {
                        fd: 5,
                        kind: FdKind::Dup {
                            of: 0,
                            cloexec: false,
                        },
                    })
                },
                "duplicate of no earlier",
            ),
            (|i| i.cwd = "relative".into(), "not absolute"),
            (|i| i.regs.cs = 0x10, "segment"),
            (
                |i| {
                    i.fpu.area.pop();
                },
                "area size",
            ),
            (|i| i.mm.brk = 0, "start after end"),
            (|i| i.rlimits[0].soft = u64::MAX - 1, "soft limit"),
            (
                |i| {
                    i.signals.actions.push(SigAction {
                        signo: 9,
                        handler: 1,
                        flags: 0,
                        restorer: 0,
                        mask: 0,
                    })
                },
                "SIGKILL",
            ),
            (
                |i| {
                    i.signals.pending_thread.push(SigInfo {
                        signo: 10,
                        raw: vec![0; 12],
                    })
                },
                "siginfo",
            ),
            (
                |i| {
                    i.rseq = Some(Rseq {
                        pointer: USER_SPACE_END,
                        size: 32,
                        signature: 0,
                    })
                },
                "rseq",
            ),
            (
                |i| i.itimers[2].interval_us = u64::MAX,
                "interval timer",
            ),
            (
                |i| {
                    i.sigaltstack = Some(AltStack {
                        sp: USER_SPACE_END - 4096,
                        size: 8192,
                        autodisarm: true,
                    })
                },
                "alternate signal stack",
            ),
            (|i| i.personality = 0xffff_ffff, "personality"),
            (|i| i.nice = -21, "nice value"),
            (|i| i.nice = 20, "nice value"),
        ];
        for (corrupt, expected) in cases {
            let mut image = sample();
            corrupt(&mut image);
            let err = image.validate().expect_err(expected).to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }
}
