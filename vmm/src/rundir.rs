//! The run directory of each node: `<base>/<name>/` holds the node's control
//! socket and its hybrid-vsock socket, and exists exactly while the node runs.
//! `<base>` is `$PMIVMM_RUN_DIR`, else `/run/pmivmm` for root, else
//! `$XDG_RUNTIME_DIR/pmivmm`, else `/tmp/pmivmm-<uid>`. A node starts only
//! in a base of its user that nobody else can write (see [`check_base`]).

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Longest node name (it becomes a path component and a socket path).
pub const MAX_NAME_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid node name {0:?}: use 1-{MAX_NAME_LEN} letters, digits, '-' or '_', starting with a letter or digit"
    )]
    BadName(String),
    #[error("node {0} is already running (its control socket {1} answers)")]
    AlreadyRunning(String, PathBuf),
    #[error("no node named {name} is running here (no {dir}); `pmivmm nodes` lists the running nodes")]
    NoSuchNode { name: String, dir: PathBuf },
    #[error("cannot create the run directory {0}: {1}")]
    Create(PathBuf, #[source] io::Error),
    #[error("the run-directory base {0} is {1}: set PMIVMM_RUN_DIR to a directory of your own")]
    UnsafeBase(PathBuf, String),
}

/// The run-directory base for this user.
pub fn base() -> PathBuf {
    if let Some(d) = std::env::var_os("PMIVMM_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/pmivmm");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("pmivmm"),
        None => PathBuf::from(format!("/tmp/pmivmm-{uid}")),
    }
}

/// The cluster key nodes of this host use unless told otherwise.
pub fn default_cluster_key() -> PathBuf {
    base().join("cluster.key")
}

/// Checks that `name` is safe as a path component.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

/// Paths of one node's run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    pub name: String,
    pub dir: PathBuf,
}

impl NodePaths {
    pub fn new(name: &str) -> Result<Self, Error> {
        Self::under(&base(), name)
    }

    pub fn under(base: &Path, name: &str) -> Result<Self, Error> {
        validate_name(name)?;
        Ok(NodePaths { name: name.to_owned(), dir: base.join(name) })
    }

    /// The VMM's control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The hybrid-vsock socket (`CONNECT <port>` to reach a guest port).
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The address (`host:port`) the node's peer listener accepts
    /// migrations on, one line.
    pub fn peer_addr(&self) -> PathBuf {
        self.dir.join("peer.addr")
    }

    /// Fails unless the node's run directory exists.
    pub fn existing(name: &str) -> Result<Self, Error> {
        let p = Self::new(name)?;
        if p.dir.is_dir() {
            Ok(p)
        } else {
            Err(Error::NoSuchNode { name: name.to_owned(), dir: p.dir })
        }
    }

    /// Whether a VMM listens on the node's control socket (it may still be
    /// too busy to answer).
    pub fn listening(&self) -> bool {
        UnixStream::connect(self.control()).is_ok()
    }

    /// Creates the run directory for a starting node. A directory left by a
    /// node that died is cleaned up; one whose control socket still answers
    /// belongs to a running node and is an error. The returned guard removes
    /// the directory when dropped.
    pub fn create(&self) -> Result<RunDirGuard, Error> {
        if let Some(base) = self.dir.parent() {
            check_base(base)?;
        }
        if self.listening() {
            return Err(Error::AlreadyRunning(self.name.clone(), self.control()));
        }
        let _ = fs::remove_dir_all(&self.dir);
        fs::create_dir_all(&self.dir).map_err(|e| Error::Create(self.dir.clone(), e))?;
        Ok(RunDirGuard(self.dir.clone()))
    }
}

/// Creates `base` (mode 0700) if it is missing, and checks that it is a
/// directory of this user that no one else can write: the nodes' sockets and
/// the cluster key go there, and a `/tmp/pmivmm-<uid>` may have been made by
/// another user. A symbolic link is refused too (its owner may move it).
fn check_base(base: &Path) -> Result<(), Error> {
    DirBuilder::new().recursive(true).mode(0o700).create(base).map_err(|e| Error::Create(base.to_owned(), e))?;
    let md = fs::symlink_metadata(base).map_err(|e| Error::Create(base.to_owned(), e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let why = if !md.is_dir() {
        "not a directory (a symbolic link?)".to_owned()
    } else if md.uid() != uid {
        format!("owned by uid {}, not by this user (uid {uid})", md.uid())
    } else if md.mode() & 0o022 != 0 {
        format!("writable by others (mode {:o})", md.mode() & 0o7777)
    } else {
        return Ok(());
    };
    Err(Error::UnsafeBase(base.to_owned(), why))
}

/// Removes a node's run directory when the node ends.
#[derive(Debug)]
pub struct RunDirGuard(PathBuf);

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Names of the nodes that have a run directory under `base`, sorted.
pub fn list(base: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_name(n).is_ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["n1", "node-2", "a_b", "X"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../etc", "a/b", ".hidden", "-x", "a b", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_list_and_clean_up() {
        let base = std::env::temp_dir().join(format!("pmivmm-rundir-{}", std::process::id()));
        let p = NodePaths::under(&base, "n1").unwrap();
        {
            let _g = p.create().unwrap();
            assert!(p.dir.is_dir());
            assert_eq!(list(&base), vec!["n1".to_owned()]);
            // A stale directory (nothing listening) is taken over.
            let _g2 = p.create().unwrap();
        }
        assert!(!p.dir.exists());
        assert!(list(&base).is_empty());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn only_a_base_of_this_user_that_no_one_else_writes_is_used() {
        use std::os::unix::fs::PermissionsExt;
        let parent = std::env::temp_dir().join(format!("pmivmm-rundir-base-{}", std::process::id()));
        let base = parent.join("base");
        let p = NodePaths::under(&base, "n3").unwrap();
        drop(p.create().unwrap());
        assert_eq!(fs::metadata(&base).unwrap().mode() & 0o7777, 0o700);
        fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(matches!(p.create(), Err(Error::UnsafeBase(_, why)) if why.contains("mode 1777")));
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        drop(p.create().unwrap());
        // Another user's directory (only root can make one here).
        if std::os::unix::fs::chown(&base, Some(1234), None).is_ok() {
            assert!(matches!(p.create(), Err(Error::UnsafeBase(_, why)) if why.contains("uid 1234")));
        }
        let link = NodePaths::under(&parent.join("link"), "n3").unwrap();
        std::os::unix::fs::symlink(&base, parent.join("link")).unwrap();
        assert!(matches!(link.create(), Err(Error::UnsafeBase(_, why)) if why.contains("symbolic link")));
        let _ = fs::remove_dir_all(&parent);
    }

    #[test]
    fn a_live_control_socket_means_running() {
        let base = std::env::temp_dir().join(format!("pmivmm-rundir-live-{}", std::process::id()));
        let p = NodePaths::under(&base, "n2").unwrap();
        let _g = p.create().unwrap();
        let _l = std::os::unix::net::UnixListener::bind(p.control()).unwrap();
        assert!(matches!(p.create(), Err(Error::AlreadyRunning(..))));
        let _ = fs::remove_dir_all(&base);
    }
}
