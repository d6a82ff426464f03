//! The content store: blob files and bao outboards under `DIR/blobs`, metadata in redb.
//!
//! Each blob is two files named by its hash: the data (`<hex>.data`, the blob's bytes at
//! their offsets, with holes where a partial blob lacks ranges) and a pre-order bao
//! outboard (`<hex>.obao`). redb records, per blob, its size and either `Complete` or the
//! verified chunk ranges held. Ranges are recorded only after the bytes are verified and
//! synced, so after a crash the record never claims more than the disk holds.
//!
//! All methods block; async callers run them on the blocking pool.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bao_tree::ChunkRanges;
use bao_tree::io::outboard::PreOrderOutboard;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use voltool_protocol::{Hash, RangeList, blob};

const BLOBS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("blobs-0");
/// Blobs whose put into the bucket began (a store in a bucket), with when: recorded
/// before the put, dropped with the record that follows it.
const PUTS: TableDefinition<[u8; 32], u64> = TableDefinition::new("puts-0");

/// Bytes of free space blob data never takes: room for the store's metadata.
pub const RESERVE: u64 = 8 << 20;
/// Free space below which the store writes no metadata (but removals, which free space).
pub const META_RESERVE: u64 = 1 << 20;

/// The folder of blob files in a store. Overlays reach blobs through redirects that start
/// with it, and the kernel follows such a redirect through every metadata layer below the
/// file first: where a layer holds a directory of the redirect's first name (a volume's
/// `d2/`, say, for a blob under `d2/`), it no longer looks in the data-only layer and the
/// file reads as an I/O error. So the first name is one that volumes do not use.
pub const BLOBS_DIR: &str = ".voltool-blobs";
/// Where stores before it kept their blob files (renamed when a store is opened).
pub const OLD_BLOBS_DIR: &str = "blobs";

