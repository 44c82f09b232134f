//! virtio-vsock (device id 19): the guest's socket channel to the host,
//! backed by Unix sockets next to the VMM (see [`muxer`]).
//!
//! [`Vsock`] is what the mmio transport sees; it forwards activation and
//! reset to the device thread, which [`create`] starts with the VM and which
//! owns the queues, the listening socket and every connection. The thread
//! waits in one epoll on the queue notifications, the listening socket and
//! the connections' sockets. [`VsockThread`] stops it and removes the
//! socket file when dropped.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::muxer::Muxer;
use self::packet::{Header, MAX_PKT_DATA};
use super::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::config::VsockConfig;
use crate::guest_warn;

/// Virtio device id of vsock.
pub const DEVICE_TYPE: u32 = 19;
/// Queue size of rx, tx and event queues.
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// Epoll data of the queue eventfds and the command eventfd; socket fds
/// (the muxer's) are below 2^32.
const QUEUE_TOKEN: u64 = 1 << 32;
const COMMAND_TOKEN: u64 = 1 << 33;

/// Errors setting up the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vsock guest CID {0} is invalid (use 3 or more, below 2^32 - 1)")]
    BadCid(u64),
    #[error("cannot create the vsock socket directory {path}: {source}")]
    SocketDir { path: PathBuf, source: std::io::Error },
    #[error("cannot remove the stale vsock socket {path}: {source}")]
    StaleSocket { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("setting up the vsock device's event loop: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("cannot start the vsock device thread: {0}")]
    Thread(#[source] std::io::Error),
}

enum Command {
    Activate { mem: GuestMemoryMmap, queues: Vec<ActiveQueue>, interrupt: Arc<Interrupt> },
    Reset,
    Stop,
}

/// Sends commands to the device thread.
struct CommandSender {
    tx: mpsc::Sender<Command>,
    wake: EventFd,
}

impl CommandSender {
    fn send(&self, cmd: Command) -> Result<(), ActivateError> {
        self.tx.send(cmd).map_err(|_| ActivateError::WorkerGone)?;
        self.wake.write(1).map_err(|_| ActivateError::WorkerGone)
    }
}

/// The vsock device as the transport sees it.
pub struct Vsock {
    guest_cid: u64,
    commands: CommandSender,
}

/// The running device thread; dropping it stops the thread and removes the
/// socket file.
pub struct VsockThread {
    commands: CommandSender,
    handle: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for VsockThread {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the node's vsock socket (replacing a stale one) and starts the
/// device thread.
pub fn create(config: &VsockConfig) -> Result<(Vsock, VsockThread), Error> {
    let cid = config.guest_cid;
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(Error::BadCid(cid));
    }
    let path = config.socket_path.clone();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::SocketDir { path: dir.to_owned(), source })?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!("removed the stale vsock socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::StaleSocket { path, source }),
    }
    let listener = UnixListener::bind(&path).map_err(|source| Error::Bind { path: path.clone(), source })?;
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Epoll)?;
    let epoll = Arc::new(Epoll::new().map_err(Error::Epoll)?);
    epoll
        .ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, COMMAND_TOKEN))
        .map_err(Error::Epoll)?;
    let muxer = Muxer::new(cid, path.clone(), listener, epoll.clone()).map_err(Error::Epoll)?;
    let (tx, rx) = mpsc::channel();
    let worker = Worker { epoll, wake: wake.try_clone().map_err(Error::Epoll)?, commands: rx, muxer, guest_cid: cid, active: None };
    let handle = std::thread::Builder::new().name("vsock".into()).spawn(move || worker.run()).map_err(Error::Thread)?;
    let sender = || -> Result<CommandSender, Error> {
        Ok(CommandSender { tx: tx.clone(), wake: wake.try_clone().map_err(Error::Epoll)? })
    };
    Ok((Vsock { guest_cid: cid, commands: sender()? }, VsockThread { commands: sender()?, handle: Some(handle), path }))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("vsock: the guest wrote the read-only config space at offset {offset}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { got: queues.len(), want: QUEUE_SIZES.len() });
        }
        self.commands.send(Command::Activate { mem, queues, interrupt })
    }

    fn reset(&mut self) {
        if self.commands.send(Command::Reset).is_err() {
            tracing::warn!("vsock: reset, but the device thread is gone");
        }
    }
}

/// Queues and memory of an activated device.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<Interrupt>,
}

/// The device thread's state.
struct Worker {
    epoll: Arc<Epoll>,
    wake: EventFd,
    commands: mpsc::Receiver<Command>,
    muxer: Muxer,
    guest_cid: u64,
    active: Option<Active>,
}

