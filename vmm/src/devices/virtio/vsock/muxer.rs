//! The hybrid Unix-socket backend (Firecracker's design): the vsock
//! connections of one guest, multiplexed onto host Unix sockets.
//!
//! - Host-initiated: a client connects to the node's listening socket at
//!   `path`, writes `CONNECT <port>\n`, and once the guest accepts gets
//!   `OK <local_port>\n`; then the socket carries the stream. A guest RST
//!   closes the client's socket.
//! - Guest-initiated: a connection to host port P is connected to the Unix
//!   socket `<path>_P`; the guest gets a RST when nothing listens there.
//!
//! The muxer owns every host socket and registers them in the device
//! thread's epoll; the epoll data of a socket is its fd.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::Connection;
use super::packet::{Header, Op, HOST_CID, TYPE_STREAM};

/// Most connections (including ones still reading their CONNECT line).
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First local port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (host port, guest port).
type Key = (u32, u32);

struct Entry {
    conn: Connection,
    /// What the socket is registered for in epoll (None: not registered).
    registered: Option<EventSet>,
    /// In `rxq`.
    queued: bool,
}

/// A host client that connected and has not finished its CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Arc<Epoll>,
    conns: HashMap<Key, Entry>,
    /// Connection of each registered socket fd.
    by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections with packets for the guest, in arrival order.
    rxq: VecDeque<Key>,
    /// RSTs for packets that belong to no connection (dst port, src port of the reply).
    stray_rsts: VecDeque<Key>,
    next_local_port: u32,
}

