//! Sealed frames of an established peer link (wire format in the
//! [module docs](super)), over any async byte stream.
//!
//! Frames are AES-256-GCM encrypted and authenticated ([`Sealer`]) in
//! records: the header, then the data in [`DATA_PIECE`] pieces, each with
//! its own tag. The writer copies each piece from its [`FrameData`] into
//! its buffer, seals it there and writes it while it is still in cache; the
//! reader opens each piece where it landed in the frame's data buffer, as
//! it arrives.
//!
//! A failed send or receive, or one cancelled in the middle of a frame,
//! leaves the stream in an unknown place within a frame, so the link
//! refuses further use ([`Error::Broken`]) rather than send or accept
//! garbage. A receive cancelled while waiting for the next frame to start
//! (a timeout on an idle link) loses nothing.

use std::mem;
use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Error;

/// Longest message header (its postcard encoding): 64 KiB. Messages are
/// small; bulk data goes in the data part.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Longest data part of a frame: 64 MiB. Senders of more split it.
pub const MAX_DATA_LEN: usize = 64 * 1024 * 1024;
/// Bytes of a record's authentication tag.
pub const TAG_LEN: usize = 16;
/// The data of a frame is sealed in records of this size (the last one may
/// be shorter). Part of the wire format. Small enough that a piece stays in
/// cache while it is copied, sealed and handed to the kernel; not smaller
/// than the link's write buffer, so that pieces bypass it; whole pages.
pub const DATA_PIECE: usize = 256 * 1024;
/// `header_len: u32 | data_len: u32`.
pub(crate) const PREFIX_LEN: usize = 8;

/// Why a received frame is refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("its header length {0} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLarge(u32),
    #[error("its data length {0} exceeds the limit of {MAX_DATA_LEN} bytes")]
    DataTooLarge(u32),
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    #[error("its authentication tag does not match: the frame was altered, reordered or replayed")]
    BadMac,
    #[error("its message does not decode: {0}")]
    Decode(postcard::Error),
}

/// Why the data of a frame to send could not be read (e.g. a guest frame
/// that is not RAM).
pub type DataError = Box<dyn std::error::Error + Send + Sync>;

/// The data part of a frame to send. It is copied piece by piece into the
/// writer's buffer (where it is encrypted), so it need not be in one place:
/// guest pages go straight from guest RAM to the link.
#[allow(clippy::len_without_is_empty, reason = "the link only asks how long the data is")]
pub trait FrameData {
    /// Bytes of data.
    fn len(&self) -> usize;

    /// Copies bytes `offset..offset + out.len()` into `out`; `offset` is a
    /// multiple of [`DATA_PIECE`].
    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), DataError>;
}

impl FrameData for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), DataError> {
        out.copy_from_slice(&self[offset..offset + out.len()]);
        Ok(())
    }
}

/// AES-256-GCM with the key of one direction of a link. The nonce of
/// record `index` of frame `seq` is `seq: u64 | index: u32`: unique, since
/// the key belongs to one direction of one connection, `seq` counts its
/// frames and `index` the records of a frame.
struct Sealer(LessSafeKey);

impl Sealer {
    fn new(key: &[u8; 32]) -> Self {
        // Any 32 bytes are an AES-256 key.
        Sealer(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("an AES-256 key is 32 bytes")))
    }

    fn nonce(seq: u64, index: u32) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&seq.to_le_bytes());
        nonce[8..].copy_from_slice(&index.to_le_bytes());
        Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts `in_out` in place; returns its tag.
    fn seal(&self, seq: u64, index: u32, aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(Self::nonce(seq, index), Aad::from(aad), in_out)
            // AES-GCM refuses only records of more than 64 GiB.
            .expect("a record within AES-GCM's limits");
        let mut bytes = [0u8; TAG_LEN];
        bytes.copy_from_slice(tag.as_ref());
        bytes
    }

    /// Checks `tag` and decrypts `in_out` in place.
    fn open(&self, seq: u64, index: u32, aad: &[u8], tag: [u8; TAG_LEN], in_out: &mut [u8]) -> Result<(), FrameError> {
        self.0
            .open_in_place_separate_tag(Self::nonce(seq, index), Aad::from(aad), &tag, in_out)
            .map(|_| ())
            .map_err(|_| FrameError::BadMac)
    }
}