/// A content store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    db: Database,
    /// Ranges verified and written but not yet synced and recorded: served to peers at once
    /// (pipelining), forgotten by a crash.
    unsynced: std::sync::Mutex<HashMap<Hash, ChunkRanges>>,
    /// Held while files are moved to a blob's place and recorded (a batch finishing, a
    /// partial blob begun, a blob removed), so that none of them meets another's
    /// half-done work at the same place.
    place_lock: std::sync::Mutex<()>,
    /// The bucket holding blob bytes, if not the `blobs` folder.
    remote: Option<remote::Remote>,
    /// Held for reading by every put into the bucket, for writing by a sweep of puts
    /// that never ended.
    puts_gate: std::sync::RwLock<()>,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, None)
    }

    /// Opens (or creates) the store in `dir`, keeping blob bytes in the bucket `s3` if
    /// given (metadata stays in `dir`).
    pub fn open_with(dir: &Path, s3: Option<&S3Options>) -> Result<Self, StoreError> {
        let remote = s3.map(remote::Remote::open).transpose()?;
        let blobs = dir.join(BLOBS_DIR);
        let old = dir.join(OLD_BLOBS_DIR);
        if old.is_dir() && !blobs.exists() {
            std::fs::rename(&old, &blobs).ctx(&old)?;
        }
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&blobs).ctx(&blobs)?;
        // Blob files may be hard links to files users wrote (sealed upper layers): only the
        // agent reaches them here.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ctx(dir)?;
        }
        // Leftovers of imports interrupted by a crash: never referenced by metadata.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).ctx(&tmp)?;
        let db = open_db(&dir.join("store.redb")).map_err(db_err)?;
        let w = db.begin_write().map_err(db_err)?;
        w.open_table(BLOBS).map_err(db_err)?;
        w.open_table(PUTS).map_err(db_err)?;
        w.commit().map_err(db_err)?;
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                db,
                unsynced: Default::default(),
                place_lock: Default::default(),
                remote,
                puts_gate: Default::default(),
            }),
        })
    }

    /// Refuses, as a full disk, a write of `bytes` of blob data that would leave less than
    /// [`RESERVE`] free on the store's file system: the store's database must never meet a
    /// full disk (a database whose write failed fails everything until it is reopened), so
    /// blob data stops short of it.
    pub(crate) fn room_for(&self, bytes: u64, path: &Path) -> Result<(), StoreError> {
        self.room(bytes + RESERVE, path)
    }

    /// Refuses a metadata write while less than [`META_RESERVE`] is free (others than the
    /// store, such as files written into mounts, filled the disk).
    pub(crate) fn room_for_meta(&self) -> Result<(), StoreError> {
        self.room(META_RESERVE, &self.inner.dir.join("store.redb"))
    }

    fn room(&self, need: u64, path: &Path) -> Result<(), StoreError> {
        let st = rustix::fs::statvfs(&self.inner.dir)
            .map_err(|e| StoreError::io(&self.inner.dir, e.into()))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < need {
            return Err(StoreError::DiskFull {
                path: path.display().to_string(),
            });
        }
        Ok(())
    }

    /// The directory of blob files.
    pub fn blobs_dir(&self) -> PathBuf {
        self.inner.dir.join(BLOBS_DIR)
    }

    /// An overlay's data-only layer: the store's directory, in which redirects name blobs
    /// as `/.voltool-blobs/ab/<hash>.data` ([`crate::overlay::layer::data_redirect`]).
    pub fn data_layer(&self) -> &Path {
        &self.inner.dir
    }

    /// Claims a bucket's prefix for the coordinator `owner` (see [`S3Options`]); nothing
    /// to do for a store in a folder.
    pub fn claim(&self, owner: &str) -> Result<(), StoreError> {
        match &self.inner.remote {
            Some(r) => r.claim(owner),
            None => Ok(()),
        }
    }

    /// The data file of a blob.
    pub fn data_path(&self, hash: &Hash) -> PathBuf {
        Self::blob_path_in(&self.inner.dir, hash)
    }

    /// The data file of a blob in the store at `dir` (for tools that watch a store from
    /// outside).
    pub fn blob_path_in(dir: &Path, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        dir.join(BLOBS_DIR)
            .join(&hex[..2])
            .join(format!("{hex}.data"))
    }

    pub(super) fn outboard_path(&self, hash: &Hash) -> PathBuf {
        self.data_path(hash).with_extension("obao")
    }

    /// A fresh temporary file path inside the store (same file system as the blobs).
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        self.inner
            .dir
            .join("tmp")
            .join(format!("{what}-{:016x}", rand::random::<u64>()))
    }

    /// Reads a whole complete blob into memory (manifests; small blobs).
    pub fn read_all(&self, hash: &Hash) -> Result<Vec<u8>, StoreError> {
        if *hash == Hash::EMPTY {
            return Ok(Vec::new());
        }
        if !self.has_complete(hash)? {
            return Err(StoreError::NotFound(*hash));
        }
        if let Some(r) = &self.inner.remote {
            return r.get_all(hash);
        }
        let p = self.data_path(hash);
        std::fs::read(&p).ctx(&p)
    }

    /// A complete blob of `size` bytes read whole and checked against its hash (small
    /// blobs, sent whole); `None` if it is not held complete with that size.
    pub fn read_verified(&self, hash: &Hash, size: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.meta(hash)? {
            Some(m) if m.is_complete() && m.size == size => {}
            _ => return Ok(None),
        }
        let bytes = self.read_all(hash)?;
        let actual = Hash::of(&bytes);
        if bytes.len() as u64 != size || actual != *hash {
            return Err(StoreError::Corrupt {
                hash: *hash,
                message: format!(
                    "the copy here holds {} bytes hashing to {actual}",
                    bytes.len()
                ),
            });
        }
        Ok(Some(bytes))
    }
}

/// Flushes everything written to the file system that holds `path` (`syncfs`): data,
/// metadata and directory entries of every file there, in one call.
pub fn sync_fs_of(path: &Path) -> io::Result<()> {
    use std::os::fd::AsFd;
    let f = File::open(path)?;
    rustix::fs::syncfs(f.as_fd()).map_err(io::Error::from)
}

mod error;
mod import;
mod pages;
mod ranges;
mod records;
mod remote;
mod remove;

pub use error::StoreError;
use error::{IoCtx, db_err};
pub use records::{BlobMeta, BlobState, open_db, refuse_old_tables};

pub use import::{BATCH_FLUSH, IN_MEMORY_MAX, ImportBatch, PER_FILE_SYNC_MAX};
pub use pages::{PageSink, Pages};
pub use remote::S3Options;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
