//! How busy a node's vCPU is, measured from the host: the CPU time of the
//! vCPU thread (a halted vCPU waits in `KVM_RUN` without using any) over
//! wall time, read once per gossip round. Unlike the runnable count, it
//! costs the guest nothing.

use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The CPU-time clock of one thread.
#[derive(Debug, Clone, Copy)]
pub struct CpuClock(libc::clockid_t);

impl CpuClock {
    /// The clock of `thread`, valid while the thread runs.
    pub fn of<T>(thread: &JoinHandle<T>) -> io::Result<CpuClock> {
        let mut id: libc::clockid_t = 0;
        // SAFETY: the pthread_t comes from a live JoinHandle (the thread is
        // not joined while it is borrowed) and `id` is a valid out pointer.
        let r = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut id) };
        match r {
            0 => Ok(CpuClock(id)),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// The thread's CPU time so far; `None` once it has ended.
    pub fn now(&self) -> Option<Duration> {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `t` is a valid out pointer; an invalid clock (the thread
        // has ended) is an error return, not undefined behaviour.
        let r = unsafe { libc::clock_gettime(self.0, &mut t) };
        (r == 0).then(|| Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
    }
}

/// Successive readings of a CPU clock.
#[derive(Debug, Default)]
pub struct CpuUse {
    last: Option<(Duration, Instant)>,
}

impl CpuUse {
    /// The share of the time since the last reading that the thread used,
    /// in percent (`None` for the first reading).
    pub fn sample(&mut self, cpu: Duration, now: Instant) -> Option<u8> {
        let share = self.last.map(|(cpu0, then)| percent(cpu.saturating_sub(cpu0), now.duration_since(then)));
        self.last = Some((cpu, now));
        share
    }
}

/// `used` of `wall` in percent, at most 100 (clock granularity).
fn percent(used: Duration, wall: Duration) -> u8 {
    if wall.is_zero() {
        return 0;
    }
    (used.as_secs_f64() / wall.as_secs_f64() * 100.0).round().min(100.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_is_cpu_time_over_wall_time() {
        let mut u = CpuUse::default();
        let t0 = Instant::now();
        assert_eq!(u.sample(Duration::from_millis(1000), t0), None);
        assert_eq!(u.sample(Duration::from_millis(1250), t0 + Duration::from_millis(500)), Some(50));
        // Clock granularity can make the thread look busier than the wall.
        assert_eq!(u.sample(Duration::from_millis(1800), t0 + Duration::from_millis(1000)), Some(100));
        assert_eq!(u.sample(Duration::from_millis(1800), t0 + Duration::from_millis(1500)), Some(0));
        assert_eq!(percent(Duration::from_secs(1), Duration::ZERO), 0);
    }

    #[test]
    fn a_busy_thread_reads_busy_and_a_sleeping_one_idle() {
        let busy = std::thread::spawn(|| {
            let end = Instant::now() + Duration::from_millis(400);
            while Instant::now() < end {}
        });
        let sleeping = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(400)));
        let (cb, cs) = (CpuClock::of(&busy).unwrap(), CpuClock::of(&sleeping).unwrap());
        let (mut ub, mut us) = (CpuUse::default(), CpuUse::default());
        let t0 = Instant::now();
        ub.sample(cb.now().unwrap(), t0);
        us.sample(cs.now().unwrap(), t0);
        std::thread::sleep(Duration::from_millis(300));
        let t1 = Instant::now();
        // Two cores here, shared with other tests and VMs: well above idle.
        assert!(ub.sample(cb.now().unwrap(), t1).unwrap() > 20);
        assert!(us.sample(cs.now().unwrap(), t1).unwrap() < 10);
        busy.join().unwrap();
        sleeping.join().unwrap();
    }
}
