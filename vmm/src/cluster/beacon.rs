//! The multicast discovery beacon (see [`super::discovery`]): one UDP
//! datagram by which a node tells the nodes on its network where it listens
//! for peers, authenticated with a key derived from the cluster key.
//!
//! A beacon only makes a receiver try the gossip exchange with the address
//! it names; that exchange's own handshake proves the cluster key. The MAC
//! keeps nodes of other clusters and forgers from making nodes connect
//! anywhere they like, and the timestamp keeps old beacons from being
//! replayed later than [`MAX_SKEW`] after they were sent.
//!
//! # Wire format
//!
//! Integers little endian:
//! `magic: b"PMIVMMDB" | version: u16 | cluster: [u8; 8] | sent_ms: u64 |
//! name_len: u8 | name | addr_len: u8 | addr | mac: [u8; 32]`, where
//! `cluster` is the cluster key's fingerprint (8 hex digits, not secret:
//! it tells a beacon of another cluster from a forged one), `sent_ms` the
//! sender's wall clock in ms since the Unix epoch, `name` the node name and
//! `addr` its peer address (`host:port`, UTF-8), and `mac` HMAC-SHA256 of
//! everything before it under `H("pmivmm discovery v1 beacon key"; K)`
//! (BLAKE3 derive-key mode over the cluster key `K`). Magic and version
//! come first and keep their place in every version.

use std::net::SocketAddr;
use std::time::Duration;

use aws_lc_rs::hmac;

use crate::peer::ClusterKey;
use crate::rundir::{validate_name, MAX_NAME_LEN};

pub const MAGIC: &[u8; 8] = b"PMIVMMDB";
pub const VERSION: u16 = 1;
const KEY_CONTEXT: &str = "pmivmm discovery v1 beacon key";
const CLUSTER_LEN: usize = 8;
const MAC_LEN: usize = 32;
/// Longest peer address a beacon carries (`[IPv6%scope]:port` fits).
pub const MAX_ADDR_LEN: usize = 64;
/// Longest beacon: a longer datagram is no beacon and is not parsed.
pub const MAX_LEN: usize = MAGIC.len() + 2 + CLUSTER_LEN + 8 + 1 + MAX_NAME_LEN + 1 + MAX_ADDR_LEN + MAC_LEN;
/// How far a beacon's timestamp may be from the receiver's clock, either
/// way (clock skew between hosts; replays within it only repeat what the
/// sender said).
pub const MAX_SKEW: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BeaconError {
    #[error("a datagram of {0} bytes (a beacon has at most {MAX_LEN})")]
    TooLong(usize),
    #[error("a truncated beacon")]
    Truncated,
    #[error("not a pmivmm beacon")]
    Magic,
    #[error("a beacon of version {0} (this node speaks {VERSION})")]
    Version(u16),
    #[error("a beacon of another cluster (cluster key {0}, different --cluster-key?)")]
    OtherCluster(String),
    #[error("a beacon with a bad MAC")]
    Mac,
    #[error("a beacon with an invalid node name")]
    Name,
    #[error("a beacon with an invalid peer address")]
    Addr,
    #[error("a beacon {0} ms older than this node's clock (at most {ms} ms)", ms = MAX_SKEW.as_millis())]
    Stale(u64),
    #[error("a beacon {0} ms ahead of this node's clock (at most {ms} ms)", ms = MAX_SKEW.as_millis())]
    Future(u64),
}

/// What a valid beacon says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    pub name: String,
    pub addr: SocketAddr,
    pub sent_ms: u64,
}

/// The beacon key of a cluster and its fingerprint.
pub struct BeaconKey {
    mac: hmac::Key,
    cluster: [u8; CLUSTER_LEN],
}

impl BeaconKey {
    pub fn new(key: &ClusterKey) -> Self {
        let mut cluster = [0u8; CLUSTER_LEN];
        cluster.copy_from_slice(key.fingerprint().as_bytes());
        BeaconKey { mac: hmac::Key::new(hmac::HMAC_SHA256, &key.derive(KEY_CONTEXT)), cluster }
    }
}

