//! The source side of a migration: pre-copy while the process runs, freeze,
//! send the rest, commit, and make the original the deputy (or, for a
//! process that only visits this node, hand it over and drop it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pmivmm_proto::image::{PageKind, PageRef, ProcessImage, PAGE_SIZE};
use pmivmm_proto::prelayout::{PreLayout, Span};

use vm_memory::GuestMemoryMmap;

use super::link::{self, SyncReader, SyncWriter};
use super::protocol::{HomeRef, Offer, PeerMsg, PAGES_PER_BATCH};
use super::{deputy, random_id, us, Agent, Error, MigrationNode, MigrationReport};
use crate::checkpoint::frames;
use crate::peer::{DataError, FrameData, DATA_PIECE};

/// Pre-copy stops when a round dirtied at most this many pages ...
const FINAL_ROUND_PAGES: usize = 64;
/// ... or after this many rounds (a process that dirties memory faster than
/// it can be sent would never converge).
const MAX_ROUNDS: usize = 5;
/// How long a converged pre-copy waits for the target to have laid the
/// process's memory out (`LaidOut`), with a round every
/// [`LAYOUT_POLL`]; then the process is frozen anyway (the target finishes
/// the layout before it prepares the restore).
const LAYOUT_WAIT: Duration = Duration::from_secs(120);
const LAYOUT_POLL: Duration = Duration::from_millis(250);
/// The memory of processes with at least this many pages present (8 MiB)
/// is laid out ahead: a smaller one is populated within the restore's
/// batch in tens of ms, less than what the layout's own stop of the
/// target's child and the wait for it add to the migration (a `counter`:
/// ~0.7 s more end to end, the freeze no shorter).
const LAYOUT_MIN_PAGES: u64 = 2048;
/// How long the target may take to restore the process (its guest kernel
/// faults every page in, ~2.5 ms a page on emulated hosts).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the target may take to answer an offer.
pub(super) const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a source whose link failed while sending looks for the target's
/// reason.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);
/// How long the source tries to learn the outcome of a migration whose link
/// broke after `Commit`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// How to migrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Send memory while the process runs; freeze only for the last round.
    pub precopy: bool,
}

/// Where `target` (a node name, `host:port`, or `home`) is reachable.
pub fn resolve(node: &MigrationNode, pid: u32, target: &str) -> Result<String, Error> {
    let addr = if target == "home" {
        match node.relay_home(pid) {
            Some(home) => home.addr,
            None => return Err(Error::AlreadyHome(pid)),
        }
    } else if target.contains(':') {
        target.to_owned()
    } else {
        let paths = crate::rundir::NodePaths::new(target).map_err(|_| Error::UnknownTarget(target.into()))?;
        std::fs::read_to_string(paths.peer_addr())
            .map_err(|_| Error::UnknownTarget(target.into()))?
            .trim()
            .to_owned()
    };
    if addr == node.addr || target == node.name {
        return Err(Error::SelfTarget);
    }
    Ok(addr)
}

