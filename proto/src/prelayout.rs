//! A process's private anonymous memory, laid out in a migration target's
//! restore child ahead of its image.
//!
//! Faulting a restored process's memory in is the largest part of a restore
//! where guest kernel code is emulated (~20 ms a MiB: a 64 MiB process took
//! 1.5 s of its 2.1 s freeze). The source knows the process's private
//! anonymous memory and its present pages after the first pre-copy round,
//! while the process still runs; the target maps and populates them then,
//! and the restore keeps what the image still has where it was laid out.
//! A [`PreLayout`] is only a head start: what the image does not match is
//! unmapped and built again by the restore.
//!
//! It crosses two trust boundaries (source VMM to target VMM, VMM to
//! agent): [`PreLayout::validate`] bounds it before anything acts on it.

use serde::{Deserialize, Serialize};

use crate::image::{PAGE_SIZE, USER_SPACE_END};

/// At most this many regions ...
pub const MAX_REGIONS: usize = 256;
/// ... and this many address ranges to populate: a layout stays small (the
/// largest are kept, the rest is left to the restore).
pub const MAX_POPULATE: usize = 1024;
/// Present pages are populated together across gaps up to this many pages
/// (populating a few extra pages costs less than another call).
pub const MERGE_GAP_PAGES: u64 = 8;
/// Lowest address a region may start at (`mmap_min_addr`'s usual value).
const MIN_ADDR: u64 = 0x10000;

