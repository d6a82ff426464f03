//! `voltool/coord/6`: what agents ask the coordinator.
//!
//! One request per bidirectional QUIC stream: the agent sends a [`CoordRequest`] frame and,
//! for [`CoordRequest::Upload`], the raw bytes of every blob it names after it, one after
//! another, or for [`CoordRequest::Commit`] its [`CommitPart`] frames, then finishes its
//! send side; the coordinator answers with one [`CoordResponse`] frame and finishes.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::commit::{Commit, SignedHead, VolumeId};
use crate::hash::Hash;
use crate::manifest::{Change, Entry};
use crate::path::VolPath;

/// ALPN of the coordinator protocol.
pub const ALPN: &[u8] = b"voltool/coord/8";
/// Largest request frame. A commit's change set comes in [`CommitPart`] frames of their own
/// (at most [`MAX_COMMIT_PART_BYTES`]), read only from a writer once its request is admitted;
/// every other request fits in this.
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest response frame.
pub const MAX_RESPONSE: usize = 64 << 20;
/// Requests of one member the coordinator serves at once; its further streams wait unread.
pub const REQUESTS_PER_MEMBER: usize = 16;
/// What one member can make the coordinator hold, whatever it sends, the tracker aside:
/// [`REQUESTS_PER_MEMBER`] request frames of at most [`MAX_REQUEST`] and its connection's
/// windows ([`crate::blobs::CONNECTION_RECEIVE_WINDOW`], [`crate::blobs::CONNECTION_SEND_WINDOW`]).
/// A frame's memory follows the bytes that came, never the length its prefix announces. The
/// tracker keeps at most [`crate::swarm::Config::max_held_per_member`] entries of one member
/// (about 100 bytes each), and only for blobs the origin holds. A writer's commit part (at most
/// [`MAX_COMMIT_PART_BYTES`]) is read only while it holds the one commit lock, for at most the
/// coordinator's commit deadline.
pub const MAX_PER_MEMBER_BYTES: u64 = REQUESTS_PER_MEMBER as u64 * MAX_REQUEST as u64
    + crate::blobs::CONNECTION_RECEIVE_WINDOW as u64
    + crate::blobs::CONNECTION_SEND_WINDOW;
/// Most hashes in one [`CoordRequest::HasBlobs`], [`CoordRequest::Announce`] or
/// [`CoordRequest::Withdraw`] (half a MiB of hashes).
pub const MAX_HAS: usize = 16_384;
/// Longest zone label, in bytes.
pub const MAX_ZONE: usize = 64;
/// Most blobs in one [`CoordRequest::Upload`].
pub const MAX_UPLOAD_BLOBS: usize = 4096;

