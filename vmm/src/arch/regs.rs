//! Initial vCPU state for the 64-bit boot protocol: long mode with paging on,
//! flat segments from the boot GDT, RSI pointing at the zero page.

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// RFLAGS with only the always-one bit set.
const RFLAGS_RESERVED: u64 = 0x2;

/// Fills the special registers: segments, descriptor tables, control
/// registers and EFER. Other fields (APIC base, ...) keep KVM's values.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    let code = kvm_segment_from_gdt(BOOT_GDT[(CODE_SELECTOR >> 3) as usize], CODE_SELECTOR);
    let data = kvm_segment_from_gdt(BOOT_GDT[(DATA_SELECTOR >> 3) as usize], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(BOOT_GDT[(TSS_SELECTOR >> 3) as usize], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_control_registers() {
        let mut s = kvm_sregs::default();
        setup_sregs(&mut s);
        // The values the reference loader booted with on this host.
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x8000_0011, 0x9000, 0x20, 0x500));
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 39));
        assert_eq!((s.idt.base, s.idt.limit), (0x530, 0));
        assert_eq!((s.cs.selector, s.cs.l, s.ss.selector, s.tr.selector), (0x10, 1, 0x18, 0x20));
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0000, 0x7000, 0x8ff0, 2));
    }
}
