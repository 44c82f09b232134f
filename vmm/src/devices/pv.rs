//! The VMM's paravirtual interface for the guest kernel (see
//! kernel-config/patches/0003-x86-paravirtual-clear-page.patch and
//! 0004-x86-paravirtual-memory-copy.patch), three 32-bit registers:
//! - offset 0, clearing: an IN returns [`MAGIC`] when the interface is
//!   offered; an OUT of a page frame number asks the VMM to clear that frame,
//!   which it does natively in one exit instead of the guest kernel clearing
//!   it with emulated stores (~5 ms a page on kvm_pvm).
//! - offset 4, copying: an IN returns [`COPY_MAGIC`]; an OUT of the guest
//!   physical address of a request block `{dst, src, len, done: u64}` asks
//!   the VMM to copy `len` bytes from guest physical `src` to `dst`. The VMM
//!   sets `done` to 1 only if it copied: both ranges inside guest RAM, not
//!   overlapping; otherwise the guest kernel copies itself.
//! - offset 8, filling (offered with copying): the same request block with
//!   the fill byte in place of `src` (the guest kernel's large memset()).

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{IoEffect, PortIoDevice};
use crate::guest_ram::{frame_addr, PAGE_SIZE};
use crate::guest_warn;

/// The port, as in the kernel patch.
pub const PORT: u16 = 0x5a0;
/// Width of the interface in ports.
pub const PORT_LEN: u16 = 12;
/// "PMV1", little endian.
pub const MAGIC: u32 = 0x3156_4d50;
/// "PMC1", little endian: the copy register is offered.
pub const COPY_MAGIC: u32 = 0x3143_4d50;
/// Register offsets.
const CLEAR: u16 = 0;
const COPY: u16 = 4;
const FILL: u16 = 8;

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Offered on hosts where guest kernel stores are emulated.
pub struct PvInterface {
    mem: GuestMemoryMmap,
    /// Frames cleared, for the exit statistics.
    pub cleared: u64,
    /// Copies and fills done, and their bytes.
    pub copies: u64,
    pub copied: u64,
}

/// What a request block asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Copy,
    Fill,
}

/// A copy or fill request as the guest kernel lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    dst: u64,
    src: u64,
    len: u64,
}

/// Offset of the `done` word in the request block.
const DONE: u64 = 24;

impl Request {
    fn parse(block: &[u8; 24]) -> Self {
        let word = |i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap());
        Request { dst: word(0), src: word(1), len: word(2) }
    }

    /// No address overflow, source and destination apart.
    fn copy_ranges_apart(&self) -> bool {
        match (self.src.checked_add(self.len), self.dst.checked_add(self.len)) {
            (Some(src_end), Some(dst_end)) => src_end <= self.dst || dst_end <= self.src,
            _ => false,
        }
    }
}

impl PvInterface {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        PvInterface { mem, cleared: 0, copies: 0, copied: 0 }
    }

    fn clear(&mut self, pfn: u32) {
        match frame_addr(&self.mem, u64::from(pfn)) {
            Some(addr) => match self.mem.write_slice(&ZERO_PAGE, addr) {
                Ok(()) => self.cleared += 1,
                Err(e) => guest_warn!("pv: clearing frame {pfn:#x}: {e}"),
            },
            None => guest_warn!("pv: the guest asked to clear frame {pfn:#x}, which is not guest RAM"),
        }
    }

    /// Serves the request block at `block` (guest physical); sets its done
    /// word only if the copy or fill was made.
    fn serve(&mut self, op: Op, block: u32) {
        let block = GuestAddress(u64::from(block));
        let Ok(raw) = self.mem.read_obj::<[u8; 24]>(block) else {
            guest_warn!("pv: request block at {:#x} is not guest RAM", block.0);
            return;
        };
        let req = Request::parse(&raw);
        if !self.perform(op, &req) {
            guest_warn!("pv: {op:?} request {req:x?} refused (not inside guest RAM, overlapping, empty or a bad byte)");
            return;
        }
        match self.mem.write_obj(1u64, block.unchecked_add(DONE)) {
            Ok(()) => {
                self.copies += 1;
                self.copied += req.len;
            }
            Err(e) => guest_warn!("pv: completing the request at {:#x}: {e}", block.0),
        }
    }

    fn perform(&self, op: Op, req: &Request) -> bool {
        let Some(len) = usize::try_from(req.len).ok().filter(|&len| len > 0) else {
            return false;
        };
        let Ok(dst) = self.mem.get_slice(GuestAddress(req.dst), len) else {
            return false;
        };
        match op {
            Op::Copy => {
                if !req.copy_ranges_apart() {
                    return false;
                }
                let Ok(src) = self.mem.get_slice(GuestAddress(req.src), len) else {
                    return false;
                };
                src.copy_to_volatile_slice(dst);
            }
            Op::Fill => {
                let Ok(byte) = u8::try_from(req.src) else {
                    return false;
                };
                // SAFETY: dst is a live mapping of `len` bytes of guest RAM
                // (get_slice checked the range lies inside one region).
                unsafe { std::ptr::write_bytes(dst.ptr_guard_mut().as_ptr(), byte, len) };
            }
        }
        true
    }
}