/// The sending half of a link.
pub(crate) struct FrameWriter<W> {
    io: W,
    sealer: Sealer,
    seq: u64,
    /// Reused for each message's encoding.
    header: Vec<u8>,
    /// Reused for each data piece and its tag.
    piece: Vec<u8>,
    peer: Arc<str>,
    broken: bool,
    /// Fault injection: flip a bit of the next frame after sealing it.
    corrupt_next: bool,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(crate) fn new(io: W, key: [u8; 32], peer: Arc<str>) -> Self {
        let sealer = Sealer::new(&key);
        let (header, piece) = (Vec::new(), Vec::new());
        FrameWriter { io, sealer, seq: 0, header, piece, peer, broken: false, corrupt_next: false }
    }

    /// Fault injection (the migration soak and failure-safety tests): the
    /// next frame goes out with one bit of its sealed message flipped, so
    /// that the peer's authentication rejects it.
    pub(super) fn corrupt_next(&mut self) {
        self.corrupt_next = true;
    }

    /// Sends one frame and flushes it.
    pub(crate) async fn send<T, D>(&mut self, msg: &T, data: &D) -> Result<(), Error>
    where
        T: Serialize + ?Sized,
        D: FrameData + ?Sized,
    {
        if self.broken {
            return Err(Error::Broken { peer: self.peer.to_string() });
        }
        let mut header = mem::take(&mut self.header);
        header.clear();
        let mut header = postcard::to_extend(msg, header)
            .map_err(|source| Error::Encode { peer: self.peer.to_string(), source })?;
        let data_len = data.len();
        for (what, len, max) in [("message", header.len(), MAX_HEADER_LEN), ("data", data_len, MAX_DATA_LEN)] {
            if len > max {
                return Err(Error::TooLarge { peer: self.peer.to_string(), what, len, max });
            }
        }
        let mut prefix = [0u8; PREFIX_LEN];
        // Both fit: checked against the limits above.
        prefix[..4].copy_from_slice(&(header.len() as u32).to_le_bytes());
        prefix[4..].copy_from_slice(&(data_len as u32).to_le_bytes());
        let header_tag = self.sealer.seal(self.seq, 0, &prefix, &mut header);
        if mem::take(&mut self.corrupt_next) {
            // A message encodes to one byte at least.
            header[0] ^= 1;
        }

        self.broken = true;
        let mut piece = mem::take(&mut self.piece);
        let piece_len = DATA_PIECE.min(data_len) + TAG_LEN;
        if piece.len() < piece_len {
            piece.resize(piece_len, 0);
        }
        let peer = &self.peer;
        let io_error = |source| Error::Io { peer: peer.to_string(), source };
        self.io.write_all(&prefix).await.map_err(io_error)?;
        self.io.write_all(&header).await.map_err(io_error)?;
        self.io.write_all(&header_tag).await.map_err(io_error)?;
        for (index, offset) in (1..).zip((0..data_len).step_by(DATA_PIECE)) {
            let len = DATA_PIECE.min(data_len - offset);
            let (plain, tag) = piece[..len + TAG_LEN].split_at_mut(len);
            data.read_at(offset, plain).map_err(|source| Error::Data { peer: peer.to_string(), source })?;
            tag.copy_from_slice(&self.sealer.seal(self.seq, index, &[], plain));
            // The piece and its tag in one write.
            self.io.write_all(&piece[..len + TAG_LEN]).await.map_err(io_error)?;
        }
        self.io.flush().await.map_err(io_error)?;
        self.broken = false;
        self.seq += 1;
        self.header = header;
        self.piece = piece;
        Ok(())
    }

    /// Flushes and closes the sending direction: the peer's next receive
    /// sees a clean end of stream.
    pub(super) async fn shutdown(&mut self) -> Result<(), Error> {
        self.io.shutdown().await.map_err(|source| Error::Io { peer: self.peer.to_string(), source })
    }
}

