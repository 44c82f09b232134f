//! The host side of a Firecracker-style hybrid vsock: the VMM exposes the
//! guest's vsock ports through one Unix socket; a client connects, writes
//! `CONNECT <port>\n` and reads `OK <host port>\n`, then has a byte stream
//! to the guest port.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Longest acknowledgement line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_ACK_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    #[error("cannot connect to the vsock socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("i/o error on the vsock socket {path} during CONNECT {port}: {source}")]
    Io {
        path: PathBuf,
        port: u32,
        source: io::Error,
    },
    #[error("vsock socket {path} refused CONNECT {port} (reply {reply:?}); is the guest port listening?")]
    Refused {
        path: PathBuf,
        port: u32,
        reply: String,
    },
}

/// Connects to guest vsock `port` through the VMM's Unix socket at `path`.
pub fn connect(path: &Path, port: u32) -> Result<UnixStream, HybridVsockError> {
    let mut stream = UnixStream::connect(path).map_err(|source| HybridVsockError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let io_err = |source| HybridVsockError::Io {
        path: path.to_owned(),
        port,
        source,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    let reply = read_ack_line(&mut stream).map_err(io_err)?;
    let ok = reply
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .is_some_and(|p| p.parse::<u32>().is_ok());
    if !ok {
        return Err(HybridVsockError::Refused {
            path: path.to_owned(),
            port,
            reply,
        });
    }
    Ok(stream)
}

/// Reads up to and including the first newline, byte by byte so that no
/// byte of the stream after it is consumed.
fn read_ack_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_ACK_LEN {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn fake_vmm(reply: &'static str) -> (PathBuf, std::thread::JoinHandle<String>) {
        let dir =
            std::env::temp_dir().join(format!("pmivmm-hv-{}-{}", std::process::id(), reply.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut r = io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut w = stream;
            // A refused client may already be gone: ignore write errors.
            let _ = w
                .write_all(reply.as_bytes())
                .and_then(|()| w.write_all(b"payload"));
            line
        });
        (path, handle)
    }

    #[test]
    fn connect_sends_connect_and_keeps_following_bytes() {
        let (path, vmm) = fake_vmm("OK 1073741824\n");
        let mut stream = connect(&path, 1024).unwrap();
        assert_eq!(vmm.join().unwrap(), "CONNECT 1024\n");
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "payload");
    }

    #[test]
    fn refusal_is_a_clear_error() {
        let (path, vmm) = fake_vmm("NO\n");
        let err = connect(&path, 1024).unwrap_err();
        vmm.join().unwrap();
        assert!(matches!(err, HybridVsockError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("refused CONNECT 1024"));
    }
}
