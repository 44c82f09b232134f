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
//! Where the kernel tells where the page tables are (/proc/PID/pmivmm_mm)
//! and the host asks for it, private anonymous memory is left to the VMM's
//! walk of the page tables: such a round keeps the process stopped after
//! its reply, so that the walk reads the soft-dirty bits before they are
//! cleared, until the host says it walked (`PrecopyContinue`).
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
use pmivmm_proto::image::{Pages, ProcessImage, Select, Vma};

use super::capture::{
    capture_stopped, check_before_seize, inspect_stopped, present_pages, vmas, CheckpointError,
    LeftScratch,
};
use super::pagemap::Pagemap;
use super::procfs;
use super::pagetables::MmTables;
use super::tracee::{is_end, try_wait_raw_status, untrace, Interrupted, PtraceError, Tracee};

/// A process seized for pre-copy rounds, running between them.
pub struct Precopy {
    tracee: Tracee,
    pagemap: Pagemap,
    clear_refs: File,
    /// Kept stopped after a round whose pages the VMM walks (the walk must
    /// read the soft-dirty bits before they are cleared): how to resume it
    /// ([`Precopy::continue_round`]).
    held: Option<Interrupted>,
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
    /// (all dirty). It runs on, seized by this thread, unless the round left
    /// pages to the VMM's walk (`page_walk`, where the kernel allows): then
    /// it stays stopped until [`Self::continue_round`].
    pub fn start(pid: i32, page_walk: bool) -> Result<(Precopy, Pages), CheckpointError> {
        check_before_seize(pid)?;
        let (tracee, how) = Tracee::seize_and_interrupt(Pid::from_raw(pid))?;
        let first = || -> Result<(Precopy, Pages), CheckpointError> {
            let vmas = inspect_stopped(pid)?.vmas;
            let clear_refs = File::options()
                .write(true)
                .open(format!("/proc/{pid}/clear_refs"))
                .map_err(|source| CheckpointError::ClearRefs { pid, source })?;
            let mut precopy = Precopy {
                tracee,
                pagemap: Pagemap::open(pid)?,
                clear_refs,
                held: None,
            };
            let pages = precopy.observe(how, &vmas, Select::AllDirty, page_walk)?;
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
    /// soft-dirty pages); `page_walk` as for [`Self::start`]. On failure the
    /// process is let go.
    pub fn round(mut self, all: bool, page_walk: bool) -> Result<(Precopy, Pages), CheckpointError> {
        let select = if all { Select::AllDirty } else { Select::Dirty };
        let mut round = || -> Result<Pages, CheckpointError> {
            let how = self.stop()?;
            // Obstacles that appeared since the first round (a socket, a
            // thread) refuse the final checkpoint, which checks everything
            // again; a round only needs the VMAs.
            let vmas = vmas(&procfs::maps(self.pid())?, &mut Vec::new())?;
            self.observe(how, &vmas, select, page_walk)
        };
        match round() {
            Ok(pages) => Ok((self, pages)),
            Err(e) => {
                self.release();
                Err(e)
            }
        }
    }

    /// The pages of the stopped process's `vmas`; then clears the
    /// soft-dirty bits and resumes it, unless pages are left to the VMM's
    /// walk: then it stays stopped (`held`) until [`Self::continue_round`].
    fn observe(
        &mut self,
        how: Interrupted,
        vmas: &[Vma],
        select: Select,
        page_walk: bool,
    ) -> Result<Pages, CheckpointError> {
        let tables = MmTables::read(self.pid(), page_walk)?;
        let pages = present_pages(&self.pagemap, vmas, select, tables.as_ref())?;
        self.held = Some(how);
        if pages.walk.is_none() {
            self.continue_round()?;
        }
        Ok(pages)
    }

    /// After the VMM's walk of a round: clears the soft-dirty bits and lets
    /// the process run on. Nothing to do if the round held nothing.
    pub fn continue_round(&mut self) -> Result<(), CheckpointError> {
        if let Some(how) = self.held.take() {
            self.clear_soft_dirty()?;
            self.tracee.resume(how)?;
        }
        Ok(())
    }

    /// Stops the process, unless a round holds it stopped already. The
    /// soft-dirty bits of a held round were not cleared: the next round or
    /// the checkpoint reports its pages again (more copying, never a missed
    /// write).
    fn stop(&mut self) -> Result<Interrupted, PtraceError> {
        match self.held.take() {
            Some(how) => Ok(how),
            None => self.tracee.interrupt(),
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
    /// (written since the last round); `page_walk` as for
    /// [`super::capture()`]. On failure it is let go.
    pub fn capture(
        mut self,
        page_walk: bool,
    ) -> Result<(ProcessImage, Pages, LeftScratch), CheckpointError> {
        match self.stop() {
            Ok(_) => capture_stopped(self.tracee, Select::All, page_walk),
            Err(e) => {
                self.release();
                Err(e.into())
            }
        }
    }

    /// Lets the process go: it runs on (or stays in its job-control stop),
    /// no longer traced.
    pub fn release(mut self) {
        // Detaching needs a stop. A process that is gone cannot be
        // detached; its registration with the reaper goes anyway.
        let _ = self.stop();
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
