//! Framing: a little-endian `u32` payload length, then the postcard payload.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::message::Request;

/// The largest payload a frame may carry. The length is checked before
/// anything is allocated.
pub const MAX_FRAME_LEN: u32 = 8 << 20;

const LEN_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: u64 },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error("cannot decode message: {0}")]
    Decode(postcard::Error),
    #[error("message has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("unknown request variant {variant} (from a newer protocol version?)")]
    UnknownRequest { variant: u32 },
    #[error("i/o error on the agent connection: {0}")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one complete frame (length prefix included), so that it
/// can be sent with a single write.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; LEN_BYTES]).map_err(FrameError::Encode)?;
    let len = buf.len() - LEN_BYTES;
    if len > MAX_FRAME_LEN as usize {
        return Err(FrameError::TooLarge { len: len as u64 });
    }
    buf[..LEN_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Writes `msg` as one frame with a single `write_all`.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode_frame(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's payload. `Ok(None)` means the peer closed the stream
/// cleanly between frames.
pub fn read_payload<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len_buf = [0u8; LEN_BYTES];
    let mut got = 0;
    while got < LEN_BYTES {
        match r.read(&mut len_buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len_buf);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: len.into() });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(payload))
}

/// Decodes a payload that must hold exactly one `T`.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(FrameError::Decode)?;
    match rest.len() {
        0 => Ok(msg),
        n => Err(FrameError::TrailingBytes(n)),
    }
}

/// Decodes a request payload, telling an unknown request variant (a host
/// speaking a newer protocol) apart from a malformed one.
pub fn decode_request(payload: &[u8]) -> Result<Request, FrameError> {
    decode(payload).map_err(|e| match postcard::take_from_bytes::<u32>(payload) {
        Ok((variant, _)) if variant >= Request::VARIANTS => FrameError::UnknownRequest { variant },
        _ => e,
    })
}

