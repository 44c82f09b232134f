//! The file systems a node needs, mounted by the agent as PID 1.
//!
//! Each is one mount(2) here; done by /init with busybox `mount`, each would
//! cost a fork+exec (~0.6 s of emulated guest kernel on the development
//! hosts), so /init only execs the agent.

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// The host directory shared into the node (`pmivmm --node --share DIR`):
/// the VMM passes its path and 9P mount tag on the kernel command line as
/// `PMIVMM_SHARE=<dir> PMIVMM_SHARE_TAG=<tag>`, which the kernel puts into
/// init's environment.
const SHARE_ENV: &str = "PMIVMM_SHARE";
const SHARE_TAG_ENV: &str = "PMIVMM_SHARE_TAG";
const DEFAULT_SHARE_TAG: &str = "pmivmm";
const SHARE_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=262144,cache=none";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount {fstype} on {target}: {errno}")]
    Mount { fstype: String, target: String, errno: nix::Error },
    #[error("cannot create the mount point {0}: {1}")]
    MountPoint(String, std::io::Error),
}

fn mount_fs(source: &str, target: &str, fstype: &str, data: Option<&str>) -> Result<(), MountError> {
    match mount(Some(source), target, Some(fstype), MsFlags::empty(), data) {
        // Already mounted (an /init that mounted it itself): fine.
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(errno) => Err(MountError::Mount { fstype: fstype.into(), target: target.into(), errno }),
    }
}

/// Mounts /proc, /sys and /dev.
pub fn mount_kernel_filesystems() -> Result<(), MountError> {
    mount_fs("proc", "/proc", "proc", None)?;
    mount_fs("sysfs", "/sys", "sysfs", None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", None)
}

/// Mounts the node's shared directory if the VMM configured one; returns
/// where it was mounted.
pub fn mount_share() -> Result<Option<String>, MountError> {
    let Ok(dir) = std::env::var(SHARE_ENV) else {
        return Ok(None);
    };
    let tag = std::env::var(SHARE_TAG_ENV).unwrap_or_else(|_| DEFAULT_SHARE_TAG.into());
    std::fs::create_dir_all(Path::new(&dir)).map_err(|e| MountError::MountPoint(dir.clone(), e))?;
    mount_fs(&tag, &dir, "9p", Some(SHARE_OPTIONS))?;
    Ok(Some(dir))
}
