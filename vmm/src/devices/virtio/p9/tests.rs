//! The share device: config space, the guard's confinement and limits on a
//! real scratch directory, and requests through in-memory virtqueues
//! (virtio-queue's mock split queues), hostile chains included.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::server::*;
use super::*;
use super::msg::body;
use crate::devices::virtio::test_utils::chain;

// Message types the tests send and expect.
const TSTATFS: u8 = 8;
const TLOPEN: u8 = 12;
const RLOPEN: u8 = 13;
const RLCREATE: u8 = 15;
const TREADLINK: u8 = 22;
const RREADLINK: u8 = 23;
const TGETATTR: u8 = 24;
const RGETATTR: u8 = 25;
const RSETATTR: u8 = 27;
const TREADDIR: u8 = 40;
const RREADDIR: u8 = 41;
const RMKDIR: u8 = 73;
const RRENAMEAT: u8 = 75;
const RUNLINKAT: u8 = 77;
const TREAD: u8 = 116;
const RREAD: u8 = 117;
const TWRITE: u8 = 118;
const RWRITE: u8 = 119;

const ROOT: u32 = 1;

/// A response: its type and body.
struct Resp {
    ty: u8,
    body: Vec<u8>,
}

impl Resp {
    fn parse(r: &[u8]) -> Resp {
        assert!(r.len() >= HEADER_LEN, "short response {r:?}");
        assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()) as usize, r.len(), "size field");
        assert_eq!(u16::from_le_bytes([r[5], r[6]]), 7, "tag");
        Resp { ty: r[4], body: r[HEADER_LEN..].to_vec() }
    }
    fn errno(&self) -> Option<i32> {
        (self.ty == RLERROR).then(|| u32::from_le_bytes(self.body[..4].try_into().unwrap()) as i32)
    }
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.body[at..at + 4].try_into().unwrap())
    }
}

struct Fs {
    srv: FileServer,
    dir: PathBuf,
}

