//! The virtio-mmio transport as a hostile driver programs it: register
//! reads and writes of any width, in any order, at any offset, with the
//! queue layout pointing anywhere. A device that activates walks every
//! chain the driver made available.

use std::sync::{Arc, Mutex};

use arbitrary::{Result, Unstructured};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::guest::{self, Buffers, Piece, RING_SPAN};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{read_config_bytes, status, ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::devices::MmioDevice;

const QUEUES: [u16; 2] = [64, 64];
/// Register offsets a driver uses (the transport knows them as `reg::*`).
const REGISTERS: [u64; 24] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050, 0x060, 0x064, 0x070,
    0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100,
];
const STATUS: u64 = 0x070;

/// What the device saw: descriptors walked per activation.
#[derive(Default)]
struct Seen {
    activations: u32,
    descriptors: u32,
}

/// A device that, once active, walks and returns every available chain.
struct Walker(Arc<Mutex<Seen>>);

impl VirtioDevice for Walker {
    fn device_type(&self) -> u32 {
        0x7f
    }

    fn features(&self) -> u64 {
        1 << 3
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(b"fuzz config", offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<ActiveQueue>,
        _interrupt: Arc<Interrupt>,
    ) -> std::result::Result<(), ActivateError> {
        let mut seen = self.0.lock().expect("fuzz device state");
        seen.activations += 1;
        for mut q in queues {
            while let Some(chain) = q.queue.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                seen.descriptors += chain.count() as u32;
                let _ = q.queue.add_used(&mem, head, 0);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {}
}

pub fn run_one(data: &[u8]) -> String {
    let mem = guest::ram();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let mut transport =
        MmioTransport::new(mem.clone(), Box::new(Walker(seen.clone())), irqfd).expect("the fuzz transport");
    // Unstructured's errors only mean the input ran out.
    let _ = drive(&mut Unstructured::new(data), &mem, &mut transport);
    let mut word = [0u8; 4];
    transport.read(STATUS, &mut word);
    let seen = seen.lock().expect("fuzz device state");
    // The driver may write any bits; the ones the spec defines tell the story.
    let known = status::ACKNOWLEDGE
        | status::DRIVER
        | status::FEATURES_OK
        | status::DRIVER_OK
        | status::DEVICE_NEEDS_RESET
        | status::FAILED;
    format!(
        "status {:#x} activations {} descriptors {}",
        u32::from_le_bytes(word) & known,
        seen.activations.min(2),
        seen.descriptors.min(4)
    )
}

fn drive(u: &mut Unstructured, mem: &GuestMemoryMmap, transport: &mut MmioTransport) -> Result<()> {
    if u.ratio(1, 2)? {
        well_behaved_start(u, mem, transport)?;
    }
    for _ in 0..u.int_in_range(0..=64)? {
        let offset = if u.ratio(7, 8)? { REGISTERS[u.choose_index(REGISTERS.len())?] } else { u.int_in_range(0..=0x1ff)? };
        let width = [4, 4, 4, 1, 2, 8][u.choose_index(6)?];
        if u.ratio(1, 3)? {
            let mut buf = [0u8; 8];
            transport.read(offset, &mut buf[..width]);
        } else {
            let value: u64 = if u.ratio(1, 2)? { u.int_in_range(0..=0x100)? } else { u.arbitrary()? };
            transport.write(offset, &value.to_le_bytes()[..width]);
        }
    }
    Ok(())
}

fn write(transport: &mut MmioTransport, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

/// The driver's initialization (virtio 1.2, 3.1.1) with queues laid out
/// from the input, up to DRIVER_OK.
fn well_behaved_start(u: &mut Unstructured, mem: &GuestMemoryMmap, transport: &mut MmioTransport) -> Result<()> {
    write(transport, STATUS, status::ACKNOWLEDGE);
    write(transport, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(transport, 0x024, 1);
    write(transport, 0x020, 1);
    write(transport, STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    let mut bufs = Buffers::default();
    for i in 0..QUEUES.len() {
        let piece = |u: &mut Unstructured, _: usize| -> Result<Piece> {
            Ok(Piece { bytes: vec![0; u.int_in_range(0..=64)?], writable: u.arbitrary()? })
        };
        let Some(q) = guest::queue(u, mem, GuestAddress(i as u64 * RING_SPAN), &mut bufs, piece)? else { continue };
        write(transport, 0x030, i as u32);
        write(transport, 0x038, u32::from(q.size()));
        for (low, addr) in [(0x080, q.desc_table()), (0x090, q.avail_ring()), (0x0a0, q.used_ring())] {
            write(transport, low, addr as u32);
            write(transport, low + 4, (addr >> 32) as u32);
        }
        write(transport, 0x044, 1);
    }
    write(transport, STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    Ok(())
}

pub fn seeds() -> Vec<Vec<u8>> {
    super::random_seeds()
}
