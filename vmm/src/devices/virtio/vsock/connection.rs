//! One vsock stream between a guest port and a host Unix socket: the
//! connection state machine and the credit-based flow control of virtio
//! 1.2, 5.10.6.3, with no knowledge of queues or guest memory.
//!
//! Guest -> host data is buffered here up to [`TX_BUF_SIZE`] bytes, which is
//! exactly the receive buffer (`buf_alloc`) we advertise, and our `fwd_cnt`
//! counts only bytes the host socket has taken. A guest that respects its
//! credit therefore never overflows the buffer; when the host socket would
//! block, the guest simply runs out of credit (backpressure) instead of us
//! buffering more. A guest that ignores its credit gets a RST.
//! Host -> guest data is read from the socket only while the guest has
//! credit left, straight into the guest's receive buffer.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::{Op, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Our receive buffer per connection, advertised to the guest as buf_alloc.
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much was forwarded.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
    /// A RST is queued; the connection goes away once it is sent.
    Closing,
    /// Finished; the muxer drops it (and with it the host socket).
    Dead,
}

/// Control packets waiting for room in the guest's rx queue.
#[derive(Debug, Default)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    /// SHUTDOWN flags still to announce.
    shutdown: u32,
}

/// A packet the connection wants to send to the guest: op, flags, and for
/// RW the number of data bytes written into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPacket {
    pub op: Op,
    pub flags: u32,
    pub len: usize,
    /// Our credit fields, to put in the header.
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    state: State,
    pending: Pending,
    /// The guest's receive buffer size and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Data bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Data bytes from the guest that the host socket took.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest data the host socket has not taken yet (at most TX_BUF_SIZE).
    tx_buf: Vec<u8>,
    /// The socket reported readable and has not been drained since.
    readable: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The host closed its write side (we read EOF).
    host_eof: bool,
    /// The host socket hung up completely.
    host_hup: bool,
    /// Reply to send the host client once the guest accepts ("OK <port>\n").
    host_reply: Option<String>,
}

impl Connection {
    fn new(stream: UnixStream, state: State, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        Connection {
            stream,
            state,
            pending: Pending::default(),
            peer_buf_alloc,
            peer_fwd_cnt: Wrapping(peer_fwd_cnt),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: Vec::new(),
            readable: false,
            peer_shutdown: 0,
            host_eof: false,
            host_hup: false,
            host_reply: None,
        }
    }

    /// A host client asked to reach a guest port: a REQUEST goes out, and
    /// the client is told `OK <local_port>` when the guest accepts.
    pub fn new_local(stream: UnixStream, local_port: u32) -> Self {
        let mut c = Connection::new(stream, State::LocalInit, 0, 0);
        c.pending.request = true;
        c.host_reply = Some(format!("OK {local_port}\n"));
        c
    }

    /// The guest connected to a host port and a host listener took it.
    pub fn new_peer(stream: UnixStream, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        let mut c = Connection::new(stream, State::Established, peer_buf_alloc, peer_fwd_cnt);
        c.pending.response = true;
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Whether the muxer should drop the connection now.
    pub fn is_dead(&self) -> bool {
        self.state == State::Dead
    }

    /// The host side hung up: stop polling the socket (it stays readable).
    pub fn host_hung_up(&self) -> bool {
        self.host_hup
    }

    /// Credit the guest has given us: how many more bytes it can receive.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Queues a RST; everything else queued is dropped.
    fn reset(&mut self) {
        if self.state != State::Dead {
            self.state = State::Closing;
        }
    }

    /// Whether we may read the host socket to send data to the guest.
    fn wants_host_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Epoll interest for the host socket.
    pub fn wants_readable(&self) -> bool {
        self.wants_host_data() && !self.readable
    }

    pub fn wants_writable(&self) -> bool {
        !self.tx_buf.is_empty() && matches!(self.state, State::Established)
    }

    /// A packet from the guest for this connection (op already validated).
    pub fn recv(&mut self, op: Op, flags: u32, buf_alloc: u32, fwd_cnt: u32, data: &[u8]) {
        if matches!(self.state, State::Closing | State::Dead) {
            return;
        }
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.pending.credit_request = false;
        }
        match (self.state, op) {
            (_, Op::Rst) => self.state = State::Dead,
            (State::LocalInit, Op::Response) => self.accept_response(),
            (State::Established, Op::Rw) => self.recv_data(data),
            (State::Established, Op::CreditUpdate) => {}
            (State::Established, Op::CreditRequest) => self.pending.credit_update = true,
            (State::Established, Op::Shutdown) => {
                self.peer_shutdown |= flags & SHUTDOWN_BOTH;
                self.flush();
            }
            (state, op) => {
                tracing::debug!("vsock: {op:?} in state {state:?}; resetting the connection");
                self.reset();
            }
        }
    }