/// A request to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CoordRequest {
    /// Create an empty volume (version 0).
    CreateVolume {
        /// Its name.
        name: String,
    },
    /// List all volumes.
    ListVolumes,
    /// Rename a volume; its id and history stay.
    RenameVolume {
        /// Current name.
        from: String,
        /// New name.
        to: String,
    },
    /// Delete a volume and its history.
    DeleteVolume {
        /// Its name.
        name: String,
    },
    /// The signed head of a volume.
    GetHead {
        /// Its name.
        name: String,
    },
    /// Which of these blobs the origin holds complete.
    HasBlobs {
        /// Hashes asked about (at most [`MAX_HAS`]).
        hashes: Vec<Hash>,
    },
    /// Upload blobs: for each of `blobs` in order, exactly its size in raw bytes follow the
    /// frame, and nothing after the last. The origin hashes each and keeps them only if
    /// every one hashes to its claimed hash; they are durable before it answers `Ok`.
    Upload {
        /// Claimed hash and exact size of each blob (at most [`MAX_UPLOAD_BLOBS`]).
        blobs: Vec<(Hash, u64)>,
    },
    /// Apply a change set on the current head, per path, last writer wins. The changes
    /// follow on the same stream in [`CommitPart`] frames, the last one marked `last`, so
    /// that neither side holds a change set of a million paths at once. The head moves
    /// once every part is applied, or not at all (a part refused, the stream cut short).
    Commit {
        /// Volume name.
        name: String,
        /// Volume id the change set was made against (guards against a recreated name).
        volume: VolumeId,
        /// The version the committer's copy was based on.
        base_version: u64,
    },
    /// Tracker: the sender holds these blobs (complete, or in part and growing) and serves
    /// them at `addr`. Replaces the sender's address and zone.
    Announce {
        /// Where the sender serves `voltool/blobs/4`.
        addr: SocketAddr,
        /// Its zone label (at most [`MAX_ZONE`] bytes).
        zone: Option<String>,
        /// Blobs held (at most [`MAX_HAS`]); blobs the origin does not hold are not entered.
        blobs: Vec<Hash>,
        /// Whether they are complete.
        complete: bool,
    },
    /// Tracker: the sender no longer holds these blobs (eviction, shutdown).
    Withdraw {
        /// Blobs dropped (at most [`MAX_HAS`]); empty means all of them.
        blobs: Vec<Hash>,
    },
    /// Tracker: who can serve this blob, nearest first, the origin last.
    Lookup {
        /// The blob.
        hash: Hash,
    },
    /// The node ids of the fleet's members (who may fetch from a peer).
    Members,
    /// Tracker: round-trip times the sender measured to peers on its connections; its later
    /// lookups rank providers by them (after the zone). Replaces what it reported before.
    Rtts {
        /// At most [`MAX_RTTS`] peers.
        rtts: Vec<PeerRtt>,
    },
    /// Tracker: who can serve every one of these blobs complete (a batch of small blobs
    /// that one provider sends on one stream), nearest first, the origin last.
    LookupAll {
        /// The blobs (at most [`MAX_LOOKUP_ALL`]).
        hashes: Vec<Hash>,
    },
    /// Tracker: the sender is alive and still holds what it announced (holdings of a
    /// member not heard from within the tracker's time to live expire). It registers the
    /// sender, with where it serves, as an announcement of nothing would. Answered with
    /// [`CoordResponse::Tracked`].
    Heartbeat {
        /// Where the sender serves `voltool/blobs/4`.
        addr: SocketAddr,
        /// Its zone label (at most [`MAX_ZONE`] bytes).
        zone: Option<String>,
    },
    /// Tracker: a provider sent the sender bytes of `hash` that failed verification. A
    /// report counts only when the tracker handed the sender that provider lately and the
    /// provider announced the blob; once enough distinct members reported it, lookups leave
    /// it out for a while.
    Report {
        /// The provider's node id.
        provider: [u8; 32],
        /// The blob whose bytes failed.
        hash: Hash,
    },
    /// The fleet's members now, and again each time they change: the coordinator answers
    /// [`CoordResponse::Members`] on this stream until either side closes it.
    WatchMembers,
    /// The signed head of a volume and its commits from version `from` on, oldest first
    /// (the head's own excluded): answered with [`CoordResponse::Versions`]. The client
    /// checks them link by link from the signed head down
    /// ([`crate::commit::verify_chain`]), so an older version is as trusted as the head
    /// (a preheat of a version).
    GetVersions {
        /// Its name.
        name: String,
        /// The oldest version wanted (at most [`MAX_VERSIONS`] before the head).
        from: u64,
    },
    /// The signed heads of these volumes now, and each new one as soon as it is signed:
    /// the coordinator answers [`CoordResponse::Heads`] on this stream until either side
    /// closes it (a follower's push; after a reconnect the first answer lets it catch up).
    WatchHeads {
        /// The volumes (at most [`MAX_WATCHED`]).
        volumes: Vec<VolumeId>,
    },
}

/// Most versions before the head one [`CoordRequest::GetVersions`] answers with.
pub const MAX_VERSIONS: u64 = 1024;

/// Most volumes one [`CoordRequest::WatchHeads`] stream watches.
pub const MAX_WATCHED: usize = 1024;

/// The application code a coordinator closes a connection with when the node is not a
/// fleet member.
pub const CLOSE_NOT_MEMBER: u32 = 1;

/// ALPN a coordinator in failover answers on while it does not lead: a client that offers
/// it besides [`ALPN`] learns at the handshake that it reached a standby, which then
/// closes the connection with [`CLOSE_NOT_LEADER`].
pub const STANDBY_ALPN: &[u8] = b"voltool/coord-standby/1";

/// The application code a standby closes a member's connection with: its reason is the
/// leader's address, `NODE_ID@IP:PORT`, or empty while none leads.
pub const CLOSE_NOT_LEADER: u32 = 2;

