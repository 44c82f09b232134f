//! Identity page tables for entering 64-bit mode: the first 4 GiB mapped with
//! 2 MiB pages. The kernel replaces them early in boot.

use super::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE_PAGE: u64 = 0x80;
const PAGE_SIZE: usize = 4096;
/// Number of page directories (each maps 1 GiB).
const PD_COUNT: usize = 4;

/// The PML4, PDPT and page directories as one contiguous block of bytes to be
/// written at `PML4_ADDR` (the layout keeps them adjacent).
pub fn identity_page_tables() -> Vec<u8> {
    debug_assert_eq!(PDPT_ADDR, PML4_ADDR + PAGE_SIZE as u64);
    debug_assert_eq!(PD_ADDR, PDPT_ADDR + PAGE_SIZE as u64);
    let mut t = vec![0u8; PAGE_SIZE * (2 + PD_COUNT)];
    let mut put = |offset: usize, v: u64| t[offset..offset + 8].copy_from_slice(&v.to_le_bytes());
    put(0, PDPT_ADDR | PRESENT_WRITABLE);
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + (pd * PAGE_SIZE) as u64;
        put(PAGE_SIZE + pd * 8, pd_addr | PRESENT_WRITABLE);
        for e in 0..512 {
            let phys = ((pd * 512 + e) as u64) << 21;
            put((2 + pd) * PAGE_SIZE + e * 8, phys | PRESENT_WRITABLE | HUGE_PAGE);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(t: &[u8], table_addr: u64, index: u64) -> u64 {
        let off = (table_addr - PML4_ADDR + index * 8) as usize;
        u64::from_le_bytes(t[off..off + 8].try_into().unwrap())
    }

    /// Walks the tables like the MMU does and returns the physical address.
    fn translate(t: &[u8], va: u64) -> u64 {
        let pml4e = entry(t, PML4_ADDR, (va >> 39) & 511);
        assert_eq!(pml4e & 1, 1);
        let pdpte = entry(t, pml4e & !0xfff, (va >> 30) & 511);
        assert_eq!(pdpte & 1, 1);
        let pde = entry(t, pdpte & !0xfff, (va >> 21) & 511);
        assert_eq!(pde & 0x81, 0x81);
        (pde & !0x1f_ffff) | (va & 0x1f_ffff)
    }

    #[test]
    fn maps_4gib_identically() {
        let t = identity_page_tables();
        for va in [0, 0x1000, 0x100_0000, 0x1234_5678, 0xc000_0000, 0xffff_ffff] {
            assert_eq!(translate(&t, va), va);
        }
    }
}
