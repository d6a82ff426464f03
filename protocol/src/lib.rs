//! voltool's sans-IO core: hashes, paths, manifests, commits and signed heads, and the wire
//! messages. No I/O, no clock, no async: everything here can be tested exhaustively.
//!
//! # Wire specification, version 3
//!
//! ## Goals
//! - Every byte a node uses or passes on is verified against a BLAKE3 hash from a
//!   coordinator-signed head first.
//! - Any range of any blob can be fetched from any holder, complete or partial, so a swarm
//!   can split a blob between providers; the origin speaks the same protocol as a peer.
//! - Nothing a peer sends is trusted for sizes or allocation.
//!
//! ## Non-goals
//! - Encryption or authentication beyond what QUIC/TLS with node keys gives (it gives both).
//! - Compatibility across protocol versions: a new version is a new ALPN.
//!
//! ## Transport
//! QUIC (iroh) between node keys. One ALPN per protocol: [`coord::ALPN`]
//! (`voltool/coord/5`) and [`blobs::ALPN`] (`voltool/blobs/4`). Each request uses its own
//! bidirectional stream: request frame, requester finishes; response, provider finishes
//! (a subscription's provider pushes frames until the requester goes).
//!
//! ## Frames
//! `len: u32 LE` then `len` bytes of [postcard](https://docs.rs/postcard) (varint integers,
//! enums as a varint variant index, strings and byte strings as varint length + bytes,
//! `Option` as 0/1 + value, fixed arrays as their bytes). Each message type has a maximum
//! frame length ([`coord::MAX_REQUEST`], [`blobs::MAX_REQUEST`] …) checked before the body
//! is read. A body with trailing bytes is refused.
//!
//! ## Messages
//! - [`coord::CoordRequest`] / [`coord::CoordResponse`]: volume registry, heads, uploads
//!   (raw bytes after the frame), commits (a `Commit` frame, then the change set in
//!   [`coord::CommitPart`] frames of at most [`coord::MAX_COMMIT_PART`] changes, the last
//!   one marked; the head moves only after the last), and the tracker: `Announce`,
//!   `Withdraw`, `Heartbeat` (holdings expire without one), `Lookup` and `LookupAll` (a
//!   bounded sample of live holders ranked by zone, then the asker's reported round-trip
//!   times, then completeness; the origin last), `Rtts`, `Report` (a provider's bytes
//!   failed verification), `Members`.
//! - [`control::Request`] / [`control::Event`]: the local control socket between the CLI
//!   (or the Python package, which writes the same messages as serde JSON) and the agent of
//!   its host; see [`control`].
//! - [`blobs::BlobRequest`]: `Get { hash, size, ranges, rank }` is answered by a
//!   [`blobs::GetHeader`] frame and the bao encoding of the ranges (or `Busy` at once when
//!   the provider's sending slots and queue are full); `Pick { .., among, rank }` by
//!   `Picked { unit }` and that piece's encoding; `Subscribe { hash, size, piece_bytes }`
//!   by [`blobs::Held`] frames as the provider gets pieces; `GetMany { blobs, rank }` by a
//!   header and the whole bytes of each small blob in turn.
//!
//! ## Blobs
//! A blob is a file's bytes or an encoded manifest. Its bao tree uses 16 KiB chunk groups
//! ([`blob::BLOCK_SIZE`]); ranges are in 1 KiB chunks, sorted, disjoint
//! ([`blob::RangeList`]). The encoding carries no size: it comes from the signed manifest.
//!
//! ## Heads
//! [`commit::SignedHead`]: a [`commit::Commit`] and the coordinator's ed25519 signature
//! over `b"voltool/head/v1\0"` followed by the commit's postcard encoding. Agents accept a
//! head only if it verifies under the configured coordinator id and does not roll back.
//!
//! ## Manifests
//! See [`tree`]: a head names the root page of a tree of pages (each a blob), whose leaves
//! hold the entries in strictly increasing path order; pages are split by content, so the
//! same entries make the same tree and one change touches one page per level.

pub mod blob;
pub mod blobs;
pub mod commit;
pub mod control;
pub mod coord;
pub mod frame;
pub mod hash;
pub mod links;
pub mod manifest;
pub mod path;
pub mod swarm;
pub mod tree;
pub mod volume;

pub use blob::RangeList;
pub use commit::{Commit, HeadError, SignedHead, VolumeId};
pub use hash::Hash;
pub use manifest::{Change, Entry, Manifest, ManifestError};
pub use path::{PathError, VolPath};
pub use tree::{PageRef, PageSource, Shape, TreeError};

/// Re-exported key types: node ids are ed25519 public keys.
pub use iroh_base::{PublicKey, SecretKey};

#[cfg(test)]
mod wire_tests;
