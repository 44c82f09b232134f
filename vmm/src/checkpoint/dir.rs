//! The checkpoint directory: what `pmivmm checkpoint -o DIR` writes and
//! `pmivmm restore DIR` reads.
//!
//! * `DIR/pages.bin`: the saved pages, 4096 bytes each, in the order of the
//!   image's page runs ([`ProcessImage::pages`]).
//! * `DIR/descriptor`: a fixed little-endian header, then the encoded image
//!   ([`ProcessImage::to_bytes`]):
//!
//! | offset | size | field                                         |
//! |--------|------|-----------------------------------------------|
//! | 0      | 8    | magic `PMIVCKPT`                              |
//! | 8      | 4    | format version ([`FORMAT_VERSION`])           |
//! | 12     | 4    | image format version ([`IMAGE_VERSION`])      |
//! | 16     | 8    | image length in bytes                         |
//! | 24     | 4    | CRC-32 of the image bytes                     |
//! | 28     | 8    | page count (pages.bin is count * 4096 bytes)  |
//! | 36     | 4    | CRC-32 of pages.bin                           |
//! | 40     | 4    | CRC-32 of bytes 0..40                         |
//!
//! The descriptor is written last, so a directory whose writing was
//! interrupted has none. Reading checks everything (magic, versions, sizes,
//! checksums, image validation, page count against the image) before
//! anything is sent to a guest. CRC-32 detects corruption, not tampering:
//! the image is validated as untrusted input on its own.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use pmivmm_proto::image::{ImageError, ProcessImage, IMAGE_VERSION, PAGE_SIZE};

pub const MAGIC: &[u8; 8] = b"PMIVCKPT";
/// Bump on any change to the layout above.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 44;
/// The descriptor holds the process image: at most this long (an image
/// lists VMAs, fds and signal state, kilobytes in practice).
const MAX_DESCRIPTOR_LEN: u64 = HEADER_LEN as u64 + (16 << 20);
pub const DESCRIPTOR: &str = "descriptor";
pub const PAGES: &str = "pages.bin";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{0} already holds a checkpoint (remove it or choose another directory)")]
    Exists(PathBuf),
    #[error("{path} is not a pmivmm checkpoint (bad magic)")]
    Magic { path: PathBuf },
    #[error("{path}: checkpoint format version {found}, this pmivmm reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: process image format version {found}, this pmivmm reads version {IMAGE_VERSION}")]
    ImageVersion { path: PathBuf, found: u32 },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: the process image is invalid: {source}")]
    Image { path: PathBuf, source: ImageError },
    #[error("{path} holds {pages} pages, more than the node's RAM can hold ({max} pages)")]
    TooLarge { path: PathBuf, pages: u64, max: u64 },
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Checkpoint {
    pub image_bytes: Vec<u8>,
    pub image: ProcessImage,
    /// `image.page_count() * 4096` bytes.
    pub pages: Vec<u8>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DirError + '_ {
    move |error| DirError::Io { path: path.to_owned(), error }
}

