//! The vsock device driven through in-memory virtqueues (virtio-queue's
//! mock split queues) and real Unix sockets in a temporary directory.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::host_port_path;
use super::packet::{Op, HOST_CID, SHUTDOWN_BOTH, TYPE_STREAM};
use super::*;
use crate::devices::virtio::test_utils::chain;

const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 0x100_0000;
const RX_DATA: u32 = 4096;

struct Harness {
    mem: &'static GuestMemoryMmap,
    rxvq: MockSplitQueue<'static, GuestMemoryMmap>,
    txvq: MockSplitQueue<'static, GuestMemoryMmap>,
    rxq: Queue,
    txq: Queue,
    muxer: Muxer,
    epoll: Arc<Epoll>,
    path: PathBuf,
    /// Next free descriptor index per queue, next free buffer address.
    next_desc: [u16; 2],
    next_buf: u64,
    /// Used entries already looked at per queue.
    used_seen: [u16; 2],
    /// rx chain head -> (header address, data address).
    rx_bufs: HashMap<u16, (u64, u64)>,
}

impl Harness {
    fn new(name: &str) -> Self {
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()));
        let rxvq = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let txvq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 256);
        let rxq = rxvq.create_queue().unwrap();
        let txq = txvq.create_queue().unwrap();
        let dir = std::env::temp_dir().join(format!("pmivmm-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        let epoll = Arc::new(Epoll::new().unwrap());
        let muxer = Muxer::new(GUEST_CID, path.clone(), UnixListener::bind(&path).unwrap(), epoll.clone()).unwrap();
        Harness {
            mem,
            rxvq,
            txvq,
            rxq,
            txq,
            muxer,
            epoll,
            path,
            next_desc: [0, 0],
            next_buf: 0x10_0000,
            used_seen: [0, 0],
            rx_bufs: HashMap::new(),
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(0x1000);
        a
    }

    fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc[q];
        let raw = chain(head, descs);
        let vq = if q == RX { &self.rxvq } else { &self.txvq };
        vq.add_desc_chains(&raw, head).unwrap();
        self.next_desc[q] += descs.len() as u16;
        head
    }

    /// The guest sends a packet (header and data in two descriptors).
    fn send(&mut self, hdr: Header, data: &[u8]) {
        let h = self.alloc(44);
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).unwrap();
        if data.is_empty() {
            self.add_chain(TX, &[(h, 44, 0)]);
        } else {
            let d = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.add_chain(TX, &[(h, 44, 0), (d, data.len() as u32, 0)]);
        }
        self.process_tx();
    }

    fn process_tx(&mut self) {
        process_tx_queue(self.mem, &mut self.txq, GUEST_CID, &mut self.muxer);
    }

    /// The guest offers `n` receive buffers.
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let h = self.alloc(44);
            let d = self.alloc(u64::from(RX_DATA));
            let head = self.add_chain(RX, &[(h, 44, VRING_DESC_F_WRITE as u16), (d, RX_DATA, VRING_DESC_F_WRITE as u16)]);
            self.rx_bufs.insert(head, (h, d));
        }
    }

    /// New used entries of queue `q`: (head, len).
    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used_addr = if q == RX { self.rxvq.used_addr() } else { self.txvq.used_addr() };
        let idx: u16 = self.mem.read_obj(used_addr.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let elem = used_addr.unchecked_add(4 + 8 * u64::from(self.used_seen[q] % 256));
            let id: u32 = self.mem.read_obj(elem).unwrap();
            let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Lets the muxer deliver whatever it has into the rx buffers given.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        process_rx_queue(self.mem, &mut self.rxq, &mut self.muxer);
        self.used(RX)
            .into_iter()
            .map(|(head, len)| {
                let (h, d) = self.rx_bufs[&head];
                let mut b = [0u8; 44];
                self.mem.read_slice(&mut b, GuestAddress(h)).unwrap();
                let hdr = header_from_bytes(&b);
                let mut data = vec![0u8; len as usize - 44];
                self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
                assert_eq!(hdr.len as usize, data.len());
                (hdr, data)
            })
            .collect()
    }

    /// Dispatches socket events until none arrive for a moment.
    fn pump(&mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        let mut timeout = 500;
        loop {
            let n = self.epoll.wait(timeout, &mut events).unwrap();
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                if self.muxer.owns(ev.data()) {
                    self.muxer.handle_event(ev.data(), ev.event_set());
                }
            }
            timeout = 50;
        }
    }
}