impl Fs {
    /// A server on `<scratch>/share`, with `<scratch>/outside/secret` beside it.
    fn new(name: &str, max_fids: usize) -> Fs {
        let top = std::env::temp_dir().join(format!("pmivmm-p9-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(top.join("share/sub")).unwrap();
        std::fs::create_dir_all(top.join("outside")).unwrap();
        std::fs::write(top.join("outside/secret"), b"host secret").unwrap();
        std::fs::write(top.join("share/hello"), b"hello from the host").unwrap();
        let dir = top.join("share");
        let mut fs = Fs { srv: FileServer::with_limits(&dir, max_fids).unwrap(), dir };
        let r = fs.call(body().u32(1 << 20).s("9P2000.L").frame(TVERSION));
        assert_eq!(r.ty, RVERSION);
        assert_eq!(r.u32_at(0), MAX_MSIZE, "msize is capped");
        let r = fs.call(body().u32(ROOT).u32(!0).s("root").s("").u32(0).frame(TATTACH));
        assert_eq!(r.ty, RATTACH, "attach: {:?}", r.errno());
        fs
    }

    fn call(&mut self, mut req: Vec<u8>) -> Resp {
        Resp::parse(&self.srv.handle(&mut req))
    }

    fn walk(&mut self, fid: u32, newfid: u32, names: &[&str]) -> Resp {
        let mut m = body().u32(fid).u32(newfid).u16(names.len() as u16);
        for n in names {
            m = m.s(n);
        }
        self.call(m.frame(TWALK))
    }

    /// Walks from the root to a new fid; returns the errno or the qid types.
    fn walk_root(&mut self, newfid: u32, names: &[&str]) -> Result<Vec<u8>, i32> {
        let r = self.walk(ROOT, newfid, names);
        if let Some(e) = r.errno() {
            return Err(e);
        }
        assert_eq!(r.ty, RWALK);
        let n = u16::from_le_bytes([r.body[0], r.body[1]]) as usize;
        Ok((0..n).map(|i| r.body[2 + 13 * i]).collect())
    }

    fn lopen(&mut self, fid: u32, flags: u32) -> Result<(), i32> {
        let r = self.call(body().u32(fid).u32(flags).frame(TLOPEN));
        match r.errno() {
            Some(e) => Err(e),
            None => {
                assert_eq!(r.ty, RLOPEN);
                Ok(())
            }
        }
    }

    fn read(&mut self, fid: u32) -> Result<Vec<u8>, i32> {
        let r = self.call(body().u32(fid).u64(0).u32(4096).frame(TREAD));
        if let Some(e) = r.errno() {
            return Err(e);
        }
        assert_eq!(r.ty, RREAD);
        Ok(r.body[4..].to_vec())
    }

    fn clunk(&mut self, fid: u32) -> Resp {
        self.call(body().u32(fid).frame(TCLUNK))
    }

    fn outside(&self) -> PathBuf {
        self.dir.parent().unwrap().join("outside")
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.dir.parent().unwrap());
    }
}

const QTDIR: u8 = 0x80;
const QTSYMLINK: u8 = 0x02;
const O_RDONLY: u32 = 0;
const O_RDWR: u32 = 2;

#[test]
fn read_write_create_list_rename_remove() {
    let mut fs = Fs::new("rw", MAX_FIDS);
    // Read a host file.
    assert_eq!(fs.walk_root(2, &["hello"]), Ok(vec![0]));
    fs.lopen(2, O_RDONLY).unwrap();
    assert_eq!(fs.read(2).unwrap(), b"hello from the host");
    // Create and write a file in a subdirectory.
    assert_eq!(fs.walk_root(3, &["sub"]), Ok(vec![QTDIR]));
    let r = fs.call(body().u32(3).s("new").u32(O_RDWR).u32(0o644).u32(0).frame(TLCREATE));
    assert_eq!(r.ty, RLCREATE, "{:?}", r.errno());
    let r = fs.call(body().u32(3).u64(0).data(b"written by the guest").frame(TWRITE));
    assert_eq!((r.ty, r.u32_at(0)), (RWRITE, 20));
    assert_eq!(std::fs::read(fs.dir.join("sub/new")).unwrap(), b"written by the guest");
    // getattr, statfs, mkdir, readdir.
    assert_eq!(fs.call(body().u32(2).u64(0x7ff).frame(TGETATTR)).ty, RGETATTR);
    assert_eq!(fs.call(body().u32(ROOT).frame(TSTATFS)).ty, TSTATFS + 1);
    assert_eq!(fs.call(body().u32(ROOT).s("d").u32(0o755).u32(0).frame(TMKDIR)).ty, RMKDIR);
    assert!(fs.dir.join("d").is_dir());
    assert_eq!(fs.walk_root(4, &[]), Ok(vec![]));
    fs.lopen(4, O_RDONLY).unwrap();
    let r = fs.call(body().u32(4).u64(0).u32(8192).frame(TREADDIR));
    assert_eq!(r.ty, RREADDIR);
    let listing = String::from_utf8_lossy(&r.body);
    for name in ["hello", "sub", "d"] {
        assert!(listing.contains(name), "{name} in {listing:?}");
    }
    // renameat and unlinkat.
    // (Tlcreate made fid 3 the new file: walk to the directory again.)
    assert_eq!(fs.walk_root(5, &["sub"]), Ok(vec![QTDIR]));
    let r = fs.call(body().u32(5).s("new").u32(ROOT).s("moved").frame(TRENAMEAT));
    assert_eq!(r.ty, RRENAMEAT, "{:?}", r.errno());
    assert!(fs.dir.join("moved").exists() && !fs.dir.join("sub/new").exists());
    assert_eq!(fs.call(body().u32(ROOT).s("moved").u32(0).frame(TUNLINKAT)).ty, RUNLINKAT);
    assert!(!fs.dir.join("moved").exists());
    // Clunk frees fids; clunking twice is an error.
    assert_eq!(fs.srv.fid_count(), 5);
    assert_eq!(fs.clunk(2).ty, RCLUNK);
    assert_eq!(fs.clunk(2).errno(), Some(libc::EBADF));
    assert_eq!(fs.srv.fid_count(), 4);
}

#[test]
fn dotdot_and_slashes_never_leave_the_share() {
    let mut fs = Fs::new("dotdot", MAX_FIDS);
    assert_eq!(fs.walk_root(2, &[".."]), Err(libc::EPERM));
    assert_eq!(fs.walk_root(2, &["sub", "..", ".."]), Err(libc::EPERM));
    assert_eq!(fs.walk_root(2, &["../outside"]), Err(libc::EPERM));
    assert_eq!(fs.walk_root(2, &["sub/../../outside"]), Err(libc::EPERM));
    assert_eq!(fs.walk_root(2, &["."]), Err(libc::EPERM));
    assert_eq!(fs.walk_root(2, &[""]), Err(libc::EPERM));
    assert_eq!(fs.walk_root(2, &["/etc"]), Err(libc::EPERM));
    let r = fs.walk(ROOT, 2, &[]);
    assert_eq!(r.ty, RWALK);
    // Too many names in one walk.
    let names = ["sub"; MAX_WALK_NAMES + 1];
    assert_eq!(fs.walk_root(3, &names), Err(libc::EINVAL));
    // Names of new entries.
    let bad: [&[u8]; 5] = [b"..", b"../escaped", b"sub/../../escaped", b"/tmp/escaped", b"a\0b"];
    for name in bad {
        let r = fs.call(body().u32(ROOT).bytes_str(name).u32(O_RDWR).u32(0o644).u32(0).frame(TLCREATE));
        assert_eq!(r.errno(), Some(libc::EPERM), "lcreate {name:?}");
        let r = fs.call(body().u32(ROOT).bytes_str(name).u32(0o755).u32(0).frame(TMKDIR));
        assert_eq!(r.errno(), Some(libc::EPERM), "mkdir {name:?}");
        let r = fs.call(body().u32(ROOT).bytes_str(name).u32(0).frame(TUNLINKAT));
        assert_eq!(r.errno(), Some(libc::EPERM), "unlinkat {name:?}");
        let r = fs.call(body().u32(ROOT).s("hello").u32(ROOT).bytes_str(name).frame(TRENAMEAT));
        assert_eq!(r.errno(), Some(libc::EPERM), "renameat {name:?}");
        let r = fs.call(body().u32(ROOT).u32(ROOT).bytes_str(name).frame(TLINK));
        assert_eq!(r.errno(), Some(libc::EPERM), "link {name:?}");
    }
    assert!(!fs.dir.parent().unwrap().join("escaped").exists());
    assert!(fs.outside().join("secret").exists());
    assert!(fs.dir.join("hello").exists());
}

#[test]
fn host_symlinks_are_never_followed_on_the_host() {
    let mut fs = Fs::new("symlinks", MAX_FIDS);
    symlink("/etc", fs.dir.join("etc")).unwrap();
    symlink(fs.outside().join("secret"), fs.dir.join("abs")).unwrap();
    symlink("../outside/secret", fs.dir.join("rel")).unwrap();
    symlink("loop2", fs.dir.join("loop1")).unwrap();
    symlink("loop1", fs.dir.join("loop2")).unwrap();
    symlink(fs.outside().join("planted"), fs.dir.join("dangling")).unwrap();

    // Walking onto a link gives the link (the guest resolves it in its own
    // namespace); walking through one fails; opening one fails.
    assert_eq!(fs.walk_root(2, &["etc"]), Ok(vec![QTSYMLINK]));
    assert_eq!(fs.lopen(2, O_RDONLY), Err(libc::ELOOP));
    let r = fs.call(body().u32(2).frame(TREADLINK));
    assert_eq!(r.ty, RREADLINK);
    assert_eq!(&r.body[2..], b"/etc");
    assert!(fs.walk_root(3, &["etc", "passwd"]).map_or(true, |q| q.len() < 2), "walked through a symlink");
    assert_eq!(fs.walk(2, 3, &["passwd"]).errno(), Some(libc::ENOTDIR));
    for (fid, link) in [(4, "abs"), (5, "rel"), (6, "loop1")] {
        assert_eq!(fs.walk_root(fid, &[link]), Ok(vec![QTSYMLINK]), "{link}");
        assert_eq!(fs.lopen(fid, O_RDONLY), Err(libc::ELOOP), "{link}");
        assert_eq!(fs.lopen(fid, O_RDWR | 0o1000), Err(libc::ELOOP), "{link} O_TRUNC");
        // setattr on the link (chmod, truncate) must not reach the target.
        let r = fs.call(body().u32(fid).u32(0x1 | 0x8).u32(0o777).u32(0).u32(0).u64(0).u64(0).u64(0).u64(0).u64(0).frame(TSETATTR));
        assert_ne!(r.ty, RSETATTR, "{link}: setattr on a symlink succeeded");
    }
    assert_eq!(std::fs::read(fs.outside().join("secret")).unwrap(), b"host secret");
    assert_eq!(std::fs::metadata(fs.outside().join("secret")).unwrap().permissions().mode() & 0o777, 0o644);
    // Creating a file under a dangling link's name does not create its target.
    let r = fs.call(body().u32(ROOT).s("dangling").u32(O_RDWR).u32(0o644).u32(0).frame(TLCREATE));
    assert_eq!(r.errno(), Some(libc::EEXIST));
    assert!(!fs.outside().join("planted").exists());
    // Guests cannot make symlinks or device nodes.
    let r = fs.call(body().u32(ROOT).s("mine").s("/etc").u32(0).frame(TSYMLINK));
    assert!(r.errno().is_some());
    assert!(!fs.dir.join("mine").exists());
    // A host fid on an outside target cannot be reached by renaming a link either:
    // renameat moves the link itself.
    let r = fs.call(body().u32(ROOT).s("abs").u32(ROOT).s("abs2").frame(TRENAMEAT));
    assert_eq!(r.ty, RRENAMEAT);
    assert!(fs.dir.join("abs2").symlink_metadata().unwrap().file_type().is_symlink());
    assert!(fs.outside().join("secret").exists());
}

#[test]
fn setid_bits_and_ownership_changes_are_dropped() {
    let mut fs = Fs::new("setid", MAX_FIDS);
    assert_eq!(fs.walk_root(2, &[]), Ok(vec![]));
    let r = fs.call(body().u32(2).s("suid").u32(O_RDWR).u32(0o6755).u32(0).frame(TLCREATE));
    assert_eq!(r.ty, RLCREATE);
    let path = fs.dir.join("suid");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o755);
    assert_eq!(fs.walk_root(3, &["suid"]), Ok(vec![0]));
    // chmod u+s and chown to 1234:1234: the mode applies without set-id, the owner stays.
    let r = fs.call(body().u32(3).u32(0x1 | 0x2 | 0x4).u32(0o4700).u32(1234).u32(1234).u64(0).u64(0).u64(0).u64(0).u64(0).frame(TSETATTR));
    assert_eq!(r.ty, RSETATTR, "{:?}", r.errno());
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o700);
    use std::os::unix::fs::MetadataExt;
    // SAFETY: plain getters.
    assert_eq!((md.uid(), md.gid()), unsafe { (libc::geteuid(), libc::getegid()) });
}

