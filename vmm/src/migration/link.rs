//! Blocking use of a peer link: the migration code drives the guest agent
//! with blocking calls on its own threads, and reaches the link's tokio
//! tasks through the node's runtime handle.

use std::time::Duration;

use tokio::runtime::Handle;

use super::protocol::PeerMsg;
use super::Error;
use crate::peer::{ClusterKey, FrameData, PeerLink, PeerReader, PeerWriter};

/// How long connecting and the handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SyncReader {
    rt: Handle,
    inner: PeerReader,
}

pub struct SyncWriter {
    rt: Handle,
    inner: PeerWriter,
    /// A corrupted frame was (or is about to be) sent: the peer drops the link.
    corrupted: bool,
}

/// Connects to the peer at `addr` and authenticates; returns the peer's
/// node name and the two halves.
pub fn connect(
    rt: &Handle,
    addr: &str,
    key: &ClusterKey,
    me: &str,
) -> Result<(String, SyncReader, SyncWriter), Error> {
    let link = rt.block_on(PeerLink::connect(addr, key, me, CONNECT_TIMEOUT))?;
    Ok(split(rt, link))
}

/// The halves of an established link.
pub fn split(rt: &Handle, link: PeerLink) -> (String, SyncReader, SyncWriter) {
    let peer = link.peer_name().to_owned();
    let (r, w) = link.into_split();
    (peer, SyncReader { rt: rt.clone(), inner: r }, SyncWriter { rt: rt.clone(), inner: w, corrupted: false })
}

impl SyncReader {
    /// The next message and its data; `None` when the peer closed the link.
    /// Waits at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<(PeerMsg, Vec<u8>)>, Error> {
        let inner = &mut self.inner;
        match self.rt.block_on(async { tokio::time::timeout(timeout, inner.recv::<PeerMsg>()).await }) {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::PeerTimeout(timeout)),
        }
    }

    /// The next message, which must exist.
    pub fn expect(&mut self, timeout: Duration) -> Result<(PeerMsg, Vec<u8>), Error> {
        self.recv(timeout)?.ok_or(Error::PeerClosed)
    }
}

impl SyncWriter {
    pub fn send(&mut self, msg: &PeerMsg) -> Result<(), Error> {
        Ok(self.rt.block_on(self.inner.send(msg))?)
    }

    /// Sends `msg` with `data` (guest pages read straight out of guest RAM,
    /// or bytes).
    pub fn send_data<D: FrameData + ?Sized>(&mut self, msg: &PeerMsg, data: &D) -> Result<(), Error> {
        Ok(self.rt.block_on(self.inner.send_with_data(msg, data))?)
    }

    /// Fault injection: the next message goes out corrupted, and the peer
    /// will drop the link when it reads it.
    pub fn corrupt_next(&mut self) {
        self.corrupted = true;
        self.inner.corrupt_next_frame();
    }

    /// Whether [`SyncWriter::corrupt_next`] poisoned this link.
    pub fn corrupted(&self) -> bool {
        self.corrupted
    }
}
