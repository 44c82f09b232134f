//! The sending half of a connection, shared by the threads that reply on it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use pmivmm_proto::frame::{encode_frame, FrameError};
use pmivmm_proto::Response;

/// Sends whole frames; frames from different threads never interleave.
pub struct ResponseSink<W>(Arc<Mutex<W>>);

impl<W> Clone for ResponseSink<W> {
    fn clone(&self) -> Self {
        ResponseSink(Arc::clone(&self.0))
    }
}

impl<W: Write> ResponseSink<W> {
    pub fn new(writer: W) -> Self {
        ResponseSink(Arc::new(Mutex::new(writer)))
    }

    /// Sends one response with one write (blocking while the peer does not
    /// read: that is the backpressure of exec output).
    pub fn send(&self, resp: &Response) -> Result<(), FrameError> {
        let frame = encode_frame(resp)?;
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&frame)?;
        Ok(())
    }
}
