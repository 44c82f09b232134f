//! The home side of a migrated process: its deputy.
//!
//! The deputy is the frozen original, held by the guest agent (see
//! `Request::BecomeDeputy`). This module feeds it what the process's host
//! relays (output, exit status) and sends the signals it receives to that
//! host. Hosts attach and leave as the process moves on: a process moving
//! from n2 to n3 has both links for a moment (n3 attaches before n2 hands
//! off). Output reaches home in the order the process wrote it: a newer
//! host's output is held back until the older hosts have handed off (or
//! their links broke), up to [`MAX_HELD`] bytes. Both ways are bounded:
//! what hosts report waits in a queue of [`EVENT_QUEUE`] events (a full
//! queue stops the link readers, so the hosts' relays, and through their
//! pipes the process, wait for the deputy), and requests for a host in a
//! queue of [`MAX_PENDING_REQUESTS`] (beyond that a request is dropped with
//! a warning, as the kernel merges a pending signal sent again). When no
//! host is attached for [`REATTACH_GRACE`], the process is lost (its host
//! died) and the deputy is killed, so that its parent learns of it instead
//! of waiting forever.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pmivmm_proto::{DeputyControl, DeputyEvent, DeputyEvents, ExitStatus};

use super::link::{SyncReader, SyncWriter};
use super::protocol::{check_output, PeerMsg};
use super::{Error, MigrationNode};
use crate::devices::lock;

/// How long a deputy waits for a host to (re-)attach.
const REATTACH_GRACE: Duration = Duration::from_secs(45);
/// A relay link may be silent this long (a process printing nothing).
const LINK_IDLE: Duration = Duration::from_secs(3600);
/// Output of newer hosts held back while an older host has not handed off;
/// beyond this it is written out of order rather than kept.
const MAX_HELD: usize = 1 << 20;
/// Events from the hosts waiting for the deputy: with output of at most
/// [`MAX_OUTPUT_DATA`](super::protocol::MAX_OUTPUT_DATA) an event, 4 MiB.
const EVENT_QUEUE: usize = 64;
/// Requests (signals, going home) waiting to be sent to one host, or to be
/// carried out by the host's relay.
pub const MAX_PENDING_REQUESTS: usize = 64;

/// One attachment of a host to a deputy; later attachments have larger ids.
pub type HostId = u64;

/// What the process's hosts report.
pub enum RelayEvent {
    /// A host attached: the process runs on node `node` now.
    Attached { node: String },
    Output { fd: u8, data: Vec<u8> },
    Exited(ExitStatus),
    /// A host's copy moved on (a new host has attached).
    Handoff,
    /// A host's link broke.
    LinkLost,
}

/// What the home asks of the process's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToHost {
    /// Deliver this signal.
    Signal(i32),
    /// Send the process home.
    ComeHome,
}

impl RelayEvent {
    /// The event a relay message carries; `None` for anything else (or
    /// output refused by [`check_output`]).
    pub fn from_peer(msg: PeerMsg, data: Vec<u8>) -> Option<RelayEvent> {
        match msg {
            PeerMsg::Output { fd } if check_output(fd, &data).is_ok() => Some(RelayEvent::Output { fd, data }),
            PeerMsg::Exited(status) => Some(RelayEvent::Exited(status)),
            PeerMsg::Handoff => Some(RelayEvent::Handoff),
            _ => None,
        }
    }
}

/// A deputy, as the rest of the node sees it.
pub struct DeputyHandle {
    /// The process's PID at home (the deputy's).
    pub pid: u32,
    events: SyncSender<(HostId, RelayEvent)>,
    /// Where signals go: one route per attached host, newest last.
    routes: Mutex<Vec<SyncSender<ToHost>>>,
    next_host: AtomicU64,
}

impl DeputyHandle {
    /// A deputy for `pid`, and the queue of what its hosts report.
    fn new(pid: u32) -> (Self, Receiver<(HostId, RelayEvent)>) {
        let (events, rx) = mpsc::sync_channel(EVENT_QUEUE);
        (DeputyHandle { pid, events, routes: Mutex::default(), next_host: AtomicU64::new(0) }, rx)
    }

    /// Queues `event` for the deputy, waiting while the queue is full.
    pub fn deliver(&self, host: HostId, event: RelayEvent) {
        let _ = self.events.send((host, event));
    }

