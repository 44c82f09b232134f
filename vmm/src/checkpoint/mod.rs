//! Checkpoint and restore of a guest process, run inside the VMM process:
//! the guest agent freezes / rebuilds the process and names its guest
//! frames; the VMM copies page contents straight out of / into guest RAM
//! ([`frames`]), never through vsock or the guest kernel, and keeps them in
//! a checkpoint directory ([`dir`]).
//!
//! Every step of one checkpoint or restore uses ONE agent connection (the
//! agent's ptrace tracer is the connection's thread); dropping the
//! connection on an error makes the agent resume the frozen original or kill
//! the half-restored child.

pub mod dir;
pub mod frames;
pub mod page_walk;

use std::path::Path;
use std::time::{Duration, Instant};

use pmivmm_proto::image::{Pages, ProcessImage, PAGE_SIZE};
use pmivmm_proto::ClientError;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::agent::{self, Agent, AgentError};
use crate::guest_ram::ram_frames;


/// What a checkpoint did, for the CLI and benchmarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub pid: u32,
    pub comm: String,
    /// Present pages the agent reported (data and clean file pages).
    pub present_pages: u64,
    /// Pages saved (their contents are in pages.bin).
    pub data_pages: u64,
    pub image_bytes: u64,
    /// The agent's capture (freeze, /proc, page lists) as seen by the VMM.
    pub capture_us: u64,
    /// Present pages the VMM found by walking the process's page tables
    /// (the rest the agent listed from pagemap).
    pub walked_pages: u64,
    /// The VMM's walk of the page tables the agent named (0 without one).
    pub walk_us: u64,
    /// Reading the saved pages out of guest RAM.
    pub read_us: u64,
    /// A plain memcpy of the same bytes in the same run, for comparison.
    pub memcpy_us: u64,
    /// Writing the checkpoint directory.
    pub write_us: u64,
    /// From the freeze request until the original was killed or resumed.
    pub frozen_us: u64,
    pub total_us: u64,
    /// The original still runs (`--leave-running`).
    pub left_running: bool,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreReport {
    pub pid: u32,
    pub comm: String,
    pub data_pages: u64,
    /// Reading and verifying the directory.
    pub read_dir_us: u64,
    /// The agent building the process and faulting its pages in.
    pub prepare_us: u64,
    /// The VMM's walk of the new process's page tables (0 without one).
    pub walk_us: u64,
    /// Writing the saved pages into guest RAM.
    pub write_us: u64,
    /// The agent restoring registers, fds, signals and letting it run.
    pub finish_us: u64,
    pub total_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reach(#[from] AgentError),
    #[error("{0}")]
    Agent(ClientError),
    #[error("the agent sent an invalid process image: {0}")]
    BadImage(pmivmm_proto::image::ImageError),
    #[error(transparent)]
    Frames(#[from] frames::FrameError),
    #[error(transparent)]
    Dir(#[from] dir::DirError),
}

fn agent_error(e: ClientError) -> Error {
    Error::Agent(e)
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn connect(vsock: Option<&Path>) -> Result<Agent, Error> {
    Ok(agent::connect(vsock)?)
}

/// Checkpoints process `pid` of the guest into `out`. The original is
/// killed once the directory is written, or left running (`leave_running`,
/// or after any error).
pub fn checkpoint(
    memory: &GuestMemoryMmap,
    vsock: Option<&Path>,
    pid: u32,
    out: &Path,
    leave_running: bool,
    page_walk: bool,
) -> Result<CheckpointReport, Error> {
    let start = Instant::now();
    if out.join(dir::DESCRIPTOR).exists() {
        return Err(dir::DirError::Exists(out.to_owned()).into());
    }
    let mut client = connect(vsock)?;
    let frozen_at = Instant::now();
    let (image_bytes, pages) = client.checkpoint(pid, page_walk).map_err(agent_error)?;
    let capture = frozen_at.elapsed();
    let saved = save(memory, &image_bytes, pages, out);
    let end = match (&saved, leave_running) {
        (Ok(_), false) => client.kill_original(pid),
        _ => client.resume_original(pid),
    };
    let frozen = frozen_at.elapsed();
    let Saved { image, image_bytes, present_pages, walked_pages, walk, read, memcpy, write } = saved?;
    end.map_err(agent_error)?;
    Ok(CheckpointReport {
        pid,
        comm: image.comm,
        present_pages,
        walked_pages,
        data_pages: image.pages.iter().map(|r| r.count).sum(),
        image_bytes,
        capture_us: us(capture),
        walk_us: us(walk),
        read_us: us(read),
        memcpy_us: us(memcpy),
        write_us: us(write),
        frozen_us: us(frozen),
        total_us: us(start.elapsed()),
        left_running: leave_running,
    })
}

/// What [`save`] did.
struct Saved {
    image: ProcessImage,
    image_bytes: u64,
    present_pages: u64,
    walked_pages: u64,
    walk: Duration,
    read: Duration,
    memcpy: Duration,
    write: Duration,
}

/// Validates what the agent sent, walks the page tables it named, copies
/// the pages and writes the directory.
fn save(memory: &GuestMemoryMmap, image_bytes: &[u8], pages: Pages, out: &Path) -> Result<Saved, Error> {
    let mut image = ProcessImage::from_bytes(image_bytes).map_err(Error::BadImage)?;
    let t = Instant::now();
    let listed = pages.listed.len();
    let pages = frames::resolve_capture(memory, &mut image, pages)?;
    let walk = t.elapsed();
    let image_bytes = image.to_bytes();
    frames::check_frames(memory, &pages)?;
    let data = frames::data_pages(&pages, &image.pages)?;
    let mut buf = vec![0u8; data.len() * PAGE_SIZE as usize];
    // Touch the buffer first so that the timing is of the copy, not of
    // host page faults.
    buf.iter_mut().step_by(PAGE_SIZE as usize).for_each(|b| *b = 1);
    let t = Instant::now();
    frames::read_pages(memory, &data, &mut buf)?;
    let read = t.elapsed();
    let memcpy = time_memcpy(&buf);
    let t = Instant::now();
    dir::write(out, &image_bytes, &buf)?;
    Ok(Saved {
        image,
        image_bytes: image_bytes.len() as u64,
        present_pages: pages.len() as u64,
        walked_pages: (pages.len() - listed) as u64,
        walk,
        read,
        memcpy,
        write: t.elapsed(),
    })
}

/// The time of one plain copy of `src` into a fresh (pre-faulted) buffer.
fn time_memcpy(src: &[u8]) -> Duration {
    let mut dst = vec![1u8; src.len()];
    let t = Instant::now();
    dst.copy_from_slice(src);
    let d = t.elapsed();
    std::hint::black_box(&dst);
    d
}

/// Restores the checkpoint in `from` as a new process of the guest.
pub fn restore(
    memory: &GuestMemoryMmap,
    vsock: Option<&Path>,
    from: &Path,
    page_walk: bool,
) -> Result<RestoreReport, Error> {
    let start = Instant::now();
    let ckpt = dir::read(from, ram_frames(memory))?;
    let read_dir = start.elapsed();
    let mut client = connect(vsock)?;
    let t = Instant::now();
    let (_pid, targets) = client.prepare_restore(ckpt.image_bytes.clone(), false, page_walk).map_err(agent_error)?;
    let prepare = t.elapsed();
    // On any error from here on, dropping `client` closes the connection and
    // the agent kills the half-restored child.
    let t = Instant::now();
    let targets = frames::resolve(memory, targets)?;
    let walk = t.elapsed();
    frames::check_order(&targets, &ckpt.image.pages)?;
    let t = Instant::now();
    frames::write_pages(memory, &targets, &ckpt.pages)?;
    let write = t.elapsed();
    let t = Instant::now();
    let pid = client.finish_restore().map_err(agent_error)?;
    let finish = t.elapsed();
    Ok(RestoreReport {
        pid,
        comm: ckpt.image.comm,
        data_pages: targets.len() as u64,
        read_dir_us: us(read_dir),
        prepare_us: us(prepare),
        walk_us: us(walk),
        write_us: us(write),
        finish_us: us(finish),
        total_us: us(start.elapsed()),
    })
}
