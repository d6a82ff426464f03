//! The coordinator's durable state behind one trait: the volume registry, each volume's
//! signed head and version records, the index of its symbolic links, and the providers
//! left out of the tracker's answers. [`RedbMeta`] keeps it in one redb file (the default,
//! a single coordinator); [`EtcdMeta`] in etcd, shared by the coordinators of a fleet in
//! failover.
//!
//! Every method is blocking: the coordinator calls them from the blocking pool. A write
//! either happens whole or not at all, and [`Meta::move_head`] is fenced on the head it
//! moves from, so a head never forks whatever the callers do.
//!
//! What is not here: the origin's blob records, kept by the origin's store beside its
//! bytes; the fleet's members and writers, which come from files every coordinator reads
//! (`--members`, `--writers`); the tracker, soft state that agents announce again.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use voltool_protocol::{Commit, Hash, SignedHead, VolumeId};

mod etcd;
mod redb;

pub(crate) use self::etcd::unreachable;
pub use self::etcd::{EtcdMeta, EtcdTls, EtcdUrl, EtcdUrlError, Fence, Imported};

pub use self::redb::RedbMeta;

/// A volume's record in the registry, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The volume's id (a rename keeps it; a delete and create makes a new one).
    pub id: VolumeId,
    /// When it was created (ms since the Unix epoch).
    pub created_ms: u64,
}

/// A failed read or write of the coordinator's state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// No volume by that name.
    #[error("no volume named {0:?}")]
    NoVolume(String),
    /// A volume of that name exists already.
    #[error("volume {0:?} already exists")]
    Exists(String),
    /// The head moved since it was read: the write that assumed it did not happen.
    #[error("the head of volume {id} is version {now:?}, not version {expected}")]
    HeadMoved {
        /// The volume.
        id: VolumeId,
        /// The version the write expected to move from.
        expected: u64,
        /// The version found (none: the volume is gone).
        now: Option<u64>,
    },
    /// This coordinator is no longer the leader (its lease ended, another took over): the
    /// write did not happen.
    #[error("this coordinator is no longer the leader: the write was refused")]
    Fenced,
    /// A record that does not decode: the state was damaged or written by another version.
    #[error("coordinator state: {what} does not decode: {why}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        why: String,
    },
    /// The engine below failed.
    #[error("coordinator state: {0}")]
    Engine(String),
    /// An import into a place that holds a fleet's state already.
    #[error("{0} holds a fleet's state already: import into a fresh one")]
    NotEmpty(String),
}

/// One link's entry in a volume's link index changed by a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkEntry {
    /// The link's path in the volume.
    pub link: String,
    /// The paths its resolution looked up before the commit (none: it was not indexed).
    pub old: Option<Vec<String>>,
    /// The paths its resolution looks up in the merged tree (none: it is no link any more,
    /// or gone).
    pub new: Option<Vec<String>>,
}

/// A commit's changes to its volume's link index, written with its head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkUpdate {
    /// The links whose entries change.
    pub entries: Vec<LinkEntry>,
}

