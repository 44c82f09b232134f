//! Encodes 9P2000.L messages, for the device tests and the fuzz targets'
//! seed inputs.

use super::server::HEADER_LEN;

/// Encodes 9P messages.
#[derive(Default)]
pub struct Msg(pub Vec<u8>);

impl Msg {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn s(self, v: &str) -> Self {
        self.bytes_str(v.as_bytes())
    }
    pub fn bytes_str(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u16).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    pub fn data(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    /// Frames the body as a message of type `ty` with tag 7.
    pub fn frame(self, ty: u8) -> Vec<u8> {
        let mut m = ((self.0.len() + HEADER_LEN) as u32).to_le_bytes().to_vec();
        m.push(ty);
        m.extend_from_slice(&7u16.to_le_bytes());
        m.extend_from_slice(&self.0);
        m
    }
}

pub fn body() -> Msg {
    Msg::default()
}

