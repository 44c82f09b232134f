//! The host side of a migrated process: its output and exit go to its home,
//! signals from its home reach it.
//!
//! The home link is a peer link (the migration link when the process came
//! straight from home, else a link this node opened with `Attach`), or the
//! deputy itself when the process runs at home again. A remote home link
//! that breaks is re-attached for a while; a process whose home cannot be
//! reached any more is killed (its parent and terminal are gone).
//!
//! Requests from the home wait in a queue of
//! [`MAX_PENDING_REQUESTS`](deputy::MAX_PENDING_REQUESTS); while it is full
//! (a slow move home, say), the home link is not read and its sender waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pmivmm_proto::{ExecEvent, ExecOutput, ExitStatus};

use super::deputy::{self, DeputyHandle, HostId, RelayEvent, ToHost};
use super::link::{self, SyncReader, SyncWriter};
use super::protocol::{check_signal, HomeRef, PeerMsg, MAX_OUTPUT_DATA};
use super::{source, Error, MigrationNode};
use crate::devices::lock;

/// The agent stream of a restored process: its output and exit status.
pub type Session = pmivmm_proto::ExecSession<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream>;

/// How long a broken home link is re-attached before the process is killed.
const REATTACH_FOR: Duration = Duration::from_secs(30);
/// A home link idles at most this long (signals are rare; the reader just
/// waits again).
const HOME_IDLE: Duration = Duration::from_secs(3600);

/// A migrated process running here.
#[derive(Clone)]
pub struct RelayHandle {
    pub home: HomeRef,
    /// When it arrived.
    pub arrived: Instant,
    /// Set before the process is killed because it moved on.
    moving_away: Arc<AtomicBool>,
}

/// How this node reaches the home of a process.
#[allow(clippy::large_enum_variant, reason = "one per relayed process, moved a few times in its life")]
pub enum HomeLink {
    Remote(SyncReader, SyncWriter),
    /// The process runs at home: its deputy is here.
    Local(Arc<DeputyHandle>),
}

impl MigrationNode {
    /// The home of `pid` if it migrated here.
    pub fn relay_home(&self, pid: u32) -> Option<HomeRef> {
        lock(&self.relays).get(&pid).map(|r| r.home.clone())
    }

    /// Whether `pid` migrated here less than `within` ago.
    pub fn arrived_within(&self, pid: u32, within: Duration) -> bool {
        lock(&self.relays).get(&pid).is_some_and(|r| r.arrived.elapsed() < within)
    }

    /// PIDs of the processes that migrated here.
    pub fn visitors(&self) -> Vec<u32> {
        lock(&self.relays).keys().copied().collect()
    }

    /// Marks `pid` as leaving: its coming death is a handoff.
    pub fn relay_moving_away(&self, pid: u32) {
        if let Some(r) = lock(&self.relays).get(&pid) {
            r.moving_away.store(true, Ordering::SeqCst);
        }
    }
}

/// Opens the home link of a process arriving from a node that is not its
/// home.
pub fn attach_home(node: &Arc<MigrationNode>, home: &HomeRef) -> Result<HomeLink, Error> {
    if home.node == node.name {
        return node.deputy(home.token).map(HomeLink::Local);
    }
    let (_, rx, mut tx) = link::connect(&node.rt, &home.addr, &node.key, &node.name)?;
    tx.send(&PeerMsg::Attach { token: home.token })?;
    Ok(HomeLink::Remote(rx, tx))
}

/// Where output and exit go.
enum HomeSink {
    /// The current remote home link; `None` while it is being re-attached.
    Remote(Arc<Mutex<Option<SyncWriter>>>),
    Local(Arc<DeputyHandle>, HostId),
}

