//! Resource limits of a process, asked with prlimit(2): a syscall per
//! resource costs far less than reading /proc/PID/limits, whose formatting
//! took 40-60 ms of a frozen process's capture (and of its restore) in the
//! emulated guest kernel of these hosts.

use nix::errno::Errno;

/// The resources Linux keeps limits for (`RLIM_NLIMITS`, the lines of
/// /proc/PID/limits).
const RESOURCES: u32 = 16;

#[derive(Debug, thiserror::Error)]
#[error("cannot read resource limit {resource} of PID {pid}: {errno}")]
pub struct RlimitError {
    pid: i32,
    resource: u32,
    errno: Errno,
}

/// `(resource, soft, hard)` for every resource of `pid`, in resource order.
pub fn of(pid: i32) -> Result<Vec<(u32, u64, u64)>, RlimitError> {
    (0..RESOURCES)
        .map(|resource| {
            let mut old = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: without a new limit, prlimit64 only writes the old one
            // into `old`, a valid rlimit64 of ours.
            let rc = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
            Errno::result(rc).map_err(|errno| RlimitError {
                pid,
                resource,
                errno,
            })?;
            Ok((resource, old.rlim_cur, old.rlim_max))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_limits_match_getrlimit() {
        let limits = of(std::process::id() as i32).unwrap();
        assert_eq!(limits.len(), RESOURCES as usize);
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(
            limits[libc::RLIMIT_NOFILE as usize],
            (libc::RLIMIT_NOFILE, soft, hard)
        );
    }

    #[test]
    fn a_missing_process_is_an_error() {
        let err = of(i32::MAX).unwrap_err();
        assert_eq!(err.errno, Errno::ESRCH);
    }
}
