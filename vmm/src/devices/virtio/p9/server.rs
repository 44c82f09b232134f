//! The 9P2000.L file server of the share device: the `p9` crate's server
//! (crosvm's) behind a guard that enforces what that crate leaves to
//! crosvm's sandbox (a chroot in a minijail), which pmivmm does not have.
//!
//! What `p9::Server` already does (read in p9 0.3.2): every walk step is
//! `openat(parent_fd, name, O_PATH | O_NOFOLLOW)`, so a symlink is never
//! followed on the host (the guest gets the link itself and its kernel
//! resolves the target in the *guest's* namespace); files are opened by
//! reopening the fid's O_PATH fd through /proc/self/fd (a symlink fid gives
//! ELOOP); creations use `O_CREAT | O_EXCL`; symlink and mknod creation and
//! xattrs are refused; `msize` bounds every message.
//!
//! What the guard adds, by looking at each request before the server does:
//! - names (walk components, and the names of lcreate, mkdir, symlink, mknod,
//!   rename, renameat, unlinkat, link) must be one path component: not empty,
//!   not `.` or `..`, no `/` or NUL. The server resolves names relative to a
//!   directory fd, so `..` at the root or `a/../../x` would leave the share;
//!   the Linux client never sends such names (its VFS resolves `..` itself).
//! - a walk has at most 16 components (P9_MAXWELEM) and the number of fids is
//!   bounded ([`MAX_FIDS`]); each fid holds at most two host fds.
//! - every Tlopen gets O_NONBLOCK (no effect on regular files and
//!   directories): a FIFO the host left in the share cannot block the
//!   device thread, which serves one request at a time.
//! - set-user/group-id bits are dropped from created files and modes set by
//!   the guest, and ownership changes are ignored: every file the guest
//!   creates belongs to the user running the VMM (root when the VMM runs as
//!   root: a guest must not be able to plant a set-uid-root program on the
//!   host).

use std::collections::HashSet;
use std::io;
use std::path::Path;

/// Largest message in either direction (the guest's /init asks for this msize).
pub const MAX_MSIZE: u32 = 256 * 1024;
/// Most fids a guest may hold at once.
pub const MAX_FIDS: usize = 4096;
/// Most names in one Twalk (the protocol's MAXWELEM).
pub const MAX_WALK_NAMES: usize = 16;
/// Size of a message header: size[4] type[1] tag[2].
pub const HEADER_LEN: usize = 7;

// Message types (include/net/9p/9p.h).
pub const RLERROR: u8 = 7;
pub const TLOPEN: u8 = 12;
pub const TLCREATE: u8 = 14;
pub const TSYMLINK: u8 = 16;
pub const TMKNOD: u8 = 18;
pub const TRENAME: u8 = 20;
pub const TSETATTR: u8 = 26;
pub const TLINK: u8 = 70;
pub const TMKDIR: u8 = 72;
pub const TRENAMEAT: u8 = 74;
pub const TUNLINKAT: u8 = 76;
pub const TVERSION: u8 = 100;
pub const RVERSION: u8 = 101;
pub const TATTACH: u8 = 104;
pub const RATTACH: u8 = 105;
pub const TWALK: u8 = 110;
pub const RWALK: u8 = 111;
pub const TCLUNK: u8 = 120;
pub const RCLUNK: u8 = 121;

const P9_SETATTR_MODE: u32 = 0x1;
const P9_SETATTR_UID: u32 = 0x2;
const P9_SETATTR_GID: u32 = 0x4;
const SETID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
/// Tlopen's O_NONBLOCK (include/net/9p/9p.h).
const P9_NONBLOCK: u32 = 0o4000;

/// Why the guard refused a request: the errno the guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub i32);

