//! A read-only CMOS real-time clock on ports 0x70/0x71, so the guest starts
//! with the host's wall-clock time (UTC, BCD, 24-hour mode).

use std::time::{SystemTime, UNIX_EPOCH};

use super::{IoEffect, PortIoDevice};

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Calendar time, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// Converts seconds since the Unix epoch (civil-from-days, proleptic
    /// Gregorian calendar).
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86400) as i64;
        let rem = secs % 86400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday (5 in the RTC's 1 = Sunday count).
            weekday: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

/// The RTC: the index port selects a register, the data port reads it.
#[derive(Debug, Default)]
pub struct Cmos {
    index: u8,
}

impl Cmos {
    fn register(&self, now: &DateTime) -> u8 {
        match self.index {
            REG_SECONDS => bcd(now.second),
            REG_MINUTES => bcd(now.minute),
            REG_HOURS => bcd(now.hour),
            REG_WEEKDAY => bcd(now.weekday),
            REG_DAY => bcd(now.day),
            REG_MONTH => bcd(now.month),
            REG_YEAR => bcd(now.year % 100),
            REG_CENTURY => bcd(now.year / 100),
            REG_A => 0x26, // 32.768 kHz time base, no update in progress
            REG_B => 0x02, // 24-hour mode, BCD
            REG_D => 0x80, // battery good
            _ => 0,
        }
    }
}

impl PortIoDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = if offset == 1 {
            let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            self.register(&DateTime::from_unix(secs))
        } else {
            self.index
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoEffect {
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = data.first().copied().unwrap_or(0) & 0x7f;
        }
        IoEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_epoch_and_a_known_date() {
        let e = DateTime::from_unix(0);
        assert_eq!((e.year, e.month, e.day, e.hour, e.weekday), (1970, 1, 1, 0, 5));
        // 2026-11-25 19:44:30 UTC, a Wednesday.
        let d = DateTime::from_unix(1_795_635_870);
        assert_eq!(
            d,
            DateTime { year: 2026, month: 11, day: 25, hour: 19, minute: 44, second: 30, weekday: 4 }
        );
        // 2000-02-29 (leap day).
        let l = DateTime::from_unix(951_782_400);
        assert_eq!((l.year, l.month, l.day), (2000, 2, 29));
    }

    #[test]
    fn registers_are_bcd() {
        let c = Cmos { index: REG_YEAR };
        let now = DateTime::from_unix(1_795_635_870);
        assert_eq!(c.register(&now), 0x26);
        assert_eq!(Cmos { index: REG_CENTURY }.register(&now), 0x20);
        assert_eq!(Cmos { index: REG_MINUTES }.register(&now), 0x44);
    }

    #[test]
    fn index_masks_nmi_bit() {
        let mut c = Cmos::default();
        c.write(0, &[0x80 | REG_B]);
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], 0x02);
    }
}
