//! Guest RAM addressed by frame number. Frame numbers come from the guest
//! (the agent's page lists, the paravirtual page-clearing port) and are
//! untrusted: every one goes through [`frame_addr`].

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub use pmivmm_proto::image::PAGE_SIZE;

/// The guest-physical address of frame `pfn`, if all of
/// `[pfn * 4096, pfn * 4096 + 4096)` lies inside one RAM region (checked
/// arithmetic: `u64::MAX` or a frame in the MMIO gap is `None`, never a
/// wrap-around).
pub fn frame_addr(mem: &GuestMemoryMmap, pfn: u64) -> Option<GuestAddress> {
    let start = pfn.checked_mul(PAGE_SIZE)?;
    let end = start.checked_add(PAGE_SIZE)?;
    mem.iter()
        .any(|r| {
            let r_start = r.start_addr().raw_value();
            r_start.checked_add(r.len()).is_some_and(|r_end| r_start <= start && end <= r_end)
        })
        .then_some(GuestAddress(start))
}

/// How many frames of guest RAM `mem` has (all regions).
pub fn ram_frames(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len() / PAGE_SIZE).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

    #[test]
    fn frames_inside_ram_only() {
        // 64 KiB at 0 and 64 KiB at 4 GiB, like a VM with RAM above the gap.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(MMIO_GAP_END), 0x10000),
        ])
        .unwrap();
        assert_eq!(frame_addr(&mem, 0), Some(GuestAddress(0)));
        assert_eq!(frame_addr(&mem, 15), Some(GuestAddress(15 * 4096)));
        assert_eq!(frame_addr(&mem, 16), None, "just past the low region");
        assert_eq!(frame_addr(&mem, MMIO_GAP_START / 4096), None, "MMIO gap");
        assert_eq!(frame_addr(&mem, MMIO_GAP_END / 4096 - 1), None, "last gap frame");
        assert_eq!(frame_addr(&mem, MMIO_GAP_END / 4096), Some(GuestAddress(MMIO_GAP_END)));
        assert_eq!(frame_addr(&mem, MMIO_GAP_END / 4096 + 16), None, "past the end of RAM");
        assert_eq!(ram_frames(&mem), 32);
        for hostile in [u64::MAX, u64::MAX / 4096, u64::MAX / 4096 + 1, 1 << 52] {
            assert_eq!(frame_addr(&mem, hostile), None, "{hostile:#x}");
        }
    }
}
