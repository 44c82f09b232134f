//! [`PeerLink`]: the handshake and frames over a tokio TCP stream.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::auth::{
    self, Hello, HelloError, Role, SessionKeys, Transcript, MAX_HELLO_LEN, NONCE_LEN, PROOF_LEN,
};
use super::frame::{FrameData, FrameReader, FrameWriter, DATA_PIECE};
use super::key::ClusterKey;
use super::Error;

/// Send buffer: a frame that fits goes out in one write(2); bulk data
/// bypasses it in [`DATA_PIECE`] writes.
const WRITE_BUFFER: usize = DATA_PIECE;
/// Receive buffer for small frames; bulk data bypasses it.
const READ_BUFFER: usize = 64 * 1024;

/// An authenticated link to another node.
pub struct PeerLink {
    reader: PeerReader,
    writer: PeerWriter,
    peer_name: String,
    peer_addr: SocketAddr,
}

/// The receiving half of a [`PeerLink`].
pub struct PeerReader {
    frames: FrameReader<BufReader<OwnedReadHalf>>,
}

/// The sending half of a [`PeerLink`].
pub struct PeerWriter {
    frames: FrameWriter<BufWriter<OwnedWriteHalf>>,
}

impl PeerLink {
    /// Connects to the node listening at `addr` (`host:port`) and runs the
    /// handshake as node `me`. Connecting and the handshake together must
    /// finish within `timeout`.
    pub async fn connect(
        addr: &str,
        key: &ClusterKey,
        me: &str,
        timeout: Duration,
    ) -> Result<PeerLink, Error> {
        check_node_name(me)?;
        let deadline = Instant::now() + timeout;
        let stream = timeout_at(deadline, connect_tcp(addr))
            .await
            .map_err(|_| Error::ConnectTimeout { addr: addr.to_owned(), after: timeout })??;
        Self::establish(stream, Role::Connector, key, me, deadline, timeout).await
    }

    /// Runs the handshake as node `me` on a freshly accepted connection; it
    /// must finish within `timeout`.
    pub async fn accept(
        stream: TcpStream,
        key: &ClusterKey,
        me: &str,
        timeout: Duration,
    ) -> Result<PeerLink, Error> {
        check_node_name(me)?;
        let deadline = Instant::now() + timeout;
        Self::establish(stream, Role::Acceptor, key, me, deadline, timeout).await
    }

    async fn establish(
        mut stream: TcpStream,
        role: Role,
        key: &ClusterKey,
        me: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<PeerLink, Error> {
        let peer_addr =
            stream.peer_addr().map_err(|source| Error::Io { peer: "(disconnected)".to_owned(), source })?;
        let addr = peer_addr.to_string();
        stream.set_nodelay(true).map_err(|source| Error::Io { peer: addr.clone(), source })?;
        let (peer_name, keys) =
            timeout_at(deadline, handshake(&mut stream, role, key, me, &addr))
                .await
                .map_err(|_| Error::HandshakeTimeout { peer: addr.clone(), after: timeout })??;
        let label: Arc<str> = Arc::from(format!("{peer_name} at {addr}"));
        let (read_half, write_half) = stream.into_split();
        Ok(PeerLink {
            reader: PeerReader {
                frames: FrameReader::new(
                    BufReader::with_capacity(READ_BUFFER, read_half),
                    keys.recv,
                    label.clone(),
                ),
            },
            writer: PeerWriter {
                frames: FrameWriter::new(
                    BufWriter::with_capacity(WRITE_BUFFER, write_half),
                    keys.send,
                    label,
                ),
            },
            peer_name,
            peer_addr,
        })
    }

    /// The node name the peer gave in its hello.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Splits the link to send and receive from different tasks.
    pub fn into_split(self) -> (PeerReader, PeerWriter) {
        (self.reader, self.writer)
    }

    /// See [`PeerWriter::send`].
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), Error> {
        self.writer.send(msg).await
    }

    /// See [`PeerWriter::send_with_data`].
    pub async fn send_with_data<T, D>(&mut self, msg: &T, data: &D) -> Result<(), Error>
    where
        T: Serialize + ?Sized,
        D: FrameData + ?Sized,
    {
        self.writer.send_with_data(msg, data).await
    }