/// Address ranges `[start, end)`.
pub type Span = (u64, u64);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct PreLayout {
    /// Ranges to map private, anonymous and read-write: sorted, not
    /// overlapping, page-aligned user addresses.
    pub regions: Vec<Span>,
    /// Ranges within `regions` whose pages are faulted in (the pages present
    /// at the source): sorted, not overlapping, page-aligned.
    pub populate: Vec<Span>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreLayoutError {
    #[error("a layout with {count} {what} (at most {max})")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("layout range {start:#x}-{end:#x} is not a page-aligned range of user addresses")]
    Range { start: u64, end: u64 },
    #[error("layout ranges are not sorted or overlap at {0:#x}")]
    Order(u64),
    #[error("range {start:#x}-{end:#x} to populate lies outside the layout's regions")]
    Outside { start: u64, end: u64 },
    #[error("a layout populating {pages} pages (this node has room for {max})")]
    TooLarge { pages: u64, max: u64 },
}

impl PreLayout {
    /// The layout of `regions` (the process's private anonymous memory)
    /// populating the pages at `vaddrs` that lie in them; the largest
    /// [`MAX_REGIONS`] regions and [`MAX_POPULATE`] ranges are kept.
    /// `regions` need not be sorted; overlapping ones are dropped.
    pub fn of(regions: &[Span], vaddrs: impl IntoIterator<Item = u64>) -> PreLayout {
        let mut regions: Vec<Span> = regions.iter().copied().filter(|&(start, end)| valid_range(start, end)).collect();
        regions.sort_unstable();
        regions.dedup_by(|next, kept| next.0 < kept.1);
        let regions = largest(regions, MAX_REGIONS);
        let mut vaddrs: Vec<u64> = vaddrs.into_iter().collect();
        vaddrs.sort_unstable();
        let mut region = 0;
        let pages = vaddrs.into_iter().filter_map(|v| {
            while regions.get(region).is_some_and(|r| r.1 <= v) {
                region += 1;
            }
            regions.get(region).filter(|r| r.0 <= v).map(|r| (r.0, (v, v + PAGE_SIZE)))
        });
        let populate = largest(merge_close(pages), MAX_POPULATE);
        PreLayout { regions, populate }
    }

    /// Pages the layout populates.
    pub fn populated_pages(&self) -> u64 {
        self.populate.iter().map(|(start, end)| (end - start) / PAGE_SIZE).sum()
    }

    /// Checks the bounds and order of everything, and that at most
    /// `max_pages` pages are populated.
    pub fn validate(&self, max_pages: u64) -> Result<(), PreLayoutError> {
        for (what, spans, max) in
            [("regions", &self.regions, MAX_REGIONS), ("ranges to populate", &self.populate, MAX_POPULATE)]
        {
            if spans.len() > max {
                return Err(PreLayoutError::TooMany { what, count: spans.len(), max });
            }
            let mut previous_end = 0;
            for &(start, end) in spans {
                if !valid_range(start, end) {
                    return Err(PreLayoutError::Range { start, end });
                }
                if start < previous_end {
                    return Err(PreLayoutError::Order(start));
                }
                previous_end = end;
            }
        }
        for &(start, end) in &self.populate {
            let i = self.regions.partition_point(|r| r.1 <= start);
            if !self.regions.get(i).is_some_and(|r| r.0 <= start && end <= r.1) {
                return Err(PreLayoutError::Outside { start, end });
            }
        }
        let pages = self.populated_pages();
        if pages > max_pages {
            return Err(PreLayoutError::TooLarge { pages, max: max_pages });
        }
        Ok(())
    }
}

/// Ranges to populate from `pieces`, each a range with the start of the
/// region (VMA) it lies in, in ascending order: neighbours in one region
/// closer than [`MERGE_GAP_PAGES`] pages are merged.
pub fn merge_close(pieces: impl IntoIterator<Item = (u64, Span)>) -> Vec<Span> {
    let mut merged: Vec<Span> = Vec::new();
    for (region_start, (start, end)) in pieces {
        match merged.last_mut() {
            Some(last) if last.0 >= region_start && start - last.1 <= MERGE_GAP_PAGES * PAGE_SIZE => last.1 = end,
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn valid_range(start: u64, end: u64) -> bool {
    start.is_multiple_of(PAGE_SIZE) && end.is_multiple_of(PAGE_SIZE) && MIN_ADDR <= start && start < end && end <= USER_SPACE_END
}

/// The `max` largest of `spans`, in address order.
fn largest(mut spans: Vec<Span>, max: usize) -> Vec<Span> {
    if spans.len() > max {
        spans.sort_unstable_by_key(|&(start, end)| std::cmp::Reverse(end - start));
        spans.truncate(max);
        spans.sort_unstable();
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn present_pages_become_merged_ranges_inside_regions() {
        let regions = [(0x20_0000, 0x30_0000), (0x10_0000, 0x10_4000)];
        let pages = [0x10_0000, 0x10_1000, 0x20_0000, 0x20_0000 + 9 * P, 0x20_0000 + 30 * P, 0x40_0000];
        let layout = PreLayout::of(&regions, pages);
        assert_eq!(layout.regions, [(0x10_0000, 0x10_4000), (0x20_0000, 0x30_0000)]);
        assert_eq!(
            layout.populate,
            [(0x10_0000, 0x10_2000), (0x20_0000, 0x20_0000 + 10 * P), (0x20_0000 + 30 * P, 0x20_0000 + 31 * P)]
        );
        assert_eq!(layout.populated_pages(), 13);
        assert_eq!(layout.validate(13), Ok(()));
        assert_eq!(layout.validate(12), Err(PreLayoutError::TooLarge { pages: 13, max: 12 }));
    }

    #[test]
    fn close_ranges_of_one_region_merge() {
        let pieces = [(0, (0, P)), (0, (9 * P, 10 * P)), (0, (19 * P, 20 * P)), (20 * P, (20 * P, 21 * P))];
        assert_eq!(merge_close(pieces), [(0, 10 * P), (19 * P, 20 * P), (20 * P, 21 * P)]);
    }

    #[test]
    fn ranges_never_merge_across_regions() {
        let layout = PreLayout::of(&[(0x10_0000, 0x10_1000), (0x10_2000, 0x10_3000)], [0x10_0000, 0x10_2000]);
        assert_eq!(layout.populate, [(0x10_0000, 0x10_1000), (0x10_2000, 0x10_3000)]);
    }

    #[test]
    fn bad_and_overlapping_regions_are_dropped_and_the_largest_kept() {
        let layout = PreLayout::of(
            &[(0x10_0000, 0x10_3000), (0x10_1000, 0x10_2000), (0x1000, 0x2000), (0x10_5001, 0x10_6000)],
            [],
        );
        assert_eq!(layout.regions, [(0x10_0000, 0x10_3000)]);
        let many: Vec<Span> = (0..MAX_REGIONS as u64 + 10)
            .map(|i| (0x100_0000 + i * 0x10_0000, 0x100_0000 + i * 0x10_0000 + (i % 7 + 1) * P))
            .collect();
        let layout = PreLayout::of(&many, []);
        assert_eq!(layout.regions.len(), MAX_REGIONS);
        assert!(layout.regions.windows(2).all(|w| w[0].1 <= w[1].0));
        let smallest_kept = layout.regions.iter().map(|r| r.1 - r.0).min().unwrap();
        let dropped = many.iter().filter(|r| !layout.regions.contains(r));
        assert!(dropped.map(|r| r.1 - r.0).all(|len| len <= smallest_kept));
        assert_eq!(layout.validate(0), Ok(()));
    }

    #[test]
    fn hostile_layouts_are_refused() {
        let ok = PreLayout { regions: vec![(0x10_0000, 0x20_0000)], populate: vec![(0x10_0000, 0x10_1000)] };
        assert_eq!(ok.validate(1), Ok(()));
        let bad = |regions: Vec<Span>, populate: Vec<Span>| PreLayout { regions, populate }.validate(u64::MAX);
        assert!(matches!(bad(vec![(0x10_0001, 0x20_0000)], vec![]), Err(PreLayoutError::Range { .. })));
        assert!(matches!(bad(vec![(0x20_0000, 0x10_0000)], vec![]), Err(PreLayoutError::Range { .. })));
        assert!(matches!(bad(vec![(0x10_0000, USER_SPACE_END + P)], vec![]), Err(PreLayoutError::Range { .. })));
        assert!(matches!(bad(vec![(0, P)], vec![]), Err(PreLayoutError::Range { .. })));
        assert_eq!(
            bad(vec![(0x10_0000, 0x20_0000), (0x18_0000, 0x30_0000)], vec![]),
            Err(PreLayoutError::Order(0x18_0000))
        );
        assert_eq!(
            bad(vec![(0x10_0000, 0x20_0000)], vec![(0x1f_f000, 0x20_1000)]),
            Err(PreLayoutError::Outside { start: 0x1f_f000, end: 0x20_1000 })
        );
        assert!(matches!(bad(vec![], vec![(0x10_0000, 0x10_1000)]), Err(PreLayoutError::Outside { .. })));
        let many = (0..MAX_POPULATE as u64 + 1).map(|i| (0x10_0000 + 2 * i * P, 0x10_0000 + (2 * i + 1) * P)).collect();
        assert!(matches!(bad(vec![(0x10_0000, 0x100_0000)], many), Err(PreLayoutError::TooMany { .. })));
    }
}