#[test]
fn fids_are_bounded_and_freed() {
    let mut fs = Fs::new("fids", 8);
    assert_eq!(fs.srv.fid_count(), 1);
    for fid in 2..=8 {
        assert_eq!(fs.walk_root(fid, &["sub"]), Ok(vec![QTDIR]), "fid {fid}");
    }
    assert_eq!(fs.srv.fid_count(), 8);
    assert_eq!(fs.walk_root(9, &["sub"]), Err(libc::EMFILE));
    let r = fs.call(body().u32(9).u32(!0).s("root").s("").u32(0).frame(TATTACH));
    assert_eq!(r.errno(), Some(libc::EMFILE));
    // Reusing an existing fid (walk fid to itself) is allowed at the limit.
    assert_eq!(fs.walk(8, 8, &[]).ty, RWALK);
    // Failed and partial walks create no fid.
    assert_eq!(fs.clunk(8).ty, RCLUNK);
    assert_eq!(fs.walk_root(8, &["nothing"]), Err(libc::ENOENT));
    let r = fs.walk(ROOT, 8, &["sub", "nothing"]);
    assert_eq!(r.ty, RWALK);
    assert_eq!(fs.srv.fid_count(), 7);
    assert_eq!(fs.walk_root(8, &["hello"]), Ok(vec![0]));
    assert_eq!(fs.srv.fid_count(), 8);
    // Tversion drops them all.
    assert_eq!(fs.call(body().u32(8192).s("9P2000.L").frame(TVERSION)).ty, RVERSION);
    assert_eq!(fs.srv.fid_count(), 0);
}

