//! Accepts peer links: authenticates each (see [`crate::peer`]) and hands
//! its conversation to the migration code by its first message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::link::{self, SyncReader, SyncWriter};
use super::protocol::PeerMsg;
use super::{target, Error, MigrationNode};
use crate::devices::lock;
use crate::peer::PeerLink;

/// Peer links served at once; more wait in the listen backlog.
const MAX_LINKS: usize = 64;
/// How long a new link may take to authenticate and say what it wants.
const OPENING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an `Attach` waits for its deputy to appear (the source makes
/// the deputy only after the target has answered).
const ATTACH_WAIT: Duration = Duration::from_secs(30);

/// Serves peer links on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, node: Arc<MigrationNode>) {
    let slots = Arc::new(Semaphore::new(MAX_LINKS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, peer_addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("peer listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let link = match PeerLink::accept(stream, &node.key, &node.name, OPENING_TIMEOUT).await {
                Ok(link) => link,
                Err(e) => {
                    tracing::warn!("peer link from {peer_addr} refused: {e}");
                    return;
                }
            };
            let (peer, rx, tx) = link::split(&node.rt, link);
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = converse(&node, peer.clone(), rx, tx) {
                    tracing::warn!("peer link from {peer} ({peer_addr}): {e}");
                }
            })
            .await;
            drop(permit);
        });
    }
}

/// Runs the conversation the link's first message opens.
fn converse(node: &Arc<MigrationNode>, peer: String, mut rx: SyncReader, mut tx: SyncWriter) -> Result<(), Error> {
    let (first, _) = rx.expect(OPENING_TIMEOUT)?;
    match first {
        PeerMsg::Offer(offer) => {
            target::receive(node, peer, offer, rx, tx);
            Ok(())
        }
        PeerMsg::Attach { token } => {
            let deadline = Instant::now() + ATTACH_WAIT;
            let deputy = loop {
                match node.deputy(token) {
                    Ok(d) => break d,
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            tracing::info!("{peer} now runs the process of deputy PID {}", deputy.pid);
            deputy.attach_remote(peer, rx, tx)
        }
        PeerMsg::Query { id } => {
            let running = node.outcome(id);
            tracing::info!("{peer} asked for the outcome of migration {id:#x}: running={running}");
            tx.send(&PeerMsg::Outcome { running })
        }
        PeerMsg::Gossip { members } => {
            let now = Instant::now();
            let ours = {
                let mut table = lock(&node.cluster.table);
                if let Err(e) = table.merge(&members, now) {
                    tracing::warn!("cluster: table from {peer} refused: {e}");
                }
                table.gossip(now)
            };
            tx.send(&PeerMsg::Gossip { members: ours })
        }
        other => Err(Error::unexpected("Offer, Attach, Query or Gossip", &other)),
    }
}
