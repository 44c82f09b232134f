//! The checkpoint/restore requests of one connection.
//!
//! ptrace is per thread on the tracer side, so every step of one checkpoint
//! (`PrecopyRound`s, `Checkpoint`, then `ResumeOriginal` or `KillOriginal`)
//! or restore (`PrepareRestore`, then `FinishRestore`) must come from the
//! thread that attached: the connection's own thread, which calls into this
//! state. When the connection ends, [`Drop`] lets pre-copied processes go,
//! resumes every process still frozen by a checkpoint and kills a
//! half-restored child, so a lost host never leaves a seized, frozen or
//! half-built process behind.
//!
//! A pre-copied process runs between rounds but stays seized: its stops
//! (signals, job control) wait for this thread, which the reaper wakes
//! through [`Migrations::waker`] (see crate::reaper); the connection polls
//! it beside the socket and calls [`Migrations::tend`].
//!
//! Stdio of a restored process: descriptors 0-2 that were regular files in
//! the image are reopened by the engine like other files (a workload's
//! redirected output continues in its file); any other stdio (pipes,
//! terminals) becomes /dev/null here, or with `forward_stdio` (migration:
//! the VMM relays it to the process's deputy at home) stdin /dev/null and
//! stdout/stderr pipes whose output the connection streams like an exec's
//! (see crate::exec).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};
use pmivmm_proto::frame::MAX_FRAME_LEN;
use pmivmm_proto::image::{Itimer, Pages, ProcessImage};
use pmivmm_proto::prelayout::PreLayout;
use pmivmm_proto::{ErrorKind, Response};

use crate::checkpoint::{
    capture, finish_restore, kill_original, pre_layout, prepare_restore, resume_original, start_restore_child,
    CheckpointError,
    LeftScratch, Precopy, RestoredChild, Tended,
};
use crate::exec::{stdio_pipe, Streamed};
use crate::reaper::{self, Waker};

/// Upper bound of the encoded size of one [`pmivmm_proto::image::PageRef`]
/// (two varint u64s of at most 10 bytes, the kind and the dirty flag) and
/// of one [`pmivmm_proto::image::WalkRange`] (two varints and a flag).
const MAX_PAGE_REF_LEN: usize = 22;
/// Room for the reply's variant tag, length prefixes and a walk's root,
/// levels and mode.
const REPLY_OVERHEAD: usize = 96;

/// What one connection has seized, frozen or half-built.
#[derive(Default)]
pub struct Migrations {
    /// Processes in pre-copy rounds on this connection, running.
    precopies: Vec<Precopy>,
    /// Set by the reaper when a pre-copied process stops or ends; made
    /// with the first pre-copy.
    waker: Option<Waker>,
    /// Processes captured on this connection and still frozen.
    frozen: Vec<Frozen>,
    /// A child started on this connection (`StartRestore`), waiting for
    /// `PrepareRestore`.
    started: Option<Started>,
    /// A child prepared on this connection, waiting for `FinishRestore`.
    restoring: Option<Restoring>,
}

/// The stopped child of a coming restore, and its output pipes.
struct Started {
    child: RestoredChild,
    forward_stdio: bool,
    /// With forwarded stdio: the read ends of its stdout and stderr.
    outputs: Option<[OwnedFd; 2]>,
}

/// A process frozen by `Checkpoint`.
pub struct Frozen {
    pub pid: i32,
    /// The signals pending in it at the checkpoint, which its image carries.
    pub carried: Vec<i32>,
    /// Its interval timers, which the capture disarmed: re-armed if it
    /// resumes.
    pub itimers: [Itimer; 3],
    /// The capture's scratch page, removed if it resumes.
    pub scratch: LeftScratch,
}

struct Restoring {
    child: RestoredChild,
    image: ProcessImage,
    /// With forwarded stdio: its output pipes and exit status.
    forwarded: Option<Streamed>,
}