#[test]
fn malformed_requests_get_errors() {
    let mut fs = Fs::new("malformed", MAX_FIDS);
    // Too short for a header: no response.
    assert!(fs.srv.handle(&mut [1, 2, 3]).is_empty());
    // Size field larger than the buffer, or smaller than a header.
    let mut m = body().u32(ROOT).frame(TCLUNK);
    m[0] = 200;
    assert_eq!(Resp::parse(&fs.srv.handle(&mut m)).errno(), Some(libc::EINVAL));
    m[0] = 3;
    assert_eq!(Resp::parse(&fs.srv.handle(&mut m)).errno(), Some(libc::EINVAL));
    // Truncated bodies.
    for ty in [TWALK, TLCREATE, TMKDIR, TSETATTR, TRENAMEAT, TATTACH, TCLUNK] {
        let r = fs.call(body().u16(5).frame(ty));
        assert_eq!(r.errno(), Some(libc::EINVAL), "type {ty}");
    }
    // A string longer than the message.
    let r = fs.call(body().u32(ROOT).u32(2).u16(1).u16(1000).frame(TWALK));
    assert_eq!(r.errno(), Some(libc::EINVAL));
    // Unknown type.
    assert!(fs.call(body().u32(0).frame(250)).errno().is_some());
    // The server still works.
    assert_eq!(fs.walk_root(2, &["hello"]), Ok(vec![0]));
}

