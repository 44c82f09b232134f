//! Emulated devices, one per module, and the port-I/O bus that routes the
//! vCPU's IN/OUT exits to them.

pub mod cmos;
pub mod i8042;
pub mod serial;

use std::sync::{Arc, Mutex};

/// What a port write asks of the VMM beyond the device's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEffect {
    None,
    /// The guest asked for a machine reset (how our guests reboot/power off).
    GuestReset,
}

/// A device on the legacy port-I/O bus. Offsets are relative to the base.
pub trait PortIoDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> IoEffect;
}

struct PortRange {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PortIoDevice>>,
}

/// Routes port accesses to devices; unclaimed reads return all ones and
/// unclaimed writes are ignored, like an empty ISA bus.
#[derive(Default)]
pub struct PortIoBus {
    ranges: Vec<PortRange>,
}

/// Errors from the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("port range 0x{base:x}+{len} overlaps a device already on the bus")]
    Overlap { base: u16, len: u16 },
}

impl PortIoBus {
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PortIoDevice>>,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if self.ranges.iter().any(|r| {
            u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
        }) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(PortRange { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&PortRange, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((r, off)) => lock(&r.device).read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> IoEffect {
        match self.find(port) {
            Some((r, off)) => lock(&r.device).write(off, data),
            None => IoEffect::None,
        }
    }
}

/// Locks a device; a poisoned lock (a panic elsewhere while holding it) still
/// gives access, since device state stays consistent between accesses.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(u8);
    impl PortIoDevice for Scratch {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u16, data: &[u8]) -> IoEffect {
            self.0 = data[0];
            IoEffect::None
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let mut bus = PortIoBus::default();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Scratch(10)))).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x102, &mut b);
        assert_eq!(b[0], 12);
        bus.write(0x100, &[20]);
        bus.read(0x103, &mut b);
        assert_eq!(b[0], 23);
        bus.read(0x104, &mut b);
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = PortIoBus::default();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Scratch(0)))).unwrap();
        assert!(bus.insert(0x103, 2, Arc::new(Mutex::new(Scratch(0)))).is_err());
        assert!(bus.insert(0xfffe, 2, Arc::new(Mutex::new(Scratch(0)))).is_ok());
    }
}
