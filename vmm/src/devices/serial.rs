//! COM1: the vm-superio 8250 UART, its interrupt line as an irqfd, and a
//! console sink that copies guest output to the node's console (stdout or a
//! file) while watching it for the agent's ready line and kernel panics.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{lock, IoEffect, PortIoDevice};

/// Raises an interrupt line by signalling an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The console line a kernel panic starts with.
const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// The first line images/init prints: user space has started.
const INIT_MARKER: &str = "pmivmm-init: started";
/// Longest console line kept for matching; the rest of a longer line is
/// still written out, just not matched.
const MAX_LINE: usize = 1024;

/// Boot milestones seen on the console, as times since the VMM started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Milestones {
    /// The first byte the guest wrote to the console.
    pub first_output: Option<Duration>,
    /// /init started (user space is up).
    pub init: Option<Duration>,
    /// The agent announced itself.
    pub agent_ready: Option<Duration>,
}

/// What the console has shown so far, shared with whoever waits for it.
#[derive(Debug)]
pub struct ConsoleEvents {
    started: Instant,
    panicked: AtomicBool,
    first_output: OnceLock<Duration>,
    init: OnceLock<Duration>,
    ready: Mutex<Option<(Duration, String)>>,
    ready_cv: Condvar,
}

impl ConsoleEvents {
    pub fn new(started: Instant) -> Arc<Self> {
        Arc::new(ConsoleEvents {
            started,
            panicked: AtomicBool::new(false),
            first_output: OnceLock::new(),
            init: OnceLock::new(),
            ready: Mutex::new(None),
            ready_cv: Condvar::new(),
        })
    }

    /// True once the guest kernel printed a panic.
    pub fn panicked(&self) -> bool {
        self.panicked.load(Ordering::Relaxed)
    }

    /// The milestones reached so far.
    pub fn milestones(&self) -> Milestones {
        Milestones {
            first_output: self.first_output.get().copied(),
            init: self.init.get().copied(),
            agent_ready: lock(&self.ready).as_ref().map(|(t, _)| *t),
        }
    }

    /// Waits until the agent's ready line appeared (time since start, line).
    pub fn wait_ready(&self, timeout: Duration) -> Option<(Duration, String)> {
        let guard = lock(&self.ready);
        let (guard, _) = self
            .ready_cv
            .wait_timeout_while(guard, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }

    fn output(&self) {
        if self.first_output.get().is_none() {
            let _ = self.first_output.set(self.started.elapsed());
        }
    }

    fn line(&self, line: &str) {
        if line.starts_with(INIT_MARKER) {
            let _ = self.init.set(self.started.elapsed());
        }
        if line.contains(PANIC_MARKER) {
            self.panicked.store(true, Ordering::Relaxed);
        }
        if line.starts_with(pmivmm_proto::AGENT_READY_MARKER) {
            let mut r = lock(&self.ready);
            if r.is_none() {
                *r = Some((self.started.elapsed(), line.to_owned()));
                self.ready_cv.notify_all();
            }
        }
    }
}

/// Copies console bytes to `out` and feeds complete lines to `events`.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    events: Arc<ConsoleEvents>,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>, events: Arc<ConsoleEvents>) -> Self {
        ConsoleSink { out, line: Vec::new(), events }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.events.output();
        for &b in buf {
            if b == b'\n' {
                let l = String::from_utf8_lossy(&self.line);
                self.events.line(l.trim_end_matches('\r'));
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        // Console output is best effort: a closed stdout must not stop the guest.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The UART on the port bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    pub fn new(irq: EventFdTrigger, sink: ConsoleSink) -> Self {
        SerialDevice { serial: Serial::new(irq, sink) }
    }

    /// Queues console input for the guest; returns how many bytes fit in the
    /// receive FIFO (the caller retries the rest).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.serial.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl PortIoDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.serial.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> IoEffect {
        if let Some(&b) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, b) {
                tracing::debug!("serial write: {e:?}");
            }
        }
        IoEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Shared, Arc<ConsoleEvents>) {
        let out = Shared::default();
        let ev = ConsoleEvents::new(Instant::now());
        let sink = ConsoleSink::new(Box::new(out.clone()), ev.clone());
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (SerialDevice::new(irq, sink), out, ev)
    }

    #[test]
    fn thr_writes_reach_the_console_and_raise_the_irq() {
        let (mut d, out, _) = device();
        d.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            d.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert!(d.serial.interrupt_evt().0.read().unwrap() >= 1);
        let mut lsr = [0u8];
        d.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn ready_line_and_panic_are_seen() {
        let (mut d, _, ev) = device();
        let line = format!("{} version=9\r\nKernel panic - not syncing: x\n", pmivmm_proto::AGENT_READY_MARKER);
        for b in line.bytes() {
            d.write(0, &[b]);
        }
        let (_, l) = ev.wait_ready(Duration::from_secs(1)).unwrap();
        assert!(l.ends_with("version=9"));
        let m = ev.milestones();
        assert!(m.first_output.is_some() && m.agent_ready.is_some() && m.init.is_none());
        assert!(ev.panicked());
    }

    #[test]
    fn input_is_queued_for_the_guest() {
        let (mut d, _, _) = device();
        assert_eq!(d.enqueue_input(b"ls\r"), 3);
        let mut b = [0u8];
        d.read(5, &mut b);
        assert_eq!(b[0] & 1, 1); // data ready
        d.read(0, &mut b);
        assert_eq!(b[0], b'l');
        let big = vec![b'x'; 1000];
        assert!(d.enqueue_input(&big) < 1000);
    }
}
