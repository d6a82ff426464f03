//! `voltool/blobs/4`: verified ranges of blobs, between any two fleet members.
//!
//! The origin (coordinator) and every agent serve the same protocol, so "fall back to the
//! origin" only means the origin is the last provider in the list.
//!
//! One request per bidirectional stream. The requester sends a [`BlobRequest`] frame and
//! finishes its send side (but for [`BlobRequest::Subscribe`]). Every request that moves
//! bytes carries the requester's `rank`: how far along its download is, permille, plus
//! [`crate::swarm::BACKGROUND_RANK`] for a background download (a follow, a preheat). A
//! provider serves a few requests at once, lets a few more wait (the lowest rank first: a
//! foreground request before a background one, then the one furthest behind) and answers
//! the rest [`GetHeader::Busy`] (the swarm's [`Admission`]).
//!
//! - [`BlobRequest::Get`]: the provider answers with a [`GetHeader`] frame and, when it is
//!   `Ok`, the bao encoding (16 KiB chunk groups, pre-order parents interleaved with
//!   leaves, no size prefix) of exactly the requested ranges, then finishes. The requester
//!   verifies every parent and leaf against the hash before it writes a byte; a provider
//!   that sends one bad byte fails the whole response.
//! - [`BlobRequest::Pick`]: the requester names the pieces it may take and the provider
//!   (the origin) chooses one, the one it has sent least: [`GetHeader::Picked`] names it,
//!   and the bao encoding of that piece follows, as for `Get`.
//! - [`BlobRequest::Subscribe`]: the provider answers with one [`Held`] frame (the pieces
//!   it holds whole) and then one more each time it holds new pieces (those alone,
//!   coalesced), until the requester finishes or resets its side. A provider that holds
//!   the blob whole, or has as many subscribers as it takes, finishes after the first.
//!   This replaces polling: nobody asks everybody what they have.
//! - [`BlobRequest::GetMany`] asks for many small blobs whole, on one stream. For each
//!   blob in order the provider sends a [`GetHeader`] frame and, when it is `Ok`, exactly
//!   the blob's bytes (its size comes from the signed manifest), then goes on with the
//!   next; a blob it does not hold gets its header (`NotFound`) and no bytes. The requester
//!   hashes each blob whole and compares the hash before it keeps a byte. A provider checks
//!   its own copy the same way before it sends it.
//!
//! [`Admission`]: crate::swarm::Admission

use serde::{Deserialize, Serialize};

use crate::blob::{CHUNK_BYTES, RangeList};
use crate::hash::Hash;
use crate::swarm::PieceSet;

/// ALPN of the blob protocol.
pub const ALPN: &[u8] = b"voltool/blobs/4";
/// Largest request frame.
pub const MAX_REQUEST: usize = 64 << 10;

/// Streams one peer may have open to a node at once (both protocols).
pub const CONNECTION_STREAMS: u32 = 128;
/// Bytes a connection may have received and not yet read, over all its streams.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 8 << 20;
/// Bytes queued to send on one connection.
pub const CONNECTION_SEND_WINDOW: u64 = 8 << 20;
/// What one peer can make a provider hold, whatever it sends: a request frame on each of
/// its streams ([`CONNECTION_STREAMS`] × [`MAX_REQUEST`], 8 MiB) and its connection's
/// windows (16 MiB). A provider decodes a request's sizes against what it holds before it
/// allocates anything for them (a subscription to a blob it does not hold at that size ends
/// at once), gives one peer at most [`crate::swarm::Config::serve_slots_per_peer`] sending
/// slots and [`crate::swarm::Config::serve_queue_per_peer`] places in its queue, and resets
/// an answer its requester has not taken within the swarm's request deadline.
pub const MAX_PER_PEER_BYTES: u64 = CONNECTION_STREAMS as u64 * MAX_REQUEST as u64
    + CONNECTION_RECEIVE_WINDOW as u64
    + CONNECTION_SEND_WINDOW;
/// Largest header or have frame.
pub const MAX_RESPONSE: usize = 64 << 10;
/// Most blobs in one [`BlobRequest::GetMany`].
pub const MAX_GET_MANY: usize = 1024;
/// Largest blob [`BlobRequest::GetMany`] may name: one piece of the swarm downloader.
pub const MAX_GET_MANY_SIZE: u64 = 1 << 20;

/// A request to a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BlobRequest {
    /// Send these chunk ranges of the blob, verified.
    Get {
        /// The blob.
        hash: Hash,
        /// Its size, from the signed manifest.
        size: u64,
        /// Chunk ranges wanted, aligned to chunk groups.
        ranges: RangeList,
        /// How far along the requester's download is, permille.
        rank: u16,
    },
    /// Push which pieces of the blob you hold, now and as you get more.
    Subscribe {
        /// The blob.
        hash: Hash,
        /// Its size, from the signed manifest.
        size: u64,
        /// Bytes of a piece (see [`piece_ranges`]); a provider refuses another size.
        piece_bytes: u64,
    },
    /// Send these small blobs whole, one after another.
    GetMany {
        /// Each blob and its size from the signed manifest (at most [`MAX_GET_MANY`], each
        /// at most [`MAX_GET_MANY_SIZE`] bytes).
        blobs: Vec<(Hash, u64)>,
        /// How far along the requester's download is, permille.
        rank: u16,
    },
    /// Send one piece of `among`, your choice.
    Pick {
        /// The blob.
        hash: Hash,
        /// Its size, from the signed manifest.
        size: u64,
        /// Bytes of a piece (see [`piece_ranges`]); a provider refuses another size.
        piece_bytes: u64,
        /// Pieces the requester may take.
        among: PieceSet,
        /// How far along the requester's download is, permille.
        rank: u16,
    },
}