/// The descriptor header of a checkpoint of `image` and `pages`.
pub fn header(image: &[u8], pages: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&IMAGE_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&(image.len() as u64).to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(image).to_le_bytes());
    h[28..36].copy_from_slice(&(pages.len() as u64 / PAGE_SIZE).to_le_bytes());
    h[36..40].copy_from_slice(&crc32fast::hash(pages).to_le_bytes());
    let crc = crc32fast::hash(&h[..40]);
    h[40..44].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes a checkpoint into `dir` (created if missing; refused if it
/// already holds one). `pages` must be whole pages.
pub fn write(dir: &Path, image: &[u8], pages: &[u8]) -> Result<(), DirError> {
    assert_eq!(pages.len() as u64 % PAGE_SIZE, 0, "pages must be whole pages");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let descriptor = dir.join(DESCRIPTOR);
    if descriptor.exists() {
        return Err(DirError::Exists(dir.to_owned()));
    }
    let pages_path = dir.join(PAGES);
    write_synced(&pages_path, &[pages])?;
    write_synced(&descriptor, &[&header(image, pages), image])
}

fn write_synced(path: &Path, parts: &[&[u8]]) -> Result<(), DirError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    for p in parts {
        f.write_all(p).map_err(io_err(path))?;
    }
    f.sync_all().map_err(io_err(path))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and verifies the checkpoint in `dir`, which must hold at most
/// `max_pages` pages (sizes are checked before anything is read whole).
pub fn read(dir: &Path, max_pages: u64) -> Result<Checkpoint, DirError> {
    let path = dir.join(DESCRIPTOR);
    let corrupt = |what: String| DirError::Corrupt { path: path.clone(), what };
    let desc_len = fs::metadata(&path).map_err(io_err(&path))?.len();
    if desc_len > MAX_DESCRIPTOR_LEN {
        return Err(corrupt(format!("descriptor of {desc_len} bytes (at most {MAX_DESCRIPTOR_LEN})")));
    }
    let desc = fs::read(&path).map_err(io_err(&path))?;
    if desc.len() < HEADER_LEN {
        if !desc.starts_with(MAGIC) && !MAGIC.starts_with(&desc) {
            return Err(DirError::Magic { path });
        }
        return Err(corrupt(format!("truncated header ({} of {HEADER_LEN} bytes)", desc.len())));
    }
    let h = &desc[..HEADER_LEN];
    if &h[0..8] != MAGIC {
        return Err(DirError::Magic { path });
    }
    if crc32fast::hash(&h[..40]) != u32_at(h, 40) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(DirError::Version { path, found: version });
    }
    let image_version = u32_at(h, 12);
    if image_version != IMAGE_VERSION {
        return Err(DirError::ImageVersion { path, found: image_version });
    }
    let image_len = u64_at(h, 16);
    let image_bytes = &desc[HEADER_LEN..];
    if image_bytes.len() as u64 != image_len {
        return Err(corrupt(format!(
            "image is {} bytes, the header says {image_len}",
            image_bytes.len()
        )));
    }
    if crc32fast::hash(image_bytes) != u32_at(h, 24) {
        return Err(corrupt("image checksum mismatch".into()));
    }
    let image =
        ProcessImage::from_bytes(image_bytes).map_err(|source| DirError::Image { path: path.clone(), source })?;
    let page_count = u64_at(h, 28);
    if page_count != image.page_count() {
        return Err(corrupt(format!(
            "header lists {page_count} pages, the image {}",
            image.page_count()
        )));
    }
    let pages_path = dir.join(PAGES);
    if page_count > max_pages {
        return Err(DirError::TooLarge { path: pages_path, pages: page_count, max: max_pages });
    }
    let expected_len = page_count
        .checked_mul(PAGE_SIZE)
        .ok_or_else(|| corrupt(format!("page count {page_count} overflows")))?;
    let pages_len = fs::metadata(&pages_path).map_err(io_err(&pages_path))?.len();
    if pages_len != expected_len {
        return Err(DirError::Corrupt {
            path: pages_path,
            what: format!("{pages_len} bytes, expected {expected_len} ({page_count} pages)"),
        });
    }
    let pages = fs::read(&pages_path).map_err(io_err(&pages_path))?;
    if pages.len() as u64 != expected_len || crc32fast::hash(&pages) != u32_at(h, 36) {
        return Err(DirError::Corrupt { path: pages_path, what: "page data checksum mismatch".into() });
    }
    Ok(Checkpoint { image_bytes: image_bytes.to_vec(), image, pages })
}

