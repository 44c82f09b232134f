//! Checkpoint directories read from disk (`pmivmm restore DIR`): a
//! descriptor and a page file as they come, or with checksums that match
//! (so that the process image and page count behind them are reached).

use std::cell::RefCell;
use std::fs;
use std::path::PathBuf;

use pmivmm_proto::image::{ProcessImage, PAGE_SIZE};

use super::class;
use crate::checkpoint::dir::{self, DESCRIPTOR, PAGES};

/// Most pages a fuzzed directory gets (when its image asks for more, it gets none).
const MAX_PAGES: u64 = 16;

thread_local! {
    /// This thread's scratch directory.
    static SCRATCH: RefCell<Option<super::Scratch>> = const { RefCell::new(None) };
}

fn scratch() -> PathBuf {
    SCRATCH.with(|s| {
        s.borrow_mut()
            .get_or_insert_with(|| super::scratch_dir("checkpoint"))
            .0
            .clone()
    })
}

pub fn run_one(data: &[u8]) -> String {
    let Some((&mode, bytes)) = data.split_first() else { return "empty".into() };
    let dir = scratch();
    let (descriptor, pages) = if mode % 2 == 0 {
        // As they come: the descriptor, then the page file after a 2-byte length.
        let (desc_len, rest) = match bytes {
            [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])).min(rest.len()), rest),
            _ => (0, bytes),
        };
        (rest[..desc_len].to_vec(), rest[desc_len..].to_vec())
    } else {
        // A consistent header over the input as the image.
        let count = postcard::from_bytes::<ProcessImage>(bytes).map_or(0, |i| i.page_count());
        let pages = if count <= MAX_PAGES { vec![0x5a; (count * PAGE_SIZE) as usize] } else { Vec::new() };
        ([&dir::header(bytes, &pages)[..], bytes].concat(), pages)
    };
    let written = fs::write(dir.join(DESCRIPTOR), descriptor).and_then(|_| fs::write(dir.join(PAGES), pages));
    if let Err(e) = written {
        // Not the decoder's doing: a full or missing /tmp.
        panic!("cannot write the fuzz checkpoint into {}: {e}", dir.display());
    }
    match dir::read(&dir, 1 << 16) {
        Ok(c) => format!("read {} pages", c.image.page_count().min(2)),
        Err(dir::DirError::Corrupt { what, .. }) => {
            let word = what.split(' ').find(|w| !w.contains(|c: char| c.is_ascii_digit())).unwrap_or("");
            format!("Corrupt {word}")
        }
        Err(e) => class(&e),
    }
}

/// A valid checkpoint of two pages, raw and through the consistent header.
pub fn seeds() -> Vec<Vec<u8>> {
    let image = dir::sample_image(2).to_bytes();
    let pages = vec![7u8; 2 * PAGE_SIZE as usize];
    let descriptor = [&dir::header(&image, &pages)[..], &image].concat();
    let mut raw = vec![0];
    raw.extend((descriptor.len() as u16).to_le_bytes());
    raw.extend(descriptor);
    raw.extend(pages);
    vec![raw, [&[1u8][..], &image].concat()]
}