    /// See [`PeerReader::recv`].
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<(T, Vec<u8>)>, Error> {
        self.reader.recv().await
    }
}

impl PeerWriter {
    /// Sends `msg` in one frame (with no data), flushed.
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), Error> {
        self.frames.send(msg, &[][..]).await
    }

    /// Sends `msg` and `data` (raw bytes, at most [`super::MAX_DATA_LEN`])
    /// in one frame, flushed. Not cancel safe: a send dropped before it
    /// finished breaks the link.
    pub async fn send_with_data<T, D>(&mut self, msg: &T, data: &D) -> Result<(), Error>
    where
        T: Serialize + ?Sized,
        D: FrameData + ?Sized,
    {
        self.frames.send(msg, data).await
    }

    /// Closes the sending direction: the peer's next receive returns `None`.
    pub async fn shutdown(&mut self) -> Result<(), Error> {
        self.frames.shutdown().await
    }

    /// Fault injection: the next frame is sent with a flipped bit (the peer
    /// rejects it and the link).
    pub fn corrupt_next_frame(&mut self) {
        self.frames.corrupt_next();
    }
}

impl PeerReader {
    /// Receives the next message and its data (empty if none was sent);
    /// `None` if the peer closed the connection between two frames. An
    /// altered, replayed or truncated frame is an error, after which the
    /// reader refuses further use. Cancel safe while no byte of the next
    /// frame has arrived (a timeout on an idle link is harmless), not after.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<(T, Vec<u8>)>, Error> {
        self.frames.recv().await
    }
}

impl fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerLink")
            .field("peer_name", &self.peer_name)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

fn check_node_name(me: &str) -> Result<(), Error> {
    if auth::valid_node_name(me) {
        Ok(())
    } else {
        Err(Error::BadNodeName(me.to_owned()))
    }
}

/// Opens a TCP connection to the first address of `addr` that answers.
async fn connect_tcp(addr: &str) -> Result<TcpStream, Error> {
    let resolve_error = |source| Error::Resolve { addr: addr.to_owned(), source };
    let mut last_error = None;
    for a in tokio::net::lookup_host(addr).await.map_err(resolve_error)? {
        match TcpStream::connect(a).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(source) => Error::Connect { addr: addr.to_owned(), source },
        None => resolve_error(std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")),
    })
}

