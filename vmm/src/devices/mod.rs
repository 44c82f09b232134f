//! Emulated devices, one per module, and the port-I/O and MMIO buses that
//! route the vCPU's IN/OUT and MMIO exits to them.

pub mod cmos;
pub mod i8042;
pub mod pv;
pub mod serial;
pub mod virtio;

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

/// Address ranges mapped to devices, shared by the port-I/O and MMIO buses.
struct Ranges<D: ?Sized> {
    ranges: Vec<(u64, u64, Arc<Mutex<D>>)>,
}

impl<D: ?Sized> Default for Ranges<D> {
    fn default() -> Self {
        Ranges { ranges: Vec::new() }
    }
}

impl<D: ?Sized> Ranges<D> {
    fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::Invalid { base, len })?;
        if self.ranges.iter().any(|&(b, l, _)| base < b + l && b < end) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push((base, len, device));
        Ok(())
    }

    /// The device at `addr` and the offset of `addr` in its range.
    fn find(&self, addr: u64) -> Option<(&Mutex<D>, u64)> {
        self.ranges
            .iter()
            .find(|&&(b, l, _)| addr >= b && addr - b < l)
            .map(|(b, _, d)| (&**d, addr - b))
    }
}

/// Routes port accesses to devices; unclaimed reads return all ones and
/// unclaimed writes are ignored, like an empty ISA bus.
#[derive(Default)]
pub struct PortIoBus {
    ranges: Ranges<dyn PortIoDevice>,
}

/// Errors from the buses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("address range 0x{base:x}+{len} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("address range 0x{base:x}+{len} is empty or wraps around")]
    Invalid { base: u64, len: u64 },
}

impl PortIoBus {
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PortIoDevice>>,
    ) -> Result<(), BusError> {
        self.ranges.insert(base.into(), len.into(), device)
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.ranges.find(port.into()) {
            Some((d, off)) => lock(d).read(off as u16, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> IoEffect {
        match self.ranges.find(port.into()) {
            Some((d, off)) => lock(d).write(off as u16, data),
            None => IoEffect::None,
        }
    }
}

/// A device on the MMIO bus. Offsets are relative to the device's window.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Routes the vCPU's MMIO exits to devices; unclaimed reads return all ones
/// and unclaimed writes are ignored.
#[derive(Default)]
pub struct MmioBus {
    ranges: Ranges<dyn MmioDevice>,
}

impl MmioBus {
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn MmioDevice>>) -> Result<(), BusError> {
        self.ranges.insert(base, len, device)
    }

    /// Returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.ranges.find(addr) {
            Some((d, off)) => {
                lock(d).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.ranges.find(addr) {
            Some((d, off)) => {
                lock(d).write(off, data);
                true
            }
            None => false,
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

    struct Window([u8; 8]);
    impl MmioDevice for Window {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0[offset as usize..offset as usize + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn mmio_bus_routes_and_reports_unclaimed() {
        let mut bus = MmioBus::default();
        bus.insert(0xd000_0000, 8, Arc::new(Mutex::new(Window([0; 8])))).unwrap();
        assert!(bus.write(0xd000_0004, &[1, 2, 3, 4]));
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0004, &mut b));
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(!bus.read(0xd000_0008, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0xcfff_ffff, &[0]));
        assert!(bus.insert(0xd000_0007, 2, Arc::new(Mutex::new(Window([0; 8])))).is_err());
        assert!(bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Window([0; 8])))).is_err());
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = PortIoBus::default();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Scratch(0)))).unwrap();
        assert!(bus.insert(0x103, 2, Arc::new(Mutex::new(Scratch(0)))).is_err());
        assert!(bus.insert(0xfffe, 2, Arc::new(Mutex::new(Scratch(0)))).is_ok());
    }
}
