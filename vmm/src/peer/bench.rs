//! Throughput of the peer link against plain TCP on loopback, measured in
//! the same run (for `pmivmm bench migrate`).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{ClusterKey, Error, PeerLink};

/// Bytes per write / per frame, like bulk page transfers.
pub const BENCH_CHUNK: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const LOOPBACK: &str = "127.0.0.1:0";

/// Sends `total` bytes over loopback TCP twice, in [`BENCH_CHUNK`] writes:
/// over a plain socket (read into a reused buffer), then over a
/// [`PeerLink`] with `send_with_data` / `recv`. Returns both throughputs in
/// bytes per second, `(plain, link)`; the handshake is not timed. Spawns
/// the receivers, so run it on a multi-threaded runtime to measure two
/// cores' worth.
pub async fn bench_throughput(total: u64) -> Result<(f64, f64), Error> {
    let chunk: Arc<[u8]> = pattern(BENCH_CHUNK).into();
    let plain = plain_tcp(total, &chunk)
        .await
        .map_err(|source| Error::Io { peer: "loopback (plain TCP benchmark)".to_owned(), source })?;
    let link = peer_link(total, &chunk).await?;
    Ok((plain, link))
}

async fn plain_tcp(total: u64, chunk: &[u8]) -> io::Result<f64> {
    let listener = TcpListener::bind(LOOPBACK).await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let mut buf = vec![0u8; BENCH_CHUNK];
        let mut received = 0;
        while received < total {
            match stream.read(&mut buf).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => received += n as u64,
            }
        }
        Ok::<_, io::Error>(())
    });
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min((total - sent) as usize);
        stream.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    receiver.await.map_err(io::Error::other)??;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn peer_link(total: u64, chunk: &[u8]) -> Result<f64, Error> {
    let bench_error = |source| Error::Io { peer: "loopback (peer link benchmark)".to_owned(), source };
    // Any key does: both ends are here.
    let key = ClusterKey::from_bytes(*blake3::hash(b"pmivmm bench key").as_bytes());
    let listener = TcpListener::bind(LOOPBACK).await.map_err(bench_error)?;
    let addr = listener.local_addr().map_err(bench_error)?.to_string();
    let receiver_key = key.clone();
    let receiver = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.map_err(bench_error)?;
        let mut link = PeerLink::accept(stream, &receiver_key, "bench-receiver", HANDSHAKE_TIMEOUT).await?;
        let mut received = 0;
        while received < total {
            match link.recv::<u64>().await? {
                Some((_, data)) => received += data.len() as u64,
                None => return Err(bench_error(io::ErrorKind::UnexpectedEof.into())),
            }
        }
        Ok(())
    });
    let mut link = PeerLink::connect(&addr, &key, "bench-sender", HANDSHAKE_TIMEOUT).await?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min((total - sent) as usize);
        link.send_with_data(&sent, &chunk[..n]).await?;
        sent += n as u64;
    }
    receiver.await.map_err(|e| bench_error(io::Error::other(e)))??;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// `len` bytes that are not all alike.
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
