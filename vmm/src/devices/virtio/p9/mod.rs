//! virtio-9p (device id 9): a host directory shared into the guest, which
//! mounts it with `mount -t 9p -o trans=virtio,version=9p2000.L <tag> <dir>`.
//!
//! One request queue: each descriptor chain carries a 9P request in its
//! device-readable descriptors and room for the response in its writable
//! ones (the Linux client's zero-copy reads and writes split the payload
//! over more descriptors; both are handled as one byte stream). The config
//! space is the mount tag (le16 length, then the bytes).
//!
//! [`P9`] is what the transport sees; [`create`] starts the device thread,
//! which owns the [`server::FileServer`] and waits in one epoll on the queue
//! notification and its command eventfd. [`P9Thread`] stops it when dropped.
//! Requests are handled one at a time on that thread; the guest's file
//! system calls are slow anyway (its kernel is emulated on the development
//! hosts), the host side of a request is a few syscalls.

pub mod msg;
pub mod server;

use std::path::{Component, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::Epoll;

use self::server::{FileServer, MAX_MSIZE};
use super::worker::{self, Active, Commands, WorkerThread};
use super::{read_config_bytes, ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::config::{self, ShareConfig};
use crate::guest_warn;

/// Virtio device id of 9p.
pub const DEVICE_TYPE: u32 = 9;
/// Feature bit: the config space holds a mount tag.
pub const VIRTIO_9P_MOUNT_TAG: u64 = 1;
/// Longest mount tag accepted (the guest mounts it by name).
pub const MAX_TAG_LEN: usize = 64;
const QUEUE_SIZES: [u16; 1] = [256];
/// Open files the VMM wants to be able to hold: two per fid plus its own.
const WANT_NOFILE: u64 = 2 * server::MAX_FIDS as u64 + 1024;

/// Errors setting up the share device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot share {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot share {0}: the guest mounts the share at the same path, passed on the kernel command line, \
         so it must be valid UTF-8 without white space, quotes, control characters or `..`"
    )]
    BadPath(PathBuf),
    #[error(
        "cannot share {path}: the guest mounts the share at the same path, where it would hide or lie in \
         the guest's own {guest_dir}; share a directory below it, or another one"
    )]
    InTheWay { path: PathBuf, guest_dir: &'static str },
    #[error("the 9p mount tag {0:?} is invalid (1 to {MAX_TAG_LEN} letters, digits, '-', '_' or '.')")]
    BadTag(String),
    #[error("setting up the 9p device's event loop: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("cannot start the 9p device thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The 9p device as the transport sees it.
pub struct P9 {
    config: Vec<u8>,
    commands: Commands,
}

/// The running device thread; dropping it stops the thread.
pub type P9Thread = WorkerThread;

/// The host directory as the guest's /init gets it on the kernel command
/// line (`PMIVMM_SHARE=<dir>`, which the kernel puts in init's environment):
/// the absolute path as given, symlinks not resolved, so that the same path
/// names the share on both sides.
pub fn guest_path(config: &ShareConfig) -> Result<String, Error> {
    let dir = std::path::absolute(&config.host_dir)
        .map_err(|source| Error::Dir { path: config.host_dir.clone(), source })?;
    let s = dir.to_str().ok_or_else(|| Error::BadPath(dir.clone()))?;
    if s.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\'' || c == '\\')
        || dir.components().any(|c| c == Component::ParentDir)
    {
        return Err(Error::BadPath(dir.clone()));
    }
    if let Some(guest_dir) = config::guest_dir_in_the_way(&dir) {
        return Err(Error::InTheWay { path: dir, guest_dir });
    }
    Ok(s.to_owned())
}