/// The receiving half of a link.
pub(crate) struct FrameReader<R> {
    io: R,
    sealer: Sealer,
    seq: u64,
    /// Reused for each message's encoding.
    header: Vec<u8>,
    peer: Arc<str>,
    broken: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, key: [u8; 32], peer: Arc<str>) -> Self {
        FrameReader { io, sealer: Sealer::new(&key), seq: 0, header: Vec::new(), peer, broken: false }
    }

    /// Receives one frame; `None` at a clean end of stream (between frames).
    /// Cancel safe until the first byte of a frame has arrived.
    pub(crate) async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<(T, Vec<u8>)>, Error> {
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

    /// Reads and opens one frame into `self.header` and the returned data.
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
        let tag = self.read_tag().await?;
        // The prefix is the header's associated data: the lengths are
        // authentic before the data buffer is allocated.
        self.sealer.open(self.seq, 0, &prefix, tag, &mut self.header)?;
        // Each piece is read with its tag into spare capacity (never zeroed
        // first; the tag is then moved out, and the next piece overwrites
        // it) in reads large enough to bypass the read buffer, and opened
        // as it arrives, while in cache.
        let data_len = data_len as usize;
        let mut data = Vec::with_capacity(data_len + TAG_LEN);
        if data_len >= PREFAULT_LEN {
            prefault(&mut data);
        }
        for index in 1.. {
            let start = data.len();
            if start == data_len {
                break;
            }
            let end = data_len.min(start + DATA_PIECE);
            while data.len() < end + TAG_LEN {
                let missing = (end + TAG_LEN - data.len()) as u64;
                if (&mut self.io).take(missing).read_buf(&mut data).await? == 0 {
                    return Err(FrameError::Truncated.into());
                }
            }
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&data[end..]);
            data.truncate(end);
            self.sealer.open(self.seq, index, &[], tag, &mut data[start..])?;
        }
        self.seq += 1;
        Ok(Some(data))
    }

    async fn read_tag(&mut self) -> Result<[u8; TAG_LEN], FrameFailure> {
        let mut tag = [0u8; TAG_LEN];
        self.io.read_exact(&mut tag).await.map_err(truncated)?;
        Ok(tag)
    }
}

/// Data parts at least this long are faulted in before they are read.
const PREFAULT_LEN: usize = 1 << 20;
const PAGE: usize = 4096;