/// Migrates process `pid` of this node to the node at `addr`. An error
/// before the target runs the process is [`Error::NotMoved`]: the process
/// runs on here.
pub fn migrate(node: &Arc<MigrationNode>, pid: u32, addr: &str, opts: Options) -> Result<MigrationReport, Error> {
    let start = Instant::now();
    // A process that migrated here keeps its home; one that started here
    // gets a deputy here.
    let visiting = node.relay_home(pid);
    let home = visiting.clone().unwrap_or_else(|| HomeRef {
        node: node.name.clone(),
        addr: node.addr.clone(),
        token: random_id(),
        pid,
    });
    let mut agent = node.agent().map_err(|e| Error::NotMoved(Box::new(e)))?;
    // On an error, dropping `agent` resumes the original.
    let t = transfer(node, &mut agent, pid, addr, &home, opts).map_err(|e| Error::NotMoved(Box::new(e)))?;
    let report = MigrationReport {
        pid,
        comm: t.comm,
        target: t.peer.clone(),
        remote_pid: t.remote_pid,
        precopy_rounds: t.rounds,
        frozen_pages: t.frozen_pages,
        bytes_sent: t.bytes_sent,
        precopy_us: us(t.precopy),
        frozen_us: us(t.frozen),
        target_restore_us: us(t.target_restore),
        total_us: us(start.elapsed()),
    };
    // The process runs on the target: this copy must never run again.
    if let Some(home) = visiting {
        // A process leaving its home again: the target took this link as
        // its home link (as on the first departure), so the deputy here
        // reads the process's output from it. Elsewhere the target attached
        // itself to the home before it answered. Then this node's copy and
        // its relay go.
        if let (true, Some((rx, tx))) = (home.node == node.name, t.link) {
            node.deputy(home.token)
                .and_then(|deputy| deputy.attach_remote(t.peer.clone(), rx, tx))
                .map_err(|e| Error::AfterCommit(Box::new(e)))?;
        }
        node.relay_moving_away(pid);
        agent.kill_original(pid).map_err(|e| Error::AfterCommit(Box::new(Error::Agent(e))))?;
    } else {
        let (events, control) =
            agent.become_deputy(pid, t.peer.clone()).map_err(|e| Error::AfterCommit(Box::new(Error::Agent(e))))?;
        let link = t.link.map(|(rx, tx)| (t.peer.clone(), rx, tx));
        deputy::start(node, home.token, pid, events, control, link).map_err(|e| Error::AfterCommit(Box::new(e)))?;
    }
    tracing::info!(
        "migrated PID {pid} ({}) to {} as PID {}: {} pre-copy rounds, frozen {:?} (capture {:?}, then the target {:?})",
        report.comm,
        report.target,
        report.remote_pid,
        report.precopy_rounds.len(),
        t.frozen,
        t.capture,
        t.target_restore
    );
    Ok(report)
}

/// What a transfer that ended with the process running on the target
/// leaves.
struct Transferred {
    peer: String,
    comm: String,
    /// 0 when the link broke after `Commit` and a `Query` said it runs.
    remote_pid: u32,
    rounds: Vec<u64>,
    frozen_pages: u64,
    bytes_sent: u64,
    precopy: Duration,
    frozen: Duration,
    /// Of `frozen`: the agent's capture of the frozen process.
    capture: Duration,
    target_restore: Duration,
    /// The migration link, now the relay link of the deputy (none after a
    /// `Query`: the target attaches again).
    link: Option<(SyncReader, SyncWriter)>,
}

