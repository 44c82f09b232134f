//! The cluster key: 32 secret bytes that every node of a cluster holds, and
//! that a peer link proves knowledge of before anything else crosses it.
//!
//! On disk it is a file of 64 hex digits (surrounding whitespace ignored),
//! readable by its owner only. The key never appears in `Debug` or
//! `Display` output; [`ClusterKey::fingerprint`] tells keys apart in logs.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in a cluster key.
pub const KEY_LEN: usize = 32;
/// Hex digits in a key file.
const HEX_LEN: usize = 2 * KEY_LEN;
/// Longest key file read: a key file is 65 bytes, anything much longer is
/// the wrong file (and `/dev/zero` must not be read forever).
const MAX_FILE_LEN: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "cluster key file {0} does not exist (every node of a cluster needs a copy of the same key file)"
    )]
    Missing(PathBuf),
    #[error("cannot read cluster key file {0}: {1}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cluster key file {path} holds {len} characters, expected {HEX_LEN} hex digits (a {KEY_LEN}-byte key)")]
    Length { path: PathBuf, len: usize },
    #[error("cluster key file {path}: character {at} is not a hex digit (expected {HEX_LEN} hex digits)")]
    NotHex { path: PathBuf, at: usize },
    #[error("cannot create cluster key file {0}: {1}")]
    Create(PathBuf, #[source] io::Error),
    #[error("cannot get random bytes for a new cluster key: {0}")]
    Random(getrandom::Error),
}

/// The secret shared by the nodes of a cluster.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_LEN]);

impl ClusterKey {
    /// A key with these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        ClusterKey(bytes)
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes).map_err(KeyError::Random)?;
        Ok(ClusterKey(bytes))
    }

    /// Reads the key file at `path`. Warns (but goes on) if other users may
    /// access the file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read_error = |e: io::Error| KeyError::Read(path.to_owned(), e);
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => KeyError::Missing(path.to_owned()),
            _ => read_error(e),
        })?;
        let mode = file.metadata().map_err(read_error)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "cluster key file {} is accessible by other users (mode {:04o}): run chmod 600 on it",
                path.display(),
                mode & 0o7777
            );
        }
        let mut text = Vec::new();
        file.take(MAX_FILE_LEN).read_to_end(&mut text).map_err(read_error)?;
        Self::parse(path, &text)
    }

    /// Reads the key file at `path`, or creates it (mode 0600, parent
    /// directories 0700) with a new random key if there is none. The file
    /// appears atomically, complete: when several processes race to create
    /// it, one wins and the others load the winner's key.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match Self::load(path) {
            Err(KeyError::Missing(_)) => (),
            loaded => return loaded,
        }
        let key = Self::generate()?;
        let create_error = |e: io::Error| KeyError::Create(path.to_owned(), e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(create_error)?;
        }
        let tmp = temp_path(path);
        key.write_new(&tmp).map_err(create_error)?;
        // link(2) fails if `path` exists, so only a complete file ever gets
        // the name, and exactly one racer wins.
        let linked = fs::hard_link(&tmp, path);
        // The key stays at `path` if linked; a leftover temporary is harmless.
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                tracing::info!("created cluster key file {} (key {})", path.display(), key.fingerprint());
                Ok(key)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(create_error(e)),
        }
    }

    /// A short, non-secret name of the key for diagnostics: two nodes show
    /// the same fingerprint exactly when they hold the same key (up to
    /// 32-bit collisions).
    pub fn fingerprint(&self) -> String {
        hex(&self.derive("pmivmm cluster key fingerprint v1")[..4])
    }

    /// A key for one use of the cluster key other than the peer link's (the
    /// multicast discovery beacons): BLAKE3 in derive-key mode, `context`
    /// naming the use, so that neither reveals anything of the other or of
    /// the cluster key.
    pub fn derive(&self, context: &str) -> [u8; KEY_LEN] {
        blake3::derive_key(context, &self.0)
    }

    pub(super) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn parse(path: &Path, text: &[u8]) -> Result<Self, KeyError> {
        let text = text.trim_ascii();
        if text.len() != HEX_LEN {
            return Err(KeyError::Length { path: path.to_owned(), len: text.len() });
        }
        let mut bytes = [0u8; KEY_LEN];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let digit = |j: usize| {
                hex_value(pair[j])
                    .ok_or_else(|| KeyError::NotHex { path: path.to_owned(), at: 2 * i + j + 1 })
            };
            bytes[i] = (digit(0)? << 4) | digit(1)?;
        }
        Ok(ClusterKey(bytes))
    }

    /// Writes the key to a new file `path` (mode 0600), synced to disk.
    fn write_new(&self, path: &Path) -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        let written = file.write_all(format!("{}\n", hex(&self.0)).as_bytes()).and_then(|()| file.sync_all());
        if written.is_err() {
            let _ = fs::remove_file(path);
        }
        written
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// A name next to `path` that no other process or thread uses.
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    path.with_file_name(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_value(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pmivmm-key-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_key_file(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn load_trims_whitespace_and_accepts_both_cases() {
        let dir = temp_dir("load");
        let path = dir.join("key");
        write_key_file(&path, &format!("  {}\n\n", HEX_KEY.to_uppercase()), 0o600);
        let key = ClusterKey::load(&path).unwrap();
        let expected: Vec<u8> = (0..32).collect();
        assert_eq!(key.as_bytes()[..], expected[..]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_errors_are_clear() {
        let dir = temp_dir("errors");
        let path = dir.join("key");
        let err = ClusterKey::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Missing(_)), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");

        write_key_file(&path, "abcd\n", 0o600);
        let err = ClusterKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("holds 4 characters, expected 64 hex digits"), "{err}");

        let mut bad = HEX_KEY.to_owned();
        bad.replace_range(10..11, "g");
        write_key_file(&path, &bad, 0o600);
        let err = ClusterKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("character 11 is not a hex digit"), "{err}");

        // Multi-byte characters are not hex either (and do not split).
        let bad = format!("é{}", &HEX_KEY[2..]);
        write_key_file(&path, &bad, 0o600);
        assert!(matches!(ClusterKey::load(&path), Err(KeyError::NotHex { at: 1, .. })));

        // A group-readable file loads (with a warning).
        write_key_file(&path, HEX_KEY, 0o644);
        assert!(ClusterKey::load(&path).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_or_create_creates_once() {
        let dir = temp_dir("create");
        let path = dir.join("sub").join("cluster.key");
        let created = ClusterKey::load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 65);
        let loaded = ClusterKey::load_or_create(&path).unwrap();
        assert_eq!(created.as_bytes(), loaded.as_bytes());
        // Nothing but the key is left in the directory.
        let names: Vec<_> =
            fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["cluster.key"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn racing_creators_agree() {
        let dir = temp_dir("race");
        let path = dir.join("cluster.key");
        let keys: Vec<ClusterKey> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..8).map(|_| s.spawn(|| ClusterKey::load_or_create(&path).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for key in &keys {
            assert_eq!(key.as_bytes(), keys[0].as_bytes());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_is_never_printed() {
        let key = ClusterKey::from_bytes([0xab; KEY_LEN]);
        assert_eq!(format!("{key:?}"), "ClusterKey(<redacted>)");
        assert_eq!(format!("{key}"), "ClusterKey(<redacted>)");
        let fingerprint = key.fingerprint();
        assert_eq!(fingerprint.len(), 8);
        assert!(!hex(key.as_bytes()).contains(&fingerprint));
        assert_ne!(fingerprint, ClusterKey::from_bytes([0xac; KEY_LEN]).fingerprint());
    }
}
