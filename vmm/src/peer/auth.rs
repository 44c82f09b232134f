//! The handshake of the peer link, without I/O: hellos, the transcript,
//! proofs of the cluster key and the direction keys (wire format in the
//! [module docs](super)).

use serde::{Deserialize, Serialize};

use super::key::ClusterKey;

/// First bytes of every hello.
pub const MAGIC: [u8; 8] = *b"PMIVMMPL";
/// Version of the peer protocol (handshake, frames and the messages sent in
/// them). Both ends must speak the same. Version 2: AES-256-GCM frames;
/// 3: gossiped loads carry the vCPU's use; 4: a migration's offer comes
/// before the freeze, without the process's name.
pub const PROTOCOL_VERSION: u32 = 5;
/// Longest hello on the wire: magic 8, version <= 5, name <= 1 + 64 and
/// nonce 32 bytes, with room for fields that later versions may add.
pub const MAX_HELLO_LEN: usize = 512;
/// Longest node name in a hello, in bytes.
pub const MAX_NODE_NAME_LEN: usize = 64;
/// Bytes of a hello's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof.
pub const PROOF_LEN: usize = 32;

const TRANSCRIPT_CONTEXT: &str = "pmivmm peer link v1 transcript";
const PROOF_DOMAIN: &[u8] = b"pmivmm peer link v1 proof ";

/// What each side sends first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u32,
    /// The sender's node name, for messages and logs.
    pub node: String,
    /// Fresh random bytes: they make the transcript, so the proofs and keys,
    /// unique to the connection.
    pub nonce: [u8; NONCE_LEN],
}

/// The fields that every version's hello starts with.
#[derive(Deserialize)]
struct HelloStart {
    magic: [u8; 8],
    version: u32,
}

/// Why a peer's hello is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("it is not a pmivmm peer (no pmivmm handshake)")]
    NotAPeer,
    #[error("it speaks peer protocol version {theirs}, this node speaks version {ours} (run the same pmivmm release on every node)")]
    Version { ours: u32, theirs: u32 },
    #[error("its handshake is malformed: {0}")]
    Malformed(&'static str),
}

/// Whether `name` may be sent in a hello: 1 to [`MAX_NODE_NAME_LEN`] bytes,
/// no control characters (it ends up in messages and logs).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NODE_NAME_LEN && !name.chars().any(char::is_control)
}

impl Hello {
    /// Our hello. `node` must be a [`valid_node_name`].
    pub fn new(node: &str, nonce: [u8; NONCE_LEN]) -> Self {
        Hello { magic: MAGIC, version: PROTOCOL_VERSION, node: node.to_owned(), nonce }
    }

    /// Decodes and checks a peer's hello.
    pub fn decode(bytes: &[u8]) -> Result<Self, HelloError> {
        let (start, _) = postcard::take_from_bytes::<HelloStart>(bytes).map_err(|_| HelloError::NotAPeer)?;
        if start.magic != MAGIC {
            return Err(HelloError::NotAPeer);
        }
        if start.version != PROTOCOL_VERSION {
            return Err(HelloError::Version { ours: PROTOCOL_VERSION, theirs: start.version });
        }
        let (hello, rest) = postcard::take_from_bytes::<Hello>(bytes)
            .map_err(|_| HelloError::Malformed("it does not decode"))?;
        if !rest.is_empty() {
            return Err(HelloError::Malformed("trailing bytes"));
        }
        if !valid_node_name(&hello.node) {
            return Err(HelloError::Malformed("invalid node name"));
        }
        Ok(hello)
    }
}

/// Which end of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the TCP connection.
    Connector,
    /// Accepted it.
    Acceptor,
}

impl Role {
    fn other(self) -> Role {
        match self {
            Role::Connector => Role::Acceptor,
            Role::Acceptor => Role::Connector,
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Role::Connector => b"connector",
            Role::Acceptor => b"acceptor",
        }
    }

    /// Context of the key of the frames this role sends.
    fn sending_context(self) -> &'static str {
        match self {
            Role::Connector => "pmivmm peer link v1 connector->acceptor",
            Role::Acceptor => "pmivmm peer link v1 acceptor->connector",
        }
    }
}

/// The keys of the frames of one connection, one per direction.
pub struct SessionKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
}

/// Both hellos, hashed, as seen from one end.
pub struct Transcript {
    role: Role,
    hash: [u8; 32],
}

impl Transcript {
    /// `ours` and `theirs` are the exact hello bytes sent and received.
    pub fn new(role: Role, ours: &[u8], theirs: &[u8]) -> Self {
        let (connector, acceptor) = match role {
            Role::Connector => (ours, theirs),
            Role::Acceptor => (theirs, ours),
        };
        let mut hasher = blake3::Hasher::new_derive_key(TRANSCRIPT_CONTEXT);
        for hello in [connector, acceptor] {
            hasher.update(&(hello.len() as u64).to_le_bytes());
            hasher.update(hello);
        }
        Transcript { role, hash: *hasher.finalize().as_bytes() }
    }

