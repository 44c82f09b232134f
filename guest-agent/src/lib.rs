//! pmivmm-agent: the guest agent of a pmivmm node, as a library so that its
//! request handling can be tested on the host over Unix sockets.

pub mod checkpoint;
pub mod connection;
pub mod deputy;
pub mod exec;
pub mod kill;
pub mod load;
pub mod migrate;
pub mod mounts;
pub mod pidfd;
pub mod power;
pub mod priority;
pub mod procfs;
pub mod ps;
pub mod reaper;
pub mod server;
pub mod sink;
pub mod spawn;
pub mod vsock;