    fn accept_response(&mut self) {
        self.state = State::Established;
        let reply = self.host_reply.take().unwrap_or_default();
        // A fresh socket's send buffer always takes these few bytes; failing
        // means the client is gone.
        if let Err(e) = self.stream.write_all(reply.as_bytes()) {
            tracing::debug!("vsock: host client left before the guest accepted: {e}");
            self.reset();
        }
    }

    fn recv_data(&mut self, data: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            tracing::debug!("vsock: guest sent data after shutting down its send side");
            self.reset();
            return;
        }
        if self.tx_buf.len() + data.len() > TX_BUF_SIZE as usize {
            crate::guest_warn!(
                "vsock: guest sent {} bytes with only {} bytes of credit; resetting the connection",
                data.len(),
                TX_BUF_SIZE as usize - self.tx_buf.len()
            );
            self.reset();
            return;
        }
        self.tx_buf.extend_from_slice(data);
        self.flush();
    }

    /// Writes buffered guest data to the host socket, as much as it takes.
    pub fn flush(&mut self) {
        if self.state != State::Established {
            return;
        }
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host socket write failed ({e}); resetting the connection");
                    self.reset();
                    return;
                }
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            // Half-close: the host reader sees EOF, and can still write.
            let _ = self.stream.shutdown(Shutdown::Write);
            if self.peer_shutdown == SHUTDOWN_BOTH {
                // The guest closed its socket and waits for our RST.
                self.reset();
            }
        }
    }

    /// The host socket became readable (or hung up).
    pub fn host_readable(&mut self, hup: bool) {
        self.readable = true;
        if hup {
            self.host_hup = true;
            if self.state == State::LocalInit {
                // The client left before the guest answered.
                self.reset();
            }
        }
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx(&self) -> bool {
        let p = &self.pending;
        matches!(self.state, State::Closing)
            || p.request
            || p.response
            || p.credit_update
            || p.shutdown != 0
            || (self.readable && self.wants_host_data() && (self.peer_credit() > 0 || !p.credit_request))
    }

    /// Produces the next packet for the guest; RW data goes into `buf`.
    /// `None` when there is nothing to send after all.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        let (op, flags, len) = self.next_rx_op(buf)?;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        Some(RxPacket { op, flags, len, buf_alloc: TX_BUF_SIZE, fwd_cnt: self.fwd_cnt.0 })
    }

    fn next_rx_op(&mut self, buf: &mut [u8]) -> Option<(Op, u32, usize)> {
        if self.state == State::Closing {
            self.state = State::Dead;
            return Some((Op::Rst, 0, 0));
        }
        if std::mem::take(&mut self.pending.request) {
            return Some((Op::Request, 0, 0));
        }
        if std::mem::take(&mut self.pending.response) {
            return Some((Op::Response, 0, 0));
        }
        if self.readable && self.wants_host_data() {
            if let Some(rx) = self.read_host(buf) {
                return Some(rx);
            }
        }
        if self.pending.shutdown != 0 {
            return Some((Op::Shutdown, std::mem::take(&mut self.pending.shutdown), 0));
        }
        if self.pending.credit_update {
            return Some((Op::CreditUpdate, 0, 0));
        }
        None
    }

    /// Reads host data for the guest, within its credit.
    fn read_host(&mut self, buf: &mut [u8]) -> Option<(Op, u32, usize)> {
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if self.pending.credit_request {
                return None;
            }
            self.pending.credit_request = true;
            return Some((Op::CreditRequest, 0, 0));
        }
        let want = buf.len().min(credit);
        if want == 0 {
            return None;
        }
        loop {
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.readable = false;
                    self.host_eof = true;
                    self.pending.shutdown |= if self.host_hup { SHUTDOWN_BOTH } else { SHUTDOWN_SEND };
                    return None;
                }
                Ok(n) => {
                    self.rx_cnt += n as u32;
                    return Some((Op::Rw, 0, n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host socket read failed ({e}); resetting the connection");
                    self.reset();
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn next(c: &mut Connection) -> Option<(Op, u32, Vec<u8>)> {
        let mut buf = [0u8; 4096];
        c.next_rx(&mut buf).map(|p| (p.op, p.flags, buf[..p.len].to_vec()))
    }

    #[test]
    fn host_initiated_handshake_replies_ok() {
        let (ours, mut client) = pair();
        let mut c = Connection::new_local(ours, 1 << 30);
        assert!(c.has_rx());
        assert_eq!(next(&mut c), Some((Op::Request, 0, vec![])));
        assert!(!c.has_rx());
        c.recv(Op::Response, 0, 4096, 0, &[]);
        let mut line = [0u8; 32];
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"OK 1073741824\n");
        // Data both ways.
        c.recv(Op::Rw, 0, 4096, 0, b"ping");
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"ping");
        client.write_all(b"pong").unwrap();
        c.host_readable(false);
        assert_eq!(next(&mut c), Some((Op::Rw, 0, b"pong".to_vec())));
        assert_eq!(next(&mut c), None, "drained");
        assert!(c.wants_readable());
    }

    #[test]
    fn guest_refusal_drops_the_connection() {
        let (ours, _client) = pair();
        let mut c = Connection::new_local(ours, 7);
        next(&mut c);
        c.recv(Op::Rst, 0, 0, 0, &[]);
        assert!(c.is_dead());
        assert!(!c.has_rx());
    }

    #[test]
    fn unexpected_op_gets_a_rst() {
        let (ours, _client) = pair();
        let mut c = Connection::new_local(ours, 7);
        next(&mut c);
        c.recv(Op::Rw, 0, 4096, 0, b"too early");
        assert_eq!(next(&mut c), Some((Op::Rst, 0, vec![])));
        assert!(c.is_dead());
    }

    #[test]
    fn never_sends_more_than_the_guest_credit() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_peer(ours, 10, 0);
        assert_eq!(next(&mut c), Some((Op::Response, 0, vec![])));
        host.write_all(&[7u8; 100]).unwrap();
        c.host_readable(false);
        assert_eq!(next(&mut c).unwrap().2.len(), 10);
        // Out of credit: one CREDIT_REQUEST, then silence.
        assert!(c.has_rx());
        assert_eq!(next(&mut c), Some((Op::CreditRequest, 0, vec![])));
        assert!(!c.has_rx());
        assert_eq!(next(&mut c), None);
        // The guest consumed the 10 bytes and shrank its buffer to 20.
        c.recv(Op::CreditUpdate, 0, 20, 10, &[]);
        assert!(c.has_rx());
        assert_eq!(next(&mut c).unwrap().2.len(), 20);
    }

    #[test]
    fn advertises_our_buffer_and_reports_forwarded_bytes() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_peer(ours, 4096, 0);
        let mut buf = [0u8; 64];
        let p = c.next_rx(&mut buf).unwrap();
        assert_eq!((p.buf_alloc, p.fwd_cnt), (TX_BUF_SIZE, 0));
        c.recv(Op::Rw, 0, 4096, 0, &[1u8; 100]);
        c.recv(Op::CreditRequest, 0, 4096, 0, &[]);
        let p = c.next_rx(&mut buf).unwrap();
        assert_eq!((p.op, p.fwd_cnt), (Op::CreditUpdate, 100));
        let mut got = [0u8; 200];
        assert_eq!(host.read(&mut got).unwrap(), 100);
    }

    #[test]
    fn backpressure_holds_data_within_credit_and_resets_on_overrun() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_peer(ours, 4096, 0);
        next(&mut c);
        // Fill the host socket until it would block: the rest stays buffered.
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        while sent + chunk.len() <= TX_BUF_SIZE as usize {
            c.recv(Op::Rw, 0, 4096, 0, &chunk);
            sent += chunk.len();
        }
        assert!(c.wants_writable(), "the host socket is full");
        let forwarded = c.fwd_cnt.0 as usize;
        assert!(forwarded < sent);
        // Credit honoured: the guest may send what was forwarded.
        c.recv(Op::Rw, 0, 4096, 0, &vec![0u8; forwarded.min(64 * 1024)]);
        assert!(!c.is_dead() && c.state == State::Established);
        // Drain the host side, flush, and the guest gets its credit back.
        let mut sink = vec![0u8; 1 << 20];
        while host.read(&mut sink).is_ok() {}
        c.flush();
        assert!(c.pending.credit_update);
        // A guest ignoring its credit is reset.
        let (ours, _host2) = pair();
        let mut c = Connection::new_peer(ours, 4096, 0);
        next(&mut c);
        let too_much = vec![0u8; TX_BUF_SIZE as usize + 1];
        c.recv(Op::Rw, 0, 4096, 0, &too_much);
        assert_eq!(next(&mut c), Some((Op::Rst, 0, vec![])));
    }

    #[test]
    fn half_close_both_ways() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_peer(ours, 4096, 0);
        next(&mut c);
        // Guest shuts its send side: the host reads EOF but can still write.
        c.recv(Op::Rw, 0, 4096, 0, b"last");
        c.recv(Op::Shutdown, SHUTDOWN_SEND, 4096, 0, &[]);
        let mut b = [0u8; 16];
        assert_eq!(host.read(&mut b).unwrap(), 4);
        assert_eq!(host.read(&mut b).unwrap(), 0, "EOF after the guest's SHUTDOWN");
        host.write_all(b"reply").unwrap();
        c.host_readable(false);
        assert_eq!(next(&mut c), Some((Op::Rw, 0, b"reply".to_vec())));
        // Host shuts its write side: the guest gets SHUTDOWN(SEND).
        host.shutdown(Shutdown::Write).unwrap();
        c.host_readable(false);
        assert_eq!(next(&mut c), Some((Op::Shutdown, SHUTDOWN_SEND, vec![])));
        // The guest closes: SHUTDOWN(both) is answered with a RST.
        c.recv(Op::Shutdown, SHUTDOWN_BOTH, 4096, 0, &[]);
        assert_eq!(next(&mut c), Some((Op::Rst, 0, vec![])));
        assert!(c.is_dead());
    }

    #[test]
    fn host_hangup_announces_full_shutdown() {
        let (ours, host) = pair();
        let mut c = Connection::new_peer(ours, 4096, 0);
        next(&mut c);
        drop(host);
        c.host_readable(true);
        assert!(c.host_hung_up());
        assert_eq!(next(&mut c), Some((Op::Shutdown, SHUTDOWN_BOTH, vec![])));
        c.recv(Op::Rst, 0, 0, 0, &[]);
        assert!(c.is_dead());
    }

    #[test]
    fn client_leaving_before_the_guest_answers_resets() {
        let (ours, client) = pair();
        let mut c = Connection::new_local(ours, 7);
        next(&mut c);
        drop(client);
        c.host_readable(true);
        assert_eq!(next(&mut c), Some((Op::Rst, 0, vec![])));
    }
}
