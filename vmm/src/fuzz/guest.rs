//! A hostile guest driver's side of a virtqueue: guest RAM, and a queue in
//! it laid out from fuzz input, either as well-formed descriptor chains
//! whose buffers hold the input's bytes (to reach the device's decoders) or
//! as raw ring bytes and addresses (to attack the ring handling itself).

use arbitrary::{Result, Unstructured};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::test_utils::chain;

/// Guest RAM of a fuzz input: rings in the first half, buffers after.
pub const RAM_SIZE: u64 = 0x4_0000;
const BUFFERS: u64 = RAM_SIZE / 2;
/// Entries of a well-formed queue (also the most a raw one may have).
const QUEUE_SIZE: u16 = 64;
/// Room for one queue's rings (descriptor table, avail and used rings).
pub const RING_SPAN: u64 = 0x1000;
/// Most chains and descriptors per chain in a well-formed queue.
const MAX_CHAINS: usize = 8;
const MAX_CHAIN_LEN: usize = 4;

/// Fresh, zeroed guest RAM.
pub fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).expect("mapping fuzz guest RAM")
}

/// Hands out buffer space in guest RAM; wraps around when it runs out.
pub struct Buffers {
    next: u64,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers { next: BUFFERS }
    }
}

impl Buffers {
    /// Writes `bytes` (truncated to what fits) into RAM; returns their address.
    pub fn place(&mut self, mem: &GuestMemoryMmap, bytes: &[u8]) -> u64 {
        let len = (bytes.len() as u64).min(RAM_SIZE - BUFFERS);
        if self.next + len > RAM_SIZE {
            self.next = BUFFERS;
        }
        let at = self.next;
        mem.write_slice(&bytes[..len as usize], GuestAddress(at)).expect("buffer within guest RAM");
        self.next = (at + len).next_multiple_of(16);
        at
    }
}

/// What one descriptor of a well-formed chain holds.
pub struct Piece {
    pub bytes: Vec<u8>,
    /// Device-writable (the device's response goes here).
    pub writable: bool,
}

/// A queue at `ring` as the driver set it up. `piece(u, i)` makes the
/// `i`-th descriptor of a well-formed chain; a raw queue ignores it.
/// `None`: the layout is one the transport refuses at activation (outside
/// RAM, bad size), which no device ever sees.
pub fn queue(
    u: &mut Unstructured,
    mem: &GuestMemoryMmap,
    ring: GuestAddress,
    bufs: &mut Buffers,
    mut piece: impl FnMut(&mut Unstructured, usize) -> Result<Piece>,
) -> Result<Option<Queue>> {
    if u.ratio(1, 8)? {
        return raw_queue(u, mem, ring);
    }
    let mock = MockSplitQueue::create(mem, ring, QUEUE_SIZE);
    let mut next = 0usize;
    for _ in 0..u.int_in_range(0..=MAX_CHAINS)? {
        let len = u.int_in_range(1..=MAX_CHAIN_LEN)?;
        let mut descs = Vec::with_capacity(len);
        for i in 0..len {
            let p = piece(u, i)?;
            let mut flags = if p.writable ^ u.ratio(1, 16)? { VRING_DESC_F_WRITE as u16 } else { 0 };
            if u.ratio(1, 64)? {
                flags |= VRING_DESC_F_INDIRECT as u16;
            }
            let desc = if u.ratio(1, 32)? {
                // Anywhere, any length.
                (u.arbitrary()?, u.arbitrary()?, flags)
            } else {
                let slack = if u.ratio(1, 8)? { u.int_in_range(0..=64)? } else { 0 };
                (bufs.place(mem, &p.bytes), p.bytes.len() as u32 + slack, flags)
            };
            descs.push(desc);
        }
        if next + len > usize::from(QUEUE_SIZE) {
            break;
        }
        let head = next as u16;
        mock.add_desc_chains(&chain(head, &descs), head).expect("rings within guest RAM");
        next += len;
    }
    Ok(Some(mock.create_queue::<Queue>().expect("a valid mock queue")))
}

/// Ring addresses, size and ring bytes as they come.
fn raw_queue(u: &mut Unstructured, mem: &GuestMemoryMmap, ring: GuestAddress) -> Result<Option<Queue>> {
    let mut q = Queue::new(QUEUE_SIZE).expect("a valid queue size");
    q.set_size(u.arbitrary()?);
    let addr = |u: &mut Unstructured| -> Result<u64> {
        if u.ratio(7, 8)? {
            Ok(ring.0 + u.int_in_range(0..=RING_SPAN)?)
        } else {
            u.arbitrary()
        }
    };
    let (desc, avail, used) = (addr(u)?, addr(u)?, addr(u)?);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(true);
    let len = u.int_in_range(0..=RING_SPAN as usize)?;
    // Writes past the end of RAM fail; the rest is garbage the device must survive.
    let _ = mem.write_slice(u.bytes(len.min(u.len()))?, ring);
    Ok(q.is_valid(mem).then_some(q))
}