/// A little-endian cursor over a request body that never panics.
struct Fields<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, Refused> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(Refused(libc::EINVAL))?;
        let r = self.pos..end;
        self.pos = end;
        Ok(r)
    }
    fn u16(&mut self) -> Result<u16, Refused> {
        let r = self.take(2)?;
        Ok(u16::from_le_bytes([self.buf[r.start], self.buf[r.start + 1]]))
    }
    fn u32(&mut self) -> Result<u32, Refused> {
        let r = self.take(4)?;
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.buf[r]);
        Ok(u32::from_le_bytes(b))
    }
    /// Where the next u32 is, to rewrite it.
    fn u32_at(&mut self) -> Result<(usize, u32), Refused> {
        let at = self.pos;
        Ok((at, self.u32()?))
    }
    fn put_u32(&mut self, at: usize, v: u32) {
        self.buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self) -> Result<&[u8], Refused> {
        let n = self.u16()? as usize;
        let r = self.take(n)?;
        Ok(&self.buf[r])
    }
    /// A string that must name one entry of a directory.
    fn name(&mut self) -> Result<(), Refused> {
        let s = self.string()?;
        if is_component(s) {
            Ok(())
        } else {
            Err(Refused(libc::EPERM))
        }
    }
}

/// Whether `name` is a single path component that stays in its directory.
pub fn is_component(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

/// What a request does to the set of fids, known before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FidEffect {
    None,
    /// Tattach: `fid` is new on success.
    Attach { fid: u32 },
    /// Twalk: `newfid` exists after a complete walk of `names` names.
    Walk { fid: u32, newfid: u32, names: u16 },
    /// Tclunk: `fid` is gone on success.
    Clunk { fid: u32 },
    /// Tversion: every fid is gone.
    Version,
}

/// Checks one request body (after the header) of type `ty`, rewriting the
/// mode and ownership fields it does not allow. Returns what the request
/// does to the fids when the server succeeds.
fn check(ty: u8, body: &mut [u8]) -> Result<FidEffect, Refused> {
    let mut f = Fields { buf: body, pos: 0 };
    match ty {
        TVERSION => return Ok(FidEffect::Version),
        TATTACH => return Ok(FidEffect::Attach { fid: f.u32()? }),
        TCLUNK => return Ok(FidEffect::Clunk { fid: f.u32()? }),
        TWALK => {
            let fid = f.u32()?;
            let newfid = f.u32()?;
            let n = f.u16()?;
            if n as usize > MAX_WALK_NAMES {
                return Err(Refused(libc::EINVAL));
            }
            for _ in 0..n {
                f.name()?;
            }
            return Ok(FidEffect::Walk { fid, newfid, names: n });
        }
        TLOPEN => {
            f.u32()?; // fid
            let (at, flags) = f.u32_at()?;
            f.put_u32(at, flags | P9_NONBLOCK);
        }
        TLCREATE => {
            f.u32()?; // fid
            f.name()?;
            f.u32()?; // flags
            let (at, mode) = f.u32_at()?;
            f.put_u32(at, mode & !SETID_BITS);
        }
        TMKDIR => {
            f.u32()?; // dfid
            f.name()?;
            let (at, mode) = f.u32_at()?;
            f.put_u32(at, mode & !libc::S_ISUID);
        }
        TSETATTR => {
            f.u32()?; // fid
            let (valid_at, valid) = f.u32_at()?;
            let (mode_at, mode) = f.u32_at()?;
            f.put_u32(valid_at, valid & !(P9_SETATTR_UID | P9_SETATTR_GID));
            if valid & P9_SETATTR_MODE != 0 {
                f.put_u32(mode_at, mode & !SETID_BITS);
            }
        }
        TSYMLINK | TMKNOD | TUNLINKAT => {
            f.u32()?; // fid / dfid / dirfd
            f.name()?;
        }
        TRENAME | TLINK => {
            f.u32()?;
            f.u32()?;
            f.name()?;
        }
        TRENAMEAT => {
            f.u32()?;
            f.name()?;
            f.u32()?;
            f.name()?;
        }
        _ => {}
    }
    Ok(FidEffect::None)
}

/// Size of an Rlerror message.
pub const RLERROR_LEN: usize = 11;