    /// A new host, node `node`: `Attached` goes before anything the host
    /// reports.
    fn attach(&self, node: String, signals: SyncSender<ToHost>) -> HostId {
        let host = self.next_host.fetch_add(1, Ordering::SeqCst);
        self.deliver(host, RelayEvent::Attached { node });
        lock(&self.routes).push(signals);
        host
    }

    /// The process runs at home, node `node`, again (as another local
    /// process); its events are delivered with the returned id.
    pub fn attach_local(&self, node: String, signals: SyncSender<ToHost>) -> HostId {
        self.attach(node, signals)
    }

    /// Node `node` attached over a peer link as the process's host.
    pub fn attach_remote(self: &Arc<Self>, node: String, mut rx: SyncReader, mut tx: SyncWriter) -> Result<(), Error> {
        let (signals, pending) = mpsc::sync_channel::<ToHost>(MAX_PENDING_REQUESTS);
        let pid = self.pid;
        thread::Builder::new()
            .name(format!("deputy-sig-{pid}"))
            .spawn(move || {
                for request in pending.iter() {
                    let msg = match request {
                        ToHost::Signal(signal) => PeerMsg::Signal { signal },
                        ToHost::ComeHome => PeerMsg::ComeHome,
                    };
                    if let Err(e) = tx.send(&msg) {
                        tracing::warn!("deputy {pid}: {request:?} not sent: {e}");
                        return;
                    }
                }
            })
            .map_err(Error::Thread)?;
        let host = self.attach(node, signals);
        let me = self.clone();
        thread::Builder::new()
            .name(format!("deputy-link-{pid}"))
            .spawn(move || loop {
                let event = match rx.recv(LINK_IDLE) {
                    Ok(Some((msg, data))) => {
                        let name = msg.name();
                        match RelayEvent::from_peer(msg, data) {
                            Some(event) => event,
                            None => {
                                tracing::warn!(
                                    "deputy {pid}: unexpected or invalid {name} on its relay link (an Output's fd \
                                     or size); dropped"
                                );
                                continue;
                            }
                        }
                    }
                    Err(Error::PeerTimeout(_)) => continue,
                    Ok(None) | Err(_) => RelayEvent::LinkLost,
                };
                // After these the link carries nothing more.
                let last = !matches!(event, RelayEvent::Output { .. });
                me.deliver(host, event);
                if last {
                    return;
                }
            })
            .map_err(|e| {
                self.deliver(host, RelayEvent::LinkLost);
                Error::Thread(e)
            })?;
        Ok(())
    }

    /// Sends `request` to the newest host still reachable, never waiting: a
    /// request beyond [`MAX_PENDING_REQUESTS`] not yet sent is dropped.
    pub fn to_host(&self, request: ToHost) {
        let mut routes = lock(&self.routes);
        while let Some(route) = routes.last() {
            match route.try_send(request) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(
                        "deputy {}: {request:?} dropped, {MAX_PENDING_REQUESTS} requests for its host are pending",
                        self.pid
                    );
                    return;
                }
                Err(TrySendError::Disconnected(_)) => routes.pop(),
            };
        }
        tracing::warn!("deputy {}: {request:?} has no host to go to", self.pid);
    }
}

impl MigrationNode {
    /// The deputy with this token.
    pub fn deputy(&self, token: u64) -> Result<Arc<DeputyHandle>, Error> {
        lock(&self.deputies).get(&token).cloned().ok_or(Error::NoDeputy(token))
    }

    /// Asks the hosts of all processes that started here to send them home.
    pub fn bring_home(&self) -> usize {
        let deputies: Vec<Arc<DeputyHandle>> = lock(&self.deputies).values().cloned().collect();
        for d in &deputies {
            d.to_host(ToHost::ComeHome);
        }
        deputies.len()
    }
}

type Events = DeputyEvents<UnixStream>;
type Control = DeputyControl<UnixStream>;