/// How `FinishRestore` ends.
pub enum Finished {
    /// With this reply (`Restored`, or an error).
    Reply(Response),
    /// The process runs and its output must stream on the connection,
    /// `Restored` first.
    Forward(Streamed),
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

/// Whether a reply with this image and these pages fits in one frame.
fn fits_in_frame(image_len: usize, pages: &Pages) -> bool {
    page_entries(pages)
        .checked_mul(MAX_PAGE_REF_LEN)
        .and_then(|n| n.checked_add(image_len))
        .and_then(|n| n.checked_add(REPLY_OVERHEAD))
        .is_some_and(|n| n <= MAX_FRAME_LEN as usize)
}

/// Listed pages and walk ranges: the entries of a reply.
fn page_entries(pages: &Pages) -> usize {
    pages.listed.len() + pages.walk.as_ref().map_or(0, |w| w.ranges.len())
}

/// The reply to a request for a process that `Checkpoint` did not freeze.
pub fn not_frozen(pid: u32) -> Response {
    error(
        ErrorKind::BadRequest,
        format!("PID {pid} was not frozen by a checkpoint on this connection"),
    )
}

fn checkpoint_error(e: CheckpointError) -> Response {
    let kind = match &e {
        CheckpointError::Refused { .. } => ErrorKind::Refused,
        _ => ErrorKind::Failed,
    };
    error(kind, e.to_string())
}

/// A PID of a request that names a process to checkpoint: positive, not
/// frozen on this connection already, and existing.
fn checkpoint_target(pid: u32, frozen: &[Frozen]) -> Result<i32, Response> {
    let pid = match i32::try_from(pid) {
        Ok(pid) if pid > 0 => pid,
        _ => return Err(error(ErrorKind::BadRequest, format!("invalid PID {pid}"))),
    };
    if frozen.iter().any(|f| f.pid == pid) {
        return Err(error(
            ErrorKind::Busy,
            format!("PID {pid} is already frozen by a checkpoint on this connection"),
        ));
    }
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(error(
            ErrorKind::NoSuchProcess,
            format!("no process with PID {pid}"),
        ));
    }
    Ok(pid)
}

impl Migrations {
    /// `PrecopyRound { pid, first, page_walk }`. `first` on a process
    /// already in pre-copy on this connection starts over: every present
    /// page.
    pub fn precopy_round(&mut self, pid: u32, first: bool, page_walk: bool) -> Response {
        let pid = match checkpoint_target(pid, &self.frozen) {
            Ok(pid) => pid,
            Err(reply) => return reply,
        };
        let round = match self.precopies.iter().position(|p| p.pid() == pid) {
            Some(i) => self
                .precopies
                .swap_remove(i)
                .round(first, page_walk)
                .map_err(checkpoint_error),
            None if first => self.start_precopy(pid, page_walk),
            None => {
                return error(
                    ErrorKind::BadRequest,
                    format!(
                        "PID {pid} is not in pre-copy on this connection (its first round must \
                         say first)"
                    ),
                )
            }
        };
        let (precopy, pages) = match round {
            Ok(round) => round,
            Err(reply) => return reply,
        };
        if !fits_in_frame(0, &pages) {
            precopy.release();
            return error(
                ErrorKind::Failed,
                format!(
                    "{} pages of PID {pid} do not fit in one reply; it was let go",
                    page_entries(&pages)
                ),
            );
        }
        self.precopies.push(precopy);
        Response::PrecopyPages { pages }
    }

    /// `PrecopyContinue { pid }`: the host walked the held round's pages.
    /// On failure the process is let go.
    pub fn precopy_continue(&mut self, pid: u32) -> Response {
        let Some(i) = self.precopies.iter().position(|p| p.pid() as u32 == pid) else {
            return error(
                ErrorKind::BadRequest,
                format!("PID {pid} is not in pre-copy on this connection"),
            );
        };
        match self.precopies[i].continue_round() {
            Ok(()) => Response::Ok,
            Err(e) => {
                self.precopies.swap_remove(i).release();
                checkpoint_error(e)
            }
        }
    }