/// The coordinator's durable state.
pub trait Meta: Send + Sync + std::fmt::Debug + 'static {
    /// A short name of the engine, for logs (`redb`, `etcd`).
    fn engine(&self) -> &'static str;

    /// The registry's record of the volume `name`.
    fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError>;

    /// Every volume, by name in byte order.
    fn volumes(&self) -> Result<Vec<(String, VolumeRecord)>, MetaError>;

    /// The signed head of the volume `id` (none once it is deleted).
    fn head(&self, id: VolumeId) -> Result<Option<SignedHead>, MetaError>;

    /// Every volume's head.
    fn heads(&self) -> Result<Vec<SignedHead>, MetaError>;

    /// The commits of the volume `id` at the versions of `versions`, in order; a version
    /// whose record was dropped (or never was) is `None`.
    fn commits(&self, id: VolumeId, versions: Range<u64>)
    -> Result<Vec<Option<Commit>>, MetaError>;

    /// Registers the volume `name` with its first head (version 0); refused with
    /// [`MetaError::Exists`] if the name is taken.
    fn create(&self, name: &str, rec: VolumeRecord, head: &SignedHead) -> Result<(), MetaError>;

    /// Renames a volume (its id, head and versions stay); refused if `from` does not exist
    /// or `to` does.
    fn rename(&self, from: &str, to: &str) -> Result<(), MetaError>;

    /// Deletes the volume `name`: its record, head, version records and link index.
    fn delete(&self, name: &str) -> Result<VolumeRecord, MetaError>;

    /// Moves the head of `head`'s volume to `head` (its version one past the head's now)
    /// and records its commit, with the commit's changes to the volume's link index and,
    /// where the blob records are shared ([`Meta::blob_records`]), the records of the pages
    /// it wrote; refused with [`MetaError::HeadMoved`] if the head is not the version
    /// before `head`'s.
    fn move_head(
        &self,
        head: &SignedHead,
        links: &LinkUpdate,
        pages: &[(Hash, u64)],
    ) -> Result<(), MetaError>;

    /// Drops the version records of the volume `id` before version `first`; returns how
    /// many it dropped.
    fn drop_versions(&self, id: VolumeId, first: u64) -> Result<u64, MetaError>;

    /// The head version the volume's link index describes (none: never indexed).
    fn links_indexed(&self, id: VolumeId) -> Result<Option<u64>, MetaError>;

    /// Whether the volume's link index lists any link.
    fn has_links(&self, id: VolumeId) -> Result<bool, MetaError>;

    /// Every link of the volume's index with the paths its resolution looked up, by path.
    fn links(&self, id: VolumeId) -> Result<Vec<(String, Vec<String>)>, MetaError>;

    /// The index's entry of one link.
    fn link(&self, id: VolumeId, path: &str) -> Result<Option<Vec<String>>, MetaError>;

    /// The links whose resolution looked up `path`.
    fn link_deps(&self, id: VolumeId, path: &str) -> Result<Vec<String>, MetaError>;

    /// The indexed links strictly below the directory `dir` (paths starting with `dir/`).
    fn links_below(&self, id: VolumeId, dir: &str) -> Result<Vec<String>, MetaError>;

    /// Providers left out of the tracker's answers, with until when (ms since the Unix
    /// epoch).
    fn distrusted(&self) -> Result<Vec<([u8; 32], u64)>, MetaError>;

    /// Records that `node` is left out until `until_ms`.
    fn distrust(&self, node: [u8; 32], until_ms: u64) -> Result<(), MetaError>;

    /// Forgets the providers whose time ended before `now_ms`.
    fn forget_distrust(&self, now_ms: u64) -> Result<(), MetaError>;

    /// Drops the engine's history of old revisions where it keeps one (etcd keeps every
    /// version of every key until compacted): what was current before the previous call is
    /// let go. Nothing to do where there is none.
    fn compact_history(&self) -> Result<(), MetaError> {
        Ok(())
    }

    /// The fleet's records of the blobs its origin holds, where the state is shared by
    /// several coordinators (etcd); `None` where the origin's store keeps them alone
    /// (redb: one coordinator).
    fn blob_records(&self) -> Option<&dyn BlobRecords> {
        None
    }
}

/// The blobs (and manifest pages) a fleet's origin holds in its bucket, with their sizes:
/// every coordinator's origin store keeps a copy of these records, made equal to them when
/// it takes the lead and written to both as blobs arrive and go.
pub trait BlobRecords: Send + Sync {
    /// Records blobs held (uploaded and verified, or pages written), fenced.
    fn record_blobs(&self, blobs: &[(Hash, u64)]) -> Result<(), MetaError>;

    /// Condemns blobs, fenced: forgets their records and marks them condemned by this
    /// writer's lead. A collection does this before it deletes their objects, and clears
    /// the marks after.
    fn condemn_blobs(&self, blobs: &[Hash]) -> Result<(), MetaError>;

    /// Clears condemnation marks, fenced: the blobs' objects are gone, or may be written
    /// again.
    fn clear_condemned(&self, blobs: &[Hash]) -> Result<(), MetaError>;

    /// Every blob condemned and not cleared, with the revision of the lead that condemned
    /// it (its leader key's, as in [`Fence`]).
    fn condemned(&self) -> Result<Vec<(Hash, i64)>, MetaError>;

    /// Every blob recorded.
    fn all_blobs(&self) -> Result<Vec<(Hash, u64)>, MetaError>;
}

/// Decodes a record (postcard), naming it if it does not decode.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: impl FnOnce() -> String,
    b: &[u8],
) -> Result<T, MetaError> {
    postcard::from_bytes(b).map_err(|e| MetaError::Corrupt {
        what: what(),
        why: e.to_string(),
    })
}

/// Encodes a record (postcard).
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, MetaError> {
    postcard::to_stdvec(v).map_err(|e| MetaError::Engine(e.to_string()))
}

/// The records a write of `head` adds: the volume's next version must follow the one now.
pub(crate) fn check_successor(
    id: VolumeId,
    now: Option<u64>,
    head: &SignedHead,
) -> Result<(), MetaError> {
    let v = head.commit.version;
    if v == 0 || now != Some(v - 1) {
        return Err(MetaError::HeadMoved {
            id,
            expected: v.saturating_sub(1),
            now,
        });
    }
    Ok(())
}
