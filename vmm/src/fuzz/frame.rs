//! The sealed frames of a peer link as an attacker on the network sees
//! them: frames sealed by an honest sender with a real direction key (from
//! a real handshake transcript), then tampered with on the wire (bits
//! flipped after sealing, the stream cut, length fields rewritten, frames
//! replayed, reordered or dropped, frames of another connection, another
//! cluster or the other direction of this link spliced in, bytes
//! inserted), read by the receiver's `FrameReader`.
//!
//! Every frame the reader accepts must be the one the sender sealed at that
//! place of the stream (otherwise it accepted a forged frame: a crash);
//! the untouched stream must be accepted whole; anything else must end in
//! an error, after which the reader refuses further use; and the reader
//! must not allocate for lengths that no sealed frame has.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use arbitrary::{Result, Unstructured};
use tokio::io::AsyncWrite;

use super::alloc;
use crate::peer::auth::{Hello, Role, Transcript};
use crate::peer::frame::{FrameReader, FrameWriter, PREFIX_LEN, TAG_LEN};
use crate::peer::{ClusterKey, Error, FrameError, DATA_PIECE, MAX_DATA_LEN, MAX_HEADER_LEN};

/// Most frames a case seals.
const MAX_FRAMES: usize = 6;
/// Most alterations of a case.
const MAX_EDITS: usize = 6;
/// Longest message a case seals (messages are small; the data is bulk).
const MAX_MSG: usize = 64;

/// The key the honest sender seals with, and keys of frames that must not
/// pass for its frames.
struct Keys {
    /// Connector to acceptor: what the reader (the acceptor) opens.
    real: [u8; 32],
    /// Acceptor to connector: the reader's own frames, reflected back.
    reverse: [u8; 32],
    /// The same direction of another connection of the same cluster.
    other_connection: [u8; 32],
    /// The same direction of a connection of another cluster.
    other_cluster: [u8; 32],
}

/// The connector's direction keys of a handshake between two nodes whose
/// hellos carry nonces `nonce` and `nonce + 1`, checked against the
/// acceptor's.
fn session(cluster: &ClusterKey, nonce: u8) -> ([u8; 32], [u8; 32]) {
    let hello = |node, nonce| postcard::to_allocvec(&Hello::new(node, [nonce; 32])).expect("encoding a hello");
    let (connector, acceptor) = (hello("n1", nonce), hello("n2", nonce + 1));
    let ours = Transcript::new(Role::Connector, &connector, &acceptor);
    let theirs = Transcript::new(Role::Acceptor, &acceptor, &connector);
    let keys = ours.verify(cluster, &theirs.our_proof(cluster)).expect("both ends hold the cluster key");
    let their_keys = theirs.verify(cluster, &ours.our_proof(cluster)).expect("both ends hold the cluster key");
    assert!(keys.send == their_keys.recv && keys.recv == their_keys.send, "direction keys of the two ends differ");
    (keys.send, keys.recv)
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let cluster = ClusterKey::from_bytes([7; 32]);
        let (real, reverse) = session(&cluster, 1);
        let (other_connection, _) = session(&cluster, 3);
        let (other_cluster, _) = session(&ClusterKey::from_bytes([8; 32]), 1);
        Keys { real, reverse, other_connection, other_cluster }
    })
}

/// One frame the honest sender seals.
#[derive(Clone)]
struct Plain {
    msg: Vec<u8>,
    data_len: usize,
    /// Sent as a message the receiver cannot decode (a `u32::MAX` where it
    /// expects a byte string's length).
    undecodable: bool,
}

impl Plain {
    /// The data of frame `index`: a pattern, cheap to make and check.
    fn data(&self, index: usize) -> Vec<u8> {
        (0..self.data_len).map(|i| (i * 7 + i / 4096 + index * 31) as u8).collect()
    }
}

/// Who sealed a foreign frame.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    Reverse,
    OtherConnection,
    OtherCluster,
}

