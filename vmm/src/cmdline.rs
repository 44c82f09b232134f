//! The guest kernel command line: base arguments, the host-compatibility
//! arguments for the development machines' paravirtualized KVM, virtio-mmio
//! device announcements, and the user's extra arguments.

use crate::arch::layout::CMDLINE_MAX_SIZE;

/// Arguments every node kernel gets.
///
/// - `console=ttyS0`: the 8250 UART is the console.
/// - `reboot=k`: reboot through the i8042 (0xFE on port 0x64), which the VMM
///   sees as a port write; without ACPI a power-off would only halt the CPU.
/// - `panic=-1 oops=panic`: a guest kernel failure resets the VM at once.
/// - `rodata=off`: skips `mark_rodata_ro()` (seconds of emulated page-table
///   work on the development host; no effect on correctness).
/// - `quiet lpj=5000 retain_initrd`: fewer console exits, no delay-loop
///   calibration, no freeing+poisoning of the initrd pages.
/// - `norandmaps`: no address-space randomization, so the vdso, stack and
///   mmap base are at the same addresses in every node and a migrated
///   process finds them where it left them.
pub const BASE_ARGS: &str =
    "console=ttyS0 reboot=k panic=-1 oops=panic rodata=off quiet lpj=5000 retain_initrd norandmaps";

/// Arguments that the development machines' `/dev/kvm` (kvm_pvm, which
/// emulates guest kernel code) needs: CPU features it reports but cannot
/// emulate are hidden. See ../shared/kvm-host.md. Not needed on hardware KVM.
pub const HOST_COMPAT_ARGS: &str = "noxsave nopti mitigations=off";

/// Passed to init (and by the agent to every process it starts) on kvm_pvm:
/// guest user code runs natively and sees AVX, but the guest kernel, booted
/// with `noxsave`, switches tasks with FXSAVE/FXRSTOR, so the upper halves of
/// the YMM registers do not survive a task switch (seen in a guest: a glibc
/// AVX `memcpy` lost 16-byte runs of data when preempted). This keeps glibc's
/// string functions on SSE. Code that detects AVX by itself is still exposed;
/// a paravirtual xstate save/restore would fix it for all code.
/// (Setting CR4.OSXSAVE and XCR0 = x87|SSE through KVM was tried: kvm_pvm
/// keeps the host's XCR0 for guest user code.)
pub const HOST_COMPAT_GLIBC_TUNABLES: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,\
-AVX_Fast_Unaligned_Load,-AVX512F,-AVX512VL,-FMA,-F16C";

/// CPUID bits hidden on kvm_pvm (XSAVE family, CMPXCHG16B, AVX*, PCID, ...),
/// and ERMS (297) and FSRM (580): with them the kernel's memcpy/memset use
/// `rep movsb/stosb`, which the emulator runs one byte per iteration; without
/// them `rep movsq/stosq`, eight bytes per iteration (a guest syscall took
/// 1.4-2.3 ms instead of ~0.5 ms once the kernel called memcpy/memset for
/// every block copy, patch 0004).
/// The kernel honours only the last `clearcpuid=`, so all bits, these and the
/// user's, are merged into one option by [`build`].
pub const HOST_COMPAT_CLEARCPUID: &[u32] =
    &[308, 295, 288, 158, 306, 534, 145, 298, 514, 515, 151, 150, 311, 312, 141, 297, 580];

/// Errors while building the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the kernel command line is {len} bytes; the kernel accepts at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("invalid clearcpuid value '{0}' in the extra kernel arguments (expected a number)")]
    BadClearCpuid(String),
}

/// A virtio-mmio device window announced to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// How the guest kernel must be told about the development hosts' KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCompat {
    Off,
    /// On, with the guest TSC rate when KVM reports it.
    ///
    /// On kvm_pvm the guest cannot calibrate its TSC (no PIT/HPET reference
    /// works), marks it unstable and falls back to the jiffies clocksource: a
    /// 10 ms clock that loses ticks while the emulated kernel is busy, and a
    /// periodic tick that costs ~20% of a host core per idle node. Given the
    /// TSC rate KVM runs the guest at (`tsc_early_khz=`) and trusting it
    /// (`tsc=reliable`: there is no second clocksource to watch it against),
    /// the guest keeps time with the TSC and stops ticking when idle
    /// (NO_HZ_IDLE).
    On { tsc_khz: Option<u32> },
}