#[test]
fn a_host_fifo_does_not_block_the_device() {
    let mut fs = Fs::new("fifo", MAX_FIDS);
    let fifo = std::ffi::CString::new(fs.dir.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert_eq!(fs.walk_root(2, &["fifo"]), Ok(vec![0]));
    // Without O_NONBLOCK this open would wait for a writer forever.
    fs.lopen(2, O_RDONLY).unwrap();
    // The server reads with pread, which a FIFO refuses: an error, not a hang.
    assert_eq!(fs.read(2), Err(libc::ESPIPE));
}

#[test]
fn component_names() {
    for ok in [&b"a"[..], b"...", b".hidden", b"x..y"] {
        assert!(is_component(ok), "{ok:?}");
    }
    for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0"] {
        assert!(!is_component(bad), "{bad:?}");
    }
}

// --- The device and its queue ---

fn share_config(dir: &Path) -> ShareConfig {
    ShareConfig { host_dir: dir.to_owned(), tag: "pmivmm".into() }
}

#[test]
fn config_space_is_the_mount_tag() {
    let fs = Fs::new("config", MAX_FIDS);
    let (dev, _thread) = create(&ShareConfig { host_dir: fs.dir.clone(), tag: "share-0".into() }).unwrap();
    assert_eq!(dev.device_type(), 9);
    assert_eq!(dev.features() & VIRTIO_9P_MOUNT_TAG, VIRTIO_9P_MOUNT_TAG);
    assert_eq!(dev.queue_max_sizes().len(), 1);
    let mut buf = [0xffu8; 12];
    dev.read_config(0, &mut buf);
    assert_eq!(&buf, b"\x07\x00share-0\x00\x00\x00");
    let mut one = [0u8; 2];
    dev.read_config(3, &mut one);
    assert_eq!(&one, b"ha");
    dev.read_config(u64::MAX, &mut one);
    assert_eq!(one, [0, 0]);
    for bad in ["", "a b", "x/y", &"t".repeat(MAX_TAG_LEN + 1)] {
        assert!(matches!(create(&ShareConfig { host_dir: fs.dir.clone(), tag: bad.into() }), Err(Error::BadTag(_))));
    }
    assert!(matches!(create(&share_config(&fs.dir.join("missing"))), Err(Error::Dir { .. })));
    assert!(matches!(create(&share_config(&fs.dir.join("hello"))), Err(Error::Dir { .. })));
    let spaced = fs.dir.join("a b");
    std::fs::create_dir(&spaced).unwrap();
    assert!(matches!(create(&share_config(&spaced)), Err(Error::BadPath(_))));
    assert!(matches!(create(&share_config(&fs.dir.join("../x/.."))), Err(Error::BadPath(_))));
    for hides in ["/", "/usr", "/etc"] {
        assert!(matches!(create(&share_config(Path::new(hides))), Err(Error::InTheWay { .. })), "{hides}");
    }
    let args = cmdline_args(&share_config(&fs.dir)).unwrap();
    assert_eq!(args, format!("PMIVMM_SHARE={} PMIVMM_SHARE_TAG=pmivmm", fs.dir.display()));
    // Relative paths become absolute; symlinks are kept (the guest mounts at the path given).
    let link = fs.dir.parent().unwrap().join("link");
    symlink(&fs.dir, &link).unwrap();
    assert_eq!(guest_path(&share_config(&link)).unwrap(), link.to_str().unwrap());
}

