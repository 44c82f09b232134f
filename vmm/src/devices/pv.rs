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
//! - offset 12, strided stores (0013-mm-paravirtual-struct-page-runs.patch):
//!   an IN returns [`STRIDE_MAGIC`]; an OUT of the guest physical address of
//!   a [`StrideRequest`] block asks the VMM to write the same fields of
//!   `count` elements `stride` bytes apart (consecutive struct pages: the
//!   memmap at boot, the tail pages of a huge page). `done` is set to 1 only
//!   if the VMM wrote them all.

use std::sync::atomic::Ordering;

use vm_memory::bitmap::BS;
use vm_memory::volatile_memory::Error as VolatileMemoryError;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::{IoEffect, PortIoDevice};
use crate::guest_ram::{frame_addr, PAGE_SIZE};
use crate::guest_warn;

/// The port, as in the kernel patch.
pub const PORT: u16 = 0x5a0;
/// Width of the interface in ports.
pub const PORT_LEN: u16 = 16;
/// "PMV1", little endian.
pub const MAGIC: u32 = 0x3156_4d50;
/// "PMC1", little endian: the copy register is offered.
pub const COPY_MAGIC: u32 = 0x3143_4d50;
/// "PMS1", little endian: the strided-store register is offered.
pub const STRIDE_MAGIC: u32 = 0x3153_4d50;
/// Register offsets.
const CLEAR: u16 = 0;
const COPY: u16 = 4;
const FILL: u16 = 8;
const STRIDE: u16 = 12;

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Offered on hosts where guest kernel stores are emulated.
pub struct PvInterface {
    mem: GuestMemoryMmap,
    /// Frames cleared, for the exit statistics.
    pub cleared: u64,
    /// Copies and fills done, and their bytes.
    pub copies: u64,
    pub copied: u64,
    /// Strided-store requests done, and the elements they wrote.
    pub strides: u64,
    pub stride_elements: u64,
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

/// Most fields in one strided-store request (the kernel's
/// PMIVMM_PV_STRIDE_FIELDS: a struct page of up to 128 bytes).
const STRIDE_FIELDS: usize = 16;
/// Largest element stride accepted.
const MAX_STRIDE: u64 = PAGE_SIZE;

/// One field of a strided store: in element `i` the 64-bit word at
/// `offset` becomes `(word & keep) | (value + i * step)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StrideField {
    offset: u64,
    keep: u64,
    value: u64,
    step: u64,
}

/// A strided-store request block as the guest kernel lays it out:
/// `{dst, stride, count, nfields, field[16] {offset, keep, value, step}, done}`,
/// all u64.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StrideRequest {
    dst: u64,
    stride: u64,
    count: u64,
    fields: Vec<StrideField>,
}

/// Why a strided-store request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum StrideError {
    #[error("{0} fields (1 to {STRIDE_FIELDS})")]
    Fields(u64),
    #[error("stride {0} (a multiple of 8 from 8 to {MAX_STRIDE})")]
    Stride(u64),
    #[error("destination {0:#x} is not 8-byte aligned")]
    Unaligned(u64),
    #[error("no elements")]
    Empty,
    #[error("field offset {offset} does not fit an element of {stride} bytes as an aligned word")]
    Offset { offset: u64, stride: u64 },
    #[error("{count} elements of {stride} bytes overflow")]
    Overflow { count: u64, stride: u64 },
}

impl StrideRequest {
    const HEADER_WORDS: usize = 4;
    const FIELD_WORDS: usize = 4;
    const LEN: usize = 8 * (Self::HEADER_WORDS + STRIDE_FIELDS * Self::FIELD_WORDS + 1);
    /// Offset of the `done` word.
    const DONE: u64 = (Self::LEN - 8) as u64;

