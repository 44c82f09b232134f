//! The Linux "zero page" (struct boot_params): e820 memory map, command line,
//! initrd location, and the setup_data chain carrying an RNG seed.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, SETUP_RNG_SEED};
use vm_memory::ByteValued;

use super::layout::{
    low_ram_end, ram_ranges, CMDLINE_ADDR, EBDA_START, HIMEM_START, INITRD_ADDR_MAX,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_PROTOCOL_VERSION: u16 = 0x020f;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
const HEAP_END_PTR: u16 = 0xfe00;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;
/// Bytes of seed in the SETUP_RNG_SEED entry.
pub const RNG_SEED_LEN: usize = 64;

/// Errors while placing boot data in guest memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "the initrd ({initrd_size} bytes) does not fit in guest RAM between the kernel end \
         (0x{kernel_end:x}) and 0x{limit:x}; give the node more memory (--mem)"
    )]
    InitrdDoesNotFit { initrd_size: u64, kernel_end: u64, limit: u64 },
}

/// `boot_params` made byte-addressable for vm-memory.
#[derive(Clone, Copy, Default)]
pub struct BootParams(pub boot_params);

// SAFETY: boot_params is a plain C struct of integers and arrays of integers
// (bindgen output, packed), so every byte pattern is a valid value.
unsafe impl ByteValued for BootParams {}

/// What the boot_params describe.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Total guest RAM in bytes.
    pub mem_size: u64,
    /// Length of the command line including the terminating NUL.
    pub cmdline_size: u32,
    /// Initrd guest address and size, if any.
    pub initrd: Option<(u64, u32)>,
    /// Address of the first setup_data entry, if any.
    pub setup_data: Option<u64>,
}

/// The e820 map for `mem_size` bytes of RAM: low RAM up to the EBDA, the
/// legacy hole reserved, then every RAM range from 1 MiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, kind| boot_e820_entry { addr, size, r#type: kind };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let end = start + size;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Where the initrd goes: page aligned, as high as possible in low RAM below
/// the protocol's limit, above the kernel.
pub fn initrd_address(mem_size: u64, initrd_size: u64, kernel_end: u64) -> Result<u64, Error> {
    let limit = low_ram_end(mem_size).min(INITRD_ADDR_MAX);
    let addr = limit.checked_sub(initrd_size).map(|a| a & !(PAGE_SIZE - 1));
    match addr {
        Some(a) if a >= kernel_end => Ok(a),
        _ => Err(Error::InitrdDoesNotFit { initrd_size, kernel_end, limit }),
    }
}

/// Builds the zero page.
pub fn build_boot_params(info: &BootInfo) -> BootParams {
    let mut p = boot_params::default();
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.version = BOOT_PROTOCOL_VERSION;
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.loadflags = LOADED_HIGH | CAN_USE_HEAP;
    p.hdr.heap_end_ptr = HEAP_END_PTR;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = info.cmdline_size;
    p.hdr.initrd_addr_max = (INITRD_ADDR_MAX - 1) as u32;
    if let Some((addr, size)) = info.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size;
    }
    p.hdr.setup_data = info.setup_data.unwrap_or(0);
    let map = e820_map(info.mem_size);
    p.e820_entries = map.len() as u8;
    p.e820_table[..map.len()].copy_from_slice(&map);
    BootParams(p)
}

/// A single SETUP_RNG_SEED setup_data entry (next = 0) carrying `seed`.
///
/// With `CONFIG_RANDOM_TRUST_BOOTLOADER` the kernel's CRNG is ready at once;
/// without a seed (RDRAND is hidden on the development host) every random
/// number costs a full BLAKE2s extraction in the emulated guest kernel.
pub fn rng_seed_setup_data(seed: &[u8; RNG_SEED_LEN]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + RNG_SEED_LEN);
    b.extend_from_slice(&0u64.to_le_bytes()); // next
    b.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes()); // type
    b.extend_from_slice(&(RNG_SEED_LEN as u32).to_le_bytes()); // len
    b.extend_from_slice(seed);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

    fn ranges(map: &[boot_e820_entry]) -> Vec<(u64, u64, u32)> {
        map.iter().map(|e| (e.addr, e.size, e.r#type)).collect()
    }

    #[test]
    fn e820_small() {
        assert_eq!(
            ranges(&e820_map(256 << 20)),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x100000 - 0x9fc00, 2),
                (0x100000, (256 << 20) - 0x100000, 1)
            ]
        );
    }

    #[test]
    fn e820_above_4g() {
        let m = ranges(&e820_map(5 << 30));
        assert_eq!(m[2], (0x100000, MMIO_GAP_START - 0x100000, 1));
        assert_eq!(m[3], (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START, 1));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn initrd_goes_to_the_top_page_aligned() {
        let a = initrd_address(256 << 20, 3 * 4096 + 5, 0x200_0000).unwrap();
        assert_eq!(a, (256 << 20) - 4 * 4096);
        assert_eq!(a % 4096, 0);
        // Above 2 GiB of low RAM the protocol limit applies.
        let a = initrd_address(3 << 30, 4096, 0x200_0000).unwrap();
        assert_eq!(a, INITRD_ADDR_MAX - 4096);
    }

    #[test]
    fn initrd_that_overlaps_the_kernel_is_refused() {
        let e = initrd_address(32 << 20, 20 << 20, 16 << 20).unwrap_err();
        assert!(matches!(e, Error::InitrdDoesNotFit { .. }));
        assert!(e.to_string().contains("--mem"));
        assert!(initrd_address(1 << 20, 2 << 20, 0).is_err());
    }

    #[test]
    fn zero_page_fields() {
        let p = build_boot_params(&BootInfo {
            mem_size: 256 << 20,
            cmdline_size: 10,
            initrd: Some((0x0f00_0000, 1234)),
            setup_data: Some(0x6000),
        })
        .0;
        let bytes = BootParams(p);
        let raw = bytes.as_slice();
        // Offsets from Documentation/x86/boot.rst.
        assert_eq!(raw.len(), 4096);
        assert_eq!(u16::from_le_bytes([raw[0x1fe], raw[0x1ff]]), 0xaa55);
        assert_eq!(&raw[0x202..0x206], b"HdrS");
        assert_eq!(raw[0x1e8], 3);
        assert_eq!(u32::from_le_bytes(raw[0x218..0x21c].try_into().unwrap()), 0x0f00_0000);
        assert_eq!(u32::from_le_bytes(raw[0x21c..0x220].try_into().unwrap()), 1234);
        assert_eq!(u32::from_le_bytes(raw[0x228..0x22c].try_into().unwrap()), CMDLINE_ADDR as u32);
        assert_eq!(u64::from_le_bytes(raw[0x250..0x258].try_into().unwrap()), 0x6000);
        assert_eq!(raw[0x211], 0x81);
    }

    #[test]
    fn rng_seed_entry_layout() {
        let d = rng_seed_setup_data(&[7; RNG_SEED_LEN]);
        assert_eq!(d.len(), 16 + 64);
        assert_eq!(u32::from_le_bytes(d[8..12].try_into().unwrap()), 9);
        assert_eq!(u32::from_le_bytes(d[12..16].try_into().unwrap()), 64);
        assert!(d[16..].iter().all(|&b| b == 7));
    }
}
