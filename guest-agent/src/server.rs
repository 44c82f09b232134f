//! Accepting connections: one thread per connection, over any listener
//! whose streams can be split into a reading and a writing half.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::connection::{serve_connection, Actions};

/// A byte stream to a client; its fd can be polled for the next request.
pub trait Stream: Read + Write + AsFd + Send + Sized + 'static {
    /// Another handle to the same stream (the writing half).
    fn try_clone(&self) -> io::Result<Self>;
}

/// Where clients connect.
pub trait Listener {
    type Stream: Stream;
    fn accept(&self) -> io::Result<Self::Stream>;
}

impl Stream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept(&self) -> io::Result<UnixStream> {
        UnixListener::accept(self).map(|(stream, _)| stream)
    }
}

/// Serves clients forever.
pub fn serve<L: Listener>(listener: L, actions: Actions) -> ! {
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) => {
                // Out of fds or memory, or an aborted connection: say so and
                // retry without spinning.
                eprintln!("pmivmm-agent: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let started = std::thread::Builder::new()
            .name("connection".into())
            .stack_size(256 << 10)
            .spawn(move || serve_connection(stream, actions));
        if let Err(e) = started {
            eprintln!("pmivmm-agent: cannot start a connection thread: {e}");
        }
    }
}