/// Runs the handshake as `role` on `io`, whose other end is `peer`. Returns
/// the peer's node name and the direction keys.
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    role: Role,
    key: &ClusterKey,
    me: &str,
    peer: &str,
) -> Result<(String, SessionKeys), Error> {
    let io_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::HandshakeClosed { peer: peer.to_owned() },
        _ => Error::Io { peer: peer.to_owned(), source },
    };
    let hello_error = |source| Error::Hello { peer: peer.to_owned(), source };

    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(Error::Random)?;
    let ours = postcard::to_allocvec(&Hello::new(me, nonce))
        .map_err(|source| Error::Encode { peer: peer.to_owned(), source })?;
    let mut message = Vec::with_capacity(4 + ours.len());
    message.extend_from_slice(&(ours.len() as u32).to_le_bytes());
    message.extend_from_slice(&ours);
    io.write_all(&message).await.map_err(io_error)?;
    io.flush().await.map_err(io_error)?;

    let mut len = [0u8; 4];
    io.read_exact(&mut len).await.map_err(io_error)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HELLO_LEN {
        return Err(hello_error(HelloError::NotAPeer));
    }
    let mut theirs = vec![0u8; len];
    io.read_exact(&mut theirs).await.map_err(io_error)?;
    let hello = Hello::decode(&theirs).map_err(hello_error)?;
    if hello.nonce == nonce {
        return Err(hello_error(HelloError::Malformed("it sent this node's own nonce back")));
    }

    let transcript = Transcript::new(role, &ours, &theirs);
    io.write_all(&transcript.our_proof(key)).await.map_err(io_error)?;
    io.flush().await.map_err(io_error)?;
    let mut proof = [0u8; PROOF_LEN];
    io.read_exact(&mut proof).await.map_err(io_error)?;
    let keys = transcript
        .verify(key, &proof)
        .ok_or_else(|| Error::Auth { peer: format!("{} at {peer}", hello.node) })?;
    Ok((hello.node, keys))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use tokio::net::TcpListener;

    use super::super::auth::PROTOCOL_VERSION;
    use super::super::test_util::Rng;
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping(u32),
        Pages { first: u64, count: u32 },
    }

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_bytes([byte; 32])
    }

    /// Connects "a" (with `ka`) to "b" (with `kb`) over loopback.
    async fn pair(ka: &ClusterKey, kb: &ClusterKey) -> (Result<PeerLink, Error>, Result<PeerLink, Error>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accept = async {
            let (stream, _) = listener.accept().await.unwrap();
            PeerLink::accept(stream, kb, "b", TIMEOUT).await
        };
        tokio::join!(PeerLink::connect(&addr, ka, "a", TIMEOUT), accept)
    }

    /// A hello as `handshake` sends it.
    fn hello_message(hello: &Hello) -> Vec<u8> {
        let bytes = postcard::to_allocvec(hello).unwrap();
        [&(bytes.len() as u32).to_le_bytes()[..], &bytes].concat()
    }

    #[tokio::test]
    async fn handshake_and_messages() {
        let (a, b) = pair(&key(1), &key(1)).await;
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.peer_name(), "b");
        assert_eq!(b.peer_name(), "a");
        assert!(a.peer_addr().ip().is_loopback());
        assert!(format!("{a:?}").contains("peer_name: \"b\""));

        a.send(&Msg::Ping(1)).await.unwrap();
        b.send(&Msg::Ping(2)).await.unwrap();
        assert_eq!(b.recv::<Msg>().await.unwrap(), Some((Msg::Ping(1), Vec::new())));
        assert_eq!(a.recv::<Msg>().await.unwrap(), Some((Msg::Ping(2), Vec::new())));

        let (mut ar, mut aw) = a.into_split();
        aw.send(&Msg::Ping(3)).await.unwrap();
        aw.shutdown().await.unwrap();
        assert_eq!(b.recv::<Msg>().await.unwrap(), Some((Msg::Ping(3), Vec::new())));
        assert_eq!(b.recv::<Msg>().await.unwrap(), None);
        drop(b);
        assert_eq!(ar.recv::<Msg>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn eight_mib_of_data() {
        let (a, b) = pair(&key(1), &key(1)).await;
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        let data = Rng(42).bytes(8 << 20);
        let msg = Msg::Pages { first: 0x1000, count: 2048 };
        let (sent, received) = tokio::join!(a.send_with_data(&msg, &data[..]), b.recv::<Msg>());
        sent.unwrap();
        let (got_msg, got_data) = received.unwrap().unwrap();
        assert_eq!(got_msg, msg);
        assert!(got_data == data);
    }

    #[tokio::test]
    async fn wrong_key_is_refused_on_both_sides() {
        let (a, b) = pair(&key(1), &key(2)).await;
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert!(matches!(a, Error::Auth { .. }), "{a}");
        assert!(matches!(b, Error::Auth { .. }), "{b}");
        let a = a.to_string();
        assert!(a.starts_with("peer b at 127.0.0.1:"), "{a}");
        assert!(a.ends_with(" failed to prove the cluster key (different --cluster-key?)"), "{a}");
        assert!(b.to_string().starts_with("peer a at 127.0.0.1:"), "{b}");
    }

    /// Runs `fake` as the acceptor of a connection from `PeerLink::connect`.
    async fn connect_to_fake<F, Fut>(fake: F) -> Error
    where
        F: FnOnce(TcpStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = async { fake(listener.accept().await.unwrap().0).await };
        let key = key(1);
        let (link, ()) = tokio::join!(PeerLink::connect(&addr, &key, "a", TIMEOUT), fake);
        link.unwrap_err()
    }

    #[tokio::test]
    async fn version_mismatch() {
        let err = connect_to_fake(|mut s| async move {
            let mut hello = Hello::new("b", [5; NONCE_LEN]);
            hello.version = 7;
            s.write_all(&hello_message(&hello)).await.unwrap();
        })
        .await;
        assert!(matches!(err, Error::Hello { source: HelloError::Version { ours: PROTOCOL_VERSION, theirs: 7 }, .. }));
        let err = err.to_string();
        assert!(err.starts_with("handshake with peer 127.0.0.1:"), "{err}");
        assert!(
            err.ends_with(&format!(
                "failed: it speaks peer protocol version 7, this node speaks version {PROTOCOL_VERSION} (run the same \
                 pmivmm release on every node)"
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn not_a_peer() {
        let err = connect_to_fake(|mut s| async move {
            s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        })
        .await;
        assert!(matches!(err, Error::Hello { source: HelloError::NotAPeer, .. }), "{err}");
    }

    #[tokio::test]
    async fn own_nonce_echoed_is_refused() {
        let mut stream = tokio::io::duplex(4096);
        let (ours, theirs) = (&mut stream.0, &mut stream.1);
        let echo = async {
            let mut hello =
                vec![0u8; 4 + postcard::to_allocvec(&Hello::new("a", [0; NONCE_LEN])).unwrap().len()];
            theirs.read_exact(&mut hello).await.unwrap();
            theirs.write_all(&hello).await.unwrap();
        };
        let key = key(1);
        let (result, ()) = tokio::join!(handshake(ours, Role::Connector, &key, "a", "echo"), echo);
        assert!(matches!(result, Err(Error::Hello { source: HelloError::Malformed(_), .. })));
    }

    #[tokio::test]
    async fn peer_that_closes_or_stalls() {
        let err = connect_to_fake(|s| async move { drop(s) }).await;
        assert!(matches!(err, Error::HandshakeClosed { .. } | Error::Io { .. }), "{err}");

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let err = PeerLink::connect(&addr, &key(1), "a", Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err}");
        assert!(err.to_string().contains("did not complete the handshake within 200ms"), "{err}");
    }

    #[tokio::test]
    async fn connection_refused_and_bad_addresses() {
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let err = PeerLink::connect(&addr, &key(1), "a", TIMEOUT).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot reach peer {addr}: connection refused (is the node running and listening?)")
        );
        let err = PeerLink::connect("no-port", &key(1), "a", TIMEOUT).await.unwrap_err();
        assert!(matches!(err, Error::Resolve { .. }), "{err}");
        let err = PeerLink::connect(&addr, &key(1), "a\nb", TIMEOUT).await.unwrap_err();
        assert!(matches!(err, Error::BadNodeName(_)), "{err}");
    }

    /// A fake peer sends random bytes, sometimes after a valid hello:
    /// the handshake fails, never panics, never succeeds.
    #[tokio::test]
    async fn garbage_handshakes_never_panic() {
        let mut rng = Rng(0xfeed_0000_2024_0001);
        for i in 0..3000 {
            let mut input = match i % 3 {
                0 => Vec::new(),
                1 => (rng.below(MAX_HELLO_LEN + 100) as u32).to_le_bytes().to_vec(),
                _ => hello_message(&Hello::new("b", [9; NONCE_LEN])),
            };
            input.extend(rng.noise(200));
            let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
            theirs.write_all(&input).await.unwrap();
            drop(theirs);
            let result = handshake(&mut ours, Role::Acceptor, &key(1), "a", "fuzz").await;
            assert!(result.is_err(), "input {i} accepted");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_runs() {
        let (plain, link) = super::super::bench_throughput(32 << 20).await.unwrap();
        assert!(plain > 0.0 && link > 0.0);
    }

    /// `cargo test --release -p pmivmm peer::link::tests::bench_1gib -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: transfers 2 GiB over loopback"]
    async fn bench_1gib() {
        let (plain, link) = super::super::bench_throughput(1 << 30).await.unwrap();
        let gib = (1u64 << 30) as f64;
        println!(
            "1 GiB in {} KiB chunks: plain TCP {:.2} GiB/s, peer link {:.2} GiB/s ({:.0}%)",
            super::super::bench::BENCH_CHUNK >> 10,
            plain / gib,
            link / gib,
            100.0 * link / plain
        );
    }
}