    fn parse(block: &[u8; Self::LEN]) -> Result<Self, StrideError> {
        let word = |i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap());
        let (dst, stride, count, nfields) = (word(0), word(1), word(2), word(3));
        if nfields == 0 || nfields > STRIDE_FIELDS as u64 {
            return Err(StrideError::Fields(nfields));
        }
        if stride == 0 || stride % 8 != 0 || stride > MAX_STRIDE {
            return Err(StrideError::Stride(stride));
        }
        if dst % 8 != 0 {
            return Err(StrideError::Unaligned(dst));
        }
        if count == 0 {
            return Err(StrideError::Empty);
        }
        let fields = (0..nfields as usize)
            .map(|f| {
                let at = Self::HEADER_WORDS + f * Self::FIELD_WORDS;
                StrideField { offset: word(at), keep: word(at + 1), value: word(at + 2), step: word(at + 3) }
            })
            .collect::<Vec<_>>();
        if let Some(f) = fields.iter().find(|f| f.offset % 8 != 0 || f.offset.saturating_add(8) > stride) {
            return Err(StrideError::Offset { offset: f.offset, stride });
        }
        let req = StrideRequest { dst, stride, count, fields };
        if count.checked_mul(stride).and_then(|span| usize::try_from(span).ok()).is_none() {
            return Err(StrideError::Overflow { count, stride });
        }
        Ok(req)
    }

    /// Bytes from the first element's start to the last one's end.
    fn span(&self) -> usize {
        // parse() checked that this fits.
        (self.count * self.stride) as usize
    }

    /// Writes the fields of every element into `span`, which starts at the
    /// first element (each word is loaded and stored whole: the guest may
    /// read its struct pages meanwhile on another vCPU).
    fn apply(&self, span: &VolatileSlice<'_, BS<'_, ()>>) -> Result<(), VolatileMemoryError> {
        for i in 0..self.count {
            let element = (i * self.stride) as usize;
            for f in &self.fields {
                let at = element + f.offset as usize;
                let old: u64 = span.load(at, Ordering::Relaxed)?;
                span.store((old & f.keep) | f.value.wrapping_add(i.wrapping_mul(f.step)), at, Ordering::Relaxed)?;
            }
        }
        Ok(())
    }
}