    /// The first round of `pid`, whose stops then wake this connection.
    fn start_precopy(&mut self, pid: i32, page_walk: bool) -> Result<(Precopy, Pages), Response> {
        if self.waker.is_none() {
            let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
            let waker = EventFd::from_flags(flags).map_err(|e| {
                error(
                    ErrorKind::Failed,
                    format!("cannot create an eventfd for the pre-copy: {e}"),
                )
            })?;
            self.waker = Some(Arc::new(waker));
        }
        let (precopy, pages) = Precopy::start(pid, page_walk).map_err(checkpoint_error)?;
        if let (Some(reaper), Some(waker)) = (reaper::running(), &self.waker) {
            reaper.wake_on_status(pid, Arc::clone(waker));
            // Stops reported before the waker was set.
            let _ = waker.write(1);
        }
        Ok((precopy, pages))
    }

    /// What the connection polls beside its socket while processes are in
    /// pre-copy: readable when [`Self::tend`] has work.
    pub fn waker(&self) -> Option<BorrowedFd<'_>> {
        match &self.waker {
            Some(waker) if !self.precopies.is_empty() => Some(waker.as_fd()),
            _ => None,
        }
    }

    /// Answers the stops of the pre-copied processes; forgets those that
    /// ended.
    pub fn tend(&mut self) {
        if let Some(waker) = &self.waker {
            // Reset; EAGAIN when it was zero already.
            let _ = waker.read();
        }
        let mut i = 0;
        while i < self.precopies.len() {
            let pid = self.precopies[i].pid();
            match self.precopies[i].tend() {
                Ok(Tended::Running) => i += 1,
                Ok(Tended::Ended) => {
                    eprintln!("pmivmm-agent: PID {pid} ended during its pre-copy");
                    self.precopies.swap_remove(i);
                }
                Err(e) => {
                    eprintln!("pmivmm-agent: pre-copy of PID {pid}: {e}; letting it go");
                    self.precopies.swap_remove(i).release();
                }
            }
        }
    }

    /// `Checkpoint { pid }`, of a process in pre-copy on this connection
    /// too.
    pub fn checkpoint(&mut self, pid: u32, page_walk: bool) -> Response {
        let pid = match checkpoint_target(pid, &self.frozen) {
            Ok(pid) => pid,
            Err(reply) => return reply,
        };
        let captured = match self.precopies.iter().position(|p| p.pid() == pid) {
            Some(i) => self.precopies.swap_remove(i).capture(page_walk),
            None => capture(pid, page_walk),
        };
        let (image, pages, scratch) = match captured {
            Ok(captured) => captured,
            Err(e) => return checkpoint_error(e),
        };
        let signals = &image.signals;
        let carried = (signals.pending_thread.iter())
            .chain(&signals.pending_process)
            .map(|info| info.signo as i32)
            .collect();
        let itimers = image.itimers;
        let image = image.to_bytes();
        if !fits_in_frame(image.len(), &pages) {
            let _ = resume_original(pid, &itimers, scratch);
            return error(
                ErrorKind::Failed,
                format!(
                    "PID {pid} is too large to checkpoint in one message: image of {} bytes and {} \
                     pages exceed the frame limit of {MAX_FRAME_LEN} bytes; it was resumed",
                    image.len(),
                    page_entries(&pages)
                ),
            );
        }
        self.frozen.push(Frozen {
            pid,
            carried,
            itimers,
            scratch,
        });
        Response::Checkpointed { image, pages }
    }

    /// `ResumeOriginal { pid }` and `KillOriginal { pid }`.
    pub fn end_freeze(&mut self, pid: u32, kill: bool) -> Response {
        let Some(Frozen {
            pid,
            itimers,
            scratch,
            ..
        }) = self.take_frozen(pid)
        else {
            return not_frozen(pid);
        };
        let r = if kill {
            kill_original(pid)
        } else {
            resume_original(pid, &itimers, scratch)
        };
        match r {
            Ok(()) => Response::Ok,
            Err(e) => error(ErrorKind::Failed, e.to_string()),
        }
    }

    /// The process frozen by `Checkpoint { pid }` on this connection, which
    /// the caller now holds.
    pub fn take_frozen(&mut self, pid: u32) -> Option<Frozen> {
        let i = self.frozen.iter().position(|f| f.pid as u32 == pid)?;
        Some(self.frozen.swap_remove(i))
    }

    /// `StartRestore { forward_stdio }`.
    pub fn start(&mut self, forward_stdio: bool) -> Response {
        if self.restoring.is_some() || self.started.is_some() {
            return error(
                ErrorKind::Busy,
                "a restore is already started on this connection",
            );
        }
        match start_child(forward_stdio) {
            Ok(started) => {
                self.started = Some(started);
                Response::Ok
            }
            Err(reply) => reply,
        }
    }

    /// `PreLayout(layout)`, for the child started on this connection.
    pub fn pre_layout(&mut self, layout: &PreLayout) -> Response {
        let Some(started) = self.started.as_mut() else {
            return error(
                ErrorKind::BadRequest,
                "no restore child is started on this connection (send StartRestore first)",
            );
        };
        match pre_layout(&mut started.child, layout) {
            Ok(()) => Response::Ok,
            Err(e) => error(ErrorKind::Failed, format!("cannot lay the restore out ahead: {e}")),
        }
    }

    /// `PrepareRestore { image, forward_stdio }`.
    pub fn prepare(&mut self, image: &[u8], forward_stdio: bool, page_walk: bool) -> Response {
        if self.restoring.is_some() {
            return error(
                ErrorKind::Busy,
                "a restore is already prepared on this connection (send FinishRestore)",
            );
        }
        let image = match ProcessImage::from_bytes(image) {
            Ok(image) => image,
            Err(e) => return error(ErrorKind::BadRequest, format!("invalid image: {e}")),
        };
        let started = match self.started.take() {
            Some(started) if started.forward_stdio == forward_stdio => started,
            Some(_) => {
                return error(
                    ErrorKind::BadRequest,
                    "the child started on this connection has other stdio than this restore asks for",
                )
            }
            None => match start_child(forward_stdio) {
                Ok(started) => started,
                Err(reply) => return reply,
            },
        };
        let (mut child, pages) = match prepare_restore(&image, started.child, page_walk) {
            Ok(prepared) => prepared,
            Err(e) => {
                return error(
                    ErrorKind::Failed,
                    format!("cannot prepare the restore: {e}"),
                )
            }
        };
        // Dropping the child (on an error below) kills it.
        let pid = child.pid();
        if !fits_in_frame(0, &pages) {
            return error(
                ErrorKind::Failed,
                format!("{} pages do not fit in one reply", page_entries(&pages)),
            );
        }
        let forwarded = match (started.outputs, child.take_exit_status()) {
            (None, _) => None,
            (Some([stdout, stderr]), Some(exit)) => Some(Streamed {
                pid,
                stdout: File::from(stdout),
                stderr: File::from(stderr),
                exit,
            }),
            (Some(_), None) => {
                return error(
                    ErrorKind::Failed,
                    "the reaper does not report the exit of the restored process",
                )
            }
        };
        self.restoring = Some(Restoring {
            child,
            image,
            forwarded,
        });
        Response::RestorePrepared {
            pid: pid as u32,
            pages,
        }
    }

    /// `FinishRestore`.
    pub fn finish(&mut self) -> Finished {
        let Some(Restoring {
            child,
            image,
            forwarded,
        }) = self.restoring.take()
        else {
            return Finished::Reply(error(
                ErrorKind::BadRequest,
                "no restore is prepared on this connection (send PrepareRestore first)",
            ));
        };
        match (finish_restore(child, &image), forwarded) {
            (Ok(_), Some(streamed)) => Finished::Forward(streamed),
            (Ok(pid), None) => Finished::Reply(Response::Restored { pid: pid as u32 }),
            (Err(e), _) => Finished::Reply(error(
                ErrorKind::Failed,
                format!("cannot finish the restore: {e}"),
            )),
        }
    }
}