/// Encodes an Rlerror.
pub fn rlerror(tag: u16, errno: i32) -> Vec<u8> {
    let mut r = Vec::with_capacity(RLERROR_LEN);
    r.extend_from_slice(&(RLERROR_LEN as u32).to_le_bytes());
    r.push(RLERROR);
    r.extend_from_slice(&tag.to_le_bytes());
    r.extend_from_slice(&(errno as u32).to_le_bytes());
    r
}

/// The share's file server: one per device, driven by the device thread.
pub struct FileServer {
    server: ::p9::Server,
    /// The fids the server holds (mirrors its table: attach, walk, clunk and
    /// version are the only requests that change it).
    fids: HashSet<u32>,
    max_fids: usize,
}

impl FileServer {
    /// Serves the directory `root` (which must exist).
    pub fn new(root: &Path) -> io::Result<Self> {
        Self::with_limits(root, MAX_FIDS)
    }

    pub fn with_limits(root: &Path, max_fids: usize) -> io::Result<Self> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", root.display())));
        }
        let server = ::p9::Server::with_config(::p9::Config {
            root: root.into_boxed_path(),
            msize: MAX_MSIZE,
            uid_map: Default::default(),
            gid_map: Default::default(),
            ascii_casefold: false,
        })?;
        Ok(FileServer { server, fids: HashSet::new(), max_fids })
    }

    /// Number of fids the guest holds.
    pub fn fid_count(&self) -> usize {
        self.fids.len()
    }

    /// Handles one request message, returning the response message. A
    /// request too short to carry a tag gets no response (an empty vector).
    pub fn handle(&mut self, req: &mut [u8]) -> Vec<u8> {
        if req.len() < HEADER_LEN {
            crate::guest_warn!("9p: a request of {} bytes is too short for a header", req.len());
            return Vec::new();
        }
        let size = u32::from_le_bytes([req[0], req[1], req[2], req[3]]) as usize;
        let ty = req[4];
        let tag = u16::from_le_bytes([req[5], req[6]]);
        if size < HEADER_LEN || size > req.len() || size > MAX_MSIZE as usize {
            crate::guest_warn!("9p: request size field {size} does not fit its buffer of {} bytes", req.len());
            return rlerror(tag, libc::EINVAL);
        }
        let req = &mut req[..size];
        let effect = match check(ty, &mut req[HEADER_LEN..]) {
            Ok(e) => e,
            Err(Refused(errno)) => return rlerror(tag, errno),
        };
        let grows = match effect {
            FidEffect::Attach { fid } => !self.fids.contains(&fid),
            FidEffect::Walk { fid, newfid, .. } => newfid != fid && !self.fids.contains(&newfid),
            _ => false,
        };
        if grows && self.fids.len() >= self.max_fids {
            crate::guest_warn!("9p: the guest holds {} fids, the most allowed", self.fids.len());
            return rlerror(tag, libc::EMFILE);
        }
        let mut resp = Vec::new();
        if let Err(e) = self.server.handle_message(&mut &req[..], &mut resp) {
            crate::guest_warn!("9p: cannot handle a request of type {ty}: {e}");
            return rlerror(tag, libc::EINVAL);
        }
        let rtype = resp.get(4).copied();
        match effect {
            FidEffect::Version if rtype == Some(RVERSION) => self.fids.clear(),
            FidEffect::Attach { fid } if rtype == Some(RATTACH) => {
                self.fids.insert(fid);
            }
            FidEffect::Walk { newfid, names, .. } if rtype == Some(RWALK) => {
                // Rwalk: header, nwqid[2], qids: the new fid exists only if
                // every name was walked.
                let nwqid = resp.get(7..9).map(|b| u16::from_le_bytes([b[0], b[1]]));
                if nwqid == Some(names) {
                    self.fids.insert(newfid);
                }
            }
            FidEffect::Clunk { fid } if rtype == Some(RCLUNK) => {
                self.fids.remove(&fid);
            }
            _ => {}
        }
        resp
    }
}
