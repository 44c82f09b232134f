//! Discovery beacons: UDP datagrams anyone on the lab network can send,
//! decoded with the cluster's beacon key. A beacon accepted must be exactly
//! what a holder of that key would have sent: encoding the decoded fields
//! again gives the input back, byte for byte.

use std::net::SocketAddr;
use std::sync::OnceLock;

use super::class;
use crate::cluster::beacon::{self, BeaconKey};
use crate::peer::ClusterKey;

/// The receiver's clock, in ms since the epoch; the seeds are fresh then.
const NOW_MS: u64 = 1_800_000_000_000;

fn key() -> &'static BeaconKey {
    static KEY: OnceLock<BeaconKey> = OnceLock::new();
    KEY.get_or_init(|| BeaconKey::new(&ClusterKey::from_bytes([7; 32])))
}

pub fn run_one(data: &[u8]) -> String {
    match beacon::decode(key(), data, NOW_MS) {
        Ok(b) => {
            let again = beacon::encode(key(), &b.name, b.addr, b.sent_ms);
            assert!(again.as_deref() == Ok(data), "accepted a beacon the key did not make: {data:?}");
            "accepted".into()
        }
        Err(e) => class(&e),
    }
}

/// Valid beacons of this cluster (IPv4 and IPv6 addresses, a second old)
/// and one of another cluster.
pub fn seeds() -> Vec<Vec<u8>> {
    let v4: SocketAddr = "10.77.0.11:7000".parse().expect("an address");
    let v6: SocketAddr = "[fe80::1]:7000".parse().expect("an address");
    let other = BeaconKey::new(&ClusterKey::from_bytes([8; 32]));
    [(key(), "lab1", v4, NOW_MS), (key(), "n-2", v6, NOW_MS - 1000), (&other, "lab2", v4, NOW_MS)]
        .into_iter()
        .map(|(k, name, addr, ms)| beacon::encode(k, name, addr, ms).expect("a valid beacon"))
        .collect()
}
