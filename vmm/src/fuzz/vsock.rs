//! The vsock device as a hostile guest driver sees it: tx chains carrying
//! packets (well-formed headers with hostile fields, or garbage), rx
//! buffers of any shape, and the connection state machine behind them,
//! with a host socket listening on one port so that connections open,
//! carry data and close.

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use arbitrary::{Result, Unstructured};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::guest::{self, Buffers, Piece, RING_SPAN};
use crate::devices::virtio::vsock::muxer::{host_port_path, Muxer};
use crate::devices::virtio::vsock::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use crate::devices::virtio::vsock::{process_rx_queue, process_tx_queue};

const GUEST_CID: u64 = 3;
/// The host port with a listener behind it.
const OPEN_PORT: u32 = 5000;

/// The host side of one fuzzing thread: the muxer and the socket behind
/// [`OPEN_PORT`], reused from input to input (reset in between).
struct Host {
    muxer: Muxer,
    epoll: Arc<Epoll>,
    port_listener: UnixListener,
    _dir: super::Scratch,
}

thread_local! {
    static HOST: RefCell<Option<Host>> = const { RefCell::new(None) };
}

impl Host {
    fn new() -> Host {
        let dir = super::scratch_dir("vsock");
        let path = dir.0.join("vsock.sock");
        let bind = |p: &std::path::Path| {
            let _ = std::fs::remove_file(p);
            UnixListener::bind(p).unwrap_or_else(|e| panic!("cannot bind {}: {e}", p.display()))
        };
        let epoll = Arc::new(Epoll::new().expect("an epoll for the fuzz muxer"));
        let muxer = Muxer::new(GUEST_CID, path.clone(), bind(&path), epoll.clone()).expect("the fuzz muxer");
        let port_listener = bind(&host_port_path(&path, OPEN_PORT));
        port_listener.set_nonblocking(true).expect("a non-blocking listener");
        Host { muxer, epoll, port_listener, _dir: dir }
    }

    /// The muxer's sockets that are ready, handled as the device thread does.
    fn poll(&mut self) {
        let mut events = [EpollEvent::default(); 16];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for e in &events[..n] {
            if self.muxer.owns(e.data()) {
                self.muxer.handle_event(e.data(), e.event_set());
            }
        }
    }

    /// Connections the muxer opened to [`OPEN_PORT`].
    fn accept(&self) -> Vec<UnixStream> {
        std::iter::from_fn(|| self.port_listener.accept().ok().map(|(s, _)| s)).collect()
    }
}

/// A tx packet: mostly a plausible header (fields drawn from small sets)
/// with its data, sometimes any 44 bytes.
fn tx_piece(u: &mut Unstructured, index: usize) -> Result<Piece> {
    if index > 0 {
        let len = u.int_in_range(0..=256)?;
        return Ok(Piece { bytes: u.bytes(len.min(u.len()))?.to_vec(), writable: false });
    }
    if u.ratio(1, 8)? {
        return Ok(Piece { bytes: u.bytes(HEADER_SIZE.min(u.len()))?.to_vec(), writable: false });
    }
    let pick = |u: &mut Unstructured, common: u64| -> Result<u64> {
        if u.ratio(7, 8)? {
            Ok(common)
        } else {
            u.arbitrary()
        }
    };
    let op = if u.ratio(15, 16)? { u.int_in_range(1..=7)? } else { u.arbitrary()? };
    let hdr = Header {
        src_cid: pick(u, GUEST_CID)?,
        dst_cid: pick(u, HOST_CID)?,
        src_port: u.int_in_range(1024..=1027)?,
        dst_port: pick(u, u64::from(OPEN_PORT))? as u32,
        len: if op == Op::Rw as u16 { u.int_in_range(0..=256)? } else { pick(u, 0)? as u32 },
        type_: pick(u, u64::from(TYPE_STREAM))? as u16,
        op,
        flags: u.int_in_range(0..=3)?,
        buf_alloc: pick(u, 64 * 1024)? as u32,
        fwd_cnt: u.arbitrary()?,
    };
    Ok(Piece { bytes: hdr.to_bytes().to_vec(), writable: false })
}

fn rx_piece(u: &mut Unstructured, index: usize) -> Result<Piece> {
    let len = if index == 0 && u.ratio(7, 8)? { HEADER_SIZE } else { u.int_in_range(0..=4096)? };
    Ok(Piece { bytes: vec![0; len], writable: true })
}

pub fn run_one(data: &[u8]) -> String {
    HOST.with(|host| {
        let mut host = host.borrow_mut();
        let host = host.get_or_insert_with(Host::new);
        let mut seen = Vec::new();
        // Unstructured's errors only mean the input ran out.
        let _ = drive(&mut Unstructured::new(data), host, &mut seen);
        host.muxer.reset();
        drop(host.accept());
        seen.sort_unstable();
        seen.dedup();
        seen.join(" ")
    })
}

fn drive(u: &mut Unstructured, host: &mut Host, seen: &mut Vec<String>) -> Result<()> {
    let mem = guest::ram();
    let mut bufs = Buffers::default();
    let Some(mut tx) = guest::queue(u, &mem, GuestAddress(0), &mut bufs, tx_piece)? else {
        seen.push("tx refused".into());
        return Ok(());
    };
    let Some(mut rx) = guest::queue(u, &mem, GuestAddress(RING_SPAN), &mut bufs, rx_piece)? else {
        seen.push("rx refused".into());
        return Ok(());
    };
    let mut peers = Vec::new();
    for _ in 0..u.int_in_range(1..=8)? {
        match u.int_in_range(0..=3)? {
            0 => {
                if process_tx_queue(&mem, &mut tx, GUEST_CID, &mut host.muxer) {
                    seen.push("tx".into());
                }
            }
            1 => {
                host.poll();
                if process_rx_queue(&mem, &mut rx, &mut host.muxer) {
                    seen.push(format!("rx {}", rx_ops(&mem)));
                }
            }
            2 => {
                peers.extend(host.accept());
                let len = u.int_in_range(0..=512)?;
                let bytes = u.bytes(len.min(u.len()))?;
                for p in &mut peers {
                    let _ = p.set_nonblocking(true);
                    let _ = p.write(bytes);
                }
                if !peers.is_empty() {
                    seen.push("host data".into());
                }
            }
            _ => {
                peers.extend(host.accept());
                peers.clear();
                host.poll();
            }
        }
    }
    Ok(())
}

/// The operations of the packets the device put into the first rx buffers.
fn rx_ops(mem: &GuestMemoryMmap) -> String {
    let mut ops: Vec<u16> = (0..4)
        .filter_map(|i| {
            // The rx ring's descriptor i, its buffer's header: op at byte 30.
            let desc = RING_SPAN + 16 * i;
            let addr: u64 = mem.read_obj(GuestAddress(desc)).ok()?;
            mem.read_obj::<u16>(GuestAddress(addr.checked_add(30)?)).ok()
        })
        .collect();
    ops.sort_unstable();
    ops.dedup();
    format!("{ops:?}")
}

pub fn seeds() -> Vec<Vec<u8>> {
    super::random_seeds()
}