/// Starts the child of a restore with /dev/null as stdin and, with
/// `forward_stdio`, pipes as stdout and stderr (else /dev/null).
fn start_child(forward_stdio: bool) -> Result<Started, Response> {
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| error(ErrorKind::Failed, format!("cannot open /dev/null: {e}")))?;
    // (read end, write end) of the stdout and stderr pipes.
    let pipes: Option<[(OwnedFd, OwnedFd); 2]> = if forward_stdio {
        // The exit status comes from the reaper, registered at the fork.
        reaper::reaper();
        match (stdio_pipe(), stdio_pipe()) {
            (Ok(stdout), Ok(stderr)) => Some([stdout, stderr]),
            (Err(e), _) | (_, Err(e)) => {
                return Err(error(
                    ErrorKind::Failed,
                    format!("cannot create the stdio pipes: {e}"),
                ))
            }
        }
    } else {
        None
    };
    let stdio = match &pipes {
        Some([stdout, stderr]) => [null.as_fd(), stdout.1.as_fd(), stderr.1.as_fd()],
        None => [null.as_fd(); 3],
    };
    let child = start_restore_child(stdio).map_err(|e| {
        error(
            ErrorKind::Failed,
            format!("cannot start the restore: {e}"),
        )
    })?;
    // The write ends go here: the child has its copies.
    Ok(Started {
        child,
        forward_stdio,
        outputs: pipes.map(|[stdout, stderr]| [stdout.0, stderr.0]),
    })
}

