//! MAC'd frames of an established peer link (wire format in the
//! [module docs](super)), over any async byte stream.
//!
//! A failed send or receive, or one cancelled in the middle of a frame,
//! leaves the stream in an unknown place within a frame, so the link
//! refuses further use ([`Error::Broken`]) rather than send or accept
//! garbage. A receive cancelled while waiting for the next frame to start
//! (a timeout on an idle link) loses nothing.

use std::mem;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Error;

/// Longest message header (its postcard encoding): 64 KiB. Messages are
/// small; bulk data goes in the data part.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Longest data part of a frame: 64 MiB. Senders of more split it.
pub const MAX_DATA_LEN: usize = 64 * 1024 * 1024;
/// Bytes of a frame's MAC.
pub const MAC_LEN: usize = 32;
/// `header_len: u32 | data_len: u32`.
const PREFIX_LEN: usize = 8;

/// Why a received frame is refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("its header length {0} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLarge(u32),
    #[error("its data length {0} exceeds the limit of {MAX_DATA_LEN} bytes")]
    DataTooLarge(u32),
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    #[error("its MAC does not match: the frame was altered, reordered or replayed")]
    BadMac,
    #[error("its message does not decode: {0}")]
    Decode(postcard::Error),
}

/// Data is hashed and written in pieces of this size, so that each piece
/// is still in cache when the kernel copies it (and the peer can start
/// reading before the whole frame is hashed). Not smaller than the link's
/// write buffer, so that the pieces bypass it.
pub(super) const DATA_PIECE: usize = 256 * 1024;

/// A hasher for the MAC of frame `seq`, fed up to the start of the data.
fn mac_hasher(key: &[u8; 32], seq: u64, prefix: &[u8; PREFIX_LEN], header: &[u8]) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&seq.to_le_bytes());
    hasher.update(prefix);
    hasher.update(header);
    hasher
}

/// The sending half of a link.
pub(super) struct FrameWriter<W> {
    io: W,
    key: [u8; 32],
    seq: u64,
    /// Reused for each message's encoding.
    header: Vec<u8>,
    peer: Arc<str>,
    broken: bool,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(super) fn new(io: W, key: [u8; 32], peer: Arc<str>) -> Self {
        FrameWriter { io, key, seq: 0, header: Vec::new(), peer, broken: false }
    }

    /// Sends one frame and flushes it.
    pub(super) async fn send<T: Serialize + ?Sized>(&mut self, msg: &T, data: &[u8]) -> Result<(), Error> {
        if self.broken {
            return Err(Error::Broken { peer: self.peer.to_string() });
        }
        let mut header = mem::take(&mut self.header);
        header.clear();
        let header = postcard::to_extend(msg, header)
            .map_err(|source| Error::Encode { peer: self.peer.to_string(), source })?;
        for (what, len, max) in
            [("message", header.len(), MAX_HEADER_LEN), ("data", data.len(), MAX_DATA_LEN)]
        {
            if len > max {
                return Err(Error::TooLarge { peer: self.peer.to_string(), what, len, max });
            }
        }
        let mut prefix = [0u8; PREFIX_LEN];
        // Both fit: checked against the limits above.
        prefix[..4].copy_from_slice(&(header.len() as u32).to_le_bytes());
        prefix[4..].copy_from_slice(&(data.len() as u32).to_le_bytes());
        let mut mac = mac_hasher(&self.key, self.seq, &prefix, &header);

        self.broken = true;
        let written = async {
            self.io.write_all(&prefix).await?;
            self.io.write_all(&header).await?;
            for piece in data.chunks(DATA_PIECE) {
                mac.update(piece);
                self.io.write_all(piece).await?;
            }
            self.io.write_all(mac.finalize().as_bytes()).await?;
            self.io.flush().await
        }
        .await;
        written.map_err(|source| Error::Io { peer: self.peer.to_string(), source })?;
        self.broken = false;
        self.seq += 1;
        self.header = header;
        Ok(())
    }

    /// Flushes and closes the sending direction: the peer's next receive
    /// sees a clean end of stream.
    pub(super) async fn shutdown(&mut self) -> Result<(), Error> {
        self.io.shutdown().await.map_err(|source| Error::Io { peer: self.peer.to_string(), source })
    }
}