/// First frame of the answer to [`BlobRequest::Get`] and [`BlobRequest::Pick`], and the
/// frame before each blob of [`BlobRequest::GetMany`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GetHeader {
    /// The encoded ranges follow.
    Ok,
    /// The provider does not hold this blob (or holds it with another size).
    NotFound,
    /// The provider holds the blob only in part and lacks some requested ranges.
    Missing,
    /// The requester is not a fleet member.
    Forbidden,
    /// The request is malformed.
    Invalid,
    /// The provider is sending as much as it will and has a queue already: ask someone
    /// else, or again a little later (not a failure).
    Busy,
    /// The answer to [`BlobRequest::Pick`]: this piece's encoding follows.
    Picked {
        /// The piece.
        unit: u32,
    },
}

/// A frame of a subscription ([`BlobRequest::Subscribe`]): pieces the provider holds whole
/// (all of them in the first frame, those newly held in later ones).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The pieces.
    pub units: PieceSet,
}

/// Pieces of a blob of `size` bytes, in pieces of `piece_bytes`.
pub fn pieces(size: u64, piece_bytes: u64) -> u32 {
    size.div_ceil(piece_bytes.max(1)).max(1) as u32
}

/// Whether `piece_bytes` is a piece size the protocol takes: a non-zero multiple of the
/// 16 KiB chunk group, and a blob's pieces fit a `u32`.
pub fn valid_piece(size: u64, piece_bytes: u64) -> bool {
    piece_bytes > 0
        && piece_bytes.is_multiple_of(crate::blob::GROUP_BYTES)
        && size.div_ceil(piece_bytes) <= u32::MAX as u64
}

/// The chunk ranges of piece `unit` of a blob of `size` bytes (empty past its end).
pub fn piece_ranges(size: u64, piece_bytes: u64, unit: u32) -> RangeList {
    let chunks = size.div_ceil(CHUNK_BYTES).max(1);
    let per = (piece_bytes / CHUNK_BYTES).max(1);
    let start = (unit as u64).saturating_mul(per);
    let end = start.saturating_add(per).min(chunks);
    if start >= end {
        return RangeList::default();
    }
    RangeList(vec![(start, end)])
}

/// The pieces that `held` (verified chunk ranges of a blob of `size` bytes) covers whole.
pub fn pieces_held(size: u64, piece_bytes: u64, held: &RangeList) -> PieceSet {
    let n = pieces(size, piece_bytes);
    let chunks = size.div_ceil(CHUNK_BYTES).max(1);
    let per = (piece_bytes / CHUNK_BYTES).max(1);
    let mut out = PieceSet::empty(n);
    for &(s, e) in &held.0 {
        let (s, e) = (s.min(chunks), e.min(chunks));
        // The first piece starting at or after s, through the last one ending by e.
        let mut u = s.div_ceil(per);
        while u < n as u64 && (u * per + per).min(chunks) <= e {
            out.insert(u as u32);
            u += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_map_to_chunk_ranges_and_back() {
        let (size, pb) = (5 * (512 << 10) + 3000, 512 << 10);
        assert_eq!(pieces(size, pb), 6);
        assert_eq!(piece_ranges(size, pb, 0), RangeList(vec![(0, 512)]));
        assert_eq!(piece_ranges(size, pb, 5), RangeList(vec![(2560, 2563)]));
        assert_eq!(piece_ranges(size, pb, 6), RangeList::default());
        assert_eq!(pieces(0, pb), 1);
        assert_eq!(piece_ranges(0, pb, 0), RangeList(vec![(0, 1)]));
        // A range covering pieces 1 and 2 whole and 3 in part.
        let held = RangeList(vec![(300, 2000)]);
        let p = pieces_held(size, pb, &held);
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![1, 2]);
        let all = pieces_held(size, pb, &RangeList::all(size));
        assert!(all.is_full());
        assert!(valid_piece(size, pb));
        assert!(!valid_piece(size, 1000));
        assert!(!valid_piece(size, 0));
    }

    proptest! {
        #[test]
        fn held_pieces_are_exactly_those_covered(size in 0u64..(40 << 20), per_groups in 1u64..64, cuts in proptest::collection::vec(0u64..50_000, 0..8)) {
            let pb = per_groups * crate::blob::GROUP_BYTES;
            let chunks = size.div_ceil(CHUNK_BYTES).max(1);
            let mut cuts: Vec<u64> = cuts.into_iter().map(|c| c % (chunks + 1)).collect();
            cuts.sort();
            cuts.dedup();
            let list = RangeList(cuts.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0], c[1])).collect());
            let held = pieces_held(size, pb, &list);
            let have = list.to_chunk_ranges();
            for u in 0..pieces(size, pb) {
                let r = piece_ranges(size, pb, u).to_chunk_ranges();
                prop_assert_eq!(held.contains(u), (have.clone() & r.clone()) == r);
            }
        }
    }
}