/// Reads and decodes one frame. `Ok(None)` means a clean close between
/// frames.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    read_payload(r)?.map(|p| decode(&p)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello {
                protocol_version: 1,
                software_version: "0.1.0".into(),
            },
            Request::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec!["A=b".into()],
                cwd: Some("/tmp".into()),
                stdin: true,
            }),
            Request::StdinData(vec![0, 1, 2, 255]),
            Request::StdinEof,
            Request::Ps,
            Request::Load,
            Request::Kill { pid: 42, signal: 9 },
            Request::Poweroff,
            Request::Checkpoint { pid: 77, page_walk: true },
            Request::ResumeOriginal { pid: 77 },
            Request::KillOriginal { pid: 77 },
            Request::PrepareRestore { image: vec![1, 2, 3], forward_stdio: true, page_walk: false },
            Request::FinishRestore,
            Request::PrecopyRound { pid: 77, first: true, page_walk: true },
            Request::PrecopyContinue { pid: 77 },
            Request::BecomeDeputy { pid: 77, node: "n2".into() },
            Request::DeputyOutput { fd: 1, data: b"out".to_vec() },
            Request::DeputyExit(ExitStatus::Signal { signal: 15, core_dumped: false }),
            Request::DeputyMoved { node: "n3".into() },
            Request::StartRestore { forward_stdio: true },
            Request::PreLayout(crate::prelayout::PreLayout {
                regions: vec![(0x10_0000, 0x20_0000)],
                populate: vec![(0x10_0000, 0x10_1000)],
            }),
        ]
    }

    fn all_responses() -> Vec<Response> {
        vec![
            Response::Hello {
                protocol_version: 1,
                software_version: "0.1.0".into(),
            },
            Response::Error {
                kind: ErrorKind::NoSuchProcess,
                message: "no process with PID 7".into(),
            },
            Response::Ok,
            Response::Started { pid: 12 },
            Response::Stdout(b"out\n".to_vec()),
            Response::Stderr(vec![]),
            Response::Exited(ExitStatus::Code(3)),
            Response::Exited(ExitStatus::Signal {
                signal: 9,
                core_dumped: true,
            }),
            Response::ProcessList(vec![ProcessInfo {
                pid: 1,
                ppid: 0,
                state: 'S',
                comm: "init".into(),
                argv: vec!["/init".into()],
                cpu_time_ms: 10,
                rss_bytes: 4096,
                migratable: Migratability::NotMigratable(vec![
                    MigrationObstacle::Init,
                    MigrationObstacle::Agent,
                    MigrationObstacle::KernelThread,
                    MigrationObstacle::Zombie,
                    MigrationObstacle::MultiThreaded { threads: 3 },
                    MigrationObstacle::SharedWritableMapping {
                        path: "/dev/zero".into(),
                    },
                    MigrationObstacle::SysvSharedMemory,
                    MigrationObstacle::Sockets { count: 2 },
                    MigrationObstacle::Devices {
                        paths: vec!["/dev/vda".into()],
                    },
                    MigrationObstacle::SpecialFiles {
                        kinds: vec!["anon_inode:[eventfd]".into()],
                    },
                    MigrationObstacle::Traced { tracer: 5 },
                    MigrationObstacle::Uninspectable {
                        error: "EACCES".into(),
                    },
                ]),
                remote: Some("n2".into()),
            }]),
            Response::Load(LoadInfo {
                load_avg: [0.5, 0.25, 0.125],
                runnable_tasks: 1,
                total_tasks: 40,
                cpus: 1,
                mem_total_bytes: 1 << 27,
                mem_free_bytes: 1 << 26,
                mem_available_bytes: 1 << 26,
            }),
            Response::Checkpointed {
                image: vec![9; 10],
                pages: crate::image::Pages {
                    listed: vec![crate::image::PageRef {
                        vaddr: 0x7fff_0000_0000,
                        pfn: 0x1234,
                        kind: crate::image::PageKind::Data,
                        dirty: true,
                    }],
                    walk: Some(crate::image::PageWalk {
                        root: 0x83_2000,
                        levels: 4,
                        mode: crate::image::WalkMode::Present(crate::image::Select::All),
                        ranges: vec![crate::image::WalkRange {
                            start: 0x40_0000,
                            end: 0x60_0000,
                            soft_dirty: true,
                        }],
                    }),
                },
            },
            Response::RestorePrepared {
                pid: 5,
                pages: Default::default(),
            },
            Response::Restored { pid: 5 },
            Response::PrecopyPages {
                pages: Default::default(),
            },
            Response::DeputySignal { signal: 10 },
            Response::Error {
                kind: ErrorKind::Refused,
                message: "is PID 1".into(),
            },
        ]
    }

    #[test]
    fn every_request_round_trips() {
        let reqs = all_requests();
        assert_eq!(reqs.len() as u32, Request::VARIANTS);
        for req in reqs {
            let frame = encode_frame(&req).unwrap();
            let payload = read_payload(&mut &frame[..]).unwrap().unwrap();
            assert_eq!(decode_request(&payload).unwrap(), req);
        }
    }

    #[test]
    fn request_variant_count_is_exact() {
        // The last variant's index must be VARIANTS - 1.
        let last = Request::PreLayout(Default::default());
        let frame = encode_frame(&last).unwrap();
        assert_eq!(frame[LEN_BYTES], (Request::VARIANTS - 1) as u8);
    }

    #[test]
    fn every_response_round_trips() {
        for resp in all_responses() {
            let frame = encode_frame(&resp).unwrap();
            let back: Response = read_frame(&mut &frame[..]).unwrap().unwrap();
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn hello_and_error_have_stable_variant_indices() {
        let hello = Request::Hello {
            protocol_version: 7,
            software_version: String::new(),
        };
        assert_eq!(encode_frame(&hello).unwrap()[LEN_BYTES], 0);
        let hello = Response::Hello {
            protocol_version: 7,
            software_version: String::new(),
        };
        assert_eq!(encode_frame(&hello).unwrap()[LEN_BYTES], 0);
        let err = Response::Error {
            kind: ErrorKind::VersionMismatch,
            message: String::new(),
        };
        assert_eq!(encode_frame(&err).unwrap()[LEN_BYTES], 1);
    }

    #[test]
    fn frames_follow_each_other_and_end_cleanly() {
        let mut stream = Vec::new();
        for req in all_requests() {
            write_frame(&mut stream, &req).unwrap();
        }
        let mut r = &stream[..];
        for req in all_requests() {
            assert_eq!(read_frame::<_, Request>(&mut r).unwrap().unwrap(), req);
        }
        assert!(read_frame::<_, Request>(&mut r).unwrap().is_none());
    }

    #[test]
    fn truncated_frames_are_errors() {
        let frame = encode_frame(&all_requests()[1]).unwrap();
        for cut in 1..frame.len() {
            let err = read_frame::<_, Request>(&mut &frame[..cut]).unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut frame = u32::MAX.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        let err = read_payload(&mut &frame[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len } if len == u64::from(u32::MAX)));
        assert!(err.to_string().contains("exceeds the maximum"));
        let big = Response::Stdout(vec![0; MAX_FRAME_LEN as usize]);
        assert!(matches!(
            encode_frame(&big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_request_variant_is_recognised() {
        let payload = [Request::VARIANTS as u8, 1, 2, 3];
        let err = decode_request(&payload).unwrap_err();
        assert!(
            matches!(err, FrameError::UnknownRequest { variant } if variant == Request::VARIANTS)
        );
        // A multi-byte varint index too.
        let payload = [0x80, 0x01];
        assert!(matches!(
            decode_request(&payload),
            Err(FrameError::UnknownRequest { variant: 128 })
        ));
    }

    #[test]
    fn malformed_payloads_are_decode_errors() {
        // Kill with a truncated signal field.
        assert!(matches!(
            decode_request(&[6, 42]),
            Err(FrameError::Decode(_))
        ));
        // Trailing bytes after a complete message.
        assert!(matches!(
            decode_request(&[4, 0]),
            Err(FrameError::TrailingBytes(1))
        ));
        // Empty payload.
        assert!(matches!(decode_request(&[]), Err(FrameError::Decode(_))));
        // A string that is not UTF-8.
        assert!(matches!(
            decode_request(&[0, 1, 1, 0xff]),
            Err(FrameError::Decode(_))
        ));
    }

    /// xorshift64*: deterministic hostile bytes.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (rng.next() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // As payloads of both directions...
            let _ = decode_request(&bytes);
            let _ = decode::<Response>(&bytes);
            // ...and as a raw stream with plausible small lengths.
            let mut stream = ((len as u32) / 2).to_le_bytes().to_vec();
            stream.extend_from_slice(&bytes);
            let mut r = &stream[..];
            while let Ok(Some(_)) = read_frame::<_, Request>(&mut r) {}
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic() {
        let mut rng = Rng(42);
        let payloads: Vec<Vec<u8>> = all_responses()
            .iter()
            .map(|m| encode_frame(m).unwrap()[LEN_BYTES..].to_vec())
            .collect();
        for _ in 0..20_000 {
            let mut p = payloads[(rng.next() % payloads.len() as u64) as usize].clone();
            let i = (rng.next() % p.len() as u64) as usize;
            p[i] = rng.next() as u8;
            if rng.next() & 3 == 0 {
                p.truncate(i);
            }
            let _ = decode::<Response>(&p);
        }
    }
}