/// Starts the deputy of `pid` (token `token`), whose process now runs on the
/// host at the other end of `link`, named with it (`None`: the host
/// attaches later).
pub fn start(
    node: &Arc<MigrationNode>,
    token: u64,
    pid: u32,
    events: Events,
    control: Control,
    link: Option<(String, SyncReader, SyncWriter)>,
) -> Result<(), Error> {
    let (handle, rx) = DeputyHandle::new(pid);
    let handle = Arc::new(handle);
    lock(&node.deputies).insert(token, handle.clone());
    if let Some((host, r, w)) = link {
        handle.attach_remote(host, r, w)?;
    }
    let signals = handle.clone();
    thread::Builder::new()
        .name(format!("deputy-ev-{pid}"))
        .spawn(move || forward_signals(events, &signals))
        .map_err(Error::Thread)?;
    let node = node.clone();
    thread::Builder::new()
        .name(format!("deputy-{pid}"))
        .spawn(move || {
            run(pid, rx, control);
            lock(&node.deputies).remove(&token);
        })
        .map_err(Error::Thread)?;
    Ok(())
}

fn forward_signals(mut events: Events, handle: &DeputyHandle) {
    loop {
        match events.next_event() {
            Ok(DeputyEvent::Signal(signal)) => handle.to_host(ToHost::Signal(signal)),
            Ok(DeputyEvent::Ended) => return,
            Err(e) => {
                tracing::debug!("deputy {}: agent stream ended: {e}", handle.pid);
                return;
            }
        }
    }
}

/// Output of the process: its fd (1 or 2) and the bytes.
type Output = (u8, Vec<u8>);

/// The attached hosts, oldest first, each with the output it sent while an
/// older host was still attached.
#[derive(Default)]
struct Hosts {
    attached: Vec<(HostId, Vec<Output>)>,
    held: usize,
}

impl Hosts {
    /// Output of `host`: what to write now (its own, if it is the oldest).
    fn output(&mut self, host: HostId, fd: u8, data: Vec<u8>) -> Vec<Output> {
        match self.attached.iter().position(|(h, _)| *h == host) {
            Some(0) => vec![(fd, data)],
            Some(i) if self.held + data.len() <= MAX_HELD => {
                self.held += data.len();
                self.attached[i].1.push((fd, data));
                Vec::new()
            }
            // A host not attached (any more), or too much held back:
            // everything held first, then this.
            _ => {
                let mut out = self.take_held();
                out.push((fd, data));
                out
            }
        }
    }

    /// `host` is gone: the output the next host held back can go.
    fn leave(&mut self, host: HostId) -> Vec<Output> {
        self.attached.retain(|(h, _)| *h != host);
        match self.attached.first_mut() {
            Some((_, held)) => {
                self.held -= held.iter().map(|(_, d)| d.len()).sum::<usize>();
                std::mem::take(held)
            }
            None => Vec::new(),
        }
    }

    /// Everything held back, oldest host first.
    fn take_held(&mut self) -> Vec<Output> {
        self.held = 0;
        self.attached.iter_mut().flat_map(|(_, held)| std::mem::take(held)).collect()
    }
}

fn run(pid: u32, rx: Receiver<(HostId, RelayEvent)>, mut control: Control) {
    let mut hosts = Hosts::default();
    let mut alone_since = Some(Instant::now());
    loop {
        let event = match alone_since {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => rx.recv_timeout(REATTACH_GRACE.saturating_sub(t.elapsed())),
        };
        let write = match event {
            Ok((host, RelayEvent::Attached { node })) => {
                hosts.attached.push((host, Vec::new()));
                if let Err(e) = control.moved(&node) {
                    tracing::warn!("deputy {pid}: cannot tell the agent that the process runs on {node} now: {e}");
                }
                Vec::new()
            }
            Ok((host, RelayEvent::Output { fd, data })) => hosts.output(host, fd, data),
            Ok((_, RelayEvent::Exited(status))) => {
                write_output(pid, &mut control, hosts.take_held());
                tracing::info!("migrated PID {pid} ended ({status}); its deputy ends the same way");
                if let Err(e) = control.exit(status) {
                    tracing::error!("deputy {pid}: cannot end it: {e}");
                }
                return;
            }
            Ok((host, RelayEvent::Handoff | RelayEvent::LinkLost)) => hosts.leave(host),
            Err(_) => {
                tracing::error!(
                    "migrated PID {pid}: no host has been attached for {REATTACH_GRACE:?}, the process is lost; \
                     killing its deputy"
                );
                let _ = control.exit(ExitStatus::Signal { signal: libc::SIGKILL, core_dumped: false });
                return;
            }
        };
        write_output(pid, &mut control, write);
        alone_since = match (hosts.attached.is_empty(), alone_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, since) => since,
        };
    }
}

