//! Virtio devices on the virtio-mmio transport.
//!
//! [`mmio::MmioTransport`] is the register file the guest driver talks to; a
//! device type (vsock today, 9p next) implements [`VirtioDevice`] in its own
//! module and gets its queues, guest memory and interrupt line when the
//! driver sets DRIVER_OK. Queue notifications arrive on per-queue eventfds
//! that the VMM registers as KVM ioeventfds, interrupts go out through an
//! eventfd registered as a KVM irqfd: the vCPU thread never runs device code.

pub mod mmio;
pub mod p9;
pub mod test_utils;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device follows virtio 1.x (required by the mmio v2 transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;

/// A queue handed to an activated device, with the eventfd the guest's
/// notifications for it arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// Errors a device reports when it cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues; the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("the device's worker thread is gone")]
    WorkerGone,
    #[error("the driver's queue layout is invalid: {0}")]
    Queue(#[source] virtio_queue::Error),
    #[error("cannot duplicate a queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Reads a read-only configuration space `config` at `offset`; bytes past
/// its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(usize::try_from(o).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device type behind the mmio transport. Everything here runs on
/// the vCPU thread with the transport lock held, so it must be quick: real
/// work belongs on the device's own thread, which `activate` hands the
/// queues to.
pub trait VirtioDevice: Send {
    /// Virtio device id (19 for vsock, 9 for 9p).
    fn device_type(&self) -> u32;
    /// Features the device offers (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Maximum size of each of the device's queues; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (most devices ignore this).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the features the driver accepted.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and drops its queues (driver wrote 0 to Status).
    fn reset(&mut self);
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus
/// register plus the irqfd that raises the line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt { status: AtomicU32::new(0), irqfd }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd KVM watches (register it with `register_irqfd`).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Logs a warning about bad guest input at most once per `EVERY` calls of
/// the same call site, so that a hostile guest cannot flood the log.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        const EVERY: u64 = 1000;
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % EVERY == 0 {
            tracing::warn!(times_seen = n + 1, $($arg)*);
        }
    }};
}

/// Log targets of crates that log bad guest input themselves, as often as
/// the guest likes: virtio-queue logs an invalid queue size or ring address
/// (one register write each) and a bad available ring index (each time a
/// device looks at the queue) at error level.
const GUEST_DRIVEN_LOG_TARGETS: [&str; 1] = ["virtio_queue"];
/// Checks of events of those crates allowed a second (a subscriber may
/// check an event more than once: at most this many lines a second).
const GUEST_DRIVEN_LOG_BUDGET: u64 = 100;

/// Whether a log event with this target goes out: those of the crates in
/// [`GUEST_DRIVEN_LOG_TARGETS`] within [`GUEST_DRIVEN_LOG_BUDGET`] checks a
/// second (counted over all of them), the others all.
pub fn log_event_allowed(target: &str) -> bool {
    static START: OnceLock<Instant> = OnceLock::new();
    static SECOND: AtomicU64 = AtomicU64::new(0);
    static CHECKS: AtomicU64 = AtomicU64::new(0);
    let guest_driven = GUEST_DRIVEN_LOG_TARGETS
        .iter()
        .any(|t| target.strip_prefix(t).is_some_and(|rest| rest.is_empty() || rest.starts_with("::")));
    if !guest_driven {
        return true;
    }
    let second = START.get_or_init(Instant::now).elapsed().as_secs();
    if SECOND.swap(second, Ordering::Relaxed) != second {
        CHECKS.store(0, Ordering::Relaxed);
    }
    CHECKS.fetch_add(1, Ordering::Relaxed) < GUEST_DRIVEN_LOG_BUDGET
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_driven_log_events_are_thinned() {
        for ours in ["pmivmm::devices::virtio::mmio", "virtio_queues", "tokio"] {
            assert!((0..2 * GUEST_DRIVEN_LOG_BUDGET).all(|_| log_event_allowed(ours)), "{ours}");
        }
        // The only caller with these targets: the budget, then (within the
        // second, or the next one's budget at most) nothing.
        let allowed = (0..100_000).filter(|_| log_event_allowed("virtio_queue::queue")).count() as u64;
        assert!((GUEST_DRIVEN_LOG_BUDGET..=2 * GUEST_DRIVEN_LOG_BUDGET).contains(&allowed), "{allowed}");
    }
}
