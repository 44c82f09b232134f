//! The VMM's paravirtual interface for the guest kernel (see
//! kernel-config/patches/0003-x86-paravirtual-clear-page.patch): an IN from
//! the port returns the magic when the interface is offered; an OUT of a
//! page frame number asks the VMM to clear that frame, which it does
//! natively in one exit instead of the guest kernel clearing it with
//! emulated stores (~5 ms a page on kvm_pvm).

use vm_memory::{Bytes, GuestMemoryMmap};

use super::{IoEffect, PortIoDevice};
use crate::guest_ram::{frame_addr, PAGE_SIZE};
use crate::guest_warn;

/// The port, as in the kernel patch.
pub const PORT: u16 = 0x5a0;
/// Width of the interface in ports.
pub const PORT_LEN: u16 = 4;
/// "PMV1", little endian.
pub const MAGIC: u32 = 0x3156_4d50;

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Offered on hosts where guest kernel stores are emulated.
pub struct PvInterface {
    mem: GuestMemoryMmap,
    /// Frames cleared, for the exit statistics.
    pub cleared: u64,
}

impl PvInterface {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        PvInterface { mem, cleared: 0 }
    }
}

impl PortIoDevice for PvInterface {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&MAGIC.to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoEffect {
        let Ok(pfn) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            guest_warn!("pv: {}-byte write to port offset {offset} ignored", data.len());
            return IoEffect::None;
        };
        match frame_addr(&self.mem, u64::from(pfn)) {
            Some(addr) if offset == 0 => match self.mem.write_slice(&ZERO_PAGE, addr) {
                Ok(()) => self.cleared += 1,
                Err(e) => guest_warn!("pv: clearing frame {pfn:#x}: {e}"),
            },
            _ => guest_warn!("pv: the guest asked to clear frame {pfn:#x}, which is not guest RAM"),
        }
        IoEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn device() -> PvInterface {
        PvInterface::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap())
    }

    #[test]
    fn offers_the_magic_on_a_32_bit_read() {
        let mut d = device();
        let mut b = [0u8; 4];
        d.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), MAGIC);
        let mut one = [0u8; 1];
        d.read(0, &mut one);
        assert_eq!(one, [0xff]);
    }

    #[test]
    fn clears_a_frame_in_ram_and_nothing_else() {
        let mut d = device();
        d.mem.write_slice(&[0xaa; 0x4000], GuestAddress(0)).unwrap();
        d.write(0, &2u32.to_le_bytes());
        let mut back = vec![0u8; 0x4000];
        d.mem.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(back[..0x2000].iter().all(|&b| b == 0xaa));
        assert!(back[0x2000..0x3000].iter().all(|&b| b == 0));
        assert!(back[0x3000..].iter().all(|&b| b == 0xaa));
        assert_eq!(d.cleared, 1);
        // Hostile frame numbers and widths change nothing.
        for pfn in [4u32, u32::MAX] {
            d.write(0, &pfn.to_le_bytes());
        }
        d.write(0, &[2]);
        d.write(1, &2u32.to_le_bytes()[..3]);
        assert_eq!(d.cleared, 1);
    }
}
