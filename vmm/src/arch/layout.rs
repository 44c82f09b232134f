//! Every fixed guest-physical address the VMM uses, in one place.
//!
//! Low memory (below 1 MiB) holds the structures the VMM builds for the
//! 64-bit Linux boot protocol; the kernel is loaded where its ELF program
//! headers ask (1 MiB and up, 16 MiB for our kernel); the initrd goes at the
//! top of low RAM. Devices live in the MMIO gap below 4 GiB; RAM above the gap
//! continues at 4 GiB.

/// Global descriptor table (null, null, code 0x10, data 0x18, TSS 0x20).
pub const GDT_ADDR: u64 = 0x500;
/// Empty interrupt descriptor table (limit 0), after the GDT: the kernel
/// installs its own.
pub const IDT_ADDR: u64 = 0x530;
/// setup_data chain (the SETUP_RNG_SEED entry).
pub const SETUP_DATA_ADDR: u64 = 0x6000;
/// The "zero page": struct boot_params.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4).
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories follow the PDPT, mapping 4 GiB with 2 MiB pages.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line the x86 kernel accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the extended BIOS data area: RAM ends here in the first MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Highest address (exclusive) an initrd may occupy (hdr.initrd_addr_max + 1).
pub const INITRD_ADDR_MAX: u64 = 0x8000_0000;

/// Guest RAM stops here and resumes at `MMIO_GAP_END` (4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device gets `VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First interrupt line handed to virtio-mmio devices (0-4 are legacy ISA).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Where KVM puts the real-mode TSS (KVM_SET_TSS_ADDR), inside the MMIO gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Where KVM puts the EPT identity map page (KVM_SET_IDENTITY_MAP_ADDR).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy I/O ports.
pub mod ports {
    /// COM1 8250 UART, 8 registers.
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// COM1 interrupt line.
    pub const SERIAL_COM1_IRQ: u32 = 4;
    /// i8042 data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port: writing 0xFE resets the machine.
    pub const I8042_COMMAND: u16 = 0x64;
    /// CMOS RTC index and data ports.
    pub const CMOS_INDEX: u16 = 0x70;
    pub const CMOS_DATA: u16 = 0x71;
}

/// Guest RAM as (start, size) ranges for `mem_size` bytes: below the MMIO gap
/// first, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

/// End (exclusive) of the RAM range that starts at 0.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
        assert_eq!(r.iter().map(|(_, s)| s).sum::<u64>(), 4 << 30);
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (GDT_ADDR, 5 * 8),
            (IDT_ADDR, 8),
            (SETUP_DATA_ADDR, 0x1000),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 4 * 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        const {
            assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
            assert!(BOOT_STACK_POINTER < PML4_ADDR && BOOT_STACK_POINTER > ZERO_PAGE_ADDR + 0x1000);
            assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && KVM_IDENTITY_MAP_ADDR < MMIO_GAP_END);
        }
    }
}