/// The receiving half of a link.
pub(super) struct FrameReader<R> {
    io: R,
    key: [u8; 32],
    seq: u64,
    /// Reused for each message's encoding.
    header: Vec<u8>,
    peer: Arc<str>,
    broken: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(super) fn new(io: R, key: [u8; 32], peer: Arc<str>) -> Self {
        FrameReader { io, key, seq: 0, header: Vec::new(), peer, broken: false }
    }

    /// Receives one frame; `None` at a clean end of stream (between frames).
    /// Cancel safe until the first byte of a frame has arrived.
    pub(super) async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<(T, Vec<u8>)>, Error> {
        if self.broken {
            return Err(Error::Broken { peer: self.peer.to_string() });
        }
        let frame = self.read_frame().await;
        // Any error leaves the stream in an unknown place (or the peer
        // sending what we do not understand).
        self.broken = true;
        let data = match frame {
            Ok(Some(data)) => data,
            Ok(None) => {
                self.broken = false;
                return Ok(None);
            }
            Err(FrameFailure::Io(source)) => return Err(Error::Io { peer: self.peer.to_string(), source }),
            Err(FrameFailure::Frame(source)) => return Err(self.frame_error(source)),
        };
        let msg = postcard::from_bytes(&self.header).map_err(|e| self.frame_error(FrameError::Decode(e)))?;
        self.broken = false;
        Ok(Some((msg, data)))
    }

    fn frame_error(&self, source: FrameError) -> Error {
        Error::Frame { peer: self.peer.to_string(), source }
    }

    /// Reads and checks one frame into `self.header` and the returned data.
    /// Marks the reader broken once it has consumed a byte, in case it is
    /// cancelled.
    async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, FrameFailure> {
        let mut prefix = [0u8; PREFIX_LEN];
        // Dropped while waiting here, nothing is lost.
        let mut got = self.io.read(&mut prefix).await?;
        if got == 0 {
            return Ok(None);
        }
        self.broken = true;
        while got < PREFIX_LEN {
            match self.io.read(&mut prefix[got..]).await? {
                0 => return Err(FrameError::Truncated.into()),
                n => got += n,
            }
        }
        let [h0, h1, h2, h3, d0, d1, d2, d3] = prefix;
        let header_len = u32::from_le_bytes([h0, h1, h2, h3]);
        let data_len = u32::from_le_bytes([d0, d1, d2, d3]);
        // Checked before anything is allocated.
        if header_len as usize > MAX_HEADER_LEN {
            return Err(FrameError::HeaderTooLarge(header_len).into());
        }
        if data_len as usize > MAX_DATA_LEN {
            return Err(FrameError::DataTooLarge(data_len).into());
        }
        self.header.resize(header_len as usize, 0);
        self.io.read_exact(&mut self.header).await.map_err(truncated)?;
        let mut expected = mac_hasher(&self.key, self.seq, &prefix, &self.header);
        // The data is read into spare capacity, never zeroed first, and
        // hashed as it arrives, while in cache.
        let data_len = data_len as usize;
        let mut data = Vec::with_capacity(data_len);
        while data.len() < data_len {
            let start = data.len();
            let piece = (data_len - start).min(DATA_PIECE) as u64;
            if (&mut self.io).take(piece).read_buf(&mut data).await? == 0 {
                return Err(FrameError::Truncated.into());
            }
            expected.update(&data[start..]);
        }
        let mut mac = [0u8; MAC_LEN];
        self.io.read_exact(&mut mac).await.map_err(truncated)?;
        // blake3::Hash's equality is constant-time.
        if expected.finalize() != blake3::Hash::from_bytes(mac) {
            return Err(FrameError::BadMac.into());
        }
        self.seq += 1;
        Ok(Some(data))
    }
}

/// A failed frame read, before the peer is named.
enum FrameFailure {
    Io(std::io::Error),
    Frame(FrameError),
}

impl From<std::io::Error> for FrameFailure {
    fn from(e: std::io::Error) -> Self {
        FrameFailure::Io(e)
    }
}

impl From<FrameError> for FrameFailure {
    fn from(e: FrameError) -> Self {
        FrameFailure::Frame(e)
    }
}

