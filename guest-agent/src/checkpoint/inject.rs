//! Running syscalls inside a frozen tracee.
//!
//! The tracee's instruction pointer is pointed at a `syscall` instruction
//! (`0f 05`) in its own memory, with the syscall number and arguments in the
//! registers; `PTRACE_SYSCALL` runs it to the syscall-entry stop and then to
//! the syscall-exit stop, where `rax` holds the result. The tracee never runs
//! an instruction past the syscall. `orig_rax` is set to -1 so that the kernel
//! does not apply syscall-restart logic to the injected registers.
//!
//! Cost: six agent syscalls per injected one (SETREGS, 2 x (SYSCALL + wait),
//! GETREGS), and the tracee stops twice: 30-50 ms in the emulated guest
//! kernel of the development hosts. Where the tracee's memory holds
//! [`BATCH_RUNNER`], [`Injector::batch`] runs many syscalls with one stop.

use std::io::{IoSlice, IoSliceMut};

use libc::user_regs_struct;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use super::tracee::{PtraceError, Tracee};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error("injected {what} failed: {errno}")]
    Failed { what: String, errno: Errno },
    #[error(
        "injected syscall ended at {rip:#x}, not after the syscall instruction at {syscall_at:#x}"
    )]
    Strayed { rip: u64, syscall_at: u64 },
    #[error("{op} of {len} bytes at {addr:#x} in PID {pid}: {errno}")]
    Memory {
        op: &'static str,
        pid: i32,
        addr: u64,
        len: usize,
        errno: Errno,
    },
}

/// The bytes of `syscall`.
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// A loop that runs the syscalls of a table, entry after entry, each entry
/// [`BATCH_ENTRY_LEN`] bytes: number, six arguments, result (written by the
/// loop). It starts with `r12` at the first entry and `r13` holding the
/// count, and ends with `int3` after the last entry or the first that
/// failed (`r12` then points at it). `as`, Intel syntax:
/// ```text
/// 0: mov rax, [r12]; mov rdi, [r12+8]; mov rsi, [r12+16]; mov rdx, [r12+24]
///    mov r10, [r12+32]; mov r8, [r12+40]; mov r9, [r12+48]
///    syscall
///    mov [r12+56], rax
///    cmp rax, -4095; jae 1f          # -4095..-1: an error
///    add r12, 64; dec r13; jnz 0b
/// 1: int3
/// ```
pub const BATCH_RUNNER: [u8; 59] = [
    0x49, 0x8b, 0x04, 0x24, 0x49, 0x8b, 0x7c, 0x24, 0x08, 0x49, 0x8b, 0x74, //
    0x24, 0x10, 0x49, 0x8b, 0x54, 0x24, 0x18, 0x4d, 0x8b, 0x54, 0x24, 0x20, //
    0x4d, 0x8b, 0x44, 0x24, 0x28, 0x4d, 0x8b, 0x4c, 0x24, 0x30, 0x0f, 0x05, //
    0x49, 0x89, 0x44, 0x24, 0x38, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, //
    0x09, 0x49, 0x83, 0xc4, 0x40, 0x49, 0xff, 0xcd, 0x75, 0xc6, 0xcc,
];
/// Bytes per syscall in a [`BATCH_RUNNER`] table.
pub const BATCH_ENTRY_LEN: usize = 64;

/// A syscall for [`Injector::batch`]: number and arguments (unused ones 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syscall {
    pub nr: i64,
    pub args: [u64; 6],
}

impl Syscall {
    pub fn new(nr: i64, args: &[u64]) -> Self {
        let mut all = [0; 6];
        all[..args.len()].copy_from_slice(args);
        Syscall { nr, args: all }
    }
}

/// The table [`BATCH_RUNNER`] reads for `calls` (results zero).
fn batch_table(calls: &[Syscall]) -> Vec<u8> {
    let mut table = Vec::with_capacity(calls.len() * BATCH_ENTRY_LEN);
    for call in calls {
        table.extend_from_slice(&call.nr.to_le_bytes());
        for arg in call.args {
            table.extend_from_slice(&arg.to_le_bytes());
        }
        table.extend_from_slice(&0u64.to_le_bytes());
    }
    table
}

/// The raw results of the entries [`BATCH_RUNNER`] ran: all of them, or up
/// to and including the first that failed.
fn batch_results(table: &[u8]) -> Vec<i64> {
    let mut results = Vec::new();
    for entry in table.chunks_exact(BATCH_ENTRY_LEN) {
        let r = i64::from_le_bytes(entry[56..64].try_into().expect("8 bytes"));
        results.push(r);
        if (-4095..0).contains(&r) {
            break;
        }
    }
    results
}

/// The offset of the first `syscall` instruction pattern in `code`.
pub fn find_syscall_insn(code: &[u8]) -> Option<usize> {
    code.windows(2).position(|w| w == SYSCALL_INSN)
}

pub struct Injector {
    tracee: Tracee,
    /// Registers every injection starts from (the tracee's, at the stop).
    template: user_regs_struct,
    /// Address of a `syscall` instruction in the tracee.
    syscall_at: u64,
}

