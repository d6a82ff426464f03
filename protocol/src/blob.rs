//! Blob geometry: bao trees with 16 KiB chunk groups, and chunk range lists.

use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use serde::{Deserialize, Serialize};

/// bao chunk groups of 16 KiB (2^4 chunks of 1 KiB): a 0.39 % outboard.
pub const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(4);
/// Bytes in one chunk group.
pub const GROUP_BYTES: u64 = 16 * 1024;
/// Bytes in one BLAKE3 chunk.
pub const CHUNK_BYTES: u64 = 1024;
/// Most ranges in one request.
pub const MAX_RANGES: usize = 1024;

/// The bao tree of a blob of `size` bytes.
pub fn tree(size: u64) -> BaoTree {
    BaoTree::new(size, BLOCK_SIZE)
}

/// Number of chunk groups in a blob.
pub fn groups(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES)
}

/// A sorted list of disjoint, non-empty half-open chunk ranges `[start, end)`, in 1 KiB
/// chunks, aligned to chunk groups. This is how ranges travel and how verified ranges are
/// stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeList(pub Vec<(u64, u64)>);

/// A range list that is unsorted, overlapping, empty in places or too long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid range list: {0}")]
pub struct RangeError(&'static str);

impl RangeList {
    /// The whole blob of `size` bytes.
    pub fn all(size: u64) -> Self {
        let chunks = size.div_ceil(CHUNK_BYTES).max(1);
        RangeList(vec![(0, chunks)])
    }

    /// Checks the invariants.
    pub fn validate(&self) -> Result<(), RangeError> {
        if self.0.len() > MAX_RANGES {
            return Err(RangeError("too many ranges"));
        }
        let mut prev_end = None;
        for &(s, e) in &self.0 {
            if s >= e {
                return Err(RangeError("empty range"));
            }
            if prev_end.is_some_and(|p| s <= p) {
                return Err(RangeError("ranges unsorted or touching"));
            }
            prev_end = Some(e);
        }
        Ok(())
    }

    /// As bao-tree ranges.
    pub fn to_chunk_ranges(&self) -> ChunkRanges {
        let mut r = ChunkRanges::empty();
        for &(s, e) in &self.0 {
            r |= ChunkRanges::from(ChunkNum(s)..ChunkNum(e));
        }
        r
    }

    /// From bao-tree ranges (bounded ones; an open end is cut at `chunks`).
    pub fn from_chunk_ranges(r: &ChunkRanges, chunks: u64) -> Self {
        let mut out = Vec::new();
        for range in r.iter() {
            use std::ops::{Bound::*, RangeBounds};
            let s = match range.start_bound() {
                Included(c) => c.0,
                Excluded(c) => c.0 + 1,
                Unbounded => 0,
            };
            let e = match range.end_bound() {
                Excluded(c) => c.0,
                Included(c) => c.0 + 1,
                Unbounded => chunks,
            };
            if s < e {
                out.push((s, e));
            }
        }
        RangeList(out)
    }

    /// Total chunks covered.
    pub fn chunks(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether the list covers all chunks of a blob of `size` bytes.
    pub fn covers_all(&self, size: u64) -> bool {
        let want = RangeList::all(size).to_chunk_ranges();
        (want.clone() & self.to_chunk_ranges()) == want
    }

    /// Bytes of a `size`-byte blob that the list covers.
    pub fn bytes(&self, size: u64) -> u64 {
        self.0
            .iter()
            .map(|&(s, e)| (e * CHUNK_BYTES).min(size).saturating_sub(s * CHUNK_BYTES))
            .sum()
    }

    /// An upper bound on the bytes of a bao response for these ranges of a `size`-byte
    /// blob: the data plus 64 bytes for every parent node that can be on the way.
    pub fn encoded_bound(&self, size: u64) -> u64 {
        let data = self.bytes(size);
        let groups = data.div_ceil(GROUP_BYTES) + 2 * self.0.len() as u64;
        data + 64 * (2 * groups + 2 * 64 * self.0.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_lists() {
        assert_eq!(RangeList::all(0).0, vec![(0, 1)]);
        assert_eq!(RangeList::all(1025).0, vec![(0, 2)]);
        assert!(RangeList(vec![(0, 2), (2, 3)]).validate().is_err());
        assert!(RangeList(vec![(3, 3)]).validate().is_err());
        assert!(RangeList(vec![(4, 5), (0, 1)]).validate().is_err());
        let r = RangeList(vec![(0, 16), (32, 48)]);
        r.validate().unwrap();
        assert_eq!(RangeList::from_chunk_ranges(&r.to_chunk_ranges(), 64), r);
        assert_eq!(r.bytes(40 * 1024), 16 * 1024 + 8 * 1024);
        assert!(!r.covers_all(48 * 1024));
        assert!(RangeList(vec![(0, 48)]).covers_all(48 * 1024));
    }
}
