//! `voltool/blobs/3`: verified ranges of blobs, between any two fleet members.
//!
//! The origin (coordinator) and every agent serve the same protocol, so "fall back to the
//! origin" only means the origin is the last provider in the list.
//!
//! One request per bidirectional stream. The requester sends a [`BlobRequest`] frame and
//! finishes its send side. For [`BlobRequest::Get`] the provider answers with a
//! [`GetHeader`] frame and, when it is `Ok`, the bao encoding (16 KiB chunk groups,
//! pre-order parents interleaved with leaves, no size prefix) of exactly the requested
//! ranges, then finishes. The requester verifies every parent and leaf against the hash
//! before it writes a byte; a provider that sends one bad byte fails the whole response.
//! For [`BlobRequest::Have`] the provider answers with one [`HaveResponse`] frame.
//!
//! [`BlobRequest::GetMany`] asks for many small blobs whole, on one stream. For each blob
//! in order the provider sends a [`GetHeader`] frame and, when it is `Ok`, exactly the
//! blob's bytes (its size comes from the signed manifest), then goes on with the next; a
//! blob it does not hold gets its header (`NotFound`) and no bytes. The requester hashes
//! each blob whole and compares the hash before it keeps a byte. A provider checks its own
//! copy the same way before it sends it.

use serde::{Deserialize, Serialize};

use crate::blob::RangeList;
use crate::hash::Hash;

/// ALPN of the blob protocol.
pub const ALPN: &[u8] = b"voltool/blobs/3";
/// Largest request frame.
pub const MAX_REQUEST: usize = 64 << 10;
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
    },
    /// Which ranges of the blob do you hold, verified?
    Have {
        /// The blob.
        hash: Hash,
    },
    /// Send these small blobs whole, one after another.
    GetMany {
        /// Each blob and its size from the signed manifest (at most [`MAX_GET_MANY`], each
        /// at most [`MAX_GET_MANY_SIZE`] bytes).
        blobs: Vec<(Hash, u64)>,
    },
}

/// First frame of the answer to [`BlobRequest::Get`].
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
}

/// Answer to [`BlobRequest::Have`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveResponse {
    /// Size of the blob, if held at all.
    pub size: Option<u64>,
    /// Verified chunk ranges held.
    pub ranges: RangeList,
}
