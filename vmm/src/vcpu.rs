//! The vCPU run loop: routes port I/O and MMIO to the device buses, steps over the
//! instructions the development host cannot emulate, and turns guest resets,
//! triple faults and stop requests into a [`VmExit`].

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::register_signal_handler;

use crate::devices::{IoEffect, MmioBus, PortIoBus};
use crate::profile::Samples;

/// Why a VM stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself: how our guests reboot and power off.
    GuestReset,
    /// The guest kernel panicked (seen on the console before the reset).
    GuestPanic,
    /// Triple fault or KVM shutdown event.
    GuestShutdown,
    /// The VMM was asked to stop the VM.
    Stopped(StopCause),
}

/// Who asked the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopCause {
    Timeout = 1,
    /// The user pressed Ctrl-A x on the interactive console.
    User = 2,
    /// `pmivmm stop` (after the guest did not power off by itself).
    Control = 3,
}

impl VmExit {
    /// The VMM's process exit code for this exit.
    pub fn exit_code(self) -> i32 {
        match self {
            VmExit::GuestReset => 0,
            VmExit::GuestPanic => 2,
            VmExit::GuestShutdown => 3,
            VmExit::Stopped(StopCause::Timeout) => 124,
            VmExit::Stopped(StopCause::User) => 130,
            VmExit::Stopped(StopCause::Control) => 0,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            VmExit::GuestReset => "the guest powered off",
            VmExit::GuestPanic => "the guest kernel panicked (see the console output)",
            VmExit::GuestShutdown => "the guest triple-faulted (KVM shutdown)",
            VmExit::Stopped(StopCause::Timeout) => "stopped: timeout reached",
            VmExit::Stopped(StopCause::User) => "stopped from the console (Ctrl-A x)",
            VmExit::Stopped(StopCause::Control) => "stopped by `pmivmm stop`",
        }
    }
}

/// Errors that end the run loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    #[error("reading vCPU registers: {0}")]
    Regs(#[source] kvm_ioctls::Error),
    #[error("KVM could not emulate a guest instruction at rip 0x{rip:x} (bytes {bytes:02x?})")]
    Emulation { rip: u64, bytes: Vec<u8> },
    #[error("KVM internal error, suberror {0}")]
    Internal(u32),
    #[error("KVM refused to enter the guest (hardware entry failure reason 0x{0:x})")]
    FailEntry(u64),
    #[error("unexpected vCPU exit: {0}")]
    Unexpected(String),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// The x86 FWAIT opcode.
const FWAIT: u8 = 0x9b;
/// Signal used to kick the vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    // The kvm_run of the vCPU running on this thread, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread's Vcpu::run to its live
        // kvm_run mapping, and is cleared before that mapping goes away.
        // Setting immediate_exit makes a KVM_RUN that is about to start
        // return EINTR at once, closing the race with a signal that arrives
        // just before the ioctl.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), Error> {
    register_signal_handler(kick_signal(), kick_handler).map_err(Error::Signal)
}

/// A stop request shared between the vCPU thread and the rest of the VMM.
#[derive(Debug, Default)]
pub struct StopRequest(AtomicU8);

impl StopRequest {
    pub fn request(&self, cause: StopCause) {
        let _ = self.0.compare_exchange(0, cause as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.get().is_some()
    }

    fn get(&self) -> Option<StopCause> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopCause::Timeout),
            2 => Some(StopCause::User),
            3 => Some(StopCause::Control),
            _ => None,
        }
    }
}

/// Counters of the run loop, logged when the VM stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExitStats {
    pub exits: u64,
    pub pio: u64,
    pub mmio: u64,
    pub fwait_steps: u64,
}

/// A vCPU with its devices.
pub struct Vcpu {
    fd: VcpuFd,
    /// Guest RIP samples, when profiling (taken at every kick that is not a stop).
    profile: Option<(Instant, Samples)>,
    pio: Arc<PortIoBus>,
    mmio: Arc<MmioBus>,
    stop: Arc<StopRequest>,
    panic_seen: Box<dyn Fn() -> bool + Send>,
    pub stats: ExitStats,
}

impl Vcpu {
    pub fn new(
        fd: VcpuFd,
        pio: Arc<PortIoBus>,
        mmio: Arc<MmioBus>,
        stop: Arc<StopRequest>,
        panic_seen: Box<dyn Fn() -> bool + Send>,
    ) -> Self {
        Vcpu { fd, profile: None, pio, mmio, stop, panic_seen, stats: ExitStats::default() }
    }

