//! The one place that waits for children.
//!
//! As PID 1 the agent inherits every orphan and must reap it; it also spawns
//! exec processes whose exit status a session wants. Waiting for both with
//! two `waitpid` callers would let one steal the other's children, so a
//! single reaper thread calls `waitpid(-1)` and hands the status of a
//! registered child to its session; everything else is reaped and dropped.
//!
//! The thread blocks in `waitpid` while any child exists and sleeps on a
//! condition variable when there is none (no child means no descendant
//! either, so no orphan can appear until the agent spawns again): no polling,
//! no signals.
//!
//! Tracing (checkpoint/restore) must go through here too: the kernel reports
//! a tracee's ptrace stops to every waiter of the tracer's thread group,
//! whatever the flags, so a tracer thread calling `waitpid(pid)` races with
//! this thread for them. Such code must receive its tracee's statuses from
//! the reaper (forward stop statuses of registered PIDs, not only exits).

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use nix::errno::Errno;
use pmivmm_proto::ExitStatus;

#[derive(Default)]
struct Children {
    /// Exit status recipients, by PID.
    waiting: HashMap<i32, Sender<ExitStatus>>,
    /// How many children have been spawned, to wake the reaper.
    spawned: u64,
}

pub struct Reaper {
    children: Mutex<Children>,
    spawned: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// The process's reaper, started on first use.
pub fn reaper() -> &'static Reaper {
    let mut started = false;
    let reaper = REAPER.get_or_init(|| {
        started = true;
        Reaper {
            children: Mutex::new(Children::default()),
            spawned: Condvar::new(),
        }
    });
    if started {
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 << 10)
            .spawn(move || reaper.run())
            .expect("cannot start the reaper thread");
    }
    reaper
}

impl Reaper {
    /// Runs `spawn` (which starts one child and returns its PID) with the
    /// child table locked, and registers the child, so that its exit status
    /// is sent to the returned receiver even if it exits at once.
    pub fn spawn_registered<E>(
        &self,
        spawn: impl FnOnce() -> Result<i32, E>,
    ) -> Result<(i32, Receiver<ExitStatus>), E> {
        let mut children = self.lock();
        let pid = spawn()?;
        let (tx, rx) = channel();
        children.waiting.insert(pid, tx);
        children.spawned += 1;
        self.spawned.notify_one();
        Ok((pid, rx))
    }

    fn lock(&self) -> MutexGuard<'_, Children> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) -> ! {
        loop {
            let spawned_before = self.lock().spawned;
            match wait_any() {
                Ok((pid, status)) => {
                    if let Some(tx) = self.lock().waiting.remove(&pid) {
                        // The session may be gone; then nobody wants it.
                        let _ = tx.send(status);
                    }
                }
                Err(Errno::ECHILD) => {
                    let mut children = self.lock();
                    while children.spawned == spawned_before {
                        children = self
                            .spawned
                            .wait(children)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    eprintln!("pmivmm-agent: waitpid failed: {e}");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }
}

/// Waits for any child to end, including children that do not signal their
/// exit with SIGCHLD (__WALL); stopped children are not reported.
fn wait_any() -> Result<(i32, ExitStatus), Errno> {
    let mut status = 0;
    // SAFETY: waitpid with a valid pointer to a local status word. (Not
    // nix's waitpid: it rejects real-time termination signals after the
    // child has already been reaped, which would lose the status.)
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
    if pid < 0 {
        return Err(Errno::last());
    }
    let status = if libc::WIFSIGNALED(status) {
        ExitStatus::Signal {
            signal: libc::WTERMSIG(status),
            core_dumped: libc::WCOREDUMP(status),
        }
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    };
    Ok((pid, status))
}
