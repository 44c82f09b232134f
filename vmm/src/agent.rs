//! Reaching a node's guest agent from inside its VMM (over the node's
//! hybrid-vsock socket), shared by checkpoint, migration and the cluster.

use std::os::unix::net::UnixStream;
use std::path::Path;

use pmivmm_proto::{AgentClient, ClientError};

/// A connection to the guest agent.
pub type Agent = AgentClient<UnixStream, UnixStream>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the node has no vsock device, so its agent cannot be reached")]
    NoVsock,
    #[error("cannot reach the guest agent: {0}")]
    Connect(ClientError),
}

/// Connects to the agent through the hybrid-vsock socket `vsock` (none:
/// the node has no vsock device).
pub fn connect(vsock: Option<&Path>) -> Result<Agent, AgentError> {
    let path = vsock.ok_or(AgentError::NoVsock)?;
    AgentClient::connect(path).map_err(AgentError::Connect)
}
