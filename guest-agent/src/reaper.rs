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
//! Tracing (checkpoint/restore) goes through here too: the kernel reports
//! a tracee's ptrace stops to every waiter of the tracer's thread group,
//! whatever the flags (`waitpid(-1, __WALL)` here would take them even
//! without WUNTRACED), so a tracer thread calling `waitpid(pid)` would race
//! with this thread and lose stops, hanging the engine. The fix: a tracer
//! registers its tracee *before* the first ptrace call can produce a status
//! ([`Reaper::trace`] before `PTRACE_SEIZE`; [`Reaper::spawn_traced`] holds
//! the table lock across the `fork` of a `PTRACE_TRACEME` child), this
//! thread queues every status of a registered PID (stops and the exit) for
//! it, and the tracer takes them with [`Reaper::wait_traced`] instead of
//! calling `waitpid` (see `checkpoint::tracee::wait_status`). The table lock
//! is taken after `waitpid` returns, so a status can never be looked up
//! before its PID was registered. An exit of a traced PID still reaches an
//! exec session waiting for it. Without a running reaper (the engine's host
//! tests) tracers call `waitpid` themselves.
//!
//! A tracer that lets its tracee run (a pre-copied process between rounds)
//! must still answer its stops (a signal-delivery stop holds the process
//! until the tracer resumes it) while it waits on its connection: it gives
//! the reaper a [`Waker`] ([`Reaper::wake_on_status`]), an eventfd the
//! reaper increments whenever it queues a status for that tracee, and polls
//! it beside the connection; [`Reaper::try_wait_traced`] then takes the
//! statuses without blocking.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use nix::errno::Errno;
use nix::sys::eventfd::EventFd;
use pmivmm_proto::ExitStatus;

/// An eventfd the reaper increments when it queues a status for a tracee
/// (see [`Reaper::wake_on_status`]).
pub type Waker = Arc<EventFd>;

/// A registered tracee.
#[derive(Default)]
struct Tracing {
    /// Raw wait statuses not yet taken by the tracer.
    statuses: VecDeque<i32>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Children {
    /// Exit status recipients, by PID.
    waiting: HashMap<i32, Sender<ExitStatus>>,
    /// Registered tracees.
    traced: HashMap<i32, Tracing>,
    /// How many children have been spawned, to wake the reaper.
    spawned: u64,
}

pub struct Reaper {
    children: Mutex<Children>,
    spawned: Condvar,
    /// Signalled when a status is queued for a tracee.
    traced_status: Condvar,
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
            traced_status: Condvar::new(),
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

/// The reaper if it runs (always in the agent; not in the engine's host
/// tests, where tracers wait for their tracees themselves).
pub fn running() -> Option<&'static Reaper> {
    REAPER.get()
}

impl Reaper {
    /// Registers `pid` as traced by the caller: from now on its wait
    /// statuses are queued for [`Self::wait_traced`]. Call it before the
    /// ptrace call that attaches.
    pub fn trace(&self, pid: i32) {
        let mut children = self.lock();
        children.traced.entry(pid).or_default();
        // Wake the reaper if it sleeps for lack of children.
        children.spawned += 1;
        self.spawned.notify_one();
    }

    /// Runs `spawn` (a fork whose child asks to be traced) with the table
    /// locked and registers the child as traced and, like
    /// [`Self::spawn_registered`], for its exit status.
    pub fn spawn_traced<E>(
        &self,
        spawn: impl FnOnce() -> Result<i32, E>,
    ) -> Result<(i32, Receiver<ExitStatus>), E> {
        let mut children = self.lock();
        let pid = spawn()?;
        children.traced.entry(pid).or_default();
        let (tx, rx) = channel();
        children.waiting.insert(pid, tx);
        children.spawned += 1;
        self.spawned.notify_one();
        Ok((pid, rx))
    }

    /// From now on, every status queued for the registered tracee `pid`
    /// also increments `waker` (one that is queued already does not).
    pub fn wake_on_status(&self, pid: i32, waker: Waker) {
        if let Some(tracing) = self.lock().traced.get_mut(&pid) {
            tracing.waker = Some(waker);
        }
    }

    /// The next raw wait status of the registered tracee `pid` if one is
    /// queued.
    pub fn try_wait_traced(&self, pid: i32) -> Option<i32> {
        self.lock().traced.get_mut(&pid)?.statuses.pop_front()
    }

    /// Ends the registration of `pid` (detached, or its end collected);
    /// statuses not taken are dropped.
    pub fn untrace(&self, pid: i32) {
        self.lock().traced.remove(&pid);
    }

    /// The next raw wait status of the registered tracee `pid`, blocking
    /// until there is one; `None` if `pid` is not registered.
    pub fn wait_traced(&self, pid: i32) -> Option<i32> {
        let mut children = self.lock();
        loop {
            let tracing = children.traced.get_mut(&pid)?;
            if let Some(status) = tracing.statuses.pop_front() {
                return Some(status);
            }
            children = self
                .traced_status
                .wait(children)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

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
                Ok((pid, raw)) => {
                    let mut children = self.lock();
                    if let Some(tracing) = children.traced.get_mut(&pid) {
                        tracing.statuses.push_back(raw);
                        self.traced_status.notify_all();
                        if let Some(waker) = &tracing.waker {
                            // Fails only if the counter would overflow: it
                            // is non-zero then, which is all it says.
                            let _ = waker.write(1);
                        }
                    }
                    let ended = libc::WIFEXITED(raw) || libc::WIFSIGNALED(raw);
                    if ended {
                        if let Some(tx) = children.waiting.remove(&pid) {
                            // The session may be gone; then nobody wants it.
                            let _ = tx.send(exit_status(raw));
                        }
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

/// Waits for any child or tracee to change state, including children that
/// do not signal their exit with SIGCHLD (__WALL); returns the raw status.
/// Stops are reported only for tracees (ptrace stops need no WUNTRACED).
fn wait_any() -> Result<(i32, i32), Errno> {
    let mut status = 0;
    // SAFETY: waitpid with a valid pointer to a local status word. (Not
    // nix's waitpid: it rejects real-time termination signals after the
    // child has already been reaped, which would lose the status.)
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
    if pid < 0 {
        return Err(Errno::last());
    }
    Ok((pid, status))
}

/// The exit status of an ended process's raw wait status.
fn exit_status(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal {
            signal: libc::WTERMSIG(status),
            core_dumped: libc::WCOREDUMP(status),
        }
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}