fn header_from_bytes(b: &[u8; 44]) -> Header {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    Header {
        src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16::from_le_bytes([b[28], b[29]]),
        op: u16::from_le_bytes([b[30], b[31]]),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// A packet from guest port `src` to host port `dst`.
fn guest_pkt(op: Op, src: u32, dst: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 64 * 1024,
        ..Default::default()
    }
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

fn read_timeout(s: &mut UnixStream, buf: &mut [u8]) -> usize {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.read(buf).unwrap()
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut h = Harness::new("guest-connect");
    let host = UnixListener::bind(host_port_path(&h.path, 52)).unwrap();
    h.give_rx(4);
    h.send(guest_pkt(Op::Request, 1024, 52), &[]);
    let got = h.recv();
    assert_eq!(ops(&got), [Op::Response as u16]);
    let r = &got[0].0;
    assert_eq!((r.src_cid, r.dst_cid, r.src_port, r.dst_port), (HOST_CID, GUEST_CID, 52, 1024));
    let (mut s, _) = host.accept().unwrap();

    h.send(Header { len: 5, ..guest_pkt(Op::Rw, 1024, 52) }, b"hello");
    let mut b = [0u8; 16];
    let n = read_timeout(&mut s, &mut b);
    assert_eq!(&b[..n], b"hello");
    // The tx buffers were all returned.
    assert_eq!(h.used(TX).len(), 2);

    s.write_all(b"world").unwrap();
    h.pump();
    let got = h.recv();
    assert_eq!(ops(&got), [Op::Rw as u16]);
    assert_eq!(got[0].1, b"world");
    assert_eq!(got[0].0.fwd_cnt, 5, "we report what the host took");
    assert_eq!(got[0].0.buf_alloc, connection::TX_BUF_SIZE);

    // The host closes: the guest is told, answers with RST, and it is over.
    drop(s);
    h.pump();
    h.give_rx(1);
    let got = h.recv();
    assert_eq!(ops(&got), [Op::Shutdown as u16]);
    assert_eq!(got[0].0.flags, SHUTDOWN_BOTH);
    h.send(guest_pkt(Op::Rst, 1024, 52), &[]);
    assert!(!h.muxer.has_rx());
    // Data for the closed connection now gets a RST.
    h.send(Header { len: 1, ..guest_pkt(Op::Rw, 1024, 52) }, b"x");
    assert_eq!(ops(&h.recv()), [Op::Rst as u16]);
}

#[test]
fn guest_connection_to_a_closed_host_port_is_reset() {
    let mut h = Harness::new("guest-refused");
    h.give_rx(1);
    h.send(guest_pkt(Op::Request, 1024, 53), &[]);
    let got = h.recv();
    assert_eq!(ops(&got), [Op::Rst as u16]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (53, 1024));
}

#[test]
fn host_initiated_connect() {
    let mut h = Harness::new("host-connect");
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    h.give_rx(4);
    let got = h.recv();
    assert_eq!(ops(&got), [Op::Request as u16]);
    let req = got[0].0;
    assert_eq!((req.dst_cid, req.dst_port), (GUEST_CID, 1024));
    let local = req.src_port;

    h.send(guest_pkt(Op::Response, 1024, local), &[]);
    let mut b = [0u8; 64];
    let n = read_timeout(&mut client, &mut b);
    assert_eq!(std::str::from_utf8(&b[..n]).unwrap(), format!("OK {local}\n"));

    client.write_all(b"ping").unwrap();
    h.pump();
    let got = h.recv();
    assert_eq!((got[0].0.op, got[0].1.as_slice()), (Op::Rw as u16, &b"ping"[..]));
    h.send(Header { len: 4, ..guest_pkt(Op::Rw, 1024, local) }, b"pong");
    let n = read_timeout(&mut client, &mut b);
    assert_eq!(&b[..n], b"pong");
}

#[test]
fn host_connect_refused_by_the_guest_closes_the_client() {
    let mut h = Harness::new("host-refused");
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.write_all(b"CONNECT 2000\n").unwrap();
    h.pump();
    h.give_rx(1);
    let req = h.recv()[0].0;
    h.send(guest_pkt(Op::Rst, 2000, req.src_port), &[]);
    let mut b = [0u8; 16];
    assert_eq!(read_timeout(&mut client, &mut b), 0, "closed without OK");
}

#[test]
fn garbage_connect_line_closes_the_client() {
    let mut h = Harness::new("host-garbage");
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.write_all(b"HELLO\n").unwrap();
    h.pump();
    let mut b = [0u8; 16];
    assert_eq!(read_timeout(&mut client, &mut b), 0);
    assert!(!h.muxer.has_rx());
}

#[test]
fn host_data_respects_guest_credit() {
    let mut h = Harness::new("credit");
    let host = UnixListener::bind(host_port_path(&h.path, 60)).unwrap();
    h.give_rx(8);
    h.send(Header { buf_alloc: 8, ..guest_pkt(Op::Request, 1500, 60) }, &[]);
    assert_eq!(ops(&h.recv()), [Op::Response as u16]);
    let (mut s, _) = host.accept().unwrap();
    s.write_all(&[0xab; 100]).unwrap();
    h.pump();
    let got = h.recv();
    assert_eq!(ops(&got), [Op::Rw as u16, Op::CreditRequest as u16]);
    assert_eq!(got[0].1.len(), 8);
    h.pump();
    assert!(h.recv().is_empty(), "nothing more without credit");
    h.send(Header { buf_alloc: 8, fwd_cnt: 8, ..guest_pkt(Op::CreditUpdate, 1500, 60) }, &[]);
    h.pump();
    let got = h.recv();
    assert_eq!(got[0].1.len(), 8);
}

#[test]
fn hostile_tx_packets_are_dropped_or_reset() {
    let mut h = Harness::new("hostile-tx");
    h.give_rx(8);
    // Descriptors outside guest RAM, and straddling its end.
    h.add_chain(TX, &[(MEM_SIZE + 0x1000, 44, 0)]);
    h.add_chain(TX, &[(MEM_SIZE - 20, 44, 0)]);
    h.add_chain(TX, &[(u64::MAX - 10, 44, 0)]);
    // A header descriptor too short, and a write-only one.
    let a = h.alloc(44);
    h.add_chain(TX, &[(a, 10, 0)]);
    h.add_chain(TX, &[(a, 44, VRING_DESC_F_WRITE as u16)]);
    h.process_tx();
    assert_eq!(h.used(TX).len(), 5, "every chain is returned to the guest");
    assert!(!h.muxer.has_rx());

    // A length beyond the data descriptor, a data descriptor beyond RAM,
    // a length above the packet limit.
    h.mem.write_slice(&Header { len: 100, ..guest_pkt(Op::Rw, 1, 2) }.to_bytes(), GuestAddress(a)).unwrap();
    let d = h.alloc(16);
    h.add_chain(TX, &[(a, 44, 0), (d, 16, 0)]);
    h.add_chain(TX, &[(a, 44, 0), (MEM_SIZE - 50, 100, 0)]);
    let b = h.alloc(44);
    h.mem.write_slice(&Header { len: 1 << 20, ..guest_pkt(Op::Rw, 1, 2) }.to_bytes(), GuestAddress(b)).unwrap();
    h.add_chain(TX, &[(b, 44, 0), (d, 16, 0)]);
    h.process_tx();
    assert_eq!(h.used(TX).len(), 3);
    assert!(!h.muxer.has_rx());

    // Wrong CIDs are dropped silently.
    h.send(Header { dst_cid: 7, ..guest_pkt(Op::Request, 1, 2) }, &[]);
    h.send(Header { src_cid: 9, ..guest_pkt(Op::Request, 1, 2) }, &[]);
    assert!(h.recv().is_empty());
    // A bogus op, a bogus type, and a control packet with data get a RST.
    h.send(Header { op: 99, ..guest_pkt(Op::Request, 1, 2) }, &[]);
    h.send(Header { type_: 2, ..guest_pkt(Op::Request, 1, 2) }, &[]);
    h.send(Header { len: 3, ..guest_pkt(Op::Request, 1, 2) }, b"abc");
    let got = h.recv();
    assert_eq!(ops(&got), [Op::Rst as u16; 3]);
    assert!(got.iter().all(|(hdr, _)| hdr.dst_port == 1 && hdr.src_port == 2));
}

#[test]
fn hostile_rx_buffers_are_dropped() {
    let mut h = Harness::new("hostile-rx");
    // Read-only, outside RAM, too short: each is consumed without a packet.
    let a = h.alloc(44);
    h.add_chain(RX, &[(a, 44, 0), (a, 16, 0)]);
    h.add_chain(RX, &[(MEM_SIZE + 0x1000, 44, VRING_DESC_F_WRITE as u16), (a, 16, VRING_DESC_F_WRITE as u16)]);
    h.add_chain(RX, &[(a, 8, VRING_DESC_F_WRITE as u16)]);
    h.give_rx(1);
    h.send(guest_pkt(Op::Request, 1024, 54), &[]);
    process_rx_queue(h.mem, &mut h.rxq, &mut h.muxer);
    let used = h.used(RX);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0, 44], "the RST lands in the good buffer");
}

