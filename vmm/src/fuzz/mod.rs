//! Fuzz targets for every decoder that sees untrusted bytes: from peers
//! ([`frame`]: sealed frames tampered with on the wire; [`peer`]: the
//! messages in them), from the guest agent and towards it ([`agent`]), from a
//! hostile guest driver ([`mmio`], [`vsock`], [`p9`]), from disk
//! ([`checkpoint`]) and from anyone on the lab network ([`beacon`]).
//!
//! Each target is a `run_one(&[u8]) -> String` that must not panic, must
//! not allocate more than [`MAX_ALLOC`] at once, and touches guest memory
//! only through vm-memory (bounds-checked, in a small guest RAM of its
//! own); it returns the class of the outcome (which error, which reply),
//! which steers the mutator ([`runner`]) towards inputs that do something
//! new. The unit tests run every target for a fixed number of inputs from a
//! fixed seed; `pmivmm fuzz` runs them for as long as asked.

pub mod alloc;
mod agent;
mod beacon;
mod checkpoint;
pub mod command;
mod frame;
mod guest;
mod mmio;
mod p9;
mod peer;
pub mod runner;
mod vsock;

use std::fmt::{self, Write};
use std::path::PathBuf;

/// Largest single allocation an input may cause: the largest frame data a
/// peer may announce (64 MiB), plus room for its header.
pub const MAX_ALLOC: usize = crate::peer::MAX_DATA_LEN + (1 << 20);
/// Longest input the mutator makes.
pub const MAX_INPUT: usize = 64 * 1024;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// What it feeds with the input.
    pub what: &'static str,
    pub run_one: fn(&[u8]) -> String,
    /// Inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "peer",
        what: "peer hellos and messages (PeerMsg, gossip tables, process images) with the receivers' checks",
        run_one: peer::run_one,
        seeds: peer::seeds,
    },
    Target {
        name: "frame",
        what: "sealed peer frames tampered with on the wire (bits, cuts, lengths, replays, reorders, drops, other keys)",
        run_one: frame::run_one,
        seeds: frame::seeds,
    },
    Target {
        name: "agent",
        what: "agent protocol frames: requests as the agent decodes them, responses as the VMM's client reads them",
        run_one: agent::run_one,
        seeds: agent::seeds,
    },
    Target {
        name: "vsock",
        what: "vsock tx/rx descriptor chains, packets and the connection state machine with a host socket",
        run_one: vsock::run_one,
        seeds: vsock::seeds,
    },
    Target {
        name: "mmio",
        what: "virtio-mmio register accesses and queue layouts from a hostile driver",
        run_one: mmio::run_one,
        seeds: mmio::seeds,
    },
    Target {
        name: "p9",
        what: "9P2000.L requests to the share, direct and through descriptor chains, confinement checked",
        run_one: p9::run_one,
        seeds: p9::seeds,
    },
    Target {
        name: "checkpoint",
        what: "checkpoint directories (descriptor, image, page file) read from disk",
        run_one: checkpoint::run_one,
        seeds: checkpoint::seeds,
    },
    Target {
        name: "beacon",
        what: "discovery beacons (UDP multicast datagrams) checked with the cluster's beacon key",
        run_one: beacon::run_one,
        seeds: beacon::seeds,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no fuzz target {0:?} (targets: {names}, or all)", names = names())]
    UnknownTarget(String),
}

fn names() -> String {
    TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

/// The targets `name` selects (`all`: every one).
pub fn select(name: &str) -> Result<Vec<&'static Target>, Error> {
    if name == "all" {
        return Ok(TARGETS.iter().collect());
    }
    TARGETS.iter().find(|t| t.name == name).map(|t| vec![t]).ok_or_else(|| Error::UnknownTarget(name.into()))
}

/// The class of a value: its `Debug` text up to the first delimiter (an
/// enum's variant name), without formatting the rest.
pub fn class(value: &dyn fmt::Debug) -> String {
    struct UpToDelimiter(String);
    impl Write for UpToDelimiter {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            match s.find(['(', ' ', '{', ':']) {
                Some(end) => {
                    self.0.push_str(&s[..end]);
                    Err(fmt::Error)
                }
                None => {
                    self.0.push_str(s);
                    Ok(())
                }
            }
        }
    }
    let mut out = UpToDelimiter(String::new());
    // Stops with an error at the first delimiter, by design.
    let _ = write!(out, "{value:?}");
    out.0
}

/// A scratch directory of this process and thread for a target's files,
/// removed when dropped (with the thread-local that holds it).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir(target: &str) -> Scratch {
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    // In memory when there is a tmpfs for it: files are written for every input.
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() };
    let dir = base.join(format!("pmivmm-fuzz-{}-{target}-{thread}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create the fuzz scratch directory {}: {e}", dir.display());
    }
    Scratch(dir)
}

/// Seeds of targets whose inputs are structured by `arbitrary`: random
/// bytes (from a fixed seed) already describe rich structures.
fn random_seeds() -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    (0..16).map(|i| std::iter::repeat_with(|| rng.u8(..)).take(64 << (i % 6)).collect()).collect()
}

#[cfg(test)]
mod tests;
