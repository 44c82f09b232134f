//! Typed wrappers over the ptrace requests the engine uses, and the
//! conversion between the kernel's register structure and the image's.
//!
//! ptrace is per thread on the tracer side: every call for one tracee must
//! come from the thread that attached it.

use std::mem::size_of;

use crate::reaper;
use libc::{c_void, user_regs_struct};
use nix::errno::Errno;
use nix::sys::ptrace::{self, Event, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use pmivmm_proto::image::{
    FpuKind, FpuState, InterruptedSyscall, Regs, Rseq, SigInfo, SyscallRestart, FXSAVE_AREA_LEN,
    SIGINFO_LEN,
};

#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    #[error("ptrace {op} on PID {pid}: {errno}")]
    Call {
        op: &'static str,
        pid: i32,
        errno: Errno,
    },
    #[error("PID {pid} is gone ({status:?})")]
    Gone { pid: i32, status: WaitStatus },
    #[error("PID {pid}: unexpected {status:?} while waiting for {expected}")]
    UnexpectedStop {
        pid: i32,
        status: WaitStatus,
        expected: &'static str,
    },
    #[error("PID {pid}: the FPU state needs XSAVE (features {features:#x} in use), which this kernel does not offer")]
    XsaveNeeded { pid: i32, features: u64 },
}

/// `NT_PRFPREG` and `NT_X86_XSTATE` (elf.h).
const NT_PRFPREG: usize = 2;
const NT_X86_XSTATE: usize = 0x202;
/// Large enough for every XSAVE layout (AMX included).
const XSAVE_BUFFER: usize = 16 << 10;
/// `xstate_bv` in the XSAVE header, right after the FXSAVE area.
const XSTATE_BV_OFFSET: usize = FXSAVE_AREA_LEN;
/// x87 and SSE: what an FXSAVE area holds.
const XFEATURES_FXSAVE: u64 = 0b11;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// A process (single-threaded) this thread traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracee {
    pub pid: Pid,
}

/// What an interrupted tracee was doing, which decides how it is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    Running,
    /// Stopped by job control (SIGSTOP, SIGTSTP, ...): it stays stopped.
    GroupStopped,
}

/// `PTRACE_LISTEN`, which nix does not wrap.
const PTRACE_LISTEN: u32 = 0x4208;

impl Tracee {
    fn err(&self, op: &'static str) -> impl Fn(Errno) -> PtraceError + '_ {
        move |errno| PtraceError::Call {
            op,
            pid: self.pid.as_raw(),
            errno,
        }
    }

    /// Attaches with `PTRACE_SEIZE` and stops the process with
    /// `PTRACE_INTERRUPT`. A signal being delivered meanwhile is passed on.
    pub fn seize_and_interrupt(pid: Pid) -> Result<(Tracee, Interrupted), PtraceError> {
        let tracee = Tracee { pid };
        // Registered before the first ptrace call: see crate::reaper.
        if let Some(reaper) = reaper::running() {
            reaper.trace(pid.as_raw());
        }
        if let Err(e) = ptrace::seize(pid, Options::PTRACE_O_TRACESYSGOOD) {
            untrace(pid);
            return Err(tracee.err("SEIZE")(e));
        }
        let stopped = tracee.interrupt();
        if stopped.is_err() {
            // Gone, or in a state we cannot handle: let it be.
            let _ = ptrace::detach(pid, None);
            untrace(pid);
        }
        stopped.map(|how| (tracee, how))
    }

    /// Stops the seized process with `PTRACE_INTERRUPT`. A signal being
    /// delivered meanwhile is passed on.
    pub fn interrupt(&self) -> Result<Interrupted, PtraceError> {
        ptrace::interrupt(self.pid).map_err(self.err("INTERRUPT"))?;
        self.wait_interrupt_stop()
    }

    fn wait_interrupt_stop(&self) -> Result<Interrupted, PtraceError> {
        let (tracee, pid) = (self, self.pid);
        loop {
            match tracee.wait()? {
                WaitStatus::PtraceEvent(_, sig, event)
                    if event == Event::PTRACE_EVENT_STOP as i32 =>
                {
                    // A seized process in group-stop reports its stop
                    // signal, a running one SIGTRAP.
                    return Ok(if sig == Signal::SIGTRAP {
                        Interrupted::Running
                    } else {
                        Interrupted::GroupStopped
                    });
                }
                // A signal-delivery stop: deliver it; the interrupt stays pending.
                WaitStatus::Stopped(_, sig) => {
                    ptrace::cont(pid, sig).map_err(tracee.err("CONT"))?
                }
                status => {
                    return Err(PtraceError::UnexpectedStop {
                        pid: pid.as_raw(),
                        status,
                        expected: "the interrupt stop",
                    })
                }
            }
        }
    }

    /// Waits for the next stop; exits are errors.
    pub fn wait(&self) -> Result<WaitStatus, PtraceError> {
        match wait_status(self.pid) {
            Err(errno) => Err(self.err("wait")(errno)),
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                Err(PtraceError::Gone {
                    pid: self.pid.as_raw(),
                    status,
                })
            }
            Ok(status) => Ok(status),
        }
    }