/// Faults the pages of `buffer`'s spare capacity in with one madvise(2),
/// rather than one page fault every 4 KiB as the kernel copies the data in
/// (a third less time on these VM hosts, where faults are dear), asking for
/// transparent huge pages first: the 2 MiB-aligned parts of the range (about
/// half of a 4 MiB frame; the allocator's mappings are only page-aligned)
/// then fault in 2 MiB at a time (a migration's data path ~10% faster per
/// GiB here). Best effort: a kernel before 5.14, or without THP, refuses,
/// and the pages fault as before.
fn prefault(buffer: &mut Vec<u8>) {
    let spare = buffer.spare_capacity_mut();
    let first = (PAGE - spare.as_ptr().addr() % PAGE) % PAGE;
    let len = spare.len().saturating_sub(first) / PAGE * PAGE;
    if len > 0 {
        let start = spare[first..].as_mut_ptr().cast();
        // SAFETY: the range lies inside the allocation of `buffer`, which is
        // ours; MADV_HUGEPAGE only changes how its pages are backed, and
        // MADV_POPULATE_WRITE only faults them in: no byte changes.
        unsafe {
            libc::madvise(start, len, libc::MADV_HUGEPAGE);
            libc::madvise(start, len, libc::MADV_POPULATE_WRITE);
        }
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
            writer.send(m, &data[..]).await.unwrap();
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
    async fn injected_corruption_hits_only_the_next_frame() {
        let mut writer = FrameWriter::new(Vec::new(), KEY, "test".into());
        writer.send(&msg(1), &[][..]).await.unwrap();
        writer.corrupt_next();
        writer.send(&msg(2), &[][..]).await.unwrap();
        assert!(!writer.corrupt_next);
        let (frames, end) = decode(KEY, &writer.io).await;
        assert_eq!(frames, vec![(msg(1), Vec::new())]);
        assert_frame_error(end, |e| matches!(e, FrameError::BadMac));
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
        let err = writer.send(&big, &[][..]).await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { what: "message", .. }), "{err}");
        let err = writer.send(&(), &vec![0u8; MAX_DATA_LEN + 1][..]).await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { what: "data", .. }), "{err}");
        // Nothing was written, and the writer still works.
        assert!(writer.io.is_empty());
        writer.send(&msg(1), &[][..]).await.unwrap();
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
        writer.send(&7u8, &[1, 2, 3][..]).await.unwrap();
        let mut reader = FrameReader::new(&writer.io[..], KEY, "test".into());
        let err = reader.recv::<Msg>().await.unwrap_err();
        assert!(matches!(err, Error::Frame { source: FrameError::Decode(_), .. }), "{err}");
    }

    /// `len` bytes computed piece by piece, never in one place.
    struct Computed(usize);

    impl Computed {
        fn byte(i: usize) -> u8 {
            (i * 7 + i / 4096) as u8
        }
    }

    impl FrameData for Computed {
        fn len(&self) -> usize {
            self.0
        }

        fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), DataError> {
            assert_eq!(offset % DATA_PIECE, 0);
            out.iter_mut().enumerate().for_each(|(i, b)| *b = Self::byte(offset + i));
            Ok(())
        }
    }

    /// Data that cannot be read.
    struct Unreadable;

    impl FrameData for Unreadable {
        fn len(&self) -> usize {
            DATA_PIECE + 1
        }

        fn read_at(&self, _: usize, _: &mut [u8]) -> Result<(), DataError> {
            Err("frame 0x42 is not guest RAM".into())
        }
    }

    /// One frame with 2.5 pieces of data, and where each record starts.
    async fn three_pieces() -> (Vec<u8>, [usize; 3]) {
        let mut writer = FrameWriter::new(Vec::new(), KEY, "test".into());
        writer.send(&msg(1), &Computed(DATA_PIECE * 5 / 2)).await.unwrap();
        let header_len = postcard::to_allocvec(&msg(1)).unwrap().len();
        let first = PREFIX_LEN + header_len + TAG_LEN;
        let record = DATA_PIECE + TAG_LEN;
        (writer.io, [first, first + record, first + 2 * record])
    }

    #[tokio::test]
    async fn data_in_pieces_round_trip() {
        let (bytes, pieces) = three_pieces().await;
        assert_eq!(bytes.len(), pieces[2] + DATA_PIECE / 2 + TAG_LEN);
        let (frames, end) = decode(KEY, &bytes).await;
        end.unwrap();
        let (m, data) = &frames[0];
        assert_eq!(*m, msg(1));
        assert_eq!(data.len(), DATA_PIECE * 5 / 2);
        assert!(data.iter().enumerate().all(|(i, &b)| b == Computed::byte(i)));
    }

    #[tokio::test]
    async fn pieces_cannot_be_swapped_or_dropped() {
        let (bytes, [p0, p1, p2]) = three_pieces().await;
        let swapped = [&bytes[..p0], &bytes[p1..p2], &bytes[p0..p1], &bytes[p2..]].concat();
        let (frames, end) = decode(KEY, &swapped).await;
        assert!(frames.is_empty());
        assert_frame_error(end, |e| matches!(e, FrameError::BadMac));
        // The middle piece dropped: the last one comes too early and short.
        let dropped = [&bytes[..p1], &bytes[p2..]].concat();
        let (frames, end) = decode(KEY, &dropped).await;
        assert!(frames.is_empty());
        assert_frame_error(end, |e| matches!(e, FrameError::Truncated));
        // A frame cut after a whole piece.
        let (frames, end) = decode(KEY, &bytes[..p1]).await;
        assert!(frames.is_empty());
        assert_frame_error(end, |e| matches!(e, FrameError::Truncated));
    }

    #[tokio::test]
    async fn message_and_data_are_encrypted() {
        let secret = b"a secret of sixteen".repeat(100);
        let mut writer = FrameWriter::new(Vec::new(), KEY, "test".into());
        writer.send(&Msg { n: 1, s: "the hidden header".into() }, &secret[..]).await.unwrap();
        let wire = &writer.io;
        assert_eq!(wire.len(), PREFIX_LEN + 1 + 18 + TAG_LEN + secret.len() + TAG_LEN);
        for plain in [&b"the hidden header"[..], &secret[..16]] {
            assert!(!wire.windows(plain.len()).any(|w| w == plain));
        }
    }

    #[tokio::test]
    async fn unreadable_data_is_an_error() {
        let mut writer = FrameWriter::new(Vec::new(), KEY, "test".into());
        let err = writer.send(&msg(1), &Unreadable).await.unwrap_err();
        assert_eq!(err.to_string(), "cannot read the data to send to peer test: frame 0x42 is not guest RAM");
        // Part of the frame is out: the writer refuses further use.
        let err = writer.send(&msg(2), &[][..]).await.unwrap_err();
        assert!(matches!(err, Error::Broken { .. }), "{err}");
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