impl Muxer {
    /// `listener` is the node's bound socket at `path`; it is registered in `epoll`.
    pub fn new(guest_cid: u64, path: PathBuf, listener: UnixListener, epoll: Arc<Epoll>) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
        )?;
        Ok(Muxer {
            guest_cid,
            path,
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            stray_rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// Whether `data` (an epoll event's data) is one of the muxer's sockets.
    pub fn owns(&self, data: u64) -> bool {
        let fd = data as RawFd;
        fd == self.listener.as_raw_fd() || self.by_fd.contains_key(&fd) || self.handshakes.contains_key(&fd)
    }

    /// Handles readiness of one of the muxer's sockets.
    pub fn handle_event(&mut self, data: u64, events: EventSet) {
        let fd = data as RawFd;
        if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if self.handshakes.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if let Some(e) = self.conns.get_mut(&key) {
                let hup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
                if events.intersects(EventSet::IN) || hup {
                    e.conn.host_readable(hup);
                }
                if events.contains(EventSet::OUT) {
                    e.conn.flush();
                }
            }
            self.update(key);
        }
    }

    /// Drops every connection (device reset).
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        for (fd, _) in self.handshakes.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.rxq.clear();
        self.stray_rsts.clear();
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accepting on {}: {e}", self.path.display());
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing a new host client");
                continue;
            }
            let fd = stream.as_raw_fd();
            let added = stream.set_nonblocking(true).and_then(|_| {
                self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64))
            });
            match added {
                Ok(()) => {
                    self.handshakes.insert(fd, Handshake { stream, line: Vec::new() });
                }
                Err(e) => tracing::warn!("vsock: cannot watch a host client socket: {e}"),
            }
        }
    }

    /// Reads the client's `CONNECT <port>\n` byte by byte, so that no data
    /// after it is consumed before the stream is connected.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before sending CONNECT".to_owned()),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => break Err("CONNECT line too long".to_owned()),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let hs = self.handshakes.remove(&fd).expect("looked up above");
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        match outcome {
            Ok(peer_port) => {
                let local_port = self.alloc_local_port();
                tracing::debug!("vsock: host client connects to guest port {peer_port} (local port {local_port})");
                self.insert((local_port, peer_port), Connection::new_local(hs.stream, local_port));
            }
            Err(e) => tracing::warn!("vsock: host client on {}: {e}; closing it", self.path.display()),
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|&(local, _)| local == p) {
                return p;
            }
        }
    }

    fn insert(&mut self, key: Key, conn: Connection) {
        let fd = conn.stream().as_raw_fd();
        self.by_fd.insert(fd, key);
        self.conns.insert(key, Entry { conn, registered: None, queued: false });
        self.update(key);
    }

    fn remove(&mut self, key: Key) {
        if let Some(e) = self.conns.remove(&key) {
            let fd = e.conn.stream().as_raw_fd();
            if e.registered.is_some() {
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.by_fd.remove(&fd);
        }
    }

    /// Brings epoll interest and the rx queue in line with the connection's state.
    fn update(&mut self, key: Key) {
        let Some(e) = self.conns.get_mut(&key) else { return };
        if e.conn.is_dead() {
            self.remove(key);
            return;
        }
        let fd = e.conn.stream().as_raw_fd();
        let want = if e.conn.host_hung_up() {
            // A hung-up socket stays ready forever: stop watching it.
            None
        } else {
            let mut set = EventSet::empty();
            set.set(EventSet::IN, e.conn.wants_readable());
            set.set(EventSet::OUT, e.conn.wants_writable());
            Some(set)
        };
        if want != e.registered {
            let result = match (e.registered, want) {
                (None, Some(set)) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64)),
                (Some(_), Some(set)) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(set, fd as u64)),
                (Some(_), None) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
                (None, None) => Ok(()),
            };
            if let Err(err) = result {
                tracing::warn!("vsock: cannot update epoll for a connection: {err}");
            }
            e.registered = want;
        }
        if !e.queued && e.conn.has_rx() {
            e.queued = true;
            self.rxq.push_back(key);
        }
    }

    /// A validated packet from the guest.
    pub fn recv(&mut self, hdr: &Header, op: Op, data: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        match self.conns.get_mut(&key) {
            Some(e) => e.conn.recv(op, hdr.flags, hdr.buf_alloc, hdr.fwd_cnt, data),
            None if op == Op::Request => {
                self.connect_to_host(key, hdr);
                return;
            }
            None if op == Op::Rst => return,
            None => {
                self.send_stray_rst(key);
                return;
            }
        }
        self.update(key);
    }

    /// Answers a packet that cannot be handled with a RST.
    pub fn send_stray_rst(&mut self, key: Key) {
        if self.stray_rsts.len() >= MAX_CONNECTIONS {
            crate::guest_warn!("vsock: too many RSTs waiting for the guest's rx queue; dropping one");
            return;
        }
        self.stray_rsts.push_back(key);
    }

    fn connect_to_host(&mut self, key: Key, hdr: &Header) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing the guest's connection to port {}", key.0);
            self.send_stray_rst(key);
            return;
        }
        let target = host_port_path(&self.path, key.0);
        match UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => self.insert(key, Connection::new_peer(stream, hdr.buf_alloc, hdr.fwd_cnt)),
            Err(e) => {
                tracing::debug!("vsock: guest connection to host port {}: {}: {e}", key.0, target.display());
                self.send_stray_rst(key);
            }
        }
    }

    /// Whether a packet may be waiting for the guest.
    pub fn has_rx(&self) -> bool {
        !self.stray_rsts.is_empty() || !self.rxq.is_empty()
    }

    /// The next packet for the guest, its data written into `buf`: the
    /// header and the data length.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some((local, peer)) = self.stray_rsts.pop_front() {
            return Some((self.header(local, peer, Op::Rst, 0, 0, 0, 0), 0));
        }
        // One pass over the queue: a connection with nothing that fits
        // `buf` (no room for data) goes back to its end and waits for a
        // larger buffer, instead of being taken again at once.
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else { break };
            let Some(e) = self.conns.get_mut(&key) else { continue };
            e.queued = false;
            let pkt = e.conn.next_rx(buf);
            self.update(key);
            if let Some(p) = pkt {
                let hdr = self.header(key.0, key.1, p.op, p.flags, p.len as u32, p.buf_alloc, p.fwd_cnt);
                return Some((hdr, p.len));
            }
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn header(&self, local: u32, peer: u32, op: Op, flags: u32, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local,
            dst_port: peer,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }
}

/// The Unix socket a guest connection to host `port` goes to: `<path>_<port>`.
pub fn host_port_path(path: &Path, port: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not text".to_owned())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("expected 'CONNECT <port>', got '{}'", text.escape_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT -1").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert!(parse_connect(b"HELLO 1").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn host_port_paths() {
        assert_eq!(host_port_path(Path::new("/run/pmivmm/n1/vsock.sock"), 52), Path::new("/run/pmivmm/n1/vsock.sock_52"));
    }
}