/// Kernel command-line arguments that tell /init to mount the share.
pub fn cmdline_args(config: &ShareConfig) -> Result<String, Error> {
    Ok(format!("PMIVMM_SHARE={} PMIVMM_SHARE_TAG={}", guest_path(config)?, config.tag))
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Opens the shared directory and starts the device thread.
pub fn create(config: &ShareConfig) -> Result<(P9, P9Thread), Error> {
    if !valid_tag(&config.tag) {
        return Err(Error::BadTag(config.tag.clone()));
    }
    guest_path(config)?;
    let server =
        FileServer::new(&config.host_dir).map_err(|source| Error::Dir { path: config.host_dir.clone(), source })?;
    raise_nofile_limit();
    let epoll = Arc::new(Epoll::new().map_err(Error::Epoll)?);
    let (commands, thread) = worker::spawn(epoll, Backend { server }).map_err(Error::Thread)?;
    let mut cfg = (config.tag.len() as u16).to_le_bytes().to_vec();
    cfg.extend_from_slice(config.tag.as_bytes());
    Ok((P9 { config: cfg, commands }, thread))
}

/// Every fid may hold two fds: make sure the soft limit allows that.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= WANT_NOFILE {
        return;
    }
    lim.rlim_cur = WANT_NOFILE.min(lim.rlim_max);
    // SAFETY: setrlimit reads only `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        tracing::warn!("9p: cannot raise the open-file limit to {}", lim.rlim_cur);
    }
}

impl VirtioDevice for P9 {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_9P_MOUNT_TAG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("9p: the guest wrote the read-only config space at offset {offset}");
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
        self.commands.reset("9p");
    }
}

/// The device's work on its thread: the file server.
struct Backend {
    server: FileServer,
}

impl worker::Backend for Backend {
    const NAME: &'static str = "9p";
    const SECCOMP: crate::seccomp::ThreadKind = crate::seccomp::ThreadKind::P9;

    fn activated(&mut self, active: &mut Active) {
        self.process(active);
    }

    fn queue_notified(&mut self, active: &mut Active, _index: usize) {
        self.process(active);
    }
}

impl Backend {
    fn process(&mut self, active: &mut Active) {
        if process_queue(&active.mem, &mut active.queues[0].queue, &mut self.server) {
            active.notify_used(0, "9p");
        }
    }
}

/// Handles every request on the queue; returns whether any buffer was used.
/// A chain whose buffers are outside guest RAM, or whose request is larger
/// than the largest message, is answered with an error when it can be and
/// returned to the guest otherwise; nothing a guest puts in a chain makes
/// the device panic or allocate more than [`MAX_MSIZE`] for it.
pub fn process_queue(mem: &GuestMemoryMmap, queue: &mut Queue, server: &mut FileServer) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = handle_chain(mem, chain, server);
        if let Err(e) = queue.add_used(mem, head, len) {
            guest_warn!("9p: cannot return a buffer to the guest: {e}");
        }
        used = true;
    }
    used
}

/// Handles one chain; returns the number of bytes written into it.
fn handle_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    server: &mut FileServer,
) -> u32 {
    use std::io::{Read, Write};
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            guest_warn!("9p: dropped a descriptor chain with buffers outside guest memory: {e}");
            return 0;
        }
    };
    if writer.available_bytes() < server::RLERROR_LEN {
        // No room even for an error: do not run a request nobody can learn the outcome of.
        guest_warn!("9p: dropped a request with {} bytes for its response", writer.available_bytes());
        return 0;
    }
    let avail = reader.available_bytes();
    let mut req = vec![0u8; avail.min(MAX_MSIZE as usize)];
    if let Err(e) = reader.read_exact(&mut req) {
        guest_warn!("9p: cannot read a request from guest memory: {e}");
        return 0;
    }
    let resp = if avail > MAX_MSIZE as usize {
        guest_warn!("9p: a request of {avail} bytes is larger than msize {MAX_MSIZE}");
        match req.get(5..7) {
            Some(t) => server::rlerror(u16::from_le_bytes([t[0], t[1]]), libc::EMSGSIZE),
            None => Vec::new(),
        }
    } else {
        server.handle(&mut req)
    };
    let resp = if resp.len() > writer.available_bytes() {
        guest_warn!("9p: a response of {} bytes does not fit the guest's {} bytes", resp.len(), writer.available_bytes());
        let tag = resp.get(5..7).map_or(0, |t| u16::from_le_bytes([t[0], t[1]]));
        let err = server::rlerror(tag, libc::ENOBUFS);
        if err.len() > writer.available_bytes() {
            return 0;
        }
        err
    } else {
        resp
    };
    match writer.write_all(&resp) {
        Ok(()) => resp.len() as u32,
        Err(e) => {
            guest_warn!("9p: cannot write a response into guest memory: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests;