impl PvInterface {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        PvInterface { mem, cleared: 0, copies: 0, copied: 0, strides: 0, stride_elements: 0 }
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
        if self.complete(block, DONE) {
            self.copies += 1;
            self.copied += req.len;
        }
    }

    /// Sets the done word at `done` in the request block at `block`; false
    /// (with a warning) if it cannot be written.
    fn complete(&self, block: GuestAddress, done: u64) -> bool {
        match self.mem.write_obj(1u64, block.unchecked_add(done)) {
            Ok(()) => true,
            Err(e) => {
                guest_warn!("pv: completing the request at {:#x}: {e}", block.0);
                false
            }
        }
    }

    /// Serves the strided-store block at `block` (guest physical); sets its
    /// done word only if every element was written.
    fn serve_stride(&mut self, block: u32) {
        let block = GuestAddress(u64::from(block));
        let mut raw = [0u8; StrideRequest::LEN];
        if self.mem.read_slice(&mut raw, block).is_err() {
            guest_warn!("pv: strided-store block at {:#x} is not guest RAM", block.0);
            return;
        }
        let req = match StrideRequest::parse(&raw) {
            Ok(req) => req,
            Err(e) => {
                guest_warn!("pv: strided-store request at {:#x} refused: {e}", block.0);
                return;
            }
        };
        let Ok(span) = self.mem.get_slice(GuestAddress(req.dst), req.span()) else {
            guest_warn!("pv: strided-store request {req:x?} refused: not inside guest RAM");
            return;
        };
        if let Err(e) = req.apply(&span) {
            guest_warn!("pv: strided-store request {req:x?} failed: {e}");
            return;
        }
        if self.complete(block, StrideRequest::DONE) {
            self.strides += 1;
            self.stride_elements += req.count;
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
            (STRIDE, 4) => data.copy_from_slice(&STRIDE_MAGIC.to_le_bytes()),
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
            STRIDE => self.serve_stride(value),
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
        d.read(16, &mut b);
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

    /// Writes a strided-store block at 0x100 with these header words and
    /// fields and asks for it; true if the VMM set done.
    fn stride(d: &mut PvInterface, header: [u64; 4], fields: &[[u64; 4]]) -> bool {
        let mut block = vec![0u8; StrideRequest::LEN];
        for (i, w) in header.iter().chain(fields.iter().flatten()).enumerate() {
            block[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        d.mem.write_slice(&block, GuestAddress(0x100)).unwrap();
        d.write(STRIDE, &0x100u32.to_le_bytes());
        d.mem.read_obj::<u64>(GuestAddress(0x100 + StrideRequest::DONE)).unwrap() == 1
    }

    fn words(d: &PvInterface, at: u64, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| d.mem.read_obj::<u64>(GuestAddress(at + 8 * i)).unwrap()).collect()
    }

    #[test]
    fn strided_stores_write_each_field_of_each_element_and_nothing_else() {
        let mut d = device();
        let mut b = [0u8; 4];
        d.read(STRIDE, &mut b);
        assert_eq!(u32::from_le_bytes(b), STRIDE_MAGIC);
        d.mem.write_slice(&[0x55; 0x1000], GuestAddress(0x1000)).unwrap();
        // Three elements of 32 bytes from 0x1020: word 0 keeps its high half
        // and gets 7 below, word 2 counts up from 0x100 by 0x20, words 1 and
        // 3 stay.
        let keep_high = 0xffff_ffff_0000_0000;
        assert!(stride(&mut d, [0x1020, 32, 3, 2], &[[0, keep_high, 7, 0], [16, 0, 0x100, 0x20]]));
        let w = words(&d, 0x1000, 20);
        let fill = 0x5555_5555_5555_5555;
        assert_eq!(&w[..4], &[fill; 4], "before the first element");
        for (i, e) in w[4..16].chunks(4).enumerate() {
            assert_eq!(e, &[0x5555_5555_0000_0007, fill, 0x100 + 0x20 * i as u64, fill], "element {i}");
        }
        assert_eq!(&w[16..], &[fill; 4], "after the last element");
        assert_eq!((d.strides, d.stride_elements), (1, 3));
    }

    #[test]
    fn strided_stores_refuse_bad_requests_and_change_nothing() {
        let mut d = device();
        d.mem.write_slice(&[0x55; 0x3000], GuestAddress(0x1000)).unwrap();
        let field = [[0, 0, 1, 0]];
        let bad: [([u64; 4], &[[u64; 4]]); 12] = [
            ([0x1000, 64, 2, 0], &field),                      // no fields
            ([0x1000, 64, 2, 17], &field),                     // too many fields
            ([0x1000, 0, 2, 1], &field),                       // no stride
            ([0x1000, 12, 2, 1], &field),                      // stride not a multiple of 8
            ([0x1000, 8192, 2, 1], &field),                    // stride beyond a page
            ([0x1004, 64, 2, 1], &field),                      // unaligned destination
            ([0x1000, 64, 0, 1], &field),                      // no elements
            ([0x1000, 64, 2, 1], &[[60, 0, 1, 0]]),            // field not aligned
            ([0x1000, 64, 2, 1], &[[64, 0, 1, 0]]),            // field past the element
            ([0x1000, 64, 0x100, 1], &field),                  // runs past the end of RAM
            ([0x1000, 64, u64::MAX, 1], &field),               // count * stride overflows
            ([u64::MAX - 7, 8, 1, 1], &field),                 // outside RAM
        ];
        for (header, fields) in bad {
            assert!(!stride(&mut d, header, fields), "{header:x?} {fields:x?}");
        }
        assert!(words(&d, 0x1000, 0x600).iter().all(|&w| w == 0x5555_5555_5555_5555));
        assert_eq!(d.strides, 0);
        // A block outside RAM is ignored.
        d.write(STRIDE, &0x3f00u32.to_le_bytes());
        d.write(STRIDE, &u32::MAX.to_le_bytes());
        assert_eq!(d.strides, 0);
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
