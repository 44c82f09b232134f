//! The 9p share device: requests from a hostile guest, straight to the file
//! server or through descriptor chains of any shape, on a scratch share
//! with a file beside it that must stay out of reach.

use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use arbitrary::{Result, Unstructured};
use vm_memory::GuestAddress;

use super::guest::{self, Buffers, Piece};
use crate::devices::virtio::p9::msg::body;
use crate::devices::virtio::p9::process_queue;
use crate::devices::virtio::p9::server::*;

const ROOT_FID: u32 = 1;
const SECRET: &[u8] = b"host secret";

thread_local! {
    static SCRATCH: RefCell<Option<super::Scratch>> = const { RefCell::new(None) };
}

/// `<scratch>/share` holds `hello` and `sub/`; `<scratch>/outside/secret`
/// is what the guest must never reach. Recreated for every input.
fn fresh_share() -> PathBuf {
    let top = SCRATCH.with(|s| s.borrow_mut().get_or_insert_with(|| super::scratch_dir("p9")).0.clone());
    let share = top.join("share");
    force_remove(&share);
    let made = fs::create_dir_all(share.join("sub"))
        .and_then(|_| fs::write(share.join("hello"), b"hello from the host"))
        .and_then(|_| fs::create_dir_all(top.join("outside")))
        .and_then(|_| fs::write(top.join("outside/secret"), SECRET));
    if let Err(e) = made {
        panic!("cannot set up the fuzz share in {}: {e}", top.display());
    }
    share
}

/// Removes `path` whatever modes the guest left on it.
fn force_remove(path: &Path) {
    let Ok(meta) = fs::symlink_metadata(path) else { return };
    if meta.is_dir() {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            force_remove(&entry.path());
        }
        let _ = fs::remove_dir(path);
    } else {
        let _ = fs::remove_file(path);
    }
}

/// Nothing beside the share changed.
fn check_confined(share: &Path) {
    let top = share.parent().expect("the share has a parent");
    let beside: Vec<_> = fs::read_dir(top).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
    let secret = fs::read(top.join("outside/secret")).ok();
    let outside = fs::read_dir(top.join("outside")).map_or(0, |d| d.count());
    assert!(
        beside.len() == 2 && secret.as_deref() == Some(SECRET) && outside == 1,
        "the guest reached outside its share: {beside:?} beside it, secret {secret:?}, {outside} entries outside"
    );
}

/// Version and attach, so that inputs start with the share's root as fid 1.
fn attach(server: &mut FileServer) {
    for mut m in [
        body().u32(MAX_MSIZE).s("9P2000.L").frame(TVERSION),
        body().u32(ROOT_FID).u32(!0).s("root").s("").u32(0).frame(TATTACH),
    ] {
        server.handle(&mut m);
    }
}

/// The next request of the input: a 2-byte length, then that many bytes.
fn next_message<'a>(u: &mut Unstructured<'a>) -> Result<&'a [u8]> {
    let len = usize::from(u.arbitrary::<u16>()?);
    u.bytes(len.min(u.len()))
}

pub fn run_one(data: &[u8]) -> String {
    let Some((&mode, bytes)) = data.split_first() else { return "empty".into() };
    let share = fresh_share();
    let mut server = FileServer::new(&share).expect("serving the fuzz share");
    attach(&mut server);
    let mut u = Unstructured::new(bytes);
    let mut replies = Vec::new();
    // Unstructured's errors only mean the input ran out.
    let _ = if mode % 4 == 0 { through_queue(&mut u, &mut server, &mut replies) } else { direct(&mut u, &mut server, &mut replies) };
    check_confined(&share);
    replies.sort_unstable();
    replies.dedup();
    format!("{replies:?}")
}

/// Each request to the server as it is.
fn direct(u: &mut Unstructured, server: &mut FileServer, replies: &mut Vec<(u8, u32)>) -> Result<()> {
    while !u.is_empty() {
        let mut req = next_message(u)?.to_vec();
        replies.push(reply_class(&server.handle(&mut req)));
    }
    Ok(())
}

