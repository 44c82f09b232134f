//! The messages VMMs exchange over a peer link ([`crate::peer`]) to move a
//! process and, afterwards, to connect it with its home node.
//!
//! A link carries one conversation, opened by its first message:
//! - [`PeerMsg::Offer`] (source to target, before the process is frozen):
//!   a migration, answered with [`PeerMsg::Accepted`] or
//!   [`PeerMsg::Refused`] (the target then starts the child the process
//!   will be built in). The source streams
//!   [`PeerMsg::Pages`] (pre-copy rounds while the process runs; the first
//!   preceded by a [`PeerMsg::Layout`] of its memory), then the
//!   frozen process's [`PeerMsg::Image`], the pages dirtied since, and
//!   [`PeerMsg::Commit`]; the target answers [`PeerMsg::Running`] once the
//!   process runs (or [`PeerMsg::Refused`]). The same link then relays the
//!   process's output and exit to its home and signals from its home, as
//!   long as the process runs there, if the source is its home.
//! - [`PeerMsg::Attach`] (the process's new host to its home, when the
//!   source was not its home): the relay link of an existing deputy.
//! - [`PeerMsg::Query`] (source to target, on a fresh link): the outcome of
//!   a migration whose link broke after `Commit`.
//! - [`PeerMsg::Gossip`]: cluster membership and loads, answered in kind.
//!
//! Everything here comes from a peer: [`Offer::validate`] and
//! [`check_pages`] bound it before anything acts on it.

use pmivmm_proto::image::{PAGE_SIZE, USER_SPACE_END};
use pmivmm_proto::prelayout::PreLayout;
use pmivmm_proto::ExitStatus;
use serde::{Deserialize, Serialize};

use crate::cluster::membership::Member;
use crate::rundir::{validate_name, MAX_NAME_LEN};

/// Pages per [`PeerMsg::Pages`] batch: 4 MiB of data per frame.
pub const PAGES_PER_BATCH: usize = 1024;
/// Data of one [`PeerMsg::Output`] (the agent's pipe reads are this size):
/// what a deputy queues is bounded by it.
pub const MAX_OUTPUT_DATA: usize = 64 << 10;
/// Longest peer address (`host:port`) accepted in a message.
const MAX_ADDR_LEN: usize = 256;

/// Where a process started and how to reach its deputy there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeRef {
    /// The home node's name.
    pub node: String,
    /// The home node's peer address (`host:port`).
    pub addr: String,
    /// Names the deputy session at home.
    pub token: u64,
    /// The process's PID at home (its deputy's).
    pub pid: u32,
}

/// A migration on its way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Chosen by the source; names the migration in a later `Query`.
    pub id: u64,
    pub home: HomeRef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerMsg {
    Offer(Offer),
    Attach { token: u64 },
    Query { id: u64 },

    /// Contents of the pages at these virtual addresses, in order, in the
    /// frame's data (`vaddrs.len()` pages).
    Pages { vaddrs: Vec<u64> },
    /// The encoded [`pmivmm_proto::image::ProcessImage`] of the frozen process.
    Image { image: Vec<u8> },
    /// Everything is sent: start the process.
    Commit,
    /// The process's private anonymous memory and the pages present in it
    /// at the first pre-copy round (at most once, before `Image`): the
    /// target lays them out while the process still runs at the source,
    /// and says `LaidOut` when it is done (or gave up); the source freezes
    /// the process after that.
    Layout(PreLayout),
    /// Target to source: the layout is done.
    LaidOut,

    /// The target takes the offered process (pages may follow).
    Accepted,
    /// The process runs on the target as `pid`.
    Running { pid: u32 },
    /// The target will not (or could not) run the process; it did not start.
    Refused { reason: String },
    /// The answer to `Query`: whether the process of that migration runs.
    Outcome { running: bool },

    /// Output of the process on its fd 1 or 2, in the frame's data.
    Output { fd: u8 },
    /// The process ended.
    Exited(ExitStatus),
    /// A signal sent to the deputy at home.
    Signal { signal: i32 },
    /// The process moved on to another node, which attaches itself; this
    /// relay link ends.
    Handoff,
    /// The home asks the process's host to send it home.
    ComeHome,
    /// Cluster membership and loads (see `crate::cluster::membership`);
    /// opens a conversation, answered with the receiver's table.
    Gossip { members: Vec<Member> },
}

impl PeerMsg {
    /// The variant's name, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            PeerMsg::Offer(_) => "Offer",
            PeerMsg::Attach { .. } => "Attach",
            PeerMsg::Query { .. } => "Query",
            PeerMsg::Pages { .. } => "Pages",
            PeerMsg::Image { .. } => "Image",
            PeerMsg::Commit => "Commit",
            PeerMsg::Layout(_) => "Layout",
            PeerMsg::LaidOut => "LaidOut",
            PeerMsg::Accepted => "Accepted",
            PeerMsg::Running { .. } => "Running",
            PeerMsg::Refused { .. } => "Refused",
            PeerMsg::Outcome { .. } => "Outcome",
            PeerMsg::Output { .. } => "Output",
            PeerMsg::Exited(_) => "Exited",
            PeerMsg::Signal { .. } => "Signal",
            PeerMsg::Handoff => "Handoff",
            PeerMsg::ComeHome => "ComeHome",
            PeerMsg::Gossip { .. } => "Gossip",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid home node name {0:?}")]
    HomeName(String),
    #[error("invalid home address {0:?}")]
    HomeAddr(String),
    #[error("a Pages message with {pages} addresses carries {bytes} bytes")]
    PagesLength { pages: usize, bytes: usize },
    #[error("a Pages message with {0} pages (at most {PAGES_PER_BATCH})")]
    BatchTooLarge(usize),
    #[error("page address {0:#x} is not a page-aligned user address")]
    PageAddr(u64),
    #[error("output for fd {0} (only 1 and 2 are forwarded)")]
    OutputFd(u8),
    #[error("an Output message with {0} bytes (at most {MAX_OUTPUT_DATA})")]
    OutputTooLarge(usize),
    #[error("signal {0} is not a valid signal number")]
    Signal(i32),
}