#[test]
fn config_space_is_the_guest_cid() {
    let dir = std::env::temp_dir().join(format!("pmivmm-vsock-{}-cfg", std::process::id()));
    let cfg = VsockConfig { guest_cid: 0x1234_5678, socket_path: dir.join("v.sock") };
    let (dev, thread) = create(&cfg).unwrap();
    assert!(cfg.socket_path.exists());
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
    let mut b = [0u8; 4];
    dev.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    drop(thread);
    assert!(!cfg.socket_path.exists(), "the socket file goes with the device");
    assert!(matches!(create(&VsockConfig { guest_cid: 2, ..cfg.clone() }), Err(Error::BadCid(2))));
}

#[test]
fn device_thread_serves_queues_through_the_transport() {
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::MmioDevice;

    let dir = std::env::temp_dir().join(format!("pmivmm-vsock-{}-thread", std::process::id()));
    let cfg = VsockConfig { guest_cid: GUEST_CID, socket_path: dir.join("v.sock") };
    let (dev, _thread) = create(&cfg).unwrap();
    let mem: &'static GuestMemoryMmap =
        Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev), irq).unwrap();
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    // Set up three queues of 16 entries, like the guest driver would.
    w(&mut t, 0x70, 1 | 2);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, 1 | 2 | 8);
    let vqs: Vec<_> = (0..3u64).map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x1_0000), 16)).collect();
    for (i, vq) in vqs.iter().enumerate() {
        w(&mut t, 0x30, i as u32);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, vq.desc_table_addr().0 as u32);
        w(&mut t, 0x90, vq.avail_addr().0 as u32);
        w(&mut t, 0xa0, vq.used_addr().0 as u32);
        w(&mut t, 0x44, 1);
    }
    w(&mut t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(t.interrupt().status(), 0);

    // The guest offers an rx buffer and sends a REQUEST to a closed port.
    let rx = SplitDescriptor::new(0x10_0000, 44 + 64, VRING_DESC_F_WRITE as u16, 0);
    vqs[RX].add_desc_chains(&[RawDescriptor::from(rx)], 0).unwrap();
    mem.write_slice(&guest_pkt(Op::Request, 1024, 99).to_bytes(), GuestAddress(0x20_0000)).unwrap();
    vqs[TX].add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x20_0000, 44, 0, 0))], 0).unwrap();
    w(&mut t, 0x50, TX as u32);
    // The device thread answers with a RST and raises the interrupt.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while t.interrupt().status() == 0 || vqs[RX].used().idx().load() == 0 {
        assert!(std::time::Instant::now() < deadline, "no answer from the device thread");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut b = [0u8; 44];
    mem.read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(header_from_bytes(&b).op, Op::Rst as u16);
    // Reset stops the device; the thread stays alive for the next activation.
    w(&mut t, 0x70, 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// Found by `pmivmm fuzz vsock`: host data waiting and an rx buffer with
/// no room for data (a zero-length data descriptor) made the device thread
/// spin forever in `Muxer::next_rx` (the connection had a packet, yet none
/// fit, and it went back to the queue it was taken from).
#[test]
fn rx_buffer_without_room_for_data_does_not_hang() {
    let mut h = Harness::new("rx-no-room");
    let host = UnixListener::bind(host_port_path(&h.path, 54)).unwrap();
    h.give_rx(1);
    h.send(guest_pkt(Op::Request, 1024, 54), &[]);
    assert_eq!(ops(&h.recv()), [Op::Response as u16]);
    let (mut s, _) = host.accept().unwrap();
    s.write_all(b"waiting").unwrap();
    h.pump();
    // Header only: the call returns, the buffer stays with the device and
    // the data waits (the guest stalled its own connection, nothing more).
    let (hdr, data) = (h.alloc(44), h.alloc(16));
    let w = VRING_DESC_F_WRITE as u16;
    h.add_chain(RX, &[(hdr, 44, w), (data, 0, w)]);
    process_rx_queue(h.mem, &mut h.rxq, &mut h.muxer);
    assert!(h.used(RX).is_empty());
    assert!(h.muxer.has_rx());
}