/// Pre-copy, freeze, send the rest, commit; `Ok` once the process runs on
/// the target. The original stays frozen by `agent` afterwards.
fn transfer(
    node: &MigrationNode,
    agent: &mut Agent,
    pid: u32,
    addr: &str,
    home: &HomeRef,
    opts: Options,
) -> Result<Transferred, Error> {
    let start = Instant::now();
    // The first round also checks that the process exists and can move.
    // A round that leaves pages to the walk holds the process stopped
    // until the walk is done; its ranges are the process's private
    // anonymous memory.
    let round = |agent: &mut Agent, first| -> Result<(Vec<PageRef>, Vec<Span>), Error> {
        let pages = agent.precopy_round(pid, first, true).map_err(Error::Agent)?;
        let walked = pages.walk.as_ref().map(|walk| walk.ranges.iter().map(|r| (r.start, r.end)).collect());
        let pages = frames::resolve(&node.memory, pages);
        if walked.is_some() {
            agent.precopy_continue(pid).map_err(Error::Agent)?;
        }
        Ok((pages?, walked.unwrap_or_default()))
    };
    let first_round = match opts.precopy {
        true => Some(round(agent, true)?),
        false => None,
    };
    let (peer, mut rx, mut tx) = link::connect(&node.rt, addr, &node.key, &node.name)?;
    let id = random_id();
    // Offered before the freeze in either mode: the target starts the child
    // it will build the process in meanwhile.
    tx.send(&PeerMsg::Offer(Offer { id, home: home.clone() }))?;
    accepted(&mut rx)?;
    let mut m = Migration { node, tx: &mut tx, sent: HashMap::new(), bytes: 0 };

    let mut rounds = Vec::new();
    if let Some((mut pages, anonymous)) = first_round {
        // The target maps and populates the memory while the pages arrive,
        // rather than while the process is frozen; the freeze waits until
        // it has (rounds go on meanwhile, keeping the last one small).
        let data = pages.iter().filter(|p| p.kind == PageKind::Data);
        let layout = PreLayout::of(&anonymous, data.map(|p| p.vaddr));
        let mut laid_out = layout.populated_pages() < LAYOUT_MIN_PAGES;
        if !laid_out {
            m.tx.send(&PeerMsg::Layout(layout)).map_err(|e| refusal_or(&mut rx, e))?;
        }
        let mut converged_at = None;
        loop {
            let n =
                m.send_pages(pages.iter().filter(|p| p.kind == PageKind::Data)).map_err(|e| refusal_or(&mut rx, e))?;
            rounds.push(n);
            if n <= FINAL_ROUND_PAGES as u64 || rounds.len() >= MAX_ROUNDS {
                let since = *converged_at.get_or_insert_with(Instant::now);
                laid_out = laid_out || target_laid_out(&mut rx, LAYOUT_POLL)?;
                if laid_out || since.elapsed() >= LAYOUT_WAIT {
                    break;
                }
            } else if !laid_out {
                laid_out = target_laid_out(&mut rx, Duration::ZERO)?;
            }
            pages = round(agent, false)?.0;
        }
    }
    let precopy = start.elapsed();

    let frozen_at = Instant::now();
    let (image_bytes, pages) = agent.checkpoint(pid, true).map_err(Error::Agent)?;
    let capture = frozen_at.elapsed();
    let mut image = ProcessImage::from_bytes(&image_bytes).map_err(Error::BadImage)?;
    let pages = frames::resolve_capture(&node.memory, &mut image, pages)?;
    let image_bytes = image.to_bytes();
    let data = frames::data_pages(&pages, &image.pages)?;
    m.tx.send(&PeerMsg::Image { image: image_bytes }).map_err(|e| refusal_or(&mut rx, e))?;
    // Pages not sent yet, written since, or whose frame changed.
    let final_pages: Vec<&PageRef> =
        data.iter().filter(|p| p.dirty || m.sent.get(&p.vaddr) != Some(&p.pfn)).collect();
    let frozen_pages = m.send_pages(final_pages.into_iter()).map_err(|e| refusal_or(&mut rx, e))?;
    m.tx.send(&PeerMsg::Commit).map_err(|e| refusal_or(&mut rx, e))?;
    let bytes_sent = m.bytes;
    let committed = Instant::now();

    let (remote_pid, link) = match rx.expect(RESTORE_TIMEOUT) {
        Ok((PeerMsg::Running { pid }, _)) => (pid, Some((rx, tx))),
        Ok((PeerMsg::Refused { reason }, _)) => return Err(Error::Refused(reason)),
        Ok((other, _)) => return Err(Error::unexpected("Running", &other)),
        Err(e) => {
            tracing::warn!(
                "migration {id:#x} of PID {pid}: link to {peer} broke after commit ({e}); asking for the outcome"
            );
            if !query_outcome(node, addr, id) {
                return Err(e);
            }
            (0, None)
        }
    };
    Ok(Transferred {
        peer,
        comm: image.comm,
        remote_pid,
        rounds,
        frozen_pages,
        bytes_sent,
        precopy,
        frozen: frozen_at.elapsed(),
        capture,
        target_restore: committed.elapsed(),
        link,
    })
}