/// Requests in descriptor chains; the replies are whatever the device wrote.
fn through_queue(u: &mut Unstructured, server: &mut FileServer, replies: &mut Vec<(u8, u32)>) -> Result<()> {
    let mem = guest::ram();
    let mut bufs = Buffers::default();
    let piece = |u: &mut Unstructured, index: usize| -> Result<Piece> {
        Ok(if index == 0 {
            Piece { bytes: next_message(u)?.to_vec(), writable: false }
        } else {
            Piece { bytes: vec![0; u.int_in_range(0..=8192)?], writable: true }
        })
    };
    if let Some(mut queue) = guest::queue(u, &mem, GuestAddress(0), &mut bufs, piece)? {
        replies.push((u8::from(process_queue(&mem, &mut queue, server)), 0));
    }
    Ok(())
}

/// The reply's type, and its errno for an error.
fn reply_class(reply: &[u8]) -> (u8, u32) {
    match reply {
        [_, _, _, _, RLERROR, _, _, e0, e1, e2, e3, ..] => (RLERROR, u32::from_le_bytes([*e0, *e1, *e2, *e3])),
        [_, _, _, _, ty, ..] => (*ty, 0),
        _ => (0, 0),
    }
}

/// Requests on the root fid and a file: walk (also to `..`), open, read,
/// write, readdir, getattr, setattr, mkdir, create, symlink, rename, unlink.
pub fn seeds() -> Vec<Vec<u8>> {
    const TSTATFS: u8 = 8;
    const TREADLINK: u8 = 22;
    const TGETATTR: u8 = 24;
    const TREADDIR: u8 = 40;
    const TREAD: u8 = 116;
    const TWRITE: u8 = 118;
    let walk = |newfid: u32, names: &[&str]| {
        names.iter().fold(body().u32(ROOT_FID).u32(newfid).u16(names.len() as u16), |m, n| m.s(n)).frame(TWALK)
    };
    let sessions: Vec<Vec<Vec<u8>>> = vec![
        vec![
            walk(2, &["hello"]),
            body().u32(2).u32(2).frame(TLOPEN),
            body().u32(2).u64(0).u32(100).frame(TREAD),
            body().u32(2).u64(5).data(b"data").frame(TWRITE),
            body().u32(2).frame(TCLUNK),
        ],
        vec![
            walk(3, &[]),
            body().u32(3).u32(0o200000).frame(TLOPEN),
            body().u32(3).u64(0).u32(4096).frame(TREADDIR),
            body().u32(ROOT_FID).u64(0x3fff).frame(TGETATTR),
            body().u32(ROOT_FID).frame(TSTATFS),
        ],
        vec![walk(4, &[".."]), walk(5, &["sub", "..", ".."]), walk(6, &["sub"])],
        vec![
            body().u32(ROOT_FID).s("d").u32(0o755).u32(0).frame(TMKDIR),
            walk(7, &[]),
            body().u32(7).s("new").u32(0o102).u32(0o644).u32(0).frame(TLCREATE),
            body().u32(ROOT_FID).s("link").s("../outside/secret").u32(0).frame(TSYMLINK),
            walk(8, &["link"]),
            body().u32(8).frame(TREADLINK),
            body().u32(ROOT_FID).s("hello").u32(ROOT_FID).s("moved").frame(TRENAMEAT),
            body().u32(ROOT_FID).s("moved").u32(0).frame(TUNLINKAT),
            body().u32(ROOT_FID).u32(1).u32(0o7777).u32(0).u32(0).u64(0).u64(0).u64(0).u64(0).u64(0).frame(TSETATTR),
        ],
    ];
    sessions
        .into_iter()
        .flat_map(|msgs: Vec<Vec<u8>>| {
            let encoded: Vec<u8> =
                msgs.iter().flat_map(|m| [&(m.len() as u16).to_le_bytes()[..], m].concat()).collect();
            [[&[1u8][..], &encoded].concat(), [&[0u8][..], &encoded].concat()]
        })
        .collect()
}
