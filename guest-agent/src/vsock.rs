//! The agent's AF_VSOCK listener.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::server::{Listener, Stream};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on vsock port {port}: {step} failed: {errno} (does the node have a virtio-vsock device?)")]
pub struct VsockError {
    port: u32,
    step: &'static str,
    errno: nix::errno::Errno,
}

pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port` for connections from any CID (the host).
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        let err = |step| move |errno| VsockError { port, step, errno };
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

impl Stream for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(VsockStream)
    }
}