impl Drop for Migrations {
    fn drop(&mut self) {
        for precopy in self.precopies.drain(..) {
            eprintln!(
                "pmivmm-agent: client left during a pre-copy; PID {} let go",
                precopy.pid()
            );
            precopy.release();
        }
        for Frozen {
            pid,
            itimers,
            scratch,
            ..
        } in self.frozen.drain(..)
        {
            if let Err(e) = resume_original(pid, &itimers, scratch) {
                eprintln!("pmivmm-agent: cannot resume PID {pid} after its client left: {e}");
            } else {
                eprintln!("pmivmm-agent: client left during a checkpoint; PID {pid} resumed");
            }
        }
        if let Some(started) = self.started.take() {
            eprintln!(
                "pmivmm-agent: client left before its restore; killing the started child PID {}",
                started.child.pid()
            );
        }
        if let Some(restoring) = self.restoring.take() {
            eprintln!(
                "pmivmm-agent: client left during a restore; killing half-restored PID {}",
                restoring.child.pid()
            );
            drop(restoring);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmivmm_proto::image::{PageKind, PageRef, PageWalk, Select, WalkMode, WalkRange};

    #[test]
    fn frame_limit_check() {
        let page = PageRef {
            vaddr: u64::MAX,
            pfn: u64::MAX,
            kind: PageKind::Data,
            dirty: true,
        };
        let listed = |n| Pages {
            listed: vec![page; n],
            walk: None,
        };
        let precopy = Response::PrecopyPages { pages: listed(10) };
        let len = pmivmm_proto::frame::encode_frame(&precopy).unwrap().len();
        assert!(len <= 10 * MAX_PAGE_REF_LEN + REPLY_OVERHEAD);
        // The bound holds for the worst-case encoding, walk ranges included.
        let range = WalkRange {
            start: u64::MAX,
            end: u64::MAX,
            soft_dirty: true,
        };
        let walk = PageWalk {
            root: u64::MAX,
            levels: u8::MAX,
            mode: WalkMode::Present(Select::AllDirty),
            ranges: vec![range; 5],
        };
        let pages = Pages {
            listed: vec![page; 5],
            walk: Some(walk),
        };
        assert_eq!(page_entries(&pages), 10);
        let resp = Response::Checkpointed {
            image: vec![0; 100],
            pages,
        };
        let len = pmivmm_proto::frame::encode_frame(&resp).unwrap().len();
        assert!(len <= 100 + 10 * MAX_PAGE_REF_LEN + REPLY_OVERHEAD);
        assert!(fits_in_frame(1000, &listed(1000)));
        let too_many = MAX_FRAME_LEN as usize / MAX_PAGE_REF_LEN + 1;
        assert!(!fits_in_frame(0, &listed(too_many)));
    }
}
