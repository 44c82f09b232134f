//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! register file of one device window. It negotiates features, collects the
//! queue layout the driver chose, and hands queues, memory and interrupt to
//! the [`VirtioDevice`] when the driver sets DRIVER_OK.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, ActivateError, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::MmioDevice;
use crate::guest_warn;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio layout.
const VERSION: u32 = 2;
/// Vendor id reported to the guest ("PMIV").
const VENDOR_ID: u32 = 0x5649_4d50;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register, where the VMM registers one
/// ioeventfd per queue (datamatch = queue index).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// Errors while creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("virtio device type {device_type} asks for a queue of {size} entries (must be a power of two up to 32768)")]
    BadQueueSize { device_type: u32, size: u16 },
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt through `irqfd`.
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>, irqfd: EventFd) -> Result<Self, Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&size| {
                Queue::new(size).map_err(|_| Error::BadQueueSize { device_type: device.device_type(), size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The eventfd of each queue, in queue order: register each as an
    /// ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt (register its irqfd on the device's GSI).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The queue layout may only change while the queue is off and the
    /// device not running (QueueReady itself may be cleared).
    fn with_queue_setup(&mut self, f: impl FnOnce(&mut Queue)) {
        self.with_queue(false, f)
    }

    fn with_queue(&mut self, even_if_ready: bool, f: impl FnOnce(&mut Queue)) {
        if self.status & status::DRIVER_OK != 0 {
            guest_warn!("virtio-mmio: queue setup after DRIVER_OK ignored");
            return;
        }
        match self.selected_queue() {
            Some(q) if even_if_ready || !q.ready() => f(q),
            Some(_) => guest_warn!("virtio-mmio: queue setup of a ready queue ignored"),
            None => guest_warn!("virtio-mmio: queue setup of a queue the device does not have ignored"),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!("virtio-mmio: read of unknown register 0x{offset:x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => match u16::try_from(v) {
                Ok(size) => self.with_queue_setup(|q| q.set_size(size)),
                // Not cut to 16 bits: 0x1_0004 is no request for 4.
                Err(_) => guest_warn!("virtio-mmio: queue size {v} ignored (larger than any queue)"),
            },
            reg::QUEUE_READY => self.with_queue(true, |q| q.set_ready(v == 1)),
            reg::QUEUE_DESC_LOW => self.with_queue_setup(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue_setup(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_AVAIL_LOW => self.with_queue_setup(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_AVAIL_HIGH => self.with_queue_setup(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_USED_LOW => self.with_queue_setup(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => self.with_queue_setup(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            _ => guest_warn!("virtio-mmio: write of unknown register 0x{offset:x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::FEATURES_OK != 0 {
            guest_warn!("virtio-mmio: driver features written after FEATURES_OK ignored");
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.acked_features = (self.acked_features & !(0xffff_ffff << shift)) | (u64::from(v) << shift);
    }

    /// With ioeventfds registered KVM handles QueueNotify without an exit;
    /// this path serves a VMM without them (and the unit tests).
    fn notify(&self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: cannot signal a queue notification: {e}");
                }
            }
            None => guest_warn!("virtio-mmio: notification for queue {index}, which does not exist"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            guest_warn!("virtio-mmio: driver cleared status bits (0x{old:x} -> 0x{v:x}) without a reset; ignored");
            return;
        }
        let mut new = v;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 && !self.features_acceptable() {
            // The driver reads Status back and gives up when FEATURES_OK is not set.
            new &= !status::FEATURES_OK;
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && new & status::FAILED == 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let unknown = self.acked_features & !self.offered_features();
        if unknown != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            guest_warn!(
                "virtio-mmio: driver accepted features 0x{:x} (offered 0x{:x}, VERSION_1 required); refusing FEATURES_OK",
                self.acked_features,
                self.offered_features()
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let device_type = self.device.device_type();
        if self.status & status::FEATURES_OK == 0 {
            tracing::warn!("virtio-mmio: device {device_type}: DRIVER_OK without FEATURES_OK");
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
            tracing::warn!("virtio-mmio: device {device_type}: queue {i} is not ready or lies outside guest RAM");
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let queues = self
            .queues
            .iter()
            .zip(&self.queue_evts)
            .map(|(q, evt)| {
                Ok(ActiveQueue {
                    queue: Queue::try_from(q.state()).map_err(ActivateError::Queue)?,
                    notify: evt.try_clone().map_err(ActivateError::EventFd)?,
                })
            })
            .collect::<Result<Vec<_>, _>>();
        let result = queues.and_then(|queues| {
            self.device.activate(self.mem.clone(), self.acked_features, queues, self.interrupt.clone())
        });
        if let Err(e) = result {
            tracing::warn!("virtio-mmio: device {device_type} failed to start: {e}");
            self.status |= status::DEVICE_NEEDS_RESET;
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            guest_warn!("virtio-mmio: {}-byte read of register 0x{offset:x} (registers are 32-bit)", data.len());
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            guest_warn!("virtio-mmio: {}-byte write to register 0x{offset:x} (registers are 32-bit)", data.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;

    /// What the test device saw.
    #[derive(Default)]
    struct Seen {
        activated: Option<(u64, Vec<u16>)>,
        resets: usize,
        config: [u8; 8],
    }

    /// A device with two queues and 8 bytes of config space.
    struct TestDevice(Arc<Mutex<Seen>>);

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let cfg = self.0.lock().unwrap().config;
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let cfg = &mut self.0.lock().unwrap().config;
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = cfg.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            acked_features: u64,
            queues: Vec<ActiveQueue>,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            let sizes = queues.iter().map(|q| q.queue.size()).collect();
            self.0.lock().unwrap().activated = Some((acked_features, sizes));
            Ok(())
        }
        fn reset(&mut self) {
            let mut s = self.0.lock().unwrap();
            s.activated = None;
            s.resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Seen>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let t = MmioTransport::new(mem, Box::new(TestDevice(seen.clone())), EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .unwrap();
        (t, seen)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Negotiates features and sets up both queues inside guest RAM.
    fn drive_to_features_ok(t: &mut MmioTransport) {
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, 1 << 3);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, 1);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(rd(t, reg::STATUS) & status::FEATURES_OK, 0);
        for (i, base) in [(0u32, 0x1000u32), (1, 0x2000)] {
            wr(t, reg::QUEUE_SEL, i);
            wr(t, reg::QUEUE_NUM, 8);
            wr(t, reg::QUEUE_DESC_LOW, base);
            wr(t, reg::QUEUE_DESC_HIGH, 0);
            wr(t, reg::QUEUE_AVAIL_LOW, base + 0x400);
            wr(t, reg::QUEUE_USED_LOW, base + 0x800);
            wr(t, reg::QUEUE_READY, 1);
            assert_eq!(rd(t, reg::QUEUE_READY), 1);
        }
    }

    const RUNNING: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn feature_words_are_selected() {
        let (mut t, _) = transport();
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1 << 3);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_needs_version_1_and_known_bits() {
        let (mut t, _) = transport();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES, 1 << 3);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0, "no VERSION_1");
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1 | 2);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0, "bit 33 was not offered");
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Frozen after FEATURES_OK.
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features, VIRTIO_F_VERSION_1 | 1 << 3);
    }

    #[test]
    fn driver_ok_activates_with_the_queue_layout() {
        let (mut t, seen) = transport();
        drive_to_features_ok(&mut t);
        wr(&mut t, reg::STATUS, RUNNING);
        assert_eq!(rd(&mut t, reg::STATUS), RUNNING);
        assert_eq!(seen.lock().unwrap().activated, Some((VIRTIO_F_VERSION_1 | 1 << 3, vec![8, 8])));
        // The layout is frozen once running.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 8);
    }

    #[test]
    fn queue_size_beyond_16_bits_is_ignored() {
        let (mut t, _) = transport();
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 2);
        wr(&mut t, reg::QUEUE_NUM, 0x1_0004);
        assert_eq!(t.queues[0].size(), 2);
    }

    #[test]
    fn queue_outside_guest_ram_is_refused() {
        let (mut t, seen) = transport();
        drive_to_features_ok(&mut t);
        wr(&mut t, reg::QUEUE_SEL, 1);
        wr(&mut t, reg::QUEUE_READY, 0);
        wr(&mut t, reg::QUEUE_USED_HIGH, 0x10);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::STATUS, RUNNING);
        assert!(seen.lock().unwrap().activated.is_none());
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_clears_everything() {
        let (mut t, seen) = transport();
        drive_to_features_ok(&mut t);
        wr(&mut t, reg::STATUS, RUNNING);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.acked_features, 0);
        let s = seen.lock().unwrap();
        assert_eq!(s.resets, 1);
        assert!(s.activated.is_none());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _) = transport();
        t.interrupt().signal_used_queue();
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn notify_signals_the_queue_eventfd() {
        let (mut t, _) = transport();
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err(), "queue 0 was not notified");
        wr(&mut t, reg::QUEUE_NOTIFY, 9);
    }

    #[test]
    fn config_space_and_generation() {
        let (mut t, seen) = transport();
        seen.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut b = [0u8; 8];
        t.read(reg::CONFIG, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut one = [0u8; 1];
        t.read(reg::CONFIG + 5, &mut one);
        assert_eq!(one, [6]);
        t.read(reg::CONFIG + 0x100, &mut b);
        assert_eq!(b, [0; 8]);
        let gen = rd(&mut t, reg::CONFIG_GENERATION);
        t.write(reg::CONFIG, &[9]);
        assert_eq!(seen.lock().unwrap().config[0], 9);
        assert_ne!(rd(&mut t, reg::CONFIG_GENERATION), gen);
    }

    #[test]
    fn odd_register_accesses_are_harmless() {
        let (mut t, _) = transport();
        let mut b = [0xaau8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, 0x0f0), 0);
        wr(&mut t, 0x0f0, 1);
    }
}
