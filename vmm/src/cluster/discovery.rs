//! Multicast discovery (`--discover [GROUP:PORT]`): every [`BEACON_EVERY`]
//! a node sends its [`beacon`] (name and peer address, authenticated with a
//! key derived from the cluster key) to a UDP multicast group on the
//! network of its peer address, and takes the peer address of every valid
//! beacon it hears from another node as a gossip seed for as long as that
//! node's beacons keep coming (see [`super::ClusterState::discovered`]).
//! Gossip's authenticated peer link remains the real check: a beacon only
//! tells a node where to try.
//!
//! The socket is bound to the group (only datagrams sent to it arrive),
//! joined and sending on the interface that holds the node's `--listen`
//! address, with a TTL of 1 (beacons stay on that network) and multicast
//! loopback on (nodes of one host hear each other, on `127.0.0.1` too).

use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};

use super::beacon::{self, BeaconKey};
use super::gossip::ROUND;
use crate::migration::MigrationNode;

/// The group of `--discover` without a value.
pub const DEFAULT_GROUP: &str = "239.77.0.1:7001";
/// How often a node sends its beacon: once per gossip round.
pub const BEACON_EVERY: Duration = ROUND;

/// Parses the GROUP:PORT of `--discover`: an IPv4 multicast group and a port.
pub fn parse_group(s: &str) -> Result<SocketAddrV4, String> {
    let group: SocketAddrV4 = s.parse().map_err(|_| format!("'{s}' is not an IPv4 GROUP:PORT like {DEFAULT_GROUP}"))?;
    if !group.ip().is_multicast() {
        return Err(format!("{} is not an IPv4 multicast group (224.0.0.0/4, e.g. {DEFAULT_GROUP})", group.ip()));
    }
    Ok(group)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--discover needs this node's IPv4 address on the network to discover on, and --listen {0} names none \
         (use --listen ADDR:PORT with that address)"
    )]
    Listen(SocketAddr),
    #[error("cannot open the discovery socket for {group} on {interface}: {source}")]
    Socket { group: SocketAddrV4, interface: Ipv4Addr, source: io::Error },
}

/// A node's discovery socket.
pub struct Discovery {
    socket: UdpSocket,
    group: SocketAddrV4,
    /// The node's peer address, which its beacons announce.
    peer: SocketAddr,
}

impl Discovery {
    /// Joins `group` (see [`parse_group`]) on the interface of `peer`, the
    /// address the node's peer listener is bound to.
    pub fn open(group: SocketAddrV4, peer: SocketAddr) -> Result<Self, Error> {
        let interface = match peer {
            SocketAddr::V4(a) if !a.ip().is_unspecified() => *a.ip(),
            _ => return Err(Error::Listen(peer)),
        };
        let open = || -> io::Result<UdpSocket> {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            // Every node of a host (or network namespace) receives on this port.
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::V4(group).into())?;
            socket.join_multicast_v4(group.ip(), &interface)?;
            socket.set_multicast_if_v4(&interface)?;
            socket.set_multicast_ttl_v4(1)?;
            socket.set_multicast_loop_v4(true)?;
            Ok(socket.into())
        };
        let socket = open().map_err(|source| Error::Socket { group, interface, source })?;
        Ok(Discovery { socket, group, peer })
    }

    /// Sends the node's beacons and takes in the others' on a thread of
    /// its own.
    pub fn start(self, node: Arc<MigrationNode>) -> io::Result<()> {
        tracing::info!(node = %node.name, "discovering peers by multicast beacons to {} from {}", self.group, self.peer);
        thread::Builder::new().name("discovery".into()).spawn(move || self.run(&node)).map(drop)
    }

    fn run(&self, node: &MigrationNode) {
        let key = BeaconKey::new(&node.key);
        // One byte more than a beacon: a longer datagram shows as too long.
        let mut buf = [0u8; beacon::MAX_LEN + 1];
        let mut next = Instant::now();
        let mut sending = true;
        loop {
            if Instant::now() >= next {
                let sent = beacon::encode(&key, &node.name, self.peer, unix_ms())
                    .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))
                    .and_then(|b| self.socket.send_to(&b, self.group));
                // Warned about once until it works again.
                match &sent {
                    Err(e) if sending => tracing::warn!("discovery: cannot send a beacon to {}: {e}", self.group),
                    Ok(_) if !sending => tracing::info!("discovery: beacons to {} go out again", self.group),
                    _ => {}
                }
                sending = sent.is_ok();
                next = Instant::now() + BEACON_EVERY;
            }
            let wait = next.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let received = self.socket.set_read_timeout(Some(wait)).and_then(|()| self.socket.recv_from(&mut buf));
            match received {
                Ok((len, from)) => heard(node, &key, &buf[..len], from),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => {
                    tracing::warn!("discovery: cannot receive beacons: {e}");
                    thread::sleep(BEACON_EVERY);
                }
            }
        }
    }
}

/// Takes in a datagram from `from`.
fn heard(node: &MigrationNode, key: &BeaconKey, datagram: &[u8], from: SocketAddr) {
    match beacon::decode(key, datagram, unix_ms()) {
        // Its own, looped back.
        Ok(b) if b.name == node.name => {}
        Ok(b) => {
            let addr = b.addr.to_string();
            if node.cluster.discovered(&addr, Instant::now()) {
                tracing::info!("cluster: discovered {} at {addr} (beacon from {from})", b.name);
            }
        }
        Err(e) => tracing::debug!("discovery: ignored {e} from {from}"),
    }
}

/// The wall clock in ms since the Unix epoch (beacon timestamps).
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::ClusterKey;

    #[test]
    fn groups_and_listen_addresses_are_checked() {
        let group = parse_group(DEFAULT_GROUP).unwrap();
        assert_eq!(group, SocketAddrV4::new(Ipv4Addr::new(239, 77, 0, 1), 7001));
        assert!(parse_group("10.77.0.1:7001").unwrap_err().contains("not an IPv4 multicast group"));
        assert!(parse_group("239.77.0.1").unwrap_err().contains("GROUP:PORT"));
        for listen in ["0.0.0.0:7000", "[::1]:7000"] {
            let err = Discovery::open(group, listen.parse().unwrap()).err().unwrap();
            assert!(err.to_string().contains("--listen ADDR:PORT"), "{err}");
        }
    }

    /// Two nodes of this host hear each other's beacons on 127.0.0.1 (a
    /// group and port of this test's own).
    #[test]
    fn nodes_of_a_host_hear_each_other() {
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 77, 0, 254), 20000 + (std::process::id() % 20000) as u16);
        let a = Discovery::open(group, "127.0.0.1:7000".parse().unwrap()).unwrap();
        let b = Discovery::open(group, "127.0.0.1:7001".parse().unwrap()).unwrap();
        let key = BeaconKey::new(&ClusterKey::from_bytes([3; crate::peer::key::KEY_LEN]));
        let sent = beacon::encode(&key, "a", a.peer, unix_ms()).unwrap();
        a.socket.send_to(&sent, a.group).unwrap();
        b.socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; beacon::MAX_LEN + 1];
        let (len, _) = b.socket.recv_from(&mut buf).unwrap();
        let got = beacon::decode(&key, &buf[..len], unix_ms()).unwrap();
        assert_eq!((got.name.as_str(), got.addr), ("a", a.peer));
    }
}
