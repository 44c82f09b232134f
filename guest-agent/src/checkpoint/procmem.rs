//! Page contents through /proc/PID/mem, by virtual address: what the host
//! tests (and a future `--local` mode without a VMM) use instead of the VMM's
//! copy by guest frame number. One pread/pwrite per run of pages.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use pmivmm_proto::image::{PageRun, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum ProcMemError {
    #[error("/proc/{pid}/mem at {addr:#x} ({len} bytes): {source}")]
    Io {
        pid: i32,
        addr: u64,
        len: usize,
        source: io::Error,
    },
    #[error("{got} bytes of page data for {expected} bytes of pages")]
    Length { got: usize, expected: usize },
}

pub struct ProcMem {
    pid: i32,
    file: File,
}

impl ProcMem {
    pub fn open(pid: i32) -> Result<ProcMem, ProcMemError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|source| ProcMemError::Io {
                pid,
                addr: 0,
                len: 0,
                source,
            })?;
        Ok(ProcMem { pid, file })
    }

    /// The contents of the pages of `runs`, concatenated.
    pub fn read_runs(&self, runs: &[PageRun]) -> Result<Vec<u8>, ProcMemError> {
        let total: u64 = runs.iter().map(|r| r.count * PAGE_SIZE).sum();
        let mut data = vec![0u8; total as usize];
        let mut at = 0;
        for run in runs {
            let len = (run.count * PAGE_SIZE) as usize;
            self.file
                .read_exact_at(&mut data[at..at + len], run.start)
                .map_err(|e| self.err(run.start, len, e))?;
            at += len;
        }
        Ok(data)
    }

    /// Writes `data` (as [`Self::read_runs`] returned it) into the pages of
    /// `runs`.
    pub fn write_runs(&self, runs: &[PageRun], data: &[u8]) -> Result<(), ProcMemError> {
        let expected: u64 = runs.iter().map(|r| r.count * PAGE_SIZE).sum();
        if data.len() as u64 != expected {
            return Err(ProcMemError::Length {
                got: data.len(),
                expected: expected as usize,
            });
        }
        let mut at = 0;
        for run in runs {
            let len = (run.count * PAGE_SIZE) as usize;
            self.file
                .write_all_at(&data[at..at + len], run.start)
                .map_err(|e| self.err(run.start, len, e))?;
            at += len;
        }
        Ok(())
    }

    fn err(&self, addr: u64, len: usize, source: io::Error) -> ProcMemError {
        ProcMemError::Io {
            pid: self.pid,
            addr,
            len,
            source,
        }
    }
}
