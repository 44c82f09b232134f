//! The thread a virtio device's queues are served on.
//!
//! The transport (on the vCPU thread) hands the device its queues on
//! activation and takes them back on reset; the device thread waits in one
//! epoll loop on those commands, on the queues' notification eventfds and on
//! whatever fds the device's backend registers itself (tokens below
//! [`QUEUE_TOKEN_BASE`]), and dispatches them to the [`Backend`].

use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, ActiveQueue, Interrupt};
use crate::guest_warn;
use crate::seccomp::{self, ThreadKind};

/// Epoll token of queue `i` is `QUEUE_TOKEN_BASE + i`; backends use tokens
/// below it for their own fds.
pub const QUEUE_TOKEN_BASE: u64 = 1 << 32;
const COMMAND_TOKEN: u64 = 1 << 33;

/// An activated device's memory, queues and interrupt.
pub struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<Interrupt>,
}

impl Active {
    /// Interrupts the guest if queue `index` asks for it after the device
    /// put buffers in its used ring.
    pub fn notify_used(&mut self, index: usize, device: &str) {
        let q = &mut self.queues[index].queue;
        match q.needs_notification(&self.mem) {
            Ok(true) => self.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => guest_warn!("{device}: reading queue {index}'s notification state: {e}"),
        }
    }
}

/// What a device does on its thread.
pub trait Backend: Send + 'static {
    /// Name for logs and the thread ("vsock", "9p").
    const NAME: &'static str;
    /// The seccomp filter of the thread.
    const SECCOMP: ThreadKind;
    /// The device was activated; the guest may have queued requests already.
    fn activated(&mut self, active: &mut Active);
    /// The guest notified queue `index`.
    fn queue_notified(&mut self, active: &mut Active, index: usize);
    /// An event on one of the backend's own fds.
    fn event(&mut self, _active: Option<&mut Active>, _token: u64, _events: EventSet) {}
    /// Called after every batch of events.
    fn after_events(&mut self, _active: Option<&mut Active>) {}
    /// The driver reset the device (or re-activated it).
    fn reset(&mut self) {}
}

enum Command {
    Activate(Active),
    Reset,
    Stop,
}

/// Sends commands to a device thread.
pub struct Commands {
    tx: mpsc::Sender<Command>,
    wake: EventFd,
}

impl Commands {
    fn send(&self, cmd: Command) -> Result<(), ActivateError> {
        self.tx.send(cmd).map_err(|_| ActivateError::WorkerGone)?;
        self.wake.write(1).map_err(|_| ActivateError::WorkerGone)
    }

    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Commands { tx: self.tx.clone(), wake: self.wake.try_clone()? })
    }

    /// Hands the device its queues; fails if the count is not `expected`.
    pub fn activate(
        &self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
        expected: usize,
    ) -> Result<(), ActivateError> {
        if queues.len() != expected {
            return Err(ActivateError::QueueCount { got: queues.len(), want: expected });
        }
        self.send(Command::Activate(Active { mem, queues, interrupt }))
    }

    /// Takes the queues back.
    pub fn reset(&self, device: &str) {
        if self.send(Command::Reset).is_err() {
            tracing::warn!("{device}: reset, but the device thread is gone");
        }
    }
}

/// A running device thread; dropping it stops and joins the thread.
pub struct WorkerThread {
    commands: Commands,
    handle: Option<JoinHandle<()>>,
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Starts the thread of `backend`, whose own fds are registered on `epoll`.
/// Returns the command sender for the device and the thread handle.
pub fn spawn<B: Backend>(epoll: Arc<Epoll>, backend: B) -> std::io::Result<(Commands, WorkerThread)> {
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    epoll.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, COMMAND_TOKEN))?;
    let (tx, rx) = mpsc::channel();
    let commands = Commands { tx, wake };
    let worker =
        Worker { epoll, wake: commands.wake.try_clone()?, commands: rx, backend, active: None, filtered: false };
    let handle = std::thread::Builder::new().name(B::NAME.into()).spawn(move || worker.run())?;
    Ok((commands.try_clone()?, WorkerThread { commands, handle: Some(handle) }))
}

struct Worker<B> {
    epoll: Arc<Epoll>,
    wake: EventFd,
    commands: mpsc::Receiver<Command>,
    backend: B,
    active: Option<Active>,
    /// The thread's own seccomp filter is installed.
    filtered: bool,
}

impl<B: Backend> Worker<B> {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: the device's event loop failed ({e}); the device stops", B::NAME);
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    COMMAND_TOKEN => {
                        if !self.handle_commands() {
                            return;
                        }
                    }
                    t if t >= QUEUE_TOKEN_BASE => {
                        let index = (t - QUEUE_TOKEN_BASE) as usize;
                        if let Some(active) = &mut self.active {
                            if let Some(q) = active.queues.get(index) {
                                let _ = q.notify.read();
                                self.backend.queue_notified(active, index);
                            }
                        }
                    }
                    t => self.backend.event(self.active.as_mut(), t, ev.event_set()),
                }
            }
            self.backend.after_events(self.active.as_mut());
        }
    }

    /// Returns false when the thread should stop.
    fn handle_commands(&mut self) -> bool {
        let _ = self.wake.read();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Activate(mut active) => {
                    self.install_filter();
                    self.deactivate();
                    for (i, q) in active.queues.iter().enumerate() {
                        let ev = EpollEvent::new(EventSet::IN, QUEUE_TOKEN_BASE + i as u64);
                        if let Err(e) = self.epoll.ctl(ControlOperation::Add, q.notify.as_raw_fd(), ev) {
                            tracing::error!("{}: cannot watch queue {i}: {e}", B::NAME);
                        }
                    }
                    tracing::debug!("{}: device activated", B::NAME);
                    self.backend.activated(&mut active);
                    self.active = Some(active);
                }
                Command::Reset => self.deactivate(),
                Command::Stop => return false,
            }
        }
        true
    }

    /// The first activation comes from the running guest, after the
    /// process filter is in place: the thread narrows it to its own.
    fn install_filter(&mut self) {
        if !self.filtered {
            self.filtered = true;
            if let Err(e) = seccomp::install_thread(B::SECCOMP) {
                tracing::warn!("{}: {e}; the thread keeps the VMM's filter", B::NAME);
            }
        }
    }

    fn deactivate(&mut self) {
        if let Some(active) = self.active.take() {
            for q in &active.queues {
                let _ = self.epoll.ctl(ControlOperation::Delete, q.notify.as_raw_fd(), EpollEvent::default());
            }
            self.backend.reset();
        }
    }
}
