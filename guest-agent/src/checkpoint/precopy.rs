//! Pre-copy rounds: the pages of a process that keeps running, so that the
//! VMM can copy most of them before the freeze.
//!
//! The first round refuses the process like a checkpoint would (and leaves
//! it untouched), seizes it and reports every present page; every round
//! stops it for a moment, reads which pages were written since the previous
//! one (the soft-dirty bits of /proc/PID/pagemap), clears the bits (`4` to
//! /proc/PID/clear_refs) and lets it run on, still seized. The final
//! checkpoint ([`Precopy::capture`]) reports every present page with its
//! bit. Pages are classified exactly as by [`super::capture()`]: the same
//! VMA and pagemap code reads them.
//!
//! A seized process that runs still stops for its tracer: at every signal
//! it is sent and on job control. The tracer (the connection thread) must
//! answer those stops while it waits for the next request:
//! [`Precopy::tend`] does, when the reaper says a status is queued (see
//! crate::reaper).
//!
//! Cost per round in the guest: the stop and the resume, /proc/PID/maps,
//! one pagemap read per VMA and the clear_refs write (the pagemap and
//! clear_refs files stay open between rounds): ~20 syscalls. Measured on a
//! node of the development hosts (`memory 1`: 11 VMAs, 480 present pages,
//! 258 dirty per round): a round takes ~0.4-0.5 s in the agent, of which
//! the pagemap reads ~0.3 s (the kernel walks every page of every VMA,
//! present or not: their cost grows with the VMAs' size), /proc/PID/maps
//! ~70 ms, clear_refs ~50 ms, the stop ~25 ms. Afterwards every first
//! write to a page costs the process a write-protection fault.

use std::fs::File;
use std::io::Write;

use nix::errno::Errno;
use nix::unistd::Pid;
use pmivmm_proto::image::{PageRef, ProcessImage};

use super::capture::{
    capture_stopped, check_before_seize, inspect_stopped, present_pages, vmas, CheckpointError,
};
use super::pagemap::{Pagemap, Select};
use super::procfs;
use super::tracee::{is_end, try_wait_raw_status, untrace, PtraceError, Tracee};

/// A process seized for pre-copy rounds, running between them.
pub struct Precopy {
    tracee: Tracee,
    pagemap: Pagemap,
    clear_refs: File,
}

/// What [`Precopy::tend`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tended {
    Running,
    /// The process has ended (its tracing with it).
    Ended,
}

impl Precopy {
    /// The first round: refuses `pid` like [`super::capture()`] would
    /// (leaving it untouched), seizes it and returns every present page
    /// (all dirty). It runs on, seized by this thread.
    pub fn start(pid: i32) -> Result<(Precopy, Vec<PageRef>), CheckpointError> {
        check_before_seize(pid)?;
        let (tracee, how) = Tracee::seize_and_interrupt(Pid::from_raw(pid))?;
        let first = || -> Result<(Precopy, Vec<PageRef>), CheckpointError> {
            let vmas = inspect_stopped(pid)?.vmas;
            let clear_refs = File::options()
                .write(true)
                .open(format!("/proc/{pid}/clear_refs"))
                .map_err(|source| CheckpointError::ClearRefs { pid, source })?;
            let precopy = Precopy {
                tracee,
                pagemap: Pagemap::open(pid)?,
                clear_refs,
            };
            let pages = present_pages(&precopy.pagemap, &vmas, Select::AllDirty)?;
            precopy.clear_soft_dirty()?;
            tracee.resume(how)?;
            Ok((precopy, pages))
        };
        first().inspect_err(|_| {
            let _ = tracee.detach();
        })
    }

    pub fn pid(&self) -> i32 {
        self.tracee.pid.as_raw()
    }

    /// A later round: the present pages written since the previous one
    /// (every present page with `all`, or where the kernel does not track
    /// soft-dirty pages). On failure the process is let go.
    pub fn round(self, all: bool) -> Result<(Precopy, Vec<PageRef>), CheckpointError> {
        let select = if all { Select::AllDirty } else { Select::Dirty };
        let round = || -> Result<Vec<PageRef>, CheckpointError> {
            let how = self.tracee.interrupt()?;
            // Obstacles that appeared since the first round (a socket, a
            // thread) refuse the final checkpoint, which checks everything
            // again; a round only needs the VMAs.
            let vmas = vmas(&procfs::maps(self.pid())?, &mut Vec::new())?;
            let pages = present_pages(&self.pagemap, &vmas, select)?;
            self.clear_soft_dirty()?;
            self.tracee.resume(how)?;
            Ok(pages)
        };
        match round() {
            Ok(pages) => Ok((self, pages)),
            Err(e) => {
                self.release();
                Err(e)
            }
        }
    }

    /// Answers the stops the running process reported (see the module
    /// doc) without waiting for more.
    pub fn tend(&self) -> Result<Tended, PtraceError> {
        let pid = self.tracee.pid;
        let err = |errno| PtraceError::Call {
            op: "wait",
            pid: pid.as_raw(),
            errno,
        };
        while let Some(raw) = try_wait_raw_status(pid).map_err(err)? {
            if is_end(raw) {
                untrace(pid);
                return Ok(Tended::Ended);
            }
            match self.tracee.pass_stop(raw) {
                // Killed meanwhile: its end follows.
                Ok(())
                | Err(PtraceError::Call {
                    errno: Errno::ESRCH,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Tended::Running)
    }

    /// Freezes the process for good and captures it like
    /// [`super::capture()`], every present page with its soft-dirty bit
    /// (written since the last round). On failure it is let go.
    pub fn capture(self) -> Result<(ProcessImage, Vec<PageRef>), CheckpointError> {
        match self.tracee.interrupt() {
            Ok(_) => capture_stopped(self.tracee, Select::All),
            Err(e) => {
                self.release();
                Err(e.into())
            }
        }
    }

    /// Lets the process go: it runs on (or stays in its job-control stop),
    /// no longer traced.
    pub fn release(self) {
        // Detaching needs a stop. A process that is gone cannot be
        // detached; its registration with the reaper goes anyway.
        let _ = self.tracee.interrupt();
        let _ = self.tracee.detach();
    }

    /// Clears the soft-dirty bits of the whole process.
    fn clear_soft_dirty(&self) -> Result<(), CheckpointError> {
        (&self.clear_refs)
            .write_all(b"4")
            .map_err(|source| CheckpointError::ClearRefs {
                pid: self.pid(),
                source,
            })
    }
}