/// A rewritten length field.
#[derive(Clone, Copy)]
enum Length {
    Exact(u32),
    /// The sealed value plus this.
    Near(i32),
}

/// An alteration of the stream: first of its frames, then of its bytes.
enum Edit {
    Replay { frame: usize, at: usize },
    Swap(usize, usize),
    Drop(usize),
    /// Frame `frame` sealed by `source` (with the content changed, so that
    /// its acceptance would show) in place of the wire's frame `at`.
    Foreign { source: Source, frame: usize, at: usize },
    FlipBit { pos: usize, bit: u8 },
    Cut(usize),
    /// A length field (`data` or header) of the `at`th frame on the wire rewritten.
    SetLength { at: usize, data: bool, value: Length },
    Insert { pos: usize, bytes: Vec<u8> },
}

fn plain(u: &mut Unstructured) -> Result<Plain> {
    let msg_len = u.int_in_range(0..=MAX_MSG)?;
    let msg = u.bytes(msg_len)?.to_vec();
    let data_len = match u.int_in_range(0..=9u8)? {
        0..=2 => 0,
        3..=5 => usize::from(u.arbitrary::<u8>()?),
        6 | 7 => usize::from(u.arbitrary::<u16>()?),
        // Across record boundaries.
        _ => (DATA_PIECE * u.int_in_range(1..=2usize)?).saturating_add_signed(u.int_in_range(-2..=2isize)?),
    };
    Ok(Plain { msg, data_len, undecodable: u.ratio(1, 12)? })
}

fn edit(u: &mut Unstructured, frames: usize) -> Result<Edit> {
    let frame = |u: &mut Unstructured| u.int_in_range(0..=frames - 1);
    Ok(match u.int_in_range(0..=7u8)? {
        0 => Edit::Replay { frame: frame(u)?, at: u.int_in_range(0..=frames)? },
        1 => Edit::Swap(frame(u)?, frame(u)?),
        2 => Edit::Drop(frame(u)?),
        3 => {
            let source = *u.choose(&[Source::Reverse, Source::OtherConnection, Source::OtherCluster])?;
            Edit::Foreign { source, frame: frame(u)?, at: frame(u)? }
        }
        4 => Edit::FlipBit { pos: u.arbitrary()?, bit: u.int_in_range(0..=7)? },
        5 => Edit::Cut(u.arbitrary()?),
        6 => {
            let (header, data) = (MAX_HEADER_LEN as u32, MAX_DATA_LEN as u32);
            let value = match u.int_in_range(0..=2u8)? {
                0 => Length::Exact(*u.choose(&[0, 1, header, header + 1, data, data + 1, u32::MAX])?),
                1 => Length::Near(u.int_in_range(-3..=3)?),
                _ => Length::Exact(u.arbitrary()?),
            };
            Edit::SetLength { at: frame(u)?, data: u.arbitrary()?, value }
        }
        _ => {
            let len = u.int_in_range(1..=32usize)?;
            Edit::Insert { pos: u.arbitrary()?, bytes: u.bytes(len)?.to_vec() }
        }
    })
}

/// A sink for a writer that can be read while the writer holds it.
#[derive(Clone, Default)]
struct Wire(Rc<RefCell<Vec<u8>>>);

impl AsyncWrite for Wire {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.0.borrow_mut().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs a future on in-memory streams, which never wait.
fn run<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("a frame reader or writer waited on an in-memory stream"),
    }
}

/// `frames` sealed with `key` in order (frame `i` with sequence number
/// `i`), each frame's bytes apart. `altered` changes every message, so
/// that a frame from this stream accepted in place of the real one shows.
fn seal(key: [u8; 32], frames: &[Plain], altered: bool) -> Vec<Vec<u8>> {
    let wire = Wire::default();
    let mut writer = FrameWriter::new(wire.clone(), key, "fuzz".into());
    let mut sealed = Vec::with_capacity(frames.len());
    for (index, frame) in frames.iter().enumerate() {
        let data = frame.data(index);
        let sent = if frame.undecodable {
            run(writer.send(&u32::MAX, &data[..]))
        } else if altered {
            run(writer.send(&[&frame.msg[..], b"!"].concat(), &data[..]))
        } else {
            run(writer.send(&frame.msg, &data[..]))
        };
        sent.expect("sealing a frame within the limits");
        sealed.push(wire.0.take());
    }
    sealed
}

