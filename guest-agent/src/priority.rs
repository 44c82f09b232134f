//! The agent's scheduling priority. On the development hosts the guest
//! kernel is emulated and a node has one vCPU: at the same nice value as
//! the CPU-bound jobs it serves, the agent (and the guest kernel work it
//! causes: /proc reads, captures, restores) gets a 1/(N+1) share of the CPU
//! and a migration off or onto a busy node takes N times as long. So the
//! agent runs at [`AGENT_NICE`] and puts the programs it starts back at the
//! default; a restored process is built at the agent's priority and gets
//! its own nice value back when it starts running.

use nix::errno::Errno;

/// The agent's nice value.
pub const AGENT_NICE: i32 = -10;

/// Sets the nice value of `pid` (0: the calling thread; threads created
/// afterwards inherit it).
pub fn set_nice(pid: i32, nice: i32) -> Result<(), Errno> {
    // SAFETY: setpriority takes plain integers.
    Errno::result(unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) }).map(drop)
}

/// Raises the calling thread (the agent's main thread, before it starts
/// any other) to [`AGENT_NICE`].
pub fn raise_agent() -> Result<(), Errno> {
    set_nice(0, AGENT_NICE)
}
