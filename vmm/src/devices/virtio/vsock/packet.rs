//! The vsock packet header (virtio 1.2, 5.10.6) as plain values, and the
//! checks a packet from the guest must pass before the muxer sees it.
//! Reading and writing headers in guest memory is the `virtio-vsock`
//! crate's `VsockPacket`; this module only converts to and from it.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// The host's CID: where every guest packet we accept is addressed.
pub const HOST_CID: u64 = 2;
/// The only socket type virtio-vsock defines (SOCK_STREAM).
pub const TYPE_STREAM: u16 = 1;
/// Largest data payload accepted from or sent to the guest (Linux uses 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Header size in guest memory.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

/// Stream operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl TryFrom<u16> for Op {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            other => return Err(other),
        })
    }
}

/// A packet header in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a packet from the guest was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("packet from CID {0}, which is not this guest's CID")]
    WrongSrcCid(u64),
    #[error("packet to CID {0}; only the host (CID 2) is reachable")]
    WrongDstCid(u64),
    #[error("socket type {0} is not a stream")]
    BadType(u16),
    #[error("unknown operation {0}")]
    BadOp(u16),
    #[error("a {op:?} packet carries {len} bytes of data")]
    UnexpectedData { op: Op, len: u32 },
}

impl Header {
    /// Reads the header the guest wrote.
    pub fn from_packet<B: BitmapSlice>(p: &VsockPacket<'_, B>) -> Self {
        Header {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }

    /// The little-endian wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks addressing and type of a packet the guest sent. An `Err`
    /// other than `BadType`/`BadOp`/`UnexpectedData` means the packet is
    /// dropped without a reply; those three are answered with a RST.
    pub fn validate(&self, guest_cid: u64) -> Result<Op, Error> {
        if self.src_cid != guest_cid {
            return Err(Error::WrongSrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(Error::WrongDstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(Error::BadType(self.type_));
        }
        let op = Op::try_from(self.op).map_err(Error::BadOp)?;
        if op != Op::Rw && self.len != 0 {
            return Err(Error::UnexpectedData { op, len: self.len });
        }
        Ok(op)
    }
}

impl Error {
    /// Whether the sender deserves a RST (it is addressed right but malformed).
    pub fn wants_rst(&self) -> bool {
        !matches!(self, Error::WrongSrcCid(_) | Error::WrongDstCid(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(op: u16) -> Header {
        Header { src_cid: 3, dst_cid: HOST_CID, src_port: 1024, dst_port: 5, type_: TYPE_STREAM, op, ..Default::default() }
    }

    #[test]
    fn wire_layout_matches_the_spec() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 7,
            len: 9,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1000,
            fwd_cnt: 0x20,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(b[0], 0x08);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(b[24], 9);
        assert_eq!(b[30], 5);
        assert_eq!(&b[36..40], &[0, 0x10, 0, 0]);
        assert_eq!(b[40], 0x20);
    }

    #[test]
    fn validation() {
        assert_eq!(hdr(1).validate(3), Ok(Op::Request));
        assert_eq!(hdr(1).validate(4), Err(Error::WrongSrcCid(3)));
        assert_eq!(Header { dst_cid: 3, ..hdr(1) }.validate(3), Err(Error::WrongDstCid(3)));
        assert_eq!(Header { type_: 2, ..hdr(1) }.validate(3), Err(Error::BadType(2)));
        assert_eq!(hdr(0).validate(3), Err(Error::BadOp(0)));
        assert_eq!(hdr(99).validate(3), Err(Error::BadOp(99)));
        assert_eq!(Header { len: 4, ..hdr(1) }.validate(3), Err(Error::UnexpectedData { op: Op::Request, len: 4 }));
        assert_eq!(Header { len: 4, ..hdr(5) }.validate(3), Ok(Op::Rw));
        assert!(!Error::WrongDstCid(3).wants_rst());
        assert!(Error::BadOp(9).wants_rst());
    }
}