    /// Runs the guest until it stops. Call on the thread that should receive
    /// kicks (see [`kick_signal`]).
    pub fn run(&mut self) -> Result<VmExit, Error> {
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        let result = self.run_loop();
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        result
    }

    fn run_loop(&mut self) -> Result<VmExit, Error> {
        loop {
            if let Some(cause) = self.stop.get() {
                return Ok(VmExit::Stopped(cause));
            }
            let exit = self.fd.run();
            self.stats.exits += 1;
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.stats.pio += 1;
                    self.pio.read(port, data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.stats.pio += 1;
                    if self.pio.write(port, data) == IoEffect::GuestReset {
                        return Ok(self.reset_exit());
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.stats.mmio += 1;
                    if !self.mmio.read(addr, data) {
                        tracing::trace!("mmio read of unclaimed 0x{addr:x}");
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.stats.mmio += 1;
                    if !self.mmio.write(addr, data) {
                        tracing::trace!("mmio write to unclaimed 0x{addr:x}");
                    }
                }
                Ok(VcpuExit::Shutdown) => return Ok(self.shutdown_exit()),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Ok(match kind {
                        KVM_SYSTEM_EVENT_RESET => self.reset_exit(),
                        KVM_SYSTEM_EVENT_SHUTDOWN => self.shutdown_exit(),
                        other => return Err(Error::Unexpected(format!("system event {other}"))),
                    })
                }
                Ok(VcpuExit::Hlt) => return Ok(self.shutdown_exit()),
                Ok(VcpuExit::Intr) => self.kicked()?,
                Ok(VcpuExit::InternalError) => self.internal_error()?,
                Ok(VcpuExit::FailEntry(reason, _)) => return Err(Error::FailEntry(reason)),
                Ok(other) => return Err(Error::Unexpected(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => self.kicked()?,
                Err(e) => return Err(Error::Run(e)),
            }
        }
    }

    /// Back from a kick: re-arm KVM_RUN and take a profile sample.
    fn kicked(&mut self) -> Result<(), Error> {
        self.fd.set_kvm_immediate_exit(0);
        if let Some((start, samples)) = &mut self.profile {
            let rip = self.fd.get_regs().map_err(Error::Regs)?.rip;
            samples.0.push((start.elapsed(), rip));
        }
        Ok(())
    }

    /// Starts recording a guest RIP sample at every kick.
    pub fn enable_profiling(&mut self) {
        self.profile = Some((Instant::now(), Samples::default()));
    }

    /// The samples recorded so far.
    pub fn take_samples(&mut self) -> Option<Samples> {
        self.profile.take().map(|(_, s)| s)
    }

    fn reset_exit(&self) -> VmExit {
        if (self.panic_seen)() {
            VmExit::GuestPanic
        } else {
            VmExit::GuestReset
        }
    }

    fn shutdown_exit(&self) -> VmExit {
        if (self.panic_seen)() {
            VmExit::GuestPanic
        } else {
            VmExit::GuestShutdown
        }
    }

    /// The development host's KVM cannot emulate FWAIT in guest kernel mode
    /// (Linux runs it in `fpu__drop()` on every exec and exit) and reports an
    /// emulation failure with the instruction bytes. With no x87 exception
    /// pending FWAIT is a no-op, so step over it. Anything else is fatal.
    fn internal_error(&mut self) -> Result<(), Error> {
        // SAFETY: reading the union member KVM fills for KVM_EXIT_INTERNAL_ERROR.
        let (suberror, insn) = unsafe {
            let run = self.fd.get_kvm_run();
            let ef = run.__bindgen_anon_1.emulation_failure;
            let insn = ef.__bindgen_anon_1.__bindgen_anon_1;
            let n = (insn.insn_size as usize).min(insn.insn_bytes.len());
            let has_bytes = ef.flags
                & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                != 0;
            (ef.suberror, if has_bytes { insn.insn_bytes[..n].to_vec() } else { Vec::new() })
        };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Err(Error::Internal(suberror));
        }
        let mut regs = self.fd.get_regs().map_err(Error::Regs)?;
        if insn.first() == Some(&FWAIT) {
            regs.rip += 1;
            self.fd.set_regs(&regs).map_err(Error::Regs)?;
            self.stats.fwait_steps += 1;
            return Ok(());
        }
        Err(Error::Emulation { rip: regs.rip, bytes: insn })
    }
}
