//! What the guest agent and the VMM share.

/// The agent prints a line starting with this on the console once it is up:
/// `pmivmm-agent ready version=<version>`.
pub const AGENT_READY_MARKER: &str = "pmivmm-agent ready";

/// The version of this crate, which agent and VMM report to each other.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
