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

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EventSet};

use self::muxer::Muxer;
use self::packet::{Header, MAX_PKT_DATA};
use super::worker::{self, Active, Commands, WorkerThread};
use super::{read_config_bytes, ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::config::VsockConfig;
use crate::guest_warn;

/// Virtio device id of vsock.
pub const DEVICE_TYPE: u32 = 19;
/// Queue size of rx, tx and event queues.
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// Queue indexes (the third, 2, is the event queue, which we never use).
const RX: usize = 0;
const TX: usize = 1;

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

/// The vsock device as the transport sees it.
pub struct Vsock {
    guest_cid: u64,
    commands: Commands,
}

/// The running device thread; dropping it stops the thread and removes the
/// socket file.
pub struct VsockThread {
    _thread: WorkerThread,
    path: PathBuf,
}

impl Drop for VsockThread {
    fn drop(&mut self) {
        // `_thread` is dropped (stopped and joined) after this body runs.
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
    let epoll = Arc::new(Epoll::new().map_err(Error::Epoll)?);
    let muxer = Muxer::new(cid, path.clone(), listener, epoll.clone()).map_err(Error::Epoll)?;
    let (commands, thread) =
        worker::spawn(epoll, Backend { muxer, guest_cid: cid }).map_err(Error::Thread)?;
    Ok((Vsock { guest_cid: cid, commands }, VsockThread { _thread: thread, path }))
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
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
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
        self.commands.activate(mem, queues, interrupt, QUEUE_SIZES.len())
    }

    fn reset(&mut self) {
        self.commands.reset("vsock");
    }
}

/// The device's work on its thread: the muxer of host connections.
struct Backend {
    muxer: Muxer,
    guest_cid: u64,
}

impl worker::Backend for Backend {
    const NAME: &'static str = "vsock";
    const SECCOMP: crate::seccomp::ThreadKind = crate::seccomp::ThreadKind::Vsock;

    fn activated(&mut self, active: &mut Active) {
        // The guest may have queued packets before this thread saw the activation.
        self.process_tx(active);
    }

    fn queue_notified(&mut self, active: &mut Active, index: usize) {
        // RX: buffers arrived, handled by after_events after every batch.
        // EVENT: we send no events (they are for migration of the VM itself).
        if index == TX {
            self.process_tx(active);
        }
    }

    fn event(&mut self, _active: Option<&mut Active>, token: u64, events: EventSet) {
        // A token the muxer no longer owns is a socket closed earlier in this batch.
        if self.muxer.owns(token) {
            self.muxer.handle_event(token, events);
        }
    }

    fn after_events(&mut self, active: Option<&mut Active>) {
        // Fill the guest's rx buffers with whatever the muxer has for it.
        if let Some(active) = active {
            if process_rx_queue(&active.mem, &mut active.queues[RX].queue, &mut self.muxer) {
                active.notify_used(RX, "vsock");
            }
        }
    }

    fn reset(&mut self) {
        self.muxer.reset();
    }
}

impl Backend {
    /// Takes every packet the guest queued on tx.
    fn process_tx(&mut self, active: &mut Active) {
        if process_tx_queue(&active.mem, &mut active.queues[TX].queue, self.guest_cid, &mut self.muxer) {
            active.notify_used(TX, "vsock");
        }
    }
}

/// Hands each tx packet to the muxer; returns whether any buffer was used.
/// Malformed chains are returned to the guest unprocessed.
pub(crate) fn process_tx_queue(mem: &GuestMemoryMmap, queue: &mut Queue, guest_cid: u64, muxer: &mut Muxer) -> bool {
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
pub(crate) fn process_rx_queue(mem: &GuestMemoryMmap, queue: &mut Queue, muxer: &mut Muxer) -> bool {
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