/// Whether the target said it laid the process's memory out, waiting at
/// most `wait` for it.
fn target_laid_out(rx: &mut SyncReader, wait: Duration) -> Result<bool, Error> {
    match rx.recv(wait) {
        Ok(Some((PeerMsg::LaidOut, _))) => Ok(true),
        Ok(Some((PeerMsg::Refused { reason }, _))) => Err(Error::Refused(reason)),
        Ok(Some((other, _))) => Err(Error::unexpected("LaidOut", &other)),
        Ok(None) => Err(Error::PeerClosed),
        Err(Error::PeerTimeout(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The target's answer to the offer.
fn accepted(rx: &mut SyncReader) -> Result<(), Error> {
    match rx.expect(ACCEPT_TIMEOUT)? {
        (PeerMsg::Accepted, _) => Ok(()),
        (PeerMsg::Refused { reason }, _) => Err(Error::Refused(reason)),
        (other, _) => Err(Error::unexpected("Accepted", &other)),
    }
}

/// Why sending to the target failed: its `Refused` if it sent one before it
/// closed the link (it refuses pages while they arrive when other incoming
/// migrations hold its page budget), else the error itself.
fn refusal_or(rx: &mut SyncReader, e: Error) -> Error {
    if !matches!(e, Error::Link(_) | Error::PeerClosed) {
        return e;
    }
    match rx.recv(REFUSAL_WAIT) {
        Ok(Some((PeerMsg::Refused { reason }, _))) => Error::Refused(reason),
        _ => e,
    }
}

struct Migration<'a> {
    node: &'a MigrationNode,
    tx: &'a mut SyncWriter,
    /// Pages sent so far, with the frame they were read from.
    sent: HashMap<u64, u64>,
    bytes: u64,
}

impl Migration<'_> {
    /// Sends the contents of `pages`; returns how many.
    fn send_pages<'p>(&mut self, pages: impl Iterator<Item = &'p PageRef>) -> Result<u64, Error> {
        let pages: Vec<PageRef> = pages.copied().collect();
        self.bytes += stream_pages(&self.node.memory, self.tx, &pages)?;
        self.sent.extend(pages.iter().map(|p| (p.vaddr, p.pfn)));
        Ok(pages.len() as u64)
    }
}

/// Sends the contents of the frames of `pages` in [`PAGES_PER_BATCH`]
/// batches, read straight out of guest RAM piece by piece as the link
/// seals them (each batch's frames checked before it starts); returns the
/// bytes sent. Pages go in frame order: scattered 4 KiB reads are several
/// times slower than reads in address order, and neighbouring frames are
/// read in one copy.
pub fn stream_pages(memory: &GuestMemoryMmap, tx: &mut SyncWriter, pages: &[PageRef]) -> Result<u64, Error> {
    let mut pages = pages.to_vec();
    pages.sort_unstable_by_key(|p| p.pfn);
    let mut bytes = 0;
    for batch in pages.chunks(PAGES_PER_BATCH) {
        frames::check_frames(memory, batch)?;
        let vaddrs = batch.iter().map(|p| p.vaddr).collect();
        let data = GuestPages { memory, pages: batch };
        tx.send_data(&PeerMsg::Pages { vaddrs }, &data)?;
        bytes += data.len() as u64;
    }
    Ok(bytes)
}

/// The contents of the frames of `pages`, as the data of a frame.
struct GuestPages<'a> {
    memory: &'a GuestMemoryMmap,
    pages: &'a [PageRef],
}

// The link asks for whole pieces: whole pages.
const _: () = assert!(DATA_PIECE.is_multiple_of(PAGE_SIZE as usize));

impl FrameData for GuestPages<'_> {
    fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE as usize
    }

    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), DataError> {
        let first = offset / PAGE_SIZE as usize;
        let count = out.len().div_ceil(PAGE_SIZE as usize);
        let pages = self.pages.get(first..first + count).unwrap_or_default();
        // A misaligned request fails here as a length mismatch.
        Ok(frames::read_pages(self.memory, pages, out)?)
    }
}

/// Whether the process of migration `id` runs on the target at `addr`,
/// asked on fresh links until the target answers. A target VMM that cannot
/// be reached at all is gone with its VM, so the process does not run there.
fn query_outcome(node: &MigrationNode, addr: &str, id: u64) -> bool {
    let deadline = Instant::now() + QUERY_TIMEOUT;
    loop {
        match ask(node, addr, id) {
            Ok(running) => return running,
            Err(Error::Link(e)) if e.is_unreachable() => {
                tracing::warn!("migration {id:#x}: the target {addr} is gone ({e}); the original resumes");
                return false;
            }
            Err(e) if Instant::now() >= deadline => {
                tracing::error!(
                    "migration {id:#x}: no answer from the target {addr} for {QUERY_TIMEOUT:?} ({e}); \
                     the original resumes"
                );
                return false;
            }
            Err(e) => {
                tracing::warn!("migration {id:#x}: asking {addr} for the outcome: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn ask(node: &MigrationNode, addr: &str, id: u64) -> Result<bool, Error> {
    let (_, mut rx, mut tx): (String, SyncReader, SyncWriter) = link::connect(&node.rt, addr, &node.key, &node.name)?;
    tx.send(&PeerMsg::Query { id })?;
    match rx.expect(QUERY_TIMEOUT)? {
        (PeerMsg::Outcome { running }, _) => Ok(running),
        (other, _) => Err(Error::unexpected("Outcome", &other)),
    }
}