fn write_output(pid: u32, control: &mut Control, output: Vec<Output>) {
    for (fd, data) in output {
        if let Err(e) = control.output(fd, &data) {
            tracing::warn!("deputy {pid}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::MAX_OUTPUT_DATA;

    fn out(fd: u8, s: &str) -> (u8, Vec<u8>) {
        (fd, s.as_bytes().to_vec())
    }

    fn attached(ids: &[HostId]) -> Hosts {
        let mut hosts = Hosts::default();
        hosts.attached.extend(ids.iter().map(|&h| (h, Vec::new())));
        hosts
    }

    #[test]
    fn a_new_hosts_output_waits_for_the_old_hosts_handoff() {
        let mut hosts = attached(&[1, 2]);
        assert!(hosts.output(2, 1, b"new 1\n".to_vec()).is_empty());
        assert_eq!(hosts.output(1, 1, b"old last\n".to_vec()), vec![out(1, "old last\n")]);
        assert!(hosts.output(2, 2, b"new 2\n".to_vec()).is_empty());
        assert_eq!(hosts.leave(1), vec![out(1, "new 1\n"), out(2, "new 2\n")]);
        assert_eq!(hosts.held, 0);
        assert_eq!(hosts.output(2, 1, b"new 3\n".to_vec()), vec![out(1, "new 3\n")]);
    }

    #[test]
    fn held_output_goes_first_at_the_exit_and_beyond_the_limit() {
        let mut hosts = attached(&[1, 2, 3]);
        assert!(hosts.output(3, 1, b"c".to_vec()).is_empty());
        assert!(hosts.output(2, 1, b"b".to_vec()).is_empty());
        assert_eq!(hosts.take_held(), vec![out(1, "b"), out(1, "c")]);
        assert!(hosts.output(2, 1, vec![b'x'; MAX_HELD]).is_empty());
        let flushed = hosts.output(3, 1, b"y".to_vec());
        assert_eq!(flushed, vec![(1, vec![b'x'; MAX_HELD]), out(1, "y")]);
        assert_eq!(hosts.held, 0);
    }

    #[test]
    fn hosts_wait_while_the_deputys_queue_is_full() {
        let (deputy, rx) = DeputyHandle::new(7);
        let deputy = Arc::new(deputy);
        for _ in 0..EVENT_QUEUE {
            deputy.deliver(1, RelayEvent::Output { fd: 1, data: b"x".to_vec() });
        }
        let (done_tx, done) = mpsc::channel();
        let sender = deputy.clone();
        thread::spawn(move || {
            sender.deliver(1, RelayEvent::Handoff);
            done_tx.send(()).unwrap();
        });
        assert!(done.recv_timeout(Duration::from_millis(200)).is_err(), "a full queue took another event");
        assert!(matches!(rx.recv().unwrap(), (1, RelayEvent::Output { .. })));
        done.recv_timeout(Duration::from_secs(10)).expect("the host went on once there was room");
        assert_eq!(rx.try_iter().count(), EVENT_QUEUE);
    }

    #[test]
    fn requests_beyond_the_limit_are_dropped_without_waiting() {
        let (deputy, _events) = DeputyHandle::new(7);
        let (gone, _) = mpsc::sync_channel(MAX_PENDING_REQUESTS);
        let (route, pending) = mpsc::sync_channel(MAX_PENDING_REQUESTS);
        deputy.attach_local("a".into(), route);
        deputy.attach_local("a".into(), gone);
        for signal in 1..=MAX_PENDING_REQUESTS as i32 + 10 {
            deputy.to_host(ToHost::Signal(signal));
        }
        // The newest route was closed: it is dropped, the older one used.
        assert_eq!(lock(&deputy.routes).len(), 1);
        let got: Vec<ToHost> = pending.try_iter().collect();
        assert_eq!(got.len(), MAX_PENDING_REQUESTS);
        assert_eq!(got[0], ToHost::Signal(1));
        assert!(RelayEvent::from_peer(PeerMsg::Output { fd: 1 }, vec![0; MAX_OUTPUT_DATA + 1]).is_none());
    }

    #[test]
    fn output_of_a_host_not_attached_is_written_at_once() {
        let mut hosts = attached(&[4]);
        assert_eq!(hosts.output(9, 2, b"late\n".to_vec()), vec![out(2, "late\n")]);
        let mut none = Hosts::default();
        assert_eq!(none.leave(4), vec![]);
    }
}