    /// Lets an interrupted process go on as it was: running, or (with
    /// `PTRACE_LISTEN`) in its group-stop, still seized.
    pub fn resume(&self, how: Interrupted) -> Result<(), PtraceError> {
        match how {
            Interrupted::Running => ptrace::cont(self.pid, None).map_err(self.err("CONT")),
            Interrupted::GroupStopped => self
                .raw("LISTEN", PTRACE_LISTEN, 0, std::ptr::null_mut())
                .map(drop),
        }
    }

    /// Answers a stop (raw wait status) of a seized process that runs (see
    /// [`Self::resume`]): passes a signal on, keeps a job-control stop,
    /// resumes from anything else.
    pub fn pass_stop(&self, raw: i32) -> Result<(), PtraceError> {
        let (sig, event) = (libc::WSTOPSIG(raw), raw >> 16);
        if event == 0 && sig != libc::SIGTRAP | 0x80 {
            // A signal-delivery stop (0x80: a syscall stop).
            self.cont_with(sig)
        } else if event == Event::PTRACE_EVENT_STOP as i32 && sig != libc::SIGTRAP {
            self.resume(Interrupted::GroupStopped)
        } else {
            self.resume(Interrupted::Running)
        }
    }

    /// `PTRACE_CONT` delivering signal `sig` (0: none), real-time signals
    /// included.
    pub fn cont_with(&self, sig: i32) -> Result<(), PtraceError> {
        self.raw("CONT", libc::PTRACE_CONT, 0, sig as usize as *mut c_void)
            .map(drop)
    }