impl PortIoDevice for PvInterface {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (CLEAR, 4) => data.copy_from_slice(&MAGIC.to_le_bytes()),
            (COPY, 4) => data.copy_from_slice(&COPY_MAGIC.to_le_bytes()),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoEffect {
        let Ok(value) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) else {
            guest_warn!("pv: {}-byte write to port offset {offset} ignored", data.len());
            return IoEffect::None;
        };
        match offset {
            CLEAR => self.clear(value),
            COPY => self.serve(Op::Copy, value),
            FILL => self.serve(Op::Fill, value),
            _ => guest_warn!("pv: write to port offset {offset} ignored"),
        }
        IoEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> PvInterface {
        PvInterface::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap())
    }

    #[test]
    fn offers_the_magic_on_a_32_bit_read() {
        let mut d = device();
        let mut b = [0u8; 4];
        d.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), MAGIC);
        d.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), COPY_MAGIC);
        d.read(12, &mut b);
        assert_eq!(b, [0xff; 4]);
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

    /// Writes a request block at 0x100 and asks for it.
    fn request(d: &mut PvInterface, dst: u64, src: u64, len: u64) -> bool {
        request_at(d, COPY, dst, src, len)
    }

    fn request_at(d: &mut PvInterface, register: u16, dst: u64, src: u64, len: u64) -> bool {
        let mut block = Vec::new();
        for w in [dst, src, len, 0] {
            block.extend_from_slice(&w.to_le_bytes());
        }
        d.mem.write_slice(&block, GuestAddress(0x100)).unwrap();
        d.write(register, &0x100u32.to_le_bytes());
        d.mem.read_obj::<u64>(GuestAddress(0x100 + DONE)).unwrap() == 1
    }

    #[test]
    fn fills_inside_ram_with_a_byte_and_refuses_the_rest() {
        let mut d = device();
        d.mem.write_slice(&[0xaa; 0x2000], GuestAddress(0x2000)).unwrap();
        assert!(request_at(&mut d, FILL, 0x2800, 0x5c, 0x1000));
        let mut back = vec![0u8; 0x2000];
        d.mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert!(back[..0x800].iter().all(|&b| b == 0xaa));
        assert!(back[0x800..0x1800].iter().all(|&b| b == 0x5c));
        assert!(back[0x1800..].iter().all(|&b| b == 0xaa));
        for (dst, byte, len) in [(0x3800, 0, 0x1000), (0x2000, 0x100, 0x10), (0x2000, 0, 0), (u64::MAX, 0, 1)] {
            assert!(!request_at(&mut d, FILL, dst, byte, len), "{dst:#x} {byte:#x} {len:#x}");
        }
        assert_eq!((d.copies, d.copied), (1, 0x1000));
    }

    #[test]
    fn copies_inside_ram_and_says_so() {
        let mut d = device();
        let pattern: Vec<u8> = (0..0x1000u32).map(|i| (i % 251) as u8).collect();
        d.mem.write_slice(&pattern, GuestAddress(0x1000)).unwrap();
        assert!(request(&mut d, 0x2800, 0x1000, 0x1000));
        let mut back = vec![0u8; 0x1000];
        d.mem.read_slice(&mut back, GuestAddress(0x2800)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!((d.copies, d.copied), (1, 0x1000));
    }

    #[test]
    fn refuses_copies_outside_ram_overlapping_or_empty() {
        let mut d = device();
        d.mem.write_slice(&[0xaa; 0x1000], GuestAddress(0x3000)).unwrap();
        let bad = [
            (0x3000, 0x1000, 0x1001),        // destination runs past RAM
            (0x1000, 0x3800, 0x1000),        // source runs past RAM
            (0x1000, 0x1800, 0x1000),        // overlap
            (0x1000, 0x2000, 0),             // empty
            (u64::MAX - 8, 0x1000, 0x100),   // address overflow
            (0x1000, u64::MAX, 2),
            (0x1000, 0x2000, u64::MAX),
        ];
        for (dst, src, len) in bad {
            assert!(!request(&mut d, dst, src, len), "{dst:#x} {src:#x} {len:#x}");
        }
        assert_eq!(d.copies, 0);
        let mut back = vec![0u8; 0x1000];
        d.mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert!(back.iter().all(|&b| b == 0xaa));
        // A request block outside RAM is ignored.
        d.write(4, &0x4000u32.to_le_bytes());
        d.write(4, &u32::MAX.to_le_bytes());
        assert_eq!(d.copies, 0);
    }
}