/// A small valid image with `pages` pages in one anonymous VMA (for tests
/// and the fuzz targets' seed inputs).
pub fn sample_image(pages: u64) -> ProcessImage {
    use pmivmm_proto::image::*;
    let start = 0x10_0000u64;
    let end = start + pages.max(1) * PAGE_SIZE;
    ProcessImage {
        version: IMAGE_VERSION,
        source_pid: 42,
        comm: "sample".into(),
        exe: "/bin/sample".into(),
        argv: vec!["sample".into()],
        environ: vec![],
        regs: Regs { cs: USER_CS, ss: USER_SS, ..Default::default() },
        fpu: FpuState { kind: FpuKind::Fxsave, area: vec![0; FXSAVE_AREA_LEN] },
        interrupted_syscall: None,
        mm: MmLayout {
            start_code: 0,
            end_code: 0,
            start_data: 0,
            end_data: 0,
            start_brk: end,
            brk: end,
            start_stack: end,
            arg_start: 0,
            arg_end: 0,
            env_start: 0,
            env_end: 0,
        },
        vmas: vec![Vma {
            start,
            end,
            prot: PROT_READ | PROT_WRITE,
            shared: false,
            offset: 0,
            kind: VmaKind::Anonymous,
        }],
        pages: if pages == 0 { vec![] } else { vec![PageRun { start, count: pages }] },
        signals: SignalState::default(),
        rseq: None,
        itimers: Default::default(),
        sigaltstack: None,
        personality: 0,
        nice: 0,
        fds: vec![],
        cwd: "/".into(),
        umask: 0o22,
        rlimits: vec![],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pmivmm-ckptdir-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn written(name: &str, pages: u64) -> (PathBuf, ProcessImage, Vec<u8>) {
        let dir = scratch(name);
        let image = sample_image(pages);
        let data: Vec<u8> = (0..pages * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        write(&dir, &image.to_bytes(), &data).unwrap();
        (dir, image, data)
    }

    #[test]
    fn round_trip() {
        let (dir, image, data) = written("rt", 3);
        let c = read(&dir, 1 << 20).unwrap();
        assert_eq!(c.image, image);
        assert_eq!(c.pages, data);
        assert_eq!(c.image_bytes, image.to_bytes());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn too_large_for_the_node_or_huge_descriptors_are_refused_before_reading() {
        let (dir, _, _) = written("large", 3);
        let e = read(&dir, 2).unwrap_err();
        assert!(matches!(e, DirError::TooLarge { pages: 3, max: 2, .. }), "{e}");
        // A sparse descriptor of 1 GiB is not read.
        let desc = fs::File::options().write(true).open(dir.join(DESCRIPTOR)).unwrap();
        desc.set_len(1 << 30).unwrap();
        let e = read(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("descriptor of 1073741824 bytes"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_to_overwrite() {
        let (dir, image, data) = written("ow", 1);
        assert!(matches!(write(&dir, &image.to_bytes(), &data), Err(DirError::Exists(_))));
        fs::remove_dir_all(dir).unwrap();
    }

    fn flip(path: &Path, at: usize) {
        let mut b = fs::read(path).unwrap();
        b[at] ^= 0x40;
        fs::write(path, b).unwrap();
    }

    #[test]
    fn corruption_is_detected_everywhere() {
        let (dir, _, _) = written("corrupt", 2);
        let desc = dir.join(DESCRIPTOR);
        let len = fs::read(&desc).unwrap().len();
        // Every byte of the descriptor matters.
        for at in 0..len {
            flip(&desc, at);
            assert!(read(&dir, 1 << 20).is_err(), "flipped descriptor byte {at} went unnoticed");
            flip(&desc, at);
        }
        flip(&dir.join(PAGES), 4097);
        let e = read(&dir, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        flip(&dir.join(PAGES), 4097);
        read(&dir, 1 << 20).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn truncation_and_missing_files() {
        let (dir, _, _) = written("trunc", 2);
        let pages = dir.join(PAGES);
        let b = fs::read(&pages).unwrap();
        fs::write(&pages, &b[..4096]).unwrap();
        let e = read(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("expected 8192"), "{e}");
        fs::remove_file(&pages).unwrap();
        assert!(matches!(read(&dir, 1 << 20), Err(DirError::Io { .. })));
        let desc = dir.join(DESCRIPTOR);
        let d = fs::read(&desc).unwrap();
        fs::write(&desc, &d[..20]).unwrap();
        assert!(read(&dir, 1 << 20).unwrap_err().to_string().contains("truncated header"));
        fs::write(&desc, &d[..d.len() - 1]).unwrap();
        assert!(matches!(read(&dir, 1 << 20), Err(DirError::Corrupt { .. })));
        fs::write(&desc, b"hello").unwrap();
        assert!(matches!(read(&dir, 1 << 20), Err(DirError::Magic { .. })));
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(read(&dir, 1 << 20), Err(DirError::Io { .. })));
    }

    #[test]
    fn wrong_version_is_named() {
        let (dir, _, _) = written("ver", 1);
        let desc = dir.join(DESCRIPTOR);
        let mut d = fs::read(&desc).unwrap();
        d[8..12].copy_from_slice(&7u32.to_le_bytes());
        let crc = crc32fast::hash(&d[..40]);
        d[40..44].copy_from_slice(&crc.to_le_bytes());
        fs::write(&desc, d).unwrap();
        assert!(matches!(read(&dir, 1 << 20), Err(DirError::Version { found: 7, .. })));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn invalid_image_with_good_checksums_is_refused() {
        let dir = scratch("badimg");
        let mut image = sample_image(1);
        image.regs.cs = 0x10; // kernel code segment
        write(&dir, &image.to_bytes(), &[0u8; 4096]).unwrap();
        assert!(matches!(read(&dir, 1 << 20), Err(DirError::Image { .. })));
        fs::remove_dir_all(dir).unwrap();
    }
}
