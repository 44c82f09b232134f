//! The bit of the i8042 keyboard controller our guests use: the reset
//! command. The kernel runs with `reboot=k`, so reboot and power-off write
//! 0xFE to the command port.

use super::{IoEffect, PortIoDevice};

/// Offset of the command/status port from the data port (0x64 - 0x60).
pub const COMMAND_OFFSET: u16 = 4;
/// Pulse the reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 on ports 0x60-0x64: no keyboard, status reads 0, reset works.
#[derive(Debug, Default)]
pub struct I8042;

impl PortIoDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoEffect {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            IoEffect::GuestReset
        } else {
            IoEffect::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let mut d = I8042;
        assert_eq!(d.write(COMMAND_OFFSET, &[0xfe]), IoEffect::GuestReset);
        assert_eq!(d.write(COMMAND_OFFSET, &[0xaa]), IoEffect::None);
        assert_eq!(d.write(0, &[0xfe]), IoEffect::None);
        let mut b = [0xffu8];
        d.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b, [0]);
    }
}
