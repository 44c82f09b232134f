//! The home side of a migrated process: its deputy.
//!
//! The deputy is the frozen original, held by the guest agent (see
//! `Request::BecomeDeputy`). This module feeds it what the process's host
//! relays (output, exit status) and sends the signals it receives to that
//! host. Hosts attach and leave as the process moves on: a process moving
//! from n2 to n3 has both links for a moment (n3 attaches before n2 hands
//! off). When no host is attached for [`REATTACH_GRACE`], the process is
//! lost (its host died) and the deputy is killed, so that its parent learns
//! of it instead of waiting forever.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pmivmm_proto::{DeputyControl, DeputyEvent, DeputyEvents, ExitStatus};

use super::link::{SyncReader, SyncWriter};
use super::protocol::{check_output_fd, PeerMsg};
use super::{Error, MigrationNode};
use crate::devices::lock;

/// How long a deputy waits for a host to (re-)attach.
const REATTACH_GRACE: Duration = Duration::from_secs(45);
/// A relay link may be silent this long (a process printing nothing).
const LINK_IDLE: Duration = Duration::from_secs(3600);

/// What the process's hosts report.
pub enum RelayEvent {
    /// A host attached.
    Attached,
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
    /// The event a relay message carries; `None` for anything else (or an
    /// output fd other than 1 and 2).
    pub fn from_peer(msg: PeerMsg, data: Vec<u8>) -> Option<RelayEvent> {
        match msg {
            PeerMsg::Output { fd } if check_output_fd(fd).is_ok() => Some(RelayEvent::Output { fd, data }),
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
    events: Mutex<Sender<RelayEvent>>,
    /// Where signals go: one route per attached host, newest last.
    routes: Mutex<Vec<Sender<ToHost>>>,
}

impl DeputyHandle {
    pub fn deliver(&self, event: RelayEvent) {
        let _ = lock(&self.events).send(event);
    }

    /// The process runs at home again (as another local process).
    pub fn attach_local(&self, signals: Sender<ToHost>) {
        lock(&self.routes).push(signals);
        self.deliver(RelayEvent::Attached);
    }

    /// A host attached over a peer link.
    pub fn attach_remote(self: &Arc<Self>, mut rx: SyncReader, mut tx: SyncWriter) -> Result<(), Error> {
        let (signals, pending) = mpsc::channel::<ToHost>();
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
                                tracing::warn!("deputy {pid}: unexpected {name} on its relay link; ignored");
                                continue;
                            }
                        }
                    }
                    Err(Error::PeerTimeout(_)) => continue,
                    Ok(None) | Err(_) => RelayEvent::LinkLost,
                };
                // After these the link carries nothing more.
                let last = !matches!(event, RelayEvent::Output { .. });
                me.deliver(event);
                if last {
                    return;
                }
            })
            .map_err(Error::Thread)?;
        lock(&self.routes).push(signals);
        self.deliver(RelayEvent::Attached);
        Ok(())
    }

    /// Sends `request` to the newest host still reachable.
    pub fn to_host(&self, request: ToHost) {
        let mut routes = lock(&self.routes);
        while let Some(route) = routes.last() {
            if route.send(request).is_ok() {
                return;
            }
            routes.pop();
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
/// host at the other end of `link` (`None`: the host attaches later).
pub fn start(
    node: &Arc<MigrationNode>,
    token: u64,
    pid: u32,
    events: Events,
    control: Control,
    link: Option<(SyncReader, SyncWriter)>,
) -> Result<(), Error> {
    let (tx, rx) = mpsc::channel();
    let handle = Arc::new(DeputyHandle { pid, events: Mutex::new(tx), routes: Mutex::default() });
    lock(&node.deputies).insert(token, handle.clone());
    if let Some((r, w)) = link {
        handle.attach_remote(r, w)?;
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

fn run(pid: u32, rx: Receiver<RelayEvent>, mut control: Control) {
    let mut hosts = 0usize;
    let mut alone_since = Some(Instant::now());
    loop {
        let event = match alone_since {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => rx.recv_timeout(REATTACH_GRACE.saturating_sub(t.elapsed())),
        };
        let result = match event {
            Ok(RelayEvent::Attached) => {
                hosts += 1;
                Ok(())
            }
            Ok(RelayEvent::Output { fd, data }) => control.output(fd, &data),
            Ok(RelayEvent::Exited(status)) => {
                tracing::info!("migrated PID {pid} ended ({status}); its deputy ends the same way");
                if let Err(e) = control.exit(status) {
                    tracing::error!("deputy {pid}: cannot end it: {e}");
                }
                return;
            }
            Ok(RelayEvent::Handoff | RelayEvent::LinkLost) => {
                hosts = hosts.saturating_sub(1);
                Ok(())
            }
            Err(_) => {
                tracing::error!(
                    "migrated PID {pid}: no host has been attached for {REATTACH_GRACE:?}, the process is lost; \
                     killing its deputy"
                );
                let _ = control.exit(ExitStatus::Signal { signal: libc::SIGKILL, core_dumped: false });
                return;
            }
        };
        if let Err(e) = result {
            tracing::warn!("deputy {pid}: {e}");
        }
        alone_since = match (hosts, alone_since) {
            (0, None) => Some(Instant::now()),
            (0, since) => since,
            _ => None,
        };
    }
}