pub fn run_one(data: &[u8]) -> String {
    let mut u = Unstructured::new(data);
    let Ok(count) = u.int_in_range(1..=MAX_FRAMES) else { return "empty".into() };
    // Unstructured's errors only mean the input ran out: take what was read.
    let frames: Vec<Plain> = (0..count).map_while(|_| plain(&mut u).ok()).collect();
    if frames.is_empty() {
        return "empty".into();
    }
    let edits: Vec<Edit> = (0..MAX_EDITS).map_while(|_| edit(&mut u, frames.len()).ok()).collect();
    let keys = keys();
    let real = seal(keys.real, &frames, false);
    let mut foreign: Vec<(Source, Vec<Vec<u8>>)> = Vec::new();

    // Frame edits on the wire's frames, then byte edits on the stream.
    let mut wire: Vec<Vec<u8>> = real.clone();
    let mut stream: Option<Vec<u8>> = None;
    for e in &edits {
        if let (Some(_), Edit::Replay { .. } | Edit::Swap(..) | Edit::Drop(_) | Edit::Foreign { .. }) = (&stream, e) {
            continue;
        }
        let n = wire.len();
        match *e {
            Edit::Replay { frame, at } if frame < real.len() => wire.insert(at.min(n), real[frame].clone()),
            Edit::Swap(a, b) if a < n && b < n => wire.swap(a, b),
            Edit::Drop(at) if at < n => drop(wire.remove(at)),
            Edit::Foreign { source, frame, at } if at < n => {
                let key = match source {
                    Source::Reverse => keys.reverse,
                    Source::OtherConnection => keys.other_connection,
                    Source::OtherCluster => keys.other_cluster,
                };
                if !foreign.iter().any(|(s, _)| *s == source) {
                    foreign.push((source, seal(key, &frames, true)));
                }
                let sealed = &foreign.iter().find(|(s, _)| *s == source).expect("sealed above").1;
                wire[at] = sealed[frame].clone();
            }
            Edit::SetLength { at, data, value } if at < n && wire[at].len() >= PREFIX_LEN => {
                let field = if data { 4..8 } else { 0..4 };
                let old = u32::from_le_bytes(wire[at][field.clone()].try_into().expect("4 bytes"));
                let value = match value {
                    Length::Exact(value) => value,
                    Length::Near(delta) => old.wrapping_add_signed(delta),
                };
                wire[at][field].copy_from_slice(&value.to_le_bytes());
            }
            Edit::FlipBit { .. } | Edit::Cut(_) | Edit::Insert { .. } => {
                let bytes = stream.get_or_insert_with(|| wire.concat());
                let len = bytes.len();
                match e {
                    Edit::FlipBit { pos, bit } if len > 0 => bytes[pos % len] ^= 1 << bit,
                    Edit::Cut(pos) => bytes.truncate(pos % (len + 1)),
                    Edit::Insert { pos, bytes: inserted } => {
                        let pos = pos % (len + 1);
                        bytes.splice(pos..pos, inserted.iter().copied());
                    }
                    _ => (),
                }
            }
            _ => (),
        }
    }
    let stream = stream.unwrap_or_else(|| wire.concat());
    check(&frames, &real, &stream)
}