/// `read_exact`'s early end of stream is a truncated frame.
fn truncated(e: std::io::Error) -> FrameFailure {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated.into(),
        _ => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::super::test_util::Rng;
    use super::*;

    const KEY: [u8; 32] = [3; 32];

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Msg {
        n: u32,
        s: String,
    }

    fn msg(n: u32) -> Msg {
        Msg { n, s: format!("message {n}") }
    }

    /// The bytes of `frames` sent with `key`, and where each frame ends.
    async fn encode(key: [u8; 32], frames: &[(Msg, Vec<u8>)]) -> (Vec<u8>, Vec<usize>) {
        let mut writer = FrameWriter::new(Vec::new(), key, "test".into());
        let mut ends = Vec::new();
        for (m, data) in frames {
            writer.send(m, data).await.unwrap();
            ends.push(writer.io.len());
        }
        (writer.io, ends)
    }

    /// Receives until the end of `bytes` or the first error.
    async fn decode(key: [u8; 32], bytes: &[u8]) -> (Vec<(Msg, Vec<u8>)>, Result<(), Error>) {
        let mut reader = FrameReader::new(bytes, key, "test".into());
        let mut frames = Vec::new();
        loop {
            match reader.recv::<Msg>().await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return (frames, Ok(())),
                Err(e) => return (frames, Err(e)),
            }
        }
    }

    fn sample() -> Vec<(Msg, Vec<u8>)> {
        vec![(msg(1), Vec::new()), (msg(2), (0..100).collect()), (msg(3), vec![0xee; 5000])]
    }

    fn assert_frame_error(result: Result<(), Error>, expected: fn(&FrameError) -> bool) {
        match result {
            Err(Error::Frame { source, .. }) if expected(&source) => (),
            other => panic!("unexpected result {other:?}"),
        }
    }

    #[tokio::test]
    async fn round_trip() {
        let (bytes, _) = encode(KEY, &sample()).await;
        let (frames, end) = decode(KEY, &bytes).await;
        end.unwrap();
        assert_eq!(frames, sample());
    }

    #[tokio::test]
    async fn altered_byte_is_rejected() {
        let (bytes, ends) = encode(KEY, &sample()).await;
        let prefix_end = ends[0] + PREFIX_LEN;
        for pos in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[pos] ^= 0x10;
            let (frames, end) = decode(KEY, &altered).await;
            assert!(end.is_err(), "byte {pos} altered");
            assert!(frames.len() < 3);
            // Altered header, data or MAC bytes fail the MAC check.
            if (prefix_end..ends[1]).contains(&pos) {
                assert_eq!(frames.len(), 1);
                assert_frame_error(end, |e| matches!(e, FrameError::BadMac));
            }
        }
    }

    #[tokio::test]
    async fn replayed_reordered_and_foreign_frames_are_rejected() {
        let (bytes, ends) = encode(KEY, &sample()).await;
        // The first frame twice.
        let replayed = [&bytes[..ends[0]], &bytes[..ends[0]]].concat();
        let (frames, end) = decode(KEY, &replayed).await;
        assert_eq!(frames.len(), 1);
        assert_frame_error(end, |e| matches!(e, FrameError::BadMac));
        // The second frame first.
        let reordered = [&bytes[ends[0]..ends[1]], &bytes[..ends[0]]].concat();
        let (frames, end) = decode(KEY, &reordered).await;
        assert!(frames.is_empty());
        assert_frame_error(end, |e| matches!(e, FrameError::BadMac));
        // A frame of another connection (another direction key).
        let (frames, end) = decode([4; 32], &bytes).await;
        assert!(frames.is_empty());
        assert_frame_error(end, |e| matches!(e, FrameError::BadMac));
    }

    #[tokio::test]
    async fn truncation_is_an_error_except_between_frames() {
        let (bytes, ends) = encode(KEY, &sample()).await;
        for cut in 0..bytes.len() {
            let (frames, end) = decode(KEY, &bytes[..cut]).await;
            let complete = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(frames.len(), complete, "cut at {cut}");
            if cut == 0 || ends.contains(&cut) {
                end.unwrap();
            } else {
                assert_frame_error(end, |e| matches!(e, FrameError::Truncated));
            }
        }
    }

    #[tokio::test]
    async fn oversize_lengths_are_rejected_before_reading_on() {
        // Only the prefix is there: the limits are checked before the
        // reader allocates or waits for the rest.
        let prefix = |h: u32, d: u32| [h.to_le_bytes(), d.to_le_bytes()].concat();
        let (_, end) = decode(KEY, &prefix(MAX_HEADER_LEN as u32 + 1, 0)).await;
        assert_frame_error(end, |e| matches!(e, FrameError::HeaderTooLarge(_)));
        let (_, end) = decode(KEY, &prefix(0, MAX_DATA_LEN as u32 + 1)).await;
        assert_frame_error(end, |e| matches!(e, FrameError::DataTooLarge(_)));
        let (_, end) = decode(KEY, &prefix(u32::MAX, u32::MAX)).await;
        let err = end.unwrap_err().to_string();
        assert_eq!(
            err,
            "bad frame from peer test: its header length 4294967295 exceeds the limit of 65536 bytes"
        );
    }

    #[tokio::test]
    async fn oversize_sends_are_refused() {
        let mut writer = FrameWriter::new(Vec::new(), KEY, "test".into());
        let big = vec![0u8; MAX_HEADER_LEN];
        let err = writer.send(&big, &[]).await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { what: "message", .. }), "{err}");
        let err = writer.send(&(), &vec![0u8; MAX_DATA_LEN + 1]).await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { what: "data", .. }), "{err}");
        // Nothing was written, and the writer still works.
        assert!(writer.io.is_empty());
        writer.send(&msg(1), &[]).await.unwrap();
        let (frames, end) = decode(KEY, &writer.io).await;
        end.unwrap();
        assert_eq!(frames, vec![(msg(1), Vec::new())]);
    }

    #[tokio::test]
    async fn reader_refuses_use_after_an_error() {
        let (mut bytes, ends) = encode(KEY, &sample()).await;
        bytes[ends[0] - 1] ^= 1;
        let mut reader = FrameReader::new(&bytes[..], KEY, "test".into());
        assert!(matches!(reader.recv::<Msg>().await, Err(Error::Frame { .. })));
        assert!(matches!(reader.recv::<Msg>().await, Err(Error::Broken { .. })));
    }

    #[tokio::test]
    async fn receive_cancelled_while_idle_loses_nothing() {
        let (bytes, ends) = encode(KEY, &sample()).await;
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let mut reader = FrameReader::new(&mut ours, KEY, "test".into());
        let idle = tokio::time::timeout(std::time::Duration::from_millis(10), reader.recv::<Msg>()).await;
        assert!(idle.is_err());
        theirs.write_all(&bytes[..ends[0]]).await.unwrap();
        assert_eq!(reader.recv::<Msg>().await.unwrap(), Some(sample().swap_remove(0)));
        // Cancelled in the middle of a frame, the reader is unusable.
        theirs.write_all(&bytes[ends[0]..ends[0] + 3]).await.unwrap();
        let partial = tokio::time::timeout(std::time::Duration::from_millis(10), reader.recv::<Msg>()).await;
        assert!(partial.is_err());
        theirs.write_all(&bytes[ends[0] + 3..]).await.unwrap();
        assert!(matches!(reader.recv::<Msg>().await, Err(Error::Broken { .. })));
    }

    #[tokio::test]
    async fn undecodable_message_is_an_error() {
        // A valid frame whose message is not a `Msg`.
        let mut writer = FrameWriter::new(Vec::new(), KEY, "test".into());
        writer.send(&7u8, &[1, 2, 3]).await.unwrap();
        let mut reader = FrameReader::new(&writer.io[..], KEY, "test".into());
        let err = reader.recv::<Msg>().await.unwrap_err();
        assert!(matches!(err, Error::Frame { source: FrameError::Decode(_), .. }), "{err}");
    }

    #[tokio::test]
    async fn garbage_never_panics() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let (valid, _) = encode(KEY, &sample()).await;
        for i in 0..5000 {
            let input = match i % 3 {
                // Pure noise.
                0 => rng.noise(300),
                // Plausible lengths, random contents.
                1 => {
                    let (h, d) = (rng.below(40) as u32, rng.below(200) as u32);
                    let body = rng.noise(300);
                    [&h.to_le_bytes()[..], &d.to_le_bytes(), &body].concat()
                }
                // A valid stream with a few random bytes changed.
                _ => {
                    let mut bytes = valid.clone();
                    for _ in 0..1 + rng.below(3) {
                        let pos = rng.below(bytes.len());
                        bytes[pos] ^= 1 + rng.below(255) as u8;
                    }
                    bytes
                }
            };
            let (frames, end) = decode(KEY, &input).await;
            if input.is_empty() {
                end.unwrap();
            } else {
                assert!(end.is_err(), "input {i} accepted");
                assert!(frames.len() < 3);
            }
        }
    }
}