const MEM_SIZE: u64 = 0x100_0000;

struct QueueHarness {
    mem: &'static GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    queue: Queue,
    next_desc: u16,
    used_seen: u16,
}

impl QueueHarness {
    fn new() -> Self {
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()));
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let queue = vq.create_queue().unwrap();
        QueueHarness { mem, vq, queue, next_desc: 0, used_seen: 0 }
    }

    fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        let raw = chain(head, descs);
        self.vq.add_desc_chains(&raw, head).unwrap();
        self.next_desc += descs.len() as u16;
        head
    }

    fn used(&mut self) -> Vec<(u16, u32)> {
        let used_addr = self.vq.used_addr();
        let idx: u16 = self.mem.read_obj(used_addr.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = used_addr.unchecked_add(4 + 8 * u64::from(self.used_seen % 256));
            let id: u32 = self.mem.read_obj(elem).unwrap();
            let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

const W: u16 = VRING_DESC_F_WRITE as u16;

#[test]
fn requests_through_the_queue() {
    let mut fs = Fs::new("queue", MAX_FIDS);
    let mut h = QueueHarness::new();
    // Twalk to "hello", Tlopen, then a Tread whose response is split like the
    // Linux client's zero-copy read: an 11-byte header buffer, then data pages.
    let walk = body().u32(ROOT).u32(2).u16(1).s("hello").frame(TWALK);
    h.mem.write_slice(&walk, GuestAddress(0x10_0000)).unwrap();
    let a = h.add_chain(&[(0x10_0000, walk.len() as u32, 0), (0x11_0000, 4096, W)]);
    let open = body().u32(2).u32(O_RDONLY).frame(TLOPEN);
    h.mem.write_slice(&open, GuestAddress(0x12_0000)).unwrap();
    let b = h.add_chain(&[(0x12_0000, open.len() as u32, 0), (0x13_0000, 4096, W)]);
    let read = body().u32(2).u64(0).u32(8192).frame(TREAD);
    // The request itself split over two readable descriptors.
    h.mem.write_slice(&read[..5], GuestAddress(0x14_0000)).unwrap();
    h.mem.write_slice(&read[5..], GuestAddress(0x14_1000)).unwrap();
    let c = h.add_chain(&[
        (0x14_0000, 5, 0),
        (0x14_1000, read.len() as u32 - 5, 0),
        (0x15_0000, 11, W),
        (0x16_0000, 4096, W),
        (0x17_0000, 4096, W),
    ]);
    assert!(process_queue(h.mem, &mut h.queue, &mut fs.srv));
    let used = h.used();
    assert_eq!(used.len(), 3);
    assert_eq!(used[0].0, a);
    assert_eq!(used[1].0, b);
    assert_eq!(used[2], (c, 11 + 19));
    let mut hdr = [0u8; 11];
    h.mem.read_slice(&mut hdr, GuestAddress(0x15_0000)).unwrap();
    assert_eq!(hdr[4], RREAD);
    assert_eq!(u32::from_le_bytes(hdr[7..11].try_into().unwrap()), 19);
    let mut data = [0u8; 19];
    h.mem.read_slice(&mut data, GuestAddress(0x16_0000)).unwrap();
    assert_eq!(&data, b"hello from the host");
}

#[test]
fn hostile_chains_do_not_break_the_device() {
    let mut fs = Fs::new("hostile", MAX_FIDS);
    let mut h = QueueHarness::new();
    let good = body().u32(ROOT).u32(2).u16(0).frame(TWALK);
    h.mem.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    let len = good.len() as u32;
    // Readable buffer outside guest RAM, or running past its end.
    let c1 = h.add_chain(&[(MEM_SIZE + 0x1000, 64, 0), (0x11_0000, 4096, W)]);
    let c2 = h.add_chain(&[(MEM_SIZE - 8, 64, 0), (0x11_0000, 4096, W)]);
    // Writable buffer outside guest RAM; address overflow.
    let c3 = h.add_chain(&[(0x10_0000, len, 0), (u64::MAX - 16, 4096, W)]);
    let c4 = h.add_chain(&[(u64::MAX, u32::MAX, 0), (0x11_0000, 4096, W)]);
    // No room for a response at all, or too little.
    let c5 = h.add_chain(&[(0x10_0000, len, 0)]);
    let c6 = h.add_chain(&[(0x10_0000, len, 0), (0x11_0000, 4, W)]);
    // Empty request; a request larger than msize (its tag still gets an error).
    let c7 = h.add_chain(&[(0x11_0000, 4096, W)]);
    let c8 = h.add_chain(&[(0x10_0000, MAX_MSIZE + 1, 0), (0x11_8000, 4096, W)]);
    // A response larger than the buffer: an error that fits instead.
    let getattr = body().u32(ROOT).u64(0x7ff).frame(TGETATTR);
    h.mem.write_slice(&getattr, GuestAddress(0x10_8000)).unwrap();
    let c9 = h.add_chain(&[(0x10_8000, getattr.len() as u32, 0), (0x11_0000, 12, W)]);
    // And a good one after all that.
    let c10 = h.add_chain(&[(0x10_0000, len, 0), (0x12_0000, 4096, W)]);
    // Huge lengths on many descriptors (overflowing sums).
    let c11 = h.add_chain(&[(0, u32::MAX, 0), (0, u32::MAX, 0), (0x11_0000, 4096, W)]);
    assert!(process_queue(h.mem, &mut h.queue, &mut fs.srv));
    let used: std::collections::HashMap<u16, u32> = h.used().into_iter().collect();
    assert_eq!(used.len(), 11, "every chain is returned: {used:?}");
    for c in [c1, c2, c3, c4, c5, c6, c7, c11] {
        assert_eq!(used[&c], 0, "chain {c}");
    }
    assert_eq!(used[&c8], 11);
    let mut r = [0u8; 11];
    h.mem.read_slice(&mut r, GuestAddress(0x11_8000)).unwrap();
    assert_eq!(Resp::parse(&r).errno(), Some(libc::EMSGSIZE));
    assert_eq!(used[&c9], 11);
    h.mem.read_slice(&mut r, GuestAddress(0x11_0000)).unwrap();
    assert_eq!(Resp::parse(&r).errno(), Some(libc::ENOBUFS));
    assert!(used[&c10] > 0);
    let mut r = vec![0u8; used[&c10] as usize];
    h.mem.read_slice(&mut r, GuestAddress(0x12_0000)).unwrap();
    assert_eq!(Resp::parse(&r).ty, RWALK);
    // Chains without room for an answer were not executed: only c10 made fid 2.
    assert_eq!(fs.srv.fid_count(), 2);
}