/// Builds the full command line.
pub fn build(compat: HostCompat, devices: &[VirtioMmioDevice], extra: &str) -> Result<String, Error> {
    let mut args: Vec<String> = BASE_ARGS.split_whitespace().map(str::to_owned).collect();
    let mut clear: Vec<u32> = Vec::new();
    if let HostCompat::On { tsc_khz } = compat {
        args.extend(HOST_COMPAT_ARGS.split_whitespace().map(str::to_owned));
        if let Some(khz) = tsc_khz {
            args.push(format!("tsc_early_khz={khz}"));
            args.push("tsc=reliable".to_owned());
        }
        args.push(HOST_COMPAT_GLIBC_TUNABLES.to_owned());
        clear.extend_from_slice(HOST_COMPAT_CLEARCPUID);
    }
    for d in devices {
        args.push(format!("virtio_mmio.device={}K@0x{:x}:{}", d.size >> 10, d.base, d.irq));
    }
    for a in extra.split_whitespace() {
        match a.strip_prefix("clearcpuid=") {
            Some(list) => {
                for bit in list.split(',').filter(|b| !b.is_empty()) {
                    clear.push(bit.parse().map_err(|_| Error::BadClearCpuid(bit.to_owned()))?);
                }
            }
            None => args.push(a.to_owned()),
        }
    }
    if !clear.is_empty() {
        let mut seen = std::collections::HashSet::new();
        clear.retain(|b| seen.insert(*b));
        let list: Vec<String> = clear.iter().map(u32::to_string).collect();
        args.push(format!("clearcpuid={}", list.join(",")));
    }
    let line = args.join(" ");
    // One byte for the terminating NUL.
    if line.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(Error::TooLong { len: line.len() + 1, max: CMDLINE_MAX_SIZE });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: HostCompat = HostCompat::On { tsc_khz: None };

    #[test]
    fn compat_passes_the_tsc_rate() {
        let l = build(HostCompat::On { tsc_khz: Some(2_445_406) }, &[], "").unwrap();
        assert!(l.contains(" tsc_early_khz=2445406 tsc=reliable "), "{l}");
        assert!(!build(ON, &[], "").unwrap().contains("tsc"));
        assert!(!build(HostCompat::Off, &[], "").unwrap().contains("tsc"));
    }

    #[test]
    fn plain_hardware_line() {
        let l = build(HostCompat::Off, &[], "").unwrap();
        assert_eq!(l, BASE_ARGS);
        assert!(!l.contains("clearcpuid"));
    }

    #[test]
    fn compat_adds_one_clearcpuid() {
        let l = build(ON, &[], "").unwrap();
        assert!(l.contains("noxsave") && l.contains("nopti"));
        assert!(l.contains(" GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX_Fast_Unaligned_Load,"));
        assert_eq!(l.matches("clearcpuid=").count(), 1);
        assert!(l.ends_with("clearcpuid=308,295,288,158,306,534,145,298,514,515,151,150,311,312,141,297,580"));
    }

    #[test]
    fn user_clearcpuid_is_merged_not_appended() {
        let l = build(ON, &[], "loglevel=8 clearcpuid=308,123").unwrap();
        assert_eq!(l.matches("clearcpuid=").count(), 1);
        assert!(l.ends_with(",297,580,123"), "{l}");
        assert!(l.contains("loglevel=8"));
        assert_eq!(build(ON, &[], "clearcpuid=x").unwrap_err(), Error::BadClearCpuid("x".into()));
    }

    #[test]
    fn virtio_devices_are_announced() {
        let d = VirtioMmioDevice { base: 0xd000_0000, size: 0x1000, irq: 5 };
        let l = build(HostCompat::Off, &[d], "").unwrap();
        assert!(l.contains("virtio_mmio.device=4K@0xd0000000:5"));
    }

    #[test]
    fn too_long_is_an_error() {
        let extra = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(build(HostCompat::Off, &[], &extra), Err(Error::TooLong { .. })));
    }
}
