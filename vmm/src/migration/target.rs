//! The target side of a migration: keep the pages (and lay the process's
//! memory out ahead when the source sends its layout), rebuild the process
//! from the image, write the pages into its frames, start it on `Commit`.
//!
//! The outcome of every received migration is recorded so that a source
//! whose link broke after `Commit` can ask (`Query`). The decision is
//! atomic: a `Query` for a migration that has not started its process yet
//! aborts it, so the answer is final.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pmivmm_proto::image::{PageRef, ProcessImage};
use vm_memory::GuestMemoryMmap;

use super::link::{SyncReader, SyncWriter};
use super::pages::PageStore;
use super::protocol::{check_pages, Offer, PeerMsg, PAGES_PER_BATCH};
use super::{relay, Agent, Error, MigrationNode};
use crate::checkpoint::frames;

/// Longest silence of a source between two messages (a pre-copy round waits
/// for the source's guest kernel to report dirty pages).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the target looks whether the layout is done while it waits
/// for the source.
const LAYOUT_POLL: Duration = Duration::from_millis(50);
/// How long a `Query` waits for a migration that is starting its process.
const COMMIT_WAIT: Duration = Duration::from_secs(60);
/// Pages written into guest RAM per thread at least (16 MiB): fewer are
/// written faster than a thread starts.
const MIN_PAGES_PER_WRITER: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Receiving,
    /// The agent is letting the process run.
    Committing,
    Running,
    Aborted,
}

impl MigrationNode {
    fn set_outcome(&self, id: u64, outcome: Outcome) {
        crate::devices::lock(&self.outcomes).insert(id, outcome);
    }

    /// Moves migration `id` from `Receiving` to `Committing`; false if a
    /// `Query` aborted it.
    fn begin_commit(&self, id: u64) -> bool {
        let mut outcomes = crate::devices::lock(&self.outcomes);
        match outcomes.get(&id) {
            Some(Outcome::Receiving) => {
                outcomes.insert(id, Outcome::Committing);
                true
            }
            _ => false,
        }
    }