    /// Resumes until the next syscall entry or exit stop. With `on_signal`,
    /// signal-delivery stops on the way are passed to it and the signal is
    /// suppressed, and ptrace event stops (a `SIGCONT` notification) are
    /// resumed from; without, they are errors.
    pub fn run_to_syscall_stop(
        &self,
        mut on_signal: Option<&mut (dyn FnMut(Signal) + '_)>,
    ) -> Result<(), PtraceError> {
        let resume = || ptrace::syscall(self.pid, None).map_err(self.err("SYSCALL"));
        resume()?;
        loop {
            match (self.wait()?, &mut on_signal) {
                (WaitStatus::PtraceSyscall(_), _) => return Ok(()),
                (WaitStatus::Stopped(_, sig), Some(on_signal)) => {
                    on_signal(sig);
                    resume()?;
                }
                (WaitStatus::PtraceEvent(..), Some(_)) => resume()?,
                (status, _) => {
                    return Err(PtraceError::UnexpectedStop {
                        pid: self.pid.as_raw(),
                        status,
                        expected: "a syscall stop",
                    })
                }
            }
        }
    }

    /// Resumes the tracee in a syscall-entry stop of a syscall that does
    /// not return (`exit_group`) and collects its end.
    pub fn run_to_end(&self) -> Result<(), PtraceError> {
        ptrace::syscall(self.pid, None).map_err(self.err("SYSCALL"))?;
        wait_for_end(self.pid).map_err(self.err("wait"))
    }

    pub fn regs(&self) -> Result<user_regs_struct, PtraceError> {
        ptrace::getregs(self.pid).map_err(self.err("GETREGS"))
    }

    pub fn set_regs(&self, regs: &user_regs_struct) -> Result<(), PtraceError> {
        ptrace::setregs(self.pid, *regs).map_err(self.err("SETREGS"))
    }

    pub fn set_options(&self, options: Options) -> Result<(), PtraceError> {
        ptrace::setoptions(self.pid, options).map_err(self.err("SETOPTIONS"))
    }

    /// Detaches (the process runs on) and ends its registration with the
    /// reaper.
    pub fn detach(&self) -> Result<(), PtraceError> {
        let r = ptrace::detach(self.pid, None).map_err(self.err("DETACH"));
        untrace(self.pid);
        r
    }

    /// One raw ptrace request that nix does not wrap.
    fn raw(
        &self,
        op: &'static str,
        request: u32,
        addr: usize,
        data: *mut c_void,
    ) -> Result<i64, PtraceError> {
        // SAFETY: every caller passes a request whose `data` points to memory
        // of the size the kernel writes or reads for that request.
        let r = unsafe { libc::ptrace(request, self.pid.as_raw(), addr as *mut c_void, data) };
        Errno::result(r).map_err(self.err(op))
    }

    /// The FPU/SSE/AVX state: the XSAVE area, or the FXSAVE area on kernels
    /// without XSAVE (`ENODEV`/`EIO`/`EINVAL` for the XSTATE set).
    pub fn fpu(&self) -> Result<FpuState, PtraceError> {
        let mut area = vec![0u8; XSAVE_BUFFER];
        match self.get_regset("GETREGSET xstate", NT_X86_XSTATE, &mut area) {
            Ok(len) => {
                area.truncate(len);
                Ok(FpuState {
                    kind: FpuKind::Xsave,
                    area,
                })
            }
            Err(PtraceError::Call {
                errno: Errno::ENODEV | Errno::EIO | Errno::EINVAL,
                ..
            }) => {
                area.truncate(FXSAVE_AREA_LEN);
                let len = self.get_regset("GETREGSET fpregs", NT_PRFPREG, &mut area)?;
                area.truncate(len);
                Ok(FpuState {
                    kind: FpuKind::Fxsave,
                    area,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Sets the FPU state. An XSAVE area goes back as it is when this kernel
    /// takes it (same XSAVE layout); otherwise its FXSAVE part is set, which
    /// is only allowed when no state beyond x87/SSE is in use.
    pub fn set_fpu(&self, fpu: &FpuState) -> Result<(), PtraceError> {
        let mut area = fpu.area.clone();
        if fpu.kind == FpuKind::Xsave {
            match self.set_regset("SETREGSET xstate", NT_X86_XSTATE, &mut area) {
                // ENODEV: no XSAVE here; EFAULT: another XSAVE layout size.
                Err(PtraceError::Call {
                    errno: Errno::ENODEV | Errno::EFAULT | Errno::EINVAL,
                    ..
                }) => {
                    let features = u64::from_le_bytes(
                        area[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8]
                            .try_into()
                            .expect("8 bytes"),
                    );
                    if features & !XFEATURES_FXSAVE != 0 {
                        return Err(PtraceError::XsaveNeeded {
                            pid: self.pid.as_raw(),
                            features,
                        });
                    }
                }
                other => return other,
            }
        }
        self.set_regset("SETREGSET fpregs", NT_PRFPREG, &mut area[..FXSAVE_AREA_LEN])
    }

    fn get_regset(
        &self,
        op: &'static str,
        set: usize,
        buf: &mut [u8],
    ) -> Result<usize, PtraceError> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        self.raw(
            op,
            libc::PTRACE_GETREGSET,
            set,
            (&mut iov as *mut libc::iovec).cast(),
        )?;
        Ok(iov.iov_len)
    }

    fn set_regset(&self, op: &'static str, set: usize, buf: &mut [u8]) -> Result<(), PtraceError> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        self.raw(
            op,
            libc::PTRACE_SETREGSET,
            set,
            (&mut iov as *mut libc::iovec).cast(),
        )
        .map(drop)
    }

    pub fn sigmask(&self) -> Result<u64, PtraceError> {
        let mut mask = 0u64;
        self.raw(
            "GETSIGMASK",
            libc::PTRACE_GETSIGMASK,
            size_of::<u64>(),
            (&mut mask as *mut u64).cast(),
        )?;
        Ok(mask)
    }

    pub fn set_sigmask(&self, mut mask: u64) -> Result<(), PtraceError> {
        self.raw(
            "SETSIGMASK",
            libc::PTRACE_SETSIGMASK,
            size_of::<u64>(),
            (&mut mask as *mut u64).cast(),
        )
        .map(drop)
    }

    /// The signals queued to the thread, or (`shared`) to the process.
    pub fn pending(&self, shared: bool) -> Result<Vec<SigInfo>, PtraceError> {
        const BATCH: usize = 32;
        let mut out = Vec::new();
        let mut buf = vec![0u8; BATCH * SIGINFO_LEN];
        loop {
            let mut args = libc::ptrace_peeksiginfo_args {
                off: out.len() as u64,
                flags: if shared {
                    libc::PTRACE_PEEKSIGINFO_SHARED
                } else {
                    0
                },
                nr: BATCH as i32,
            };
            let n = self.raw(
                "PEEKSIGINFO",
                libc::PTRACE_PEEKSIGINFO,
                (&mut args as *mut libc::ptrace_peeksiginfo_args) as usize,
                buf.as_mut_ptr().cast(),
            )? as usize;
            for raw in buf[..n * SIGINFO_LEN].chunks_exact(SIGINFO_LEN) {
                let signo = u32::from_ne_bytes(raw[..4].try_into().expect("4 bytes"));
                out.push(SigInfo {
                    signo,
                    raw: raw.to_vec(),
                });
            }
            if n < BATCH {
                return Ok(out);
            }
        }
    }

    /// The process's rseq registration, if any.
    pub fn rseq(&self) -> Result<Option<Rseq>, PtraceError> {
        let mut conf = libc::ptrace_rseq_configuration {
            rseq_abi_pointer: 0,
            rseq_abi_size: 0,
            signature: 0,
            flags: 0,
            pad: 0,
        };
        let size = size_of::<libc::ptrace_rseq_configuration>();
        match self.raw(
            "GET_RSEQ_CONFIGURATION",
            libc::PTRACE_GET_RSEQ_CONFIGURATION,
            size,
            (&mut conf as *mut libc::ptrace_rseq_configuration).cast(),
        ) {
            // A kernel without CONFIG_RSEQ (the node kernel) does not know
            // the request: nothing can be registered there.
            Err(PtraceError::Call {
                errno: Errno::EIO | Errno::EINVAL,
                ..
            }) => return Ok(None),
            other => other?,
        };
        Ok((conf.rseq_abi_pointer != 0).then_some(Rseq {
            pointer: conf.rseq_abi_pointer,
            size: conf.rseq_abi_size,
            signature: conf.signature,
        }))
    }

    pub fn kill(&self) {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        let _ = wait_for_end(self.pid);
    }
}

/// The next wait status of tracee `pid`: from the agent's reaper when it
/// runs and `pid` is registered with it (the reaper's `waitpid(-1)` would
/// otherwise take the status first, see crate::reaper), else from
/// `waitpid(pid, __WALL)`.
pub fn wait_status(pid: Pid) -> Result<WaitStatus, Errno> {
    WaitStatus::from_raw(pid, wait_raw_status(pid)?)
}

/// [`wait_status`] as the raw status word, which unlike nix's `WaitStatus`
/// also holds stops and ends by real-time signals.
pub fn wait_raw_status(pid: Pid) -> Result<i32, Errno> {
    if let Some(raw) = reaper::running().and_then(|r| r.wait_traced(pid.as_raw())) {
        return Ok(raw);
    }
    loop {
        match waitpid_raw(pid, 0) {
            Ok(Some(raw)) => return Ok(raw),
            // None: only with WNOHANG.
            Ok(None) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The next raw wait status of tracee `pid` if it has one (see
/// [`wait_raw_status`]).
pub fn try_wait_raw_status(pid: Pid) -> Result<Option<i32>, Errno> {
    if let Some(reaper) = reaper::running() {
        return Ok(reaper.try_wait_traced(pid.as_raw()));
    }
    loop {
        match waitpid_raw(pid, libc::WNOHANG) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// `waitpid(pid, __WALL | flags)`; `None` if `WNOHANG` found no status.
fn waitpid_raw(pid: Pid, flags: i32) -> Result<Option<i32>, Errno> {
    let mut status = 0;
    // SAFETY: waitpid with a valid pointer to a local status word.
    let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::__WALL | flags) };
    match r {
        -1 => Err(Errno::last()),
        0 => Ok(None),
        _ => Ok(Some(status)),
    }
}

/// Whether a raw wait status reports the end of the process.
pub fn is_end(raw: i32) -> bool {
    libc::WIFEXITED(raw) || libc::WIFSIGNALED(raw)
}

/// Waits until tracee `pid` (already sent SIGKILL, or about to end) has
/// ended, then ends its registration with the reaper.
pub fn wait_for_end(pid: Pid) -> Result<(), Errno> {
    let r = loop {
        match wait_raw_status(pid) {
            Ok(raw) if is_end(raw) => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    untrace(pid);
    r
}

/// Ends the registration of `pid` with the reaper, if one runs.
pub fn untrace(pid: Pid) {
    if let Some(reaper) = reaper::running() {
        reaper.untrace(pid.as_raw());
    }
}

/// Rewinds a syscall the process was stopped in so that it runs again when
/// the registers are set back, as the kernel's signal code would on the way
/// to user mode (`arch_do_signal_or_restart` without a handler).
/// `orig_rax` becomes -1 so that the kernel does not rewind a second time.
pub fn rewind_interrupted_syscall(regs: &mut user_regs_struct) -> Option<InterruptedSyscall> {
    if (regs.orig_rax as i64) < 0 {
        return None;
    }
    let restart = match -(regs.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            regs.rax = regs.orig_rax;
            SyscallRestart::Again
        }
        ERESTART_RESTARTBLOCK => {
            regs.rax = libc::SYS_restart_syscall as u64;
            SyscallRestart::RestartBlock
        }
        _ => return None,
    };
    let nr = regs.orig_rax;
    regs.rip -= 2;
    regs.orig_rax = u64::MAX;
    Some(InterruptedSyscall { nr, restart })
}

macro_rules! convert_regs {
    ($($field:ident),* $(,)?) => {
        pub fn regs_to_image(r: &user_regs_struct) -> Regs {
            Regs { $($field: r.$field),* }
        }

        pub fn regs_from_image(r: &Regs) -> user_regs_struct {
            user_regs_struct { $($field: r.$field),* }
        }
    };
}

convert_regs!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn in_syscall(nr: u64, ret: i64) -> user_regs_struct {
        let mut r = regs_from_image(&Regs::default());
        (r.orig_rax, r.rax, r.rip) = (nr, ret as u64, 0x1002);
        r
    }

    #[test]
    fn rewinds_restartable_syscalls() {
        let mut r = in_syscall(0, -ERESTARTSYS);
        assert_eq!(
            rewind_interrupted_syscall(&mut r).unwrap().restart,
            SyscallRestart::Again
        );
        assert_eq!((r.rax, r.rip, r.orig_rax), (0, 0x1000, u64::MAX));

        let mut r = in_syscall(230, -ERESTART_RESTARTBLOCK);
        assert_eq!(
            rewind_interrupted_syscall(&mut r).unwrap().restart,
            SyscallRestart::RestartBlock
        );
        assert_eq!((r.rax, r.rip), (libc::SYS_restart_syscall as u64, 0x1000));
    }

    #[test]
    fn leaves_finished_syscalls_and_user_code_alone() {
        for mut r in [
            in_syscall(1, 5),
            in_syscall(1, -(libc::EINTR as i64)),
            in_syscall(u64::MAX, -ERESTARTSYS),
        ] {
            let before = r;
            assert!(rewind_interrupted_syscall(&mut r).is_none());
            assert_eq!(regs_to_image(&r), regs_to_image(&before));
        }
    }
}