impl HomeSink {
    /// Sends to the home, waiting (and so holding the process back, through
    /// its full pipe) while a broken link is re-attached.
    fn send(&self, msg: PeerMsg, data: Vec<u8>) -> Result<(), Error> {
        match self {
            HomeSink::Remote(w) => {
                let deadline = Instant::now() + REATTACH_FOR;
                loop {
                    if let Some(writer) = lock(w).as_mut() {
                        match writer.send_data(&msg, &data[..]) {
                            Ok(()) => return Ok(()),
                            Err(e) if Instant::now() >= deadline => return Err(e),
                            Err(_) => {}
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::PeerClosed);
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            }
            HomeSink::Local(d, host) => {
                if let Some(event) = RelayEvent::from_peer(msg, data) {
                    d.deliver(*host, event);
                }
                Ok(())
            }
        }
    }
}

/// Relays process `pid` (restored here from `home`) until it ends. Without
/// a `link`, the home is attached first.
pub fn start(node: &Arc<MigrationNode>, pid: u32, home: HomeRef, session: Session, link: Option<HomeLink>) {
    let moving_away = Arc::new(AtomicBool::new(false));
    let handle = RelayHandle { home: home.clone(), arrived: Instant::now(), moving_away: moving_away.clone() };
    lock(&node.relays).insert(pid, handle);
    let (signals_tx, signals_rx) = mpsc::sync_channel(deputy::MAX_PENDING_REQUESTS);
    let sink = match link {
        Some(HomeLink::Local(deputy)) => {
            let host = deputy.attach_local(node.name.clone(), signals_tx);
            HomeSink::Local(deputy, host)
        }
        remote => {
            let (rx, tx) = match remote {
                Some(HomeLink::Remote(rx, tx)) => (Some(rx), Some(tx)),
                _ => (None, None),
            };
            let writer = Arc::new(Mutex::new(tx));
            spawn_home_reader(node.clone(), pid, home.clone(), rx, writer.clone(), signals_tx);
            HomeSink::Remote(writer)
        }
    };
    spawn_requests(node.clone(), pid, home.clone(), signals_rx);
    let (output, _stdin) = session.split();
    let node = node.clone();
    let spawned = thread::Builder::new()
        .name(format!("relay-{pid}"))
        .spawn(move || relay_output(&node, pid, output, &sink, &moving_away));
    if let Err(e) = spawned {
        tracing::error!("cannot start the relay of PID {pid}: {e}");
    }
}

fn relay_output(
    node: &MigrationNode,
    pid: u32,
    mut output: ExecOutput<std::os::unix::net::UnixStream>,
    sink: &HomeSink,
    moving_away: &AtomicBool,
) {
    let mut home_ok = true;
    let end = loop {
        let event = match output.next_event() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("lost the agent stream of migrated PID {pid}: {e}");
                break ExitStatus::Signal { signal: libc::SIGKILL, core_dumped: false };
            }
        };
        let (fd, data) = match event {
            ExecEvent::Stdout(d) => (1, d),
            ExecEvent::Stderr(d) => (2, d),
            ExecEvent::Exited(status) => break status,
        };
        if home_ok {
            if let Err(e) = output_pieces(data).into_iter().try_for_each(|d| sink.send(PeerMsg::Output { fd }, d)) {
                tracing::warn!("migrated PID {pid}: output lost, home link: {e}");
                home_ok = false;
            }
        }
    };
    lock(&node.relays).remove(&pid);
    let last = if moving_away.load(Ordering::SeqCst) { PeerMsg::Handoff } else { PeerMsg::Exited(end) };
    tracing::info!("migrated PID {pid} ended here ({})", last.name());
    if let Err(e) = sink.send(last, Vec::new()) {
        tracing::warn!("migrated PID {pid}: could not tell its home that it ended: {e}");
    }
}

/// `data` in the pieces a deputy accepts: [`MAX_OUTPUT_DATA`] bytes at most
/// (what the agent reads from a pipe at once).
fn output_pieces(data: Vec<u8>) -> Vec<Vec<u8>> {
    if data.len() <= MAX_OUTPUT_DATA {
        return vec![data];
    }
    data.chunks(MAX_OUTPUT_DATA).map(<[u8]>::to_vec).collect()
}

