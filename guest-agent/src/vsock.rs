//! The agent's AF_VSOCK listener.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::server::{Listener, Stream};

/// `_IO(7, 0xb9)` from linux/vm_sockets.h: the local CID, or
/// `VMADDR_CID_ANY` while no vsock device has been probed.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot open /dev/vsock: {0} (is the kernel built with VSOCKETS?)")]
    Open(io::Error),
    #[error("cannot ask /dev/vsock for the local CID: {0}")]
    LocalCid(Errno),
    #[error("no virtio-vsock device: the guest has no vsock CID")]
    NoDevice,
    #[error("cannot listen on vsock port {port}: {step} failed: {errno}")]
    Listen {
        port: u32,
        step: &'static str,
        errno: Errno,
    },
}

pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port` for connections from any CID (the host). Fails if
    /// the node has no vsock device: the kernel would accept the listener
    /// anyway, and nobody could ever connect.
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        if local_cid()? == libc::VMADDR_CID_ANY {
            return Err(VsockError::NoDevice);
        }
        let err = |step| move |errno| VsockError::Listen { port, step, errno };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err("socket"))?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(err("bind"))?;
        listen(&fd, Backlog::new(16).map_err(err("listen"))?).map_err(err("listen"))?;
        Ok(VsockListener(fd))
    }
}

fn local_cid() -> Result<u32, VsockError> {
    let dev = File::open("/dev/vsock").map_err(VsockError::Open)?;
    let mut cid: u32 = 0;
    // SAFETY: this ioctl writes one u32 through the pointer, which points
    // to a local that outlives the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    Errno::result(rc).map_err(VsockError::LocalCid)?;
    Ok(cid)
}

impl Listener for VsockListener {
    type Stream = VsockStream;
    fn accept(&self) -> io::Result<VsockStream> {
        let fd = accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(VsockStream(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }
}

/// A connected vsock socket (plain read/write on its fd).
pub struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Stream for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(VsockStream)
    }
}
