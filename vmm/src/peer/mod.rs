//! The peer link: an authenticated, encrypted TCP connection between the
//! VMMs of two cluster nodes, over which running processes migrate.
//!
//! Every node of a cluster holds the same secret [`ClusterKey`] ([`key`]).
//! A link starts with a mutual handshake that proves both ends hold it
//! ([`auth`]), then carries sealed frames ([`frame`]), each a small postcard
//! message plus optional raw bulk data (guest pages) that never goes
//! through serde. [`link`] ties these to tokio TCP streams.
//!
//! Frames are sealed with AES-256-GCM, which encrypts as well as
//! authenticates: with AES-NI and carry-less multiplication on x86_64 it is
//! the fastest integrity protection at hand (AWS-LC's AES-256-GCM, with
//! AVX-512 VAES, seals 6.5 GB/s a core on these hosts, ring 0.17's used
//! before 3.0-3.8 GB/s; authenticating the data as associated data only ran
//! at ~1.5 GiB/s, Poly1305 at ~4 GiB/s and the BLAKE3 MAC used before that
//! at ~3.6 GiB/s), so the confidentiality of guest pages comes for free. The price is one copy on the sender (GCM encrypts in place, and
//! guest RAM is not ours to overwrite): each piece of data is copied into a
//! buffer that stays in cache, and sealed there.
//!
//! # Wire format
//!
//! All integers are little endian. `K` is the 32-byte cluster key,
//! `H(ctx; ...)` is BLAKE3 in derive-key mode with context string `ctx`,
//! `MAC(k; ...)` is BLAKE3 keyed with `k`; `...` lists the bytes hashed, in
//! order. `SEAL(k, n, a; p)` is AES-256-GCM with key `k`, nonce `n` and
//! associated data `a` over plaintext `p`: the ciphertext (as long as `p`)
//! followed by a 16-byte tag.
//!
//! 1. Hellos. Each side sends, without waiting for the other,
//!    `len: u32 | postcard(Hello)` with `len <=` [`auth::MAX_HELLO_LEN`] and
//!    `Hello { magic: b"PMIVMMPL", version: u32, node: String,
//!    nonce: [u8; 32] }` (a fresh random nonce per connection). Magic and
//!    version come first and keep their place in every version, so a
//!    version mismatch is reported as such on both sides.
//! 2. Transcript: `T = H("pmivmm peer link v1 transcript"; len(hc): u64 | hc
//!    | len(ha): u64 | ha)`, where `hc` / `ha` are the exact postcard bytes of
//!    the connector's / acceptor's hello.
//! 3. Proofs. Each side sends `MAC(K; "pmivmm peer link v1 proof " | role |
//!    0u8 | T)` (32 bytes, `role` = `connector` or `acceptor`), then reads
//!    and checks the other's. Both hellos carry fresh nonces, so a proof is
//!    good for one connection only, and the role keeps a proof from being
//!    reflected back. With different keys both sides refuse the link.
//! 4. Direction keys: `H("pmivmm peer link v1 connector->acceptor"; K | T)`
//!    and `H("pmivmm peer link v1 acceptor->connector"; K | T)`.
//! 5. Frames, in each direction independently, numbered by `seq: u64` from 0,
//!    sealed with that direction's key `k`; `n(seq, i)` is the 12-byte nonce
//!    `seq: u64 | i: u32`:
//!    `prefix | SEAL(k, n(seq, 0), prefix; header) | SEAL(k, n(seq, 1), ;
//!    piece 0) | SEAL(k, n(seq, 2), ; piece 1) | ...`, where `prefix` is
//!    `header_len: u32 | data_len: u32`, `header` the postcard encoding of
//!    the message (`header_len <=` [`MAX_HEADER_LEN`]) and the pieces the
//!    raw data (`data_len <=` [`MAX_DATA_LEN`]) cut into
//!    [`frame::DATA_PIECE`] bytes (the last piece shorter; no piece for no
//!    data). The lengths are authenticated with the header, before the
//!    reader allocates for the data, and every piece's place is in its
//!    nonce: a frame or piece altered, dropped, reordered, replayed within
//!    the connection or taken from another connection (other nonces, so
//!    other keys) fails its tag.
//!
//! A connection that ends exactly between two frames is a clean end of
//! stream to the reader: whoever can cut a TCP connection can also cut it
//! there, so protocols on the link must say explicitly when they are done.

pub mod auth;
pub mod bench;
pub mod frame;
pub mod key;
pub mod link;

use std::io;
use std::time::Duration;

pub use bench::bench_throughput;
pub use frame::{DataError, FrameData, FrameError, DATA_PIECE, MAX_DATA_LEN, MAX_HEADER_LEN};
pub use key::{ClusterKey, KeyError};
pub use link::{PeerLink, PeerReader, PeerWriter};

/// Errors of the peer link. `peer` names the other end: its address before
/// the hellos, `<node> at <address>` after.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot resolve peer address {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("cannot reach peer {addr}: {}", describe_connect_error(.source))]
    Connect { addr: String, source: io::Error },
    #[error("timed out after {after:?} connecting to peer {addr}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("peer {peer} did not complete the handshake within {after:?} (is it a pmivmm node?)")]
    HandshakeTimeout { peer: String, after: Duration },
    #[error("peer {peer} closed the connection during the handshake (see its log for why)")]
    HandshakeClosed { peer: String },
    #[error("handshake with peer {peer} failed: {source}")]
    Hello { peer: String, source: auth::HelloError },
    #[error("peer {peer} failed to prove the cluster key (different --cluster-key?)")]
    Auth { peer: String },
    #[error("invalid node name {0:?} for the peer link: use 1-{max} printable characters", max = auth::MAX_NODE_NAME_LEN)]
    BadNodeName(String),
    #[error("cannot get random bytes for the handshake: {0}")]
    Random(getrandom::Error),
    #[error("connection to peer {peer} failed: {source}")]
    Io { peer: String, source: io::Error },
    #[error("bad frame from peer {peer}: {source}")]
    Frame { peer: String, source: FrameError },
    #[error("cannot read the data to send to peer {peer}: {source}")]
    Data { peer: String, source: DataError },
    #[error("cannot encode a message for peer {peer}: {source}")]
    Encode { peer: String, source: postcard::Error },
    #[error("cannot send to peer {peer}: the {what} is {len} bytes, the limit is {max}")]
    TooLarge { peer: String, what: &'static str, len: usize, max: usize },
    #[error("the link to peer {peer} is unusable after an earlier error")]
    Broken { peer: String },
}

impl Error {
    /// Whether nothing listens at the peer's address: its VMM is not running.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
    }
}

fn describe_connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused (is the node running and listening?)".to_owned()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod test_util {
    /// A small seeded PRNG (xorshift64*) for fuzz tests.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }

        /// Fewer than `max` random bytes.
        pub fn noise(&mut self, max: usize) -> Vec<u8> {
            let len = self.below(max);
            self.bytes(len)
        }
    }
}