impl Offer {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if validate_name(&self.home.node).is_err() || self.home.node.len() > MAX_NAME_LEN {
            return Err(ProtocolError::HomeName(self.home.node.clone()));
        }
        if self.home.addr.is_empty() || self.home.addr.len() > MAX_ADDR_LEN {
            return Err(ProtocolError::HomeAddr(self.home.addr.clone()));
        }
        Ok(())
    }
}

/// Checks a `Pages` message: at most [`PAGES_PER_BATCH`] page-aligned user
/// addresses and exactly their pages of data.
pub fn check_pages(vaddrs: &[u64], data: &[u8]) -> Result<(), ProtocolError> {
    if vaddrs.len() > PAGES_PER_BATCH {
        return Err(ProtocolError::BatchTooLarge(vaddrs.len()));
    }
    if data.len() as u64 != vaddrs.len() as u64 * PAGE_SIZE {
        return Err(ProtocolError::PagesLength { pages: vaddrs.len(), bytes: data.len() });
    }
    match vaddrs.iter().find(|&&v| v % PAGE_SIZE != 0 || v >= USER_SPACE_END) {
        Some(&bad) => Err(ProtocolError::PageAddr(bad)),
        None => Ok(()),
    }
}

/// Checks an `Output` message: fd 1 or 2, at most [`MAX_OUTPUT_DATA`] bytes.
pub fn check_output(fd: u8, data: &[u8]) -> Result<(), ProtocolError> {
    if fd != 1 && fd != 2 {
        Err(ProtocolError::OutputFd(fd))
    } else if data.len() > MAX_OUTPUT_DATA {
        Err(ProtocolError::OutputTooLarge(data.len()))
    } else {
        Ok(())
    }
}

/// Checks the number of a `Signal` message.
pub fn check_signal(signal: i32) -> Result<(), ProtocolError> {
    if (1..=64).contains(&signal) {
        Ok(())
    } else {
        Err(ProtocolError::Signal(signal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            id: 7,
            home: HomeRef { node: "n1".into(), addr: "127.0.0.1:7000".into(), token: 1, pid: 42 },
        }
    }

    #[test]
    fn offers_are_validated() {
        assert_eq!(offer().validate(), Ok(()));
        let mut bad = offer();
        bad.home.node = "../etc".into();
        assert!(matches!(bad.validate(), Err(ProtocolError::HomeName(_))));
        let mut bad = offer();
        bad.home.addr = "x".repeat(1000);
        assert!(matches!(bad.validate(), Err(ProtocolError::HomeAddr(_))));
    }

    #[test]
    fn pages_are_validated() {
        let page = vec![0u8; PAGE_SIZE as usize];
        assert_eq!(check_pages(&[0x1000], &page), Ok(()));
        assert_eq!(check_pages(&[], &[]), Ok(()));
        assert!(matches!(check_pages(&[0x1000, 0x2000], &page), Err(ProtocolError::PagesLength { .. })));
        assert_eq!(check_pages(&[0x1001], &page), Err(ProtocolError::PageAddr(0x1001)));
        assert_eq!(check_pages(&[USER_SPACE_END], &page), Err(ProtocolError::PageAddr(USER_SPACE_END)));
        assert_eq!(check_pages(&[!0xfff_u64], &page), Err(ProtocolError::PageAddr(!0xfff_u64)));
        let many = vec![0x1000; PAGES_PER_BATCH + 1];
        assert!(matches!(check_pages(&many, &[]), Err(ProtocolError::BatchTooLarge(_))));
    }

    #[test]
    fn relay_fields_are_validated() {
        assert!(check_output(1, b"x").is_ok() && check_output(2, &[0; MAX_OUTPUT_DATA]).is_ok());
        assert!(check_output(0, b"").is_err() && check_output(3, b"").is_err());
        assert_eq!(check_output(1, &[0; MAX_OUTPUT_DATA + 1]), Err(ProtocolError::OutputTooLarge(MAX_OUTPUT_DATA + 1)));
        assert!(check_signal(15).is_ok() && check_signal(64).is_ok());
        assert!(check_signal(0).is_err() && check_signal(65).is_err() && check_signal(-9).is_err());
    }

    #[test]
    fn messages_round_trip() {
        let msgs = [
            PeerMsg::Offer(offer()),
            PeerMsg::Attach { token: 3 },
            PeerMsg::Query { id: 9 },
            PeerMsg::Pages { vaddrs: vec![0x1000] },
            PeerMsg::Image { image: vec![1, 2] },
            PeerMsg::Commit,
            PeerMsg::Layout(PreLayout { regions: vec![(0x10_0000, 0x20_0000)], populate: vec![(0x10_0000, 0x10_1000)] }),
            PeerMsg::LaidOut,
            PeerMsg::Accepted,
            PeerMsg::Running { pid: 5 },
            PeerMsg::Refused { reason: "full".into() },
            PeerMsg::Outcome { running: true },
            PeerMsg::Output { fd: 2 },
            PeerMsg::Exited(ExitStatus::Code(3)),
            PeerMsg::Signal { signal: 10 },
            PeerMsg::Handoff,
            PeerMsg::ComeHome,
            PeerMsg::Gossip { members: vec![] },
        ];
        for m in msgs {
            let bytes = postcard::to_stdvec(&m).unwrap();
            let back: PeerMsg = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, m, "{}", m.name());
        }
    }
}
