//! Helpers for device tests and fuzz targets on virtio-queue's mock split
//! queues.

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

/// A descriptor chain starting at table index `head` from (address, length,
/// flags) triples: every descriptor but the last gets NEXT, pointing at the
/// following table entry.
pub fn chain(head: u16, descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | VRING_DESC_F_NEXT as u16 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, head + i as u16 + 1))
        })
        .collect()
}