    /// The proof we send.
    pub fn our_proof(&self, key: &ClusterKey) -> [u8; PROOF_LEN] {
        *self.proof(key, self.role).as_bytes()
    }

    /// Checks the peer's proof (in constant time); on success returns the
    /// direction keys.
    pub fn verify(&self, key: &ClusterKey, theirs: &[u8; PROOF_LEN]) -> Option<SessionKeys> {
        // blake3::Hash's equality is constant-time.
        if self.proof(key, self.role.other()) != blake3::Hash::from_bytes(*theirs) {
            return None;
        }
        Some(SessionKeys {
            send: self.direction_key(key, self.role),
            recv: self.direction_key(key, self.role.other()),
        })
    }

    fn proof(&self, key: &ClusterKey, role: Role) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(key.as_bytes());
        hasher.update(PROOF_DOMAIN);
        hasher.update(role.label());
        hasher.update(&[0]);
        hasher.update(&self.hash);
        hasher.finalize()
    }

    fn direction_key(&self, key: &ClusterKey, sender: Role) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key(sender.sending_context());
        hasher.update(key.as_bytes());
        hasher.update(&self.hash);
        *hasher.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_bytes(node: &str, nonce: u8) -> Vec<u8> {
        postcard::to_allocvec(&Hello::new(node, [nonce; NONCE_LEN])).unwrap()
    }

    /// Runs both ends' checks with the given keys; returns what each
    /// derived.
    fn handshake(kc: &ClusterKey, ka: &ClusterKey) -> (Option<SessionKeys>, Option<SessionKeys>) {
        let (hc, ha) = (hello_bytes("c", 1), hello_bytes("a", 2));
        let tc = Transcript::new(Role::Connector, &hc, &ha);
        let ta = Transcript::new(Role::Acceptor, &ha, &hc);
        (tc.verify(kc, &ta.our_proof(ka)), ta.verify(ka, &tc.our_proof(kc)))
    }

    #[test]
    fn same_key_agrees_on_direction_keys() {
        let key = ClusterKey::from_bytes([7; 32]);
        let (c, a) = handshake(&key, &key);
        let (c, a) = (c.unwrap(), a.unwrap());
        assert_eq!(c.send, a.recv);
        assert_eq!(c.recv, a.send);
        assert_ne!(c.send, c.recv);
        assert_ne!(&c.send, key.as_bytes());
    }

    #[test]
    fn different_keys_fail_on_both_sides() {
        let (c, a) = handshake(&ClusterKey::from_bytes([7; 32]), &ClusterKey::from_bytes([8; 32]));
        assert!(c.is_none() && a.is_none());
    }

    #[test]
    fn proofs_are_bound_to_role_and_hellos() {
        let key = ClusterKey::from_bytes([7; 32]);
        let (hc, ha) = (hello_bytes("c", 1), hello_bytes("a", 2));
        let tc = Transcript::new(Role::Connector, &hc, &ha);
        // Our own proof reflected back is refused.
        assert!(tc.verify(&key, &tc.our_proof(&key)).is_none());
        // A proof from another connection (other nonce) is refused.
        let other = Transcript::new(Role::Acceptor, &hello_bytes("a", 3), &hc);
        assert!(tc.verify(&key, &other.our_proof(&key)).is_none());
    }

    #[test]
    fn hello_decode() {
        let bytes = hello_bytes("node-b", 9);
        assert!(bytes.len() <= MAX_HELLO_LEN);
        assert_eq!(Hello::decode(&bytes).unwrap(), Hello::new("node-b", [9; NONCE_LEN]));

        let mut future = Hello::new("node-b", [9; NONCE_LEN]);
        future.version = PROTOCOL_VERSION + 1;
        let mut bytes = postcard::to_allocvec(&future).unwrap();
        // A later version's hello may look different after the version.
        bytes.truncate(12);
        assert_eq!(Hello::decode(&bytes), Err(HelloError::Version { ours: PROTOCOL_VERSION, theirs: PROTOCOL_VERSION + 1 }));

        assert_eq!(Hello::decode(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotAPeer));
        assert_eq!(Hello::decode(b""), Err(HelloError::NotAPeer));
        let mut bytes = hello_bytes("node-b", 9);
        bytes.push(0);
        assert_eq!(Hello::decode(&bytes), Err(HelloError::Malformed("trailing bytes")));
        let bytes = hello_bytes("bad\nname", 9);
        assert_eq!(Hello::decode(&bytes), Err(HelloError::Malformed("invalid node name")));
        let bytes = hello_bytes("node-b", 9);
        assert!(matches!(Hello::decode(&bytes[..bytes.len() - 1]), Err(HelloError::Malformed(_))));
    }

    #[test]
    fn node_names() {
        assert!(valid_node_name("node-1"));
        assert!(valid_node_name(&"x".repeat(MAX_NODE_NAME_LEN)));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name(&"x".repeat(MAX_NODE_NAME_LEN + 1)));
        assert!(!valid_node_name("a\u{1b}[31m"));
    }
}