/// The beacon of node `name` listening for peers at `addr`, sent at
/// `sent_ms`.
pub fn encode(key: &BeaconKey, name: &str, addr: SocketAddr, sent_ms: u64) -> Result<Vec<u8>, BeaconError> {
    validate_name(name).map_err(|_| BeaconError::Name)?;
    let addr = addr.to_string();
    if addr.len() > MAX_ADDR_LEN {
        return Err(BeaconError::Addr);
    }
    let mut out = Vec::with_capacity(MAX_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&key.cluster);
    out.extend_from_slice(&sent_ms.to_le_bytes());
    for field in [name.as_bytes(), addr.as_bytes()] {
        out.push(field.len() as u8);
        out.extend_from_slice(field);
    }
    let tag = hmac::sign(&key.mac, &out);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Checks and decodes `datagram`, received when the clock said `now_ms`.
pub fn decode(key: &BeaconKey, datagram: &[u8], now_ms: u64) -> Result<Beacon, BeaconError> {
    if datagram.len() > MAX_LEN {
        return Err(BeaconError::TooLong(datagram.len()));
    }
    let mut r = Reader(datagram);
    if r.take(MAGIC.len())? != MAGIC {
        return Err(BeaconError::Magic);
    }
    let version = u16::from_le_bytes(r.array()?);
    if version != VERSION {
        return Err(BeaconError::Version(version));
    }
    let cluster: [u8; CLUSTER_LEN] = r.array()?;
    let sent_ms = u64::from_le_bytes(r.array()?);
    let name = r.field()?;
    let addr = r.field()?;
    let signed = datagram.len() - r.0.len();
    let mac = r.take(MAC_LEN)?;
    if !r.0.is_empty() {
        return Err(BeaconError::Truncated);
    }
    if cluster != key.cluster {
        return Err(BeaconError::OtherCluster(String::from_utf8_lossy(&cluster).into_owned()));
    }
    hmac::verify(&key.mac, &datagram[..signed], mac).map_err(|_| BeaconError::Mac)?;
    let name = std::str::from_utf8(name).map_err(|_| BeaconError::Name)?;
    validate_name(name).map_err(|_| BeaconError::Name)?;
    let addr: SocketAddr =
        std::str::from_utf8(addr).ok().and_then(|a| a.parse().ok()).ok_or(BeaconError::Addr)?;
    let skew = MAX_SKEW.as_millis() as u64;
    match now_ms.checked_sub(sent_ms) {
        Some(age) if age > skew => Err(BeaconError::Stale(age)),
        None if sent_ms - now_ms > skew => Err(BeaconError::Future(sent_ms - now_ms)),
        _ => Ok(Beacon { name: name.to_owned(), addr, sent_ms }),
    }
}

/// The unread rest of a datagram.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BeaconError> {
        if self.0.len() < n {
            return Err(BeaconError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BeaconError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// A field of `len: u8 | bytes`.
    fn field(&mut self) -> Result<&'a [u8], BeaconError> {
        let [len] = self.array()?;
        self.take(len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::key::KEY_LEN;

    const NOW: u64 = 1_790_000_000_000;

    fn key(byte: u8) -> BeaconKey {
        BeaconKey::new(&ClusterKey::from_bytes([byte; KEY_LEN]))
    }

    fn addr() -> SocketAddr {
        "10.77.0.12:7000".parse().unwrap()
    }

    fn beacon(k: &BeaconKey) -> Vec<u8> {
        encode(k, "lab2", addr(), NOW).unwrap()
    }

    /// `b` with its MAC made again under `k` (for fields changed after signing).
    fn resign(k: &BeaconKey, b: &mut Vec<u8>) {
        b.truncate(b.len() - MAC_LEN);
        let tag = hmac::sign(&k.mac, b);
        b.extend_from_slice(tag.as_ref());
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let b = beacon(&k);
        let want = Beacon { name: "lab2".into(), addr: addr(), sent_ms: NOW };
        assert_eq!(decode(&k, &b, NOW), Ok(want.clone()));
        assert_eq!(decode(&k, &b, NOW + MAX_SKEW.as_millis() as u64), Ok(want.clone()));
        assert_eq!(decode(&k, &b, NOW - MAX_SKEW.as_millis() as u64), Ok(want));
        let longest = encode(&k, &"x".repeat(MAX_NAME_LEN), "[fe80::1:2:3:4]:65535".parse().unwrap(), NOW);
        assert!(longest.unwrap().len() <= MAX_LEN);
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(decode(&k, &encode(&k, "n1", v6, NOW).unwrap(), NOW).unwrap().addr, v6);
    }

    #[test]
    fn other_keys_and_altered_beacons_are_refused() {
        let k = key(1);
        let b = beacon(&k);
        let other = key(2);
        assert!(matches!(decode(&other, &b, NOW), Err(BeaconError::OtherCluster(_))));
        // Every byte matters: the magic, the version, the cluster, the MAC
        // or what it covers.
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(decode(&k, &bad, NOW).is_err(), "byte {i} altered and accepted");
        }
        let mut bad = b.clone();
        let at = MAGIC.len() + 2 + CLUSTER_LEN;
        bad[at] ^= 1; // sent_ms
        assert_eq!(decode(&k, &bad, NOW), Err(BeaconError::Mac));
        // Signed with another key but claiming this cluster.
        let mut forged = encode(&other, "lab2", addr(), NOW).unwrap();
        forged[MAGIC.len() + 2..][..CLUSTER_LEN].copy_from_slice(&k.cluster);
        assert_eq!(decode(&k, &forged, NOW), Err(BeaconError::Mac));
    }

    #[test]
    fn wrong_version_and_magic() {
        let k = key(1);
        let mut b = beacon(&k);
        b[MAGIC.len()..][..2].copy_from_slice(&2u16.to_le_bytes());
        resign(&k, &mut b);
        assert_eq!(decode(&k, &b, NOW), Err(BeaconError::Version(2)));
        assert_eq!(decode(&k, b"PMIVMMPL", NOW), Err(BeaconError::Magic));
        assert_eq!(decode(&k, b"hello", NOW), Err(BeaconError::Truncated));
    }

    #[test]
    fn truncated_and_oversized() {
        let k = key(1);
        let b = beacon(&k);
        for len in 0..b.len() {
            assert!(decode(&k, &b[..len], NOW).is_err(), "{len} bytes accepted");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(decode(&k, &longer, NOW), Err(BeaconError::Truncated));
        assert_eq!(decode(&k, &[0; MAX_LEN + 1], NOW), Err(BeaconError::TooLong(MAX_LEN + 1)));
        // A length field pointing past the end.
        let mut bad = b[..MAGIC.len() + 2 + CLUSTER_LEN + 8].to_vec();
        bad.push(200);
        assert_eq!(decode(&k, &bad, NOW), Err(BeaconError::Truncated));
    }

    #[test]
    fn stale_and_future() {
        let k = key(1);
        let b = beacon(&k);
        let skew = MAX_SKEW.as_millis() as u64;
        assert_eq!(decode(&k, &b, NOW + skew + 1), Err(BeaconError::Stale(skew + 1)));
        assert_eq!(decode(&k, &b, NOW - skew - 1), Err(BeaconError::Future(skew + 1)));
        assert_eq!(decode(&k, &encode(&k, "lab2", addr(), 0).unwrap(), NOW), Err(BeaconError::Stale(NOW)));
    }

    #[test]
    fn bad_names_and_addresses() {
        let k = key(1);
        assert_eq!(encode(&k, "../x", addr(), NOW), Err(BeaconError::Name));
        assert_eq!(encode(&k, &"x".repeat(MAX_NAME_LEN + 1), addr(), NOW), Err(BeaconError::Name));
        // Signed, well formed, but naming no node or address.
        let mut b = beacon(&k);
        let name_at = MAGIC.len() + 2 + CLUSTER_LEN + 8 + 1;
        b[name_at..][..4].copy_from_slice(b"../x");
        resign(&k, &mut b);
        assert_eq!(decode(&k, &b, NOW), Err(BeaconError::Name));
        let mut b = beacon(&k);
        let addr_at = name_at + 4 + 1;
        b[addr_at] = b'x';
        resign(&k, &mut b);
        assert_eq!(decode(&k, &b, NOW), Err(BeaconError::Addr));
    }

    #[test]
    fn the_beacon_key_is_not_the_cluster_key() {
        let ck = ClusterKey::from_bytes([7; KEY_LEN]);
        assert_ne!(ck.derive(KEY_CONTEXT), [7; KEY_LEN]);
        assert_ne!(ck.derive(KEY_CONTEXT), ck.derive("pmivmm cluster key fingerprint v1"));
        // The cluster field is the fingerprint the logs show.
        assert_eq!(BeaconKey::new(&ck).cluster, ck.fingerprint().as_bytes());
    }
}
