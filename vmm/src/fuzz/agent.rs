//! The agent protocol, both directions: frames of requests as the agent
//! decodes them, and the VMM's client reading a (compromised) agent's
//! responses, with the checks the VMM applies to what it gets (process
//! images, guest frame numbers against guest RAM).

use std::io::{self, Cursor};

use pmivmm_proto::frame::{decode_request, encode_frame, read_payload};
use pmivmm_proto::image::{PageKind, PageRef, PageWalk, Pages, ProcessImage, Select, WalkMode, WalkRange};
use pmivmm_proto::message::{ExecRequest, ExitStatus, Request, Response};
use pmivmm_proto::{AgentClient, ClientError, PROTOCOL_VERSION};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::class;
use crate::checkpoint::frames;

/// Guest RAM the frame numbers are checked against and page-table walks
/// read (all zero).
const RAM: u64 = 1 << 20;

pub fn run_one(data: &[u8]) -> String {
    let Some((&mode, bytes)) = data.split_first() else { return "empty".into() };
    match mode % 2 {
        0 => requests(bytes),
        _ => responses(bytes),
    }
}

/// The agent's side: every frame of the stream decoded as a request.
fn requests(bytes: &[u8]) -> String {
    let mut stream = Cursor::new(bytes);
    let mut seen = Vec::new();
    loop {
        match read_payload(&mut stream) {
            Ok(None) => break,
            Ok(Some(payload)) => match decode_request(&payload) {
                Ok(req) => seen.push(class(&req)),
                Err(e) => seen.push(class(&e)),
            },
            Err(e) => {
                seen.push(class(&e));
                break;
            }
        }
    }
    seen.sort_unstable();
    seen.dedup();
    format!("requests {}", seen.join(" "))
}

/// The VMM's side: hello, then one call chosen by the input, answered by
/// the rest of the input.
fn responses(bytes: &[u8]) -> String {
    let Some((&call, stream)) = bytes.split_first() else { return "no call".into() };
    let mut client = match AgentClient::hello(Cursor::new(stream), io::sink()) {
        Ok(client) => client,
        Err(e) => return format!("hello {}", client_error(&e)),
    };
    let result = match call % 8 {
        0 => client.ps().map(|list| format!("ps {}", list.len().min(2))),
        1 => client.load().map(|_| "load".into()),
        2 => client.checkpoint(7, true).map(|(image, pages)| checkpointed(&image, pages)),
        3 => client.precopy_round(7, true, true).map(frames_checked),
        4 => client.prepare_restore(Vec::new(), true, true).map(|(_, pages)| frames_checked(pages)),
        5 => client.finish_restore().map(|_| "restored".into()),
        6 => client.start_restore(true).map(|()| "started".into()),
        _ => client
            .exec(ExecRequest { argv: vec!["true".into()], env: vec![], cwd: None, stdin: false })
            .and_then(|session| session.wait_with_output())
            .map(|out| format!("exec {:?}", class(&out.status))),
    };
    match result {
        Ok(outcome) => outcome,
        Err(e) => format!("call {} {}", call % 8, client_error(&e)),
    }
}

fn client_error(e: &ClientError) -> String {
    match e {
        ClientError::Frame(f) => format!("Frame {}", class(f)),
        other => class(other),
    }
}

fn fuzz_ram() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("mapping fuzz RAM")
}

/// What the VMM does with a checkpoint reply before using it.
fn checkpointed(image: &[u8], pages: Pages) -> String {
    let mem = fuzz_ram();
    match ProcessImage::from_bytes(image) {
        Ok(mut image) => match frames::resolve_capture(&mem, &mut image, pages)
            .and_then(|pages| frames::data_pages(&pages, &image.pages))
            .and_then(|data| frames::check_frames(&mem, &data))
        {
            Ok(()) => "checkpoint image ok, frames ok".into(),
            Err(e) => format!("checkpoint pages {}", class(&e)),
        },
        Err(e) => format!("checkpoint image {}", class(&e)),
    }
}

/// What the VMM does with reported frames before touching them.
fn frames_checked(pages: Pages) -> String {
    let mem = fuzz_ram();
    match frames::resolve(&mem, pages).and_then(|pages| frames::check_frames(&mem, &pages)) {
        Ok(()) => "frames ok".into(),
        Err(e) => format!("frames {}", class(&e)),
    }
}

fn frame(msg: &impl serde::Serialize) -> Vec<u8> {
    encode_frame(msg).expect("encoding a seed message")
}

/// A request stream, and for every call the agent's hello and a plausible answer.
pub fn seeds() -> Vec<Vec<u8>> {
    let hello = frame(&Response::Hello { protocol_version: PROTOCOL_VERSION, software_version: "0.1.0".into() });
    let image = crate::checkpoint::dir::sample_image(1);
    let page = PageRef { vaddr: image.pages[0].start, pfn: 3, kind: PageKind::Data, dirty: true };
    let listed = |listed| Pages { listed, walk: None };
    let walk = |mode, start| PageWalk {
        root: 0x1000,
        levels: 4,
        mode,
        ranges: vec![WalkRange { start, end: start + 0x2000, soft_dirty: false }],
    };
    let answers: [(u8, Vec<Response>); 8] = [
        (0, vec![Response::ProcessList(vec![])]),
        (1, vec![Response::Error { kind: pmivmm_proto::message::ErrorKind::Refused, message: "no".into() }]),
        (
            2,
            vec![Response::Checkpointed {
                image: image.to_bytes(),
                pages: Pages { listed: vec![page], walk: Some(walk(WalkMode::Present(Select::All), 0x7000_0000)) },
            }],
        ),
        (3, vec![Response::PrecopyPages { pages: listed(vec![page, PageRef { pfn: u64::MAX, ..page }]) }]),
        (4, vec![Response::RestorePrepared { pid: 9, pages: Pages { listed: vec![], walk: Some(walk(WalkMode::Populated, 0)) } }]),
        (5, vec![Response::Restored { pid: 9 }]),
        (6, vec![Response::Ok]),
        (
            7,
            vec![
                Response::Started { pid: 9 },
                Response::Stdout(b"hi\n".to_vec()),
                Response::Exited(ExitStatus::Code(0)),
            ],
        ),
    ];
    let mut seeds: Vec<Vec<u8>> = answers
        .into_iter()
        .map(|(call, responses)| {
            let mut input = vec![1, call];
            input.extend(&hello);
            responses.iter().for_each(|r| input.extend(frame(r)));
            input
        })
        .collect();
    let mut requests = vec![0];
    for req in [Request::Ps, Request::Kill { pid: 4, signal: 9 }, Request::StdinData(vec![1, 2, 3])] {
        requests.extend(frame(&req));
    }
    seeds.push(requests);
    seeds
}