/// Most changes in one [`CommitPart`].
pub const MAX_COMMIT_PART: usize = 16_384;
/// Largest [`CommitPart`] frame.
pub const MAX_COMMIT_PART_BYTES: usize = 64 << 20;
/// Most paths a [`CoordResponse::Committed`] names as overwritten (it counts them all).
pub const MAX_OVERWRITTEN: usize = 1000;

/// Part of a change set, after a [`CoordRequest::Commit`] frame. Parts apply in order: a
/// later change of a path wins over an earlier one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitPart {
    /// The changes, relative to the commit's base version (at most [`MAX_COMMIT_PART`]).
    pub changes: Vec<Change>,
    /// For each change, the entry the committer's copy held at that path before it
    /// (`None`: absent). Where the head holds something else, another writer changed the
    /// path meanwhile and is reported as overwritten.
    pub priors: Vec<Option<Entry>>,
    /// Whether this is the last part.
    pub last: bool,
}

/// Most hashes in one [`CoordRequest::LookupAll`].
pub const MAX_LOOKUP_ALL: usize = 4096;

/// Most peers one [`CoordRequest::Rtts`] may report.
pub const MAX_RTTS: usize = 4096;

/// A round-trip time measured to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRtt {
    /// The peer's node id.
    pub id: [u8; 32],
    /// Smoothed round-trip time, microseconds.
    pub micros: u32,
}

/// A node that can serve a blob, as the tracker hands it out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderInfo {
    /// Node id.
    pub id: [u8; 32],
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its zone label.
    pub zone: Option<String>,
    /// Whether it announced the blob complete (else it holds part of it and grows).
    pub complete: bool,
    /// Whether this is the origin (always last, always complete).
    pub origin: bool,
}

/// Facts about a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Id.
    pub id: VolumeId,
    /// Milliseconds since the Unix epoch at creation.
    pub created_ms: u64,
    /// Current head.
    pub head: SignedHead,
}

/// Kinds of failure the coordinator reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such volume.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// The request is invalid (bad name, hostile path, bad change set).
    Invalid,
    /// The caller is not a fleet member, or may read but not write.
    Forbidden,
    /// An uploaded blob does not hash to its claimed hash, or is truncated.
    Corrupt,
    /// A commit references blobs the origin does not hold.
    MissingBlobs,
    /// Something failed on the coordinator's side.
    Internal,
}

/// The coordinator's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CoordResponse {
    /// Done, nothing to return.
    Ok,
    /// One volume.
    Volume(VolumeInfo),
    /// All volumes.
    Volumes(Vec<VolumeInfo>),
    /// Answer to [`CoordRequest::HasBlobs`], in order.
    Has(Vec<bool>),
    /// A commit was applied.
    Committed {
        /// The new head.
        head: SignedHead,
        /// Paths of this change set that overwrote another writer's newer change (the
        /// first [`MAX_OVERWRITTEN`] of them).
        overwritten: Vec<VolPath>,
        /// How many paths it overwrote.
        overwritten_total: u64,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// For people.
        message: String,
    },
    /// Answer to [`CoordRequest::Lookup`].
    Providers(Vec<ProviderInfo>),
    /// Answer to [`CoordRequest::Members`].
    Members(Vec<[u8; 32]>),
    /// On a [`CoordRequest::WatchMembers`] stream: the fleet keeps no list of members
    /// (any node may join), so peers need not check one at every request.
    OpenFleet,
    /// Answer to [`CoordRequest::Heartbeat`]. The tracker is soft state: `epoch` is new
    /// each time a coordinator starts, and `known` says whether the tracker knew the sender
    /// before this heartbeat. When it did not (a new epoch, an entry that expired), the
    /// sender announces again everything it holds.
    Tracked {
        /// The tracker's epoch.
        epoch: u64,
        /// Whether the tracker knew the sender.
        known: bool,
    },
    /// Answer to [`CoordRequest::GetVersions`].
    Versions {
        /// The volume's signed head.
        head: SignedHead,
        /// Its commits from the version asked for up to the head's parent, oldest first.
        commits: Vec<Commit>,
    },
    /// On a [`CoordRequest::WatchHeads`] stream: heads of watched volumes, the first time
    /// all that exist, then each one that moved. A watched volume deleted is left out.
    Heads(Vec<SignedHead>),
}