impl Injector {
    pub fn new(tracee: Tracee, template: user_regs_struct, syscall_at: u64) -> Self {
        Injector {
            tracee,
            template,
            syscall_at,
        }
    }

    /// The same injector, using the `syscall` instruction at `syscall_at`.
    pub fn moved_to(&self, syscall_at: u64) -> Self {
        Injector::new(self.tracee, self.template, syscall_at)
    }

    /// Runs `calls` in order with one stop of the tracee: [`BATCH_RUNNER`]
    /// must be at `runner_at` in its memory, and `table_at` must be
    /// writable for [`BATCH_ENTRY_LEN`] bytes per call. Returns the raw
    /// results of the calls that ran: all of them, or up to and including
    /// the first that failed. The tracee must have every signal blocked.
    pub fn batch(&self, runner_at: u64, table_at: u64, calls: &[Syscall]) -> Result<Vec<i64>, InjectError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let mut table = batch_table(calls);
        self.poke(table_at, &table)?;
        let mut regs = self.template;
        regs.rip = runner_at;
        regs.orig_rax = u64::MAX;
        regs.r12 = table_at;
        regs.r13 = calls.len() as u64;
        self.tracee.set_regs(&regs)?;
        self.tracee.cont_with(0)?;
        match self.tracee.wait()? {
            WaitStatus::Stopped(_, Signal::SIGTRAP) => {}
            status => {
                return Err(PtraceError::UnexpectedStop {
                    pid: self.tracee.pid.as_raw(),
                    status,
                    expected: "the end of an injected batch (SIGTRAP)",
                }
                .into())
            }
        }
        let end = runner_at + BATCH_RUNNER.len() as u64;
        let rip = self.tracee.regs()?.rip;
        if rip != end {
            return Err(InjectError::Strayed { rip, syscall_at: end - 1 });
        }
        self.peek(table_at, &mut table)?;
        Ok(batch_results(&table))
    }

    /// [`Self::batch`] with a name for each call: the results of all
    /// calls, or an error naming the first that failed.
    pub fn batch_checked(
        &self,
        runner_at: u64,
        table_at: u64,
        calls: &[Syscall],
        what: &[String],
    ) -> Result<Vec<u64>, InjectError> {
        let raw = self.batch(runner_at, table_at, calls)?;
        raw.into_iter().zip(what).map(|(r, what)| check(|| what.clone(), r)).collect()
    }

    /// Runs syscall `nr` with up to six arguments and returns its raw result
    /// (`-errno` on failure).
    pub fn syscall(&self, nr: i64, args: &[u64]) -> Result<i64, InjectError> {
        self.syscall_with(nr, args, None)
    }

    /// Runs a syscall that does not return (`exit_group`) and collects the
    /// tracee's end. Signals delivered on the way to it go to `on_signal`.
    pub fn call_final(
        &self,
        nr: i64,
        args: &[u64],
        on_signal: &mut dyn FnMut(Signal),
    ) -> Result<(), InjectError> {
        self.set_up(nr, args)?;
        self.tracee.run_to_syscall_stop(Some(on_signal))?;
        Ok(self.tracee.run_to_end()?)
    }

    fn syscall_with(
        &self,
        nr: i64,
        args: &[u64],
        mut on_signal: Option<&mut (dyn FnMut(Signal) + '_)>,
    ) -> Result<i64, InjectError> {
        self.set_up(nr, args)?;
        self.tracee.run_to_syscall_stop(on_signal.as_deref_mut())?;
        self.tracee.run_to_syscall_stop(on_signal)?;
        let out = self.tracee.regs()?;
        if out.rip != self.syscall_at + SYSCALL_INSN.len() as u64 {
            return Err(InjectError::Strayed {
                rip: out.rip,
                syscall_at: self.syscall_at,
            });
        }
        Ok(out.rax as i64)
    }

    /// Points the tracee at the `syscall` instruction with the registers of
    /// syscall `nr`.
    fn set_up(&self, nr: i64, args: &[u64]) -> Result<(), InjectError> {
        let mut regs = self.template;
        regs.rip = self.syscall_at;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.r10,
            &mut regs.r8,
            &mut regs.r9,
        ];
        // Unused argument registers are zeroed: some syscalls (prctl) reject
        // non-zero extra arguments.
        let mut args = args.iter().copied().chain(std::iter::repeat(0));
        for slot in slots {
            *slot = args.next().expect("endless");
        }
        Ok(self.tracee.set_regs(&regs)?)
    }

    /// Runs syscall `nr`; a negative result is an error naming `what`.
    pub fn call(
        &self,
        what: impl Fn() -> String,
        nr: i64,
        args: &[u64],
    ) -> Result<u64, InjectError> {
        check(what, self.syscall(nr, args)?)
    }

    /// Like [`Self::call`], for a tracee that may have signals delivered on
    /// the way: they go to `on_signal` and are suppressed (see
    /// `Tracee::run_to_syscall_stop`).
    pub fn call_passing_signals(
        &self,
        what: impl Fn() -> String,
        nr: i64,
        args: &[u64],
        on_signal: &mut dyn FnMut(Signal),
    ) -> Result<u64, InjectError> {
        check(what, self.syscall_with(nr, args, Some(on_signal))?)
    }

    /// Writes `data` at `addr` in the tracee (which must be writable there).
    pub fn poke(&self, addr: u64, data: &[u8]) -> Result<(), InjectError> {
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: data.len(),
        }];
        if NO_CROSS_MEMORY_ATTACH.load(Ordering::Relaxed) {
            return proc_mem(self.tracee.pid, addr, data.len(), |f| {
                f.write_all_at(data, addr)
            });
        }
        let n = match process_vm_writev(self.tracee.pid, &[IoSlice::new(data)], &remote) {
            Err(Errno::ENOSYS) => {
                NO_CROSS_MEMORY_ATTACH.store(true, Ordering::Relaxed);
                return self.poke(addr, data);
            }
            other => other,
        }
        .map_err(|errno| self.memory_error("process_vm_writev", addr, data.len(), errno))?;
        if n != data.len() {
            return Err(self.memory_error("process_vm_writev", addr, data.len(), Errno::EFAULT));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `addr` in the tracee.
    pub fn peek(&self, addr: u64, buf: &mut [u8]) -> Result<(), InjectError> {
        read_remote(self.tracee.pid, addr, buf)
    }

    fn memory_error(&self, op: &'static str, addr: u64, len: usize, errno: Errno) -> InjectError {
        InjectError::Memory {
            op,
            pid: self.tracee.pid.as_raw(),
            addr,
            len,
            errno,
        }
    }
}