/// Reads `stream` and checks what the reader accepted and allocated
/// against what the honest sender sealed; returns the outcome's class.
fn check(frames: &[Plain], real: &[Vec<u8>], stream: &[u8]) -> String {
    let untouched = stream.len() == real.iter().map(Vec::len).sum::<usize>() && stream == real.concat();
    let (outcome, largest) = alloc::measure(|| read(frames, untouched, stream));
    // Whatever the lengths on the wire say, the reader allocates for
    // authentic lengths only: a header of at most MAX_HEADER_LEN (its buffer
    // may grow to twice that), data as long as a sealed frame's.
    let sealed = frames.iter().map(|f| f.data_len + TAG_LEN).max().unwrap_or(0);
    let bound = sealed.max(2 * MAX_HEADER_LEN);
    assert!(largest <= bound, "reading allocated {largest} bytes at once, more than the {bound} sealed lengths allow");
    outcome
}

/// Reads `stream` to its end or first error, checking what the reader
/// accepted; `untouched`: the stream as sealed, to be accepted whole.
fn read(frames: &[Plain], untouched: bool, stream: &[u8]) -> String {
    let mut reader = FrameReader::new(stream, keys().real, "fuzz".into());
    let mut accepted = 0;
    let end = loop {
        match run(reader.recv::<Vec<u8>>()) {
            Ok(Some((msg, data))) => {
                let original = frames.get(accepted).filter(|f| !f.undecodable);
                match original {
                    Some(f) if msg == f.msg && data == f.data(accepted) => accepted += 1,
                    _ => panic!("the reader accepted a forged frame in place {accepted} ({} bytes of data)", data.len()),
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    if untouched {
        let decodable = frames.iter().take_while(|f| !f.undecodable).count();
        let refused = matches!(&end, Some(Error::Frame { source: FrameError::Decode(_), .. }));
        assert!(
            accepted == decodable && (end.is_none() || refused),
            "the untouched stream was refused after {accepted} of {decodable} frames: {end:?}"
        );
    }
    let Some(error) = end else { return format!("clean end after {}", frame_count(accepted, frames.len())) };
    if !matches!(run(reader.recv::<Vec<u8>>()), Err(Error::Broken { .. })) {
        panic!("the reader can be used again after: {error}");
    }
    let class = match &error {
        Error::Frame { source, .. } => super::class(source),
        other => super::class(other),
    };
    format!("{class} after {}", frame_count(accepted, frames.len()))
}

fn frame_count(accepted: usize, sealed: usize) -> &'static str {
    match accepted {
        0 => "no frame",
        n if n == sealed => "every frame",
        _ => "some frames",
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    super::random_seeds()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A case that tampers with nothing is accepted whole.
    #[test]
    fn honest_stream_is_accepted() {
        let frames: Vec<Plain> = (0..3)
            .map(|i| Plain { msg: vec![i as u8; 10], data_len: [0, 300, DATA_PIECE + 1][i], undecodable: false })
            .collect();
        let real = seal(keys().real, &frames, false);
        assert_eq!(check(&frames, &real, &real.concat()), "clean end after every frame");
    }

    /// The check catches a frame accepted that the sender did not seal there.
    #[test]
    #[should_panic(expected = "accepted a forged frame in place 0")]
    fn accepted_forgery_is_a_crash() {
        let frames = vec![Plain { msg: b"commit".to_vec(), data_len: 0, undecodable: false }];
        let real = seal(keys().real, &frames, false);
        // What a forger with the key would send.
        let forged = seal(keys().real, &frames, true);
        check(&frames, &real, &forged[0]);
    }

    /// The other keys are other keys, and a frame sealed with any of them
    /// in place of the first is refused.
    #[test]
    fn foreign_keys_are_refused() {
        let k = keys();
        let all = [k.real, k.reverse, k.other_connection, k.other_cluster];
        for (i, a) in all.iter().enumerate() {
            assert!(all[i + 1..].iter().all(|b| a != b));
        }
        let frames = vec![Plain { msg: b"offer".to_vec(), data_len: 10, undecodable: false }];
        let real = seal(k.real, &frames, false);
        for key in [k.reverse, k.other_connection, k.other_cluster] {
            let forged = seal(key, &frames, false);
            assert_eq!(check(&frames, &real, &forged[0]), "BadMac after no frame");
        }
    }
}