/// Reads signals from a remote home link (attaching first without one);
/// re-attaches when it breaks, and kills the process when its home is gone
/// for good.
fn spawn_home_reader(
    node: Arc<MigrationNode>,
    pid: u32,
    home: HomeRef,
    mut rx: Option<SyncReader>,
    writer: Arc<Mutex<Option<SyncWriter>>>,
    signals: SyncSender<ToHost>,
) {
    let run = move || loop {
        let received = match rx.as_mut() {
            Some(r) => r.recv(HOME_IDLE),
            None => Ok(None),
        };
        match received {
            Ok(Some((PeerMsg::Signal { signal }, _))) if check_signal(signal).is_ok() => {
                if signals.send(ToHost::Signal(signal)).is_err() {
                    return; // the process ended
                }
            }
            Ok(Some((PeerMsg::ComeHome, _))) => {
                if signals.send(ToHost::ComeHome).is_err() {
                    return;
                }
            }
            Ok(Some((other, _))) => {
                tracing::warn!("home {} sent {} on a relay link; ignored", home.node, other.name());
            }
            Err(Error::PeerTimeout(_)) => {}
            Ok(None) | Err(_) => {
                *lock(&writer) = None;
                if rx.is_some() && !lock(&node.relays).contains_key(&pid) {
                    return; // the process ended (or moved on) and its link closed
                }
                match reattach(&node, &home) {
                    Some((new_rx, new_tx)) => {
                        rx = Some(new_rx);
                        *lock(&writer) = Some(new_tx);
                    }
                    None => {
                        tracing::error!(
                            "the home {} of migrated PID {} is unreachable for {REATTACH_FOR:?}; killing it",
                            home.node,
                            home.pid
                        );
                        let _ = signals.send(ToHost::Signal(libc::SIGKILL));
                        return;
                    }
                }
            }
        }
    };
    if let Err(e) = thread::Builder::new().name("relay-home".into()).spawn(run) {
        tracing::error!("cannot start a home link reader: {e}");
    }
}

fn reattach(node: &Arc<MigrationNode>, home: &HomeRef) -> Option<(SyncReader, SyncWriter)> {
    let deadline = Instant::now() + REATTACH_FOR;
    while Instant::now() < deadline {
        match attach_home(node, home) {
            Ok(HomeLink::Remote(rx, tx)) => return Some((rx, tx)),
            Ok(HomeLink::Local(_)) => return None,
            Err(e) => tracing::warn!("re-attaching to home {}: {e}", home.node),
        }
        thread::sleep(Duration::from_secs(1));
    }
    None
}

/// Carries out what the home asks for `pid`: signals, and going home.
fn spawn_requests(node: Arc<MigrationNode>, pid: u32, home: HomeRef, requests: Receiver<ToHost>) {
    let run = move || {
        for request in requests.iter() {
            let done = match request {
                ToHost::Signal(signal) => node.agent().and_then(|mut a| a.kill(pid, signal).map_err(Error::Agent)),
                ToHost::ComeHome if home.node == node.name => Ok(()),
                ToHost::ComeHome => source::migrate(&node, pid, &home.addr, source::Options { precopy: true }).map(drop),
            };
            if let Err(e) = done {
                tracing::warn!("{request:?} for migrated PID {pid}: {e}");
            }
        }
    };
    if let Err(e) = thread::Builder::new().name(format!("requests-{pid}")).spawn(run) {
        tracing::error!("cannot start the request handler of PID {pid}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_goes_home_in_pieces_a_deputy_accepts() {
        assert_eq!(output_pieces(b"tick\n".to_vec()), vec![b"tick\n".to_vec()]);
        let big: Vec<u8> = (0..MAX_OUTPUT_DATA * 2 + 5).map(|i| i as u8).collect();
        let pieces = output_pieces(big.clone());
        assert_eq!(pieces.iter().map(Vec::len).collect::<Vec<_>>(), [MAX_OUTPUT_DATA, MAX_OUTPUT_DATA, 5]);
        assert_eq!(pieces.concat(), big);
    }
}
