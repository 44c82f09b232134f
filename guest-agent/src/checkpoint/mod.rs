//! The process checkpoint/restore engine.
//!
//! * [`capture`] freezes a process and describes it ([`ProcessImage`] plus the
//!   guest frame of every present page); [`resume_original`] or
//!   [`kill_original`] end the freeze.
//! * [`prepare_restore`] builds a child with the image's memory layout and
//!   reports the frames that must receive the saved pages;
//!   [`finish_restore`] restores the rest and lets the process run.
//! * [`Precopy`] runs pre-copy rounds on a process that keeps running and
//!   ends them with the checkpoint ([`Precopy::capture`]) or by letting it
//!   go.
//! * [`ProcMem`] reads and writes page contents through /proc/PID/mem, where
//!   no VMM copies them (host tests, local mode).
//!
//! Everything is plain Linux: the tests run on the host, as root.

mod capture;
mod inject;
mod pagemap;
mod pagetables;
mod precopy;
mod procfs;
mod procmem;
mod restore;
mod rlimits;
mod stub;
mod tracee;

#[cfg(test)]
mod tests;

pub use capture::{capture, kill_original, resume_original, CheckpointError, LeftScratch};
pub(crate) use capture::{injector_for, SIGSET_LEN};
pub(crate) use inject::{InjectError, Injector};
pub use pagemap::soft_dirty_tracked;
pub use precopy::{Precopy, Tended};
pub(crate) use procfs::parse_status;
pub use procmem::{ProcMem, ProcMemError};
pub use restore::{finish_restore, pre_layout, prepare_restore, start_restore_child, RestoreError, RestoredChild};
pub(crate) use tracee::{is_end, untrace, wait_for_end, wait_raw_status, PtraceError, Tracee};

pub use pmivmm_proto::image::ProcessImage;