    /// The answer to a `Query`: whether the process of migration `id` runs
    /// here. A migration that has not committed is aborted by the question.
    pub fn outcome(&self, id: u64) -> bool {
        for _ in 0..COMMIT_WAIT.as_millis() / 100 {
            {
                let mut outcomes = crate::devices::lock(&self.outcomes);
                match outcomes.get(&id).copied() {
                    Some(Outcome::Running) => return true,
                    Some(Outcome::Committing) => {}
                    _ => {
                        outcomes.insert(id, Outcome::Aborted);
                        return false;
                    }
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// How long a `stall` fault sleeps: longer than the source waits for the
/// answer to its offer (at later points the source waits longer, and the
/// stall only slows the migration down).
const STALL: Duration = Duration::from_secs(super::source::ACCEPT_TIMEOUT.as_secs() + 5);

/// Fault injection for the failure-safety tests and `pmivmm soak`: a file
/// `fault` in the node's run directory holding `<point> <action>` arms one
/// fault for the next incoming migration (the file is removed when it
/// fires). Points: `offer` (offer received), `image` (process prepared),
/// `commit` (pages written, not started), `running` (started, `Running` not
/// sent yet). Actions: `drop` (close the link), `exit` (the VMM dies at
/// once, with its VM), `stall` (sleep for [`STALL`], then go on) or
/// `corrupt` (the next message to the source goes out with a flipped bit;
/// its authentication rejects it and the link). Only root can write the run
/// directory of a root node.
fn fault_point(node: &MigrationNode, point: &str, tx: &mut SyncWriter) -> Result<(), Error> {
    let Some(path) = node.fault_file.as_deref() else { return Ok(()) };
    let Ok(armed) = std::fs::read_to_string(path) else { return Ok(()) };
    let mut words = armed.split_whitespace();
    if words.next() != Some(point) {
        return Ok(());
    }
    let _ = std::fs::remove_file(path);
    match words.next() {
        Some("exit") => {
            tracing::error!("fault injection: the VMM exits at migration point {point}");
            std::process::exit(1);
        }
        Some("stall") => {
            tracing::warn!("fault injection: stalling the migration for {STALL:?} at point {point}");
            thread::sleep(STALL);
            Ok(())
        }
        Some("corrupt") => {
            tracing::warn!("fault injection: corrupting the next frame to the source at point {point}");
            tx.corrupt_next();
            Ok(())
        }
        _ => {
            tracing::warn!("fault injection: dropping the migration link at point {point}");
            Err(Error::PeerClosed)
        }
    }
}

/// Receives the migration `offer` on this link (run on its own thread).
pub fn receive(node: &Arc<MigrationNode>, source: String, offer: Offer, mut rx: SyncReader, mut tx: SyncWriter) {
    let id = offer.id;
    node.set_outcome(id, Outcome::Receiving);
    match run(node, &source, &offer, &mut rx, &mut tx) {
        Ok(Started { pid, comm, session, home_link, steps }) => {
            node.set_outcome(id, Outcome::Running);
            tracing::info!(
                "migration {id:#x} from {source}: {comm} runs here as PID {pid} (home {} PID {}); {steps}",
                offer.home.node,
                offer.home.pid
            );
            let home_link = match fault_point(node, "running", &mut tx) {
                // The source is left in doubt and asks (`Query`); the relay
                // attaches to the home by itself.
                Err(_) => home_link,
                Ok(()) => {
                    if tx.send(&PeerMsg::Running { pid }).is_err() {
                        tracing::warn!("migration {id:#x}: the source left before it heard that PID {pid} runs");
                    }
                    if tx.corrupted() {
                        // The source rejects this link and asks, as above.
                        home_link
                    } else {
                        // When the source is the home, this link is the home link.
                        home_link.or(Some(relay::HomeLink::Remote(rx, tx)))
                    }
                }
            };
            relay::start(node, pid, offer.home, session, home_link);
        }
        Err(e) => {
            node.set_outcome(id, Outcome::Aborted);
            tracing::warn!("migration {id:#x} from {source} failed: {e}");
            let _ = tx.send(&PeerMsg::Refused { reason: e.to_string() });
        }
    }
}

struct Started {
    pid: u32,
    /// From the image (the offer comes before the capture).
    comm: String,
    session: relay::Session,
    /// The link to the home made for this process, unless the source is the
    /// home (then the migration link becomes the home link).
    home_link: Option<relay::HomeLink>,
    steps: Steps,
}

/// How long the steps of a restore took here, for the log.
#[derive(Debug, Default)]
struct Steps {
    /// The agent laying the process's memory out ahead, while pages
    /// arrived (if the source sent a layout and it worked).
    laid_out: Option<Duration>,
    /// The agent building the process from the image.
    prepare: Duration,
    /// Writing the pages into its frames after `Commit`.
    write: Duration,
    /// The agent finishing and starting it.
    finish: Duration,
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(laid_out) = self.laid_out {
            write!(f, "laid out ahead in {laid_out:?}, ")?;
        }
        write!(f, "prepared in {:?}, pages written in {:?}, finished in {:?}", self.prepare, self.write, self.finish)
    }
}

fn run(
    node: &Arc<MigrationNode>,
    source: &str,
    offer: &Offer,
    rx: &mut SyncReader,
    tx: &mut SyncWriter,
) -> Result<Started, Error> {
    offer.validate()?;
    if node.cluster.is_blocked() {
        return Err(Error::Blocked(node.name.clone()));
    }
    // Other incoming migrations may leave too little room for this one's
    // pages: refused before the source sends any.
    node.page_budget.check_room(PAGES_PER_BATCH)?;
    fault_point(node, "offer", tx)?;
    tx.send(&PeerMsg::Accepted)?;
    // The child the process will be built in is started now, while the
    // source still copies pages or captures the process (~0.2 s of guest
    // work where its kernel is emulated). From here on an error drops
    // `agent`: the agent kills the child.
    let mut agent = node.agent()?;
    agent.start_restore(true).map_err(Error::Agent)?;
    let limit = crate::guest_ram::ram_frames(&node.memory) as usize;
    let mut store = PageStore::new(limit, node.page_budget.clone());
    let mut agent = Some(agent);
    // The agent laying the memory out, on its own thread.
    let mut laying: Option<thread::JoinHandle<_>> = None;
    let mut prepared = None;
    let mut steps = Steps::default();
    loop {
        if laying.as_ref().is_some_and(thread::JoinHandle::is_finished) {
            agent = laying.take().map(|laying| joined(laying, &mut steps, offer.id));
            tx.send(&PeerMsg::LaidOut)?;
        }
        let (msg, data) = match rx.recv(if laying.is_some() { LAYOUT_POLL } else { IDLE_TIMEOUT }) {
            Ok(Some(received)) => received,
            Ok(None) => return Err(Error::PeerClosed),
            Err(Error::PeerTimeout(_)) if laying.is_some() => continue,
            Err(e) => return Err(e),
        };
        match msg {
            PeerMsg::Pages { vaddrs } => receive_pages(&mut store, &vaddrs, data)?,
            PeerMsg::Layout(layout) => {
                layout.validate(limit as u64)?;
                let Some(mut agent) = agent.take() else {
                    return Err(Error::unexpected("Pages, Image or Commit", &PeerMsg::Layout(layout)));
                };
                let started = Instant::now();
                let lay_out = move || {
                    let result = agent.pre_layout(layout);
                    (agent, result, started.elapsed())
                };
                laying = Some(thread::Builder::new().name("pre-layout".into()).spawn(lay_out).map_err(Error::Thread)?);
            }
            PeerMsg::Image { image } => {
                // A source that stopped waiting for the layout: it is
                // finished first.
                let mut agent = match (agent.take(), laying.take()) {
                    (Some(agent), _) => agent,
                    (None, Some(laying)) => joined(laying, &mut steps, offer.id),
                    (None, None) => return Err(Error::unexpected("Pages or Commit", &PeerMsg::Image { image })),
                };
                let started = Instant::now();
                let parsed = ProcessImage::from_bytes(&image).map_err(Error::BadImage)?;
                let (_, targets) = agent.prepare_restore(image, true, true).map_err(Error::Agent)?;
                let targets = frames::resolve(&node.memory, targets)?;
                frames::check_order(&targets, &parsed.pages)?;
                frames::check_frames(&node.memory, &targets)?;
                prepared = Some((agent, targets, parsed.comm));
                steps.prepare = started.elapsed();
                fault_point(node, "image", tx)?;
            }
            PeerMsg::Commit => {
                let Some((agent, targets, comm)) = prepared else {
                    return Err(Error::unexpected("Image", &PeerMsg::Commit));
                };
                let started = Instant::now();
                write_received(&node.memory, &store, &targets)?;
                steps.write = started.elapsed();
                let home_link = if source == offer.home.node {
                    None
                } else {
                    Some(relay::attach_home(node, &offer.home)?)
                };
                fault_point(node, "commit", tx)?;
                if !node.begin_commit(offer.id) {
                    return Err(Error::Refused("the source gave the migration up".into()));
                }
                let started = Instant::now();
                let session = agent.finish_restore_streaming().map_err(Error::Agent)?;
                steps.finish = started.elapsed();
                return Ok(Started { pid: session.pid(), comm, session, home_link, steps });
            }
            other => return Err(Error::unexpected("Pages, Image or Commit", &other)),
        }
    }
}

/// The agent back from a finished (or finishing) layout; its outcome goes
/// into `steps` or the log (a failed layout only means the restore builds
/// all of the process).
fn joined(
    laying: thread::JoinHandle<(Agent, Result<(), pmivmm_proto::ClientError>, Duration)>,
    steps: &mut Steps,
    id: u64,
) -> Agent {
    let (agent, result, took) = laying.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    match result {
        Ok(()) => steps.laid_out = Some(took),
        Err(e) => tracing::warn!("migration {id:#x}: laying the process out ahead failed ({e}); the restore builds all of it"),
    }
    agent
}

/// Checks and keeps one `Pages` message (its data buffer as it is).
pub fn receive_pages(store: &mut PageStore, vaddrs: &[u64], data: Vec<u8>) -> Result<(), Error> {
    check_pages(vaddrs, &data)?;
    Ok(store.insert(vaddrs, data)?)
}

/// Writes the received pages into the frames the agent reported (all
/// frames checked, and all pages found, before anything is written), in
/// the order the store holds them. The process is frozen meanwhile, so
/// large writes are shared among the host's CPUs.
pub fn write_received(memory: &GuestMemoryMmap, store: &PageStore, targets: &[PageRef]) -> Result<(), Error> {
    frames::check_frames(memory, targets)?;
    let pages = store.in_store_order(targets, |p| p.vaddr)?;
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let writers = cpus.min(1 + pages.len() / MIN_PAGES_PER_WRITER);
    let share = pages.len().div_ceil(writers).max(1);
    thread::scope(|s| {
        let parts = pages
            .chunks(share)
            .map(|part| {
                thread::Builder::new()
                    .name("write-pages".into())
                    .spawn_scoped(s, move || part.iter().try_for_each(|(p, data)| frames::write_page(memory, p, data)))
                    .map_err(Error::Thread)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for part in parts {
            part.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(())
    })
}