impl Worker {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: the device's event loop failed ({e}); the device stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    COMMAND_TOKEN if !self.handle_commands() => return,
                    COMMAND_TOKEN => {}
                    t if (QUEUE_TOKEN..QUEUE_TOKEN + QUEUE_SIZES.len() as u64).contains(&t) => {
                        self.queue_notified((t - QUEUE_TOKEN) as usize)
                    }
                    t if self.muxer.owns(t) => self.muxer.handle_event(t, ev.event_set()),
                    // A socket closed earlier in this batch.
                    _ => {}
                }
            }
            self.process_rx();
        }
    }

    /// Returns false when the thread should stop.
    fn handle_commands(&mut self) -> bool {
        let _ = self.wake.read();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Activate { mem, queues, interrupt } => {
                    for (i, q) in queues.iter().enumerate() {
                        let ev = EpollEvent::new(EventSet::IN, QUEUE_TOKEN + i as u64);
                        if let Err(e) = self.epoll.ctl(ControlOperation::Add, q.notify.as_raw_fd(), ev) {
                            tracing::error!("vsock: cannot watch queue {i}: {e}");
                        }
                    }
                    self.active = Some(Active { mem, queues, interrupt });
                    tracing::debug!("vsock: device activated");
                    // The guest may have queued packets before this thread saw the activation.
                    self.process_tx();
                }
                Command::Reset => self.deactivate(),
                Command::Stop => return false,
            }
        }
        true
    }

    fn deactivate(&mut self) {
        if let Some(active) = self.active.take() {
            for q in &active.queues {
                let _ = self.epoll.ctl(ControlOperation::Delete, q.notify.as_raw_fd(), EpollEvent::default());
            }
        }
        self.muxer.reset();
    }

    fn queue_notified(&mut self, index: usize) {
        let Some(active) = &self.active else { return };
        let _ = active.queues[index].notify.read();
        match index {
            TX => self.process_tx(),
            // RX: buffers arrived, handled by the process_rx after every batch.
            // EVENT: we send no events (they are for migration of the VM itself).
            RX | EVENT => {}
            _ => unreachable!("only three queue tokens are registered"),
        }
    }

    /// Takes every packet the guest queued on tx.
    fn process_tx(&mut self) {
        let Some(active) = &mut self.active else { return };
        let used = process_tx_queue(&active.mem, &mut active.queues[TX].queue, self.guest_cid, &mut self.muxer);
        if used {
            notify_guest(&active.mem, &mut active.queues[TX].queue, &active.interrupt);
        }
    }

    /// Fills the guest's rx buffers with whatever the muxer has for it.
    fn process_rx(&mut self) {
        let Some(active) = &mut self.active else { return };
        if process_rx_queue(&active.mem, &mut active.queues[RX].queue, &mut self.muxer) {
            notify_guest(&active.mem, &mut active.queues[RX].queue, &active.interrupt);
        }
    }
}

fn notify_guest(mem: &GuestMemoryMmap, queue: &mut Queue, interrupt: &Interrupt) {
    match queue.needs_notification(mem) {
        Ok(true) => interrupt.signal_used_queue(),
        Ok(false) => {}
        Err(e) => guest_warn!("vsock: reading the queue's notification state: {e}"),
    }
}

/// Hands each tx packet to the muxer; returns whether any buffer was used.
/// Malformed chains are returned to the guest unprocessed.
fn process_tx_queue(mem: &GuestMemoryMmap, queue: &mut Queue, guest_cid: u64, muxer: &mut Muxer) -> bool {
    let mut used = false;
    let mut data = Vec::new();
    while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => {
                let hdr = Header::from_packet(&pkt);
                data.clear();
                if let Some(slice) = pkt.data_slice() {
                    data.resize(slice.len(), 0);
                    if let Err(e) = slice.read_slice(&mut data, 0) {
                        guest_warn!("vsock: cannot read a tx packet's data: {e}");
                        data.clear();
                    }
                }
                match hdr.validate(guest_cid) {
                    Ok(op) if data.len() == hdr.len as usize => muxer.recv(&hdr, op, &data),
                    Ok(_) => muxer.send_stray_rst((hdr.dst_port, hdr.src_port)),
                    Err(e) => {
                        guest_warn!("vsock: bad packet from the guest: {e}");
                        if e.wants_rst() {
                            muxer.send_stray_rst((hdr.dst_port, hdr.src_port));
                        }
                    }
                }
            }
            Err(e) => guest_warn!("vsock: dropped a malformed tx descriptor chain: {e}"),
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            guest_warn!("vsock: cannot return a tx buffer to the guest: {e}");
        }
        used = true;
    }
    used
}

/// Writes packets from the muxer into the guest's rx buffers while both
/// exist; returns whether any buffer was used.
fn process_rx_queue(mem: &GuestMemoryMmap, queue: &mut Queue, muxer: &mut Muxer) -> bool {
    let mut used = false;
    let mut buf = vec![0u8; MAX_PKT_DATA as usize];
    while muxer.has_rx() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else { break };
        let head = chain.head_index();
        let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(mut pkt) => {
                let room = pkt.data_slice().map_or(0, |s| s.len()).min(buf.len());
                let Some((hdr, n)) = muxer.next_rx(&mut buf[..room]) else {
                    // Nothing to send after all: give the buffer back for later.
                    queue.go_to_previous_position();
                    break;
                };
                let written = pkt.set_header_from_raw(&hdr.to_bytes()).map_err(|e| e.to_string()).and_then(|_| {
                    match pkt.data_slice() {
                        Some(s) if n > 0 => s.write_slice(&buf[..n], 0).map_err(|e| e.to_string()),
                        _ => Ok(()),
                    }
                });
                match written {
                    Ok(()) => (packet::HEADER_SIZE + n) as u32,
                    Err(e) => {
                        guest_warn!("vsock: cannot write an rx packet into guest memory ({e}); a packet was lost");
                        0
                    }
                }
            }
            Err(e) => {
                guest_warn!("vsock: dropped a malformed rx descriptor chain: {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            guest_warn!("vsock: cannot return an rx buffer to the guest: {e}");
        }
        used = true;
    }
    used
}

#[cfg(test)]
mod tests;
