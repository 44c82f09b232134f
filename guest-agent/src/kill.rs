//! Sending a signal to a process of the node.

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpid, Pid};

#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("invalid PID {0}")]
    InvalidPid(u32),
    #[error("refusing to signal the agent itself (PID {0}); use poweroff")]
    Agent(u32),
    #[error("invalid or unsupported signal {0}")]
    InvalidSignal(i32),
    #[error("no process with PID {0}")]
    NoSuchProcess(u32),
    #[error("cannot signal PID {pid}: {errno}")]
    Failed { pid: u32, errno: Errno },
}

/// Sends `signal` (0: only check that the process exists) to `pid`.
pub fn send_signal(pid: u32, signal: i32) -> Result<(), KillError> {
    let target = match i32::try_from(pid) {
        Ok(p) if p > 0 => Pid::from_raw(p),
        _ => return Err(KillError::InvalidPid(pid)),
    };
    if target == getpid() || pid == 1 {
        return Err(KillError::Agent(pid));
    }
    let signal = match signal {
        0 => None,
        s => Some(Signal::try_from(s).map_err(|_| KillError::InvalidSignal(s))?),
    };
    kill(target, signal).map_err(|errno| match errno {
        Errno::ESRCH => KillError::NoSuchProcess(pid),
        errno => KillError::Failed { pid, errno },
    })
}