/// A raw syscall result; a negative one is an error naming `what`.
fn check(what: impl Fn() -> String, r: i64) -> Result<u64, InjectError> {
    if (-4095..0).contains(&r) {
        return Err(InjectError::Failed {
            what: what(),
            errno: Errno::from_raw(-r as i32),
        });
    }
    Ok(r as u64)
}

/// Set once `process_vm_readv`/`writev` returned ENOSYS: the node kernel is
/// built without CONFIG_CROSS_MEMORY_ATTACH, so /proc/PID/mem (which the
/// tracer may read and write) is used instead.
static NO_CROSS_MEMORY_ATTACH: AtomicBool = AtomicBool::new(false);

/// Runs `io` on /proc/PID/mem (opened read-write).
fn proc_mem(
    pid: Pid,
    addr: u64,
    len: usize,
    io: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> Result<(), InjectError> {
    let err = |e: std::io::Error| InjectError::Memory {
        op: "/proc/PID/mem",
        pid: pid.as_raw(),
        addr,
        len,
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    };
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(err)?;
    io(&f).map_err(err)
}

/// Reads `buf.len()` bytes at `addr` in process `pid` (one syscall).
pub fn read_remote(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<(), InjectError> {
    let len = buf.len();
    if NO_CROSS_MEMORY_ATTACH.load(Ordering::Relaxed) {
        return proc_mem(pid, addr, len, |f| f.read_exact_at(buf, addr));
    }
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let err = |errno| InjectError::Memory {
        op: "process_vm_readv",
        pid: pid.as_raw(),
        addr,
        len,
        errno,
    };
    let n = match process_vm_readv(pid, &mut [IoSliceMut::new(buf)], &remote) {
        Err(Errno::ENOSYS) => {
            NO_CROSS_MEMORY_ATTACH.store(true, Ordering::Relaxed);
            return read_remote(pid, addr, buf);
        }
        other => other.map_err(err)?,
    };
    if n != len {
        return Err(err(Errno::EFAULT));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_tables_and_results() {
        let calls = [Syscall::new(1, &[2, 3]), Syscall::new(4, &[5, 6, 7, 8, 9, 10])];
        let mut table = batch_table(&calls);
        assert_eq!(table.len(), 2 * BATCH_ENTRY_LEN);
        let word = |t: &[u8], i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!((0..8).map(|i| word(&table, i)).collect::<Vec<_>>(), [1, 2, 3, 0, 0, 0, 0, 0]);
        assert_eq!((8..16).map(|i| word(&table, i)).collect::<Vec<_>>(), [4, 5, 6, 7, 8, 9, 10, 0]);
        // Both ran.
        table[56..64].copy_from_slice(&7i64.to_le_bytes());
        table[120..128].copy_from_slice(&0i64.to_le_bytes());
        assert_eq!(batch_results(&table), [7, 0]);
        // The first failed: the second never ran.
        table[56..64].copy_from_slice(&(-22i64).to_le_bytes());
        assert_eq!(batch_results(&table), [-22]);
        // The runner's loop jumps back to its start and ends in int3.
        assert_eq!(BATCH_RUNNER.last(), Some(&0xcc));
        assert_eq!(find_syscall_insn(&BATCH_RUNNER), Some(34));
    }

    #[test]
    fn finds_syscall_instructions() {
        assert_eq!(find_syscall_insn(&[0x90, 0x0f, 0x05, 0xc3]), Some(1));
        assert_eq!(find_syscall_insn(&[0x0f, 0x0f]), None);
    }
}
