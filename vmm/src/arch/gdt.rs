//! The boot GDT and the KVM segment registers derived from it.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Builds a GDT descriptor from access/flag bits (`0xF0FF` layout: flags in
/// bits 12-15, access byte in bits 0-7), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, 64-bit code, data, 64-bit TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, ring 0, execute/read, L, G
    gdt_entry(0xc093, 0, 0xfffff), // data: present, ring 0, read/write, D/B, G
    gdt_entry(0x008b, 0, 0x67),    // busy 64-bit TSS
];

/// Decodes a GDT descriptor into the KVM segment register for `selector`.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let flags = (entry >> 40) as u16;
    kvm_segment {
        base: (((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
            // With granularity set the limit counts 4 KiB pages.
            if flags & 0x8000 != 0 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: u8::from((flags >> 7) & 1 == 0),
        padding: 0,
    }
}

/// The GDT as bytes, ready to be written at `layout::GDT_ADDR`.
pub fn gdt_bytes() -> Vec<u8> {
    BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_the_known_good_values() {
        // The values the reference loader booted with on this host.
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[4], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn code_segment_decodes_to_long_mode() {
        let s = kvm_segment_from_gdt(BOOT_GDT[2], CODE_SELECTOR);
        assert_eq!((s.base, s.limit, s.selector), (0, 0xffff_ffff, CODE_SELECTOR));
        assert_eq!((s.type_, s.present, s.dpl, s.s, s.l, s.db, s.g), (0xb, 1, 0, 1, 1, 0, 1));
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn tss_decodes_as_busy_system_segment() {
        let s = kvm_segment_from_gdt(BOOT_GDT[4], TSS_SELECTOR);
        assert_eq!((s.limit, s.type_, s.s, s.g, s.present), (0x67, 0xb, 0, 0, 1));
    }

    #[test]
    fn base_round_trips() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 0);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
    }

    #[test]
    fn bytes_are_little_endian_entries() {
        let b = gdt_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), BOOT_GDT[2]);
    }
}
