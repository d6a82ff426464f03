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

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// File I/O failed.
    #[error("store I/O on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// The local disk is full.
    #[error("the local disk is full (writing {path}); free some space and try again")]
    DiskFull {
        /// The file being written.
        path: String,
    },
    /// A database of an older version.
    #[error(
        "{file} was written by an older voltool (it holds table {table:?}); this version cannot read it: move that data directory away to start afresh"
    )]
    OldFormat {
        /// The database file.
        file: String,
        /// The old table found.
        table: String,
    },
    /// The metadata database failed.
    #[error("store database: {0}")]
    Db(String),
    /// The blob is not held (or not completely).
    #[error("blob {0} is not in the store")]
    NotFound(Hash),
    /// Content does not match its hash.
    #[error("blob {hash} failed verification: {message}")]
    Corrupt {
        /// The blob.
        hash: Hash,
        /// What failed.
        message: String,
    },
    /// A provider lacks some requested ranges of a partial blob.
    #[error("blob {0} is held only in part; requested ranges are missing")]
    MissingRanges(Hash),
    /// The object store holding the blob bytes failed or refused.
    #[error("{what}: {message}")]
    Remote {
        /// The bucket or object.
        what: String,
        /// What failed.
        message: String,
    },
}

/// A failure of the metadata database, or of decoding what it holds; a full disk under the
/// database says so, as it does under a blob's files.
fn db_err(e: impl DbFault) -> StoreError {
    e.into_store()
}

trait DbFault {
    fn into_store(self) -> StoreError;
}

impl DbFault for redb::Error {
    fn into_store(self) -> StoreError {
        match self {
            redb::Error::Io(e) if e.kind() == io::ErrorKind::StorageFull => StoreError::DiskFull {
                path: "the store's database".into(),
            },
            e => StoreError::Db(e.to_string()),
        }
    }
}

macro_rules! db_fault_via_redb {
    ($($t:ty),*) => {
        $(impl DbFault for $t {
            fn into_store(self) -> StoreError {
                redb::Error::from(self).into_store()
            }
        })*
    };
}

db_fault_via_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl DbFault for postcard::Error {
    fn into_store(self) -> StoreError {
        StoreError::Db(self.to_string())
    }
}

trait IoCtx<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoCtx<T> for io::Result<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::io(path, source))
    }
}

impl StoreError {
    /// A failed file operation on `path`; a full disk says so.
    pub fn io(path: &Path, source: io::Error) -> Self {
        let path = path.display().to_string();
        if source.kind() == io::ErrorKind::StorageFull {
            StoreError::DiskFull { path }
        } else {
            StoreError::Io { path, source }
        }
    }
}

/// What the store holds of one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Size in bytes.
    pub size: u64,
    /// Held completely, or these verified ranges.
    pub state: BlobState,
}

/// Completeness of a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobState {
    /// All bytes, verified.
    Complete,
    /// These verified chunk ranges.
    Partial(RangeList),
}

impl BlobMeta {
    /// Verified ranges held.
    pub fn ranges(&self) -> RangeList {
        match &self.state {
            BlobState::Complete => RangeList::all(self.size),
            BlobState::Partial(r) => r.clone(),
        }
    }

    /// Whether the blob is complete.
    pub fn is_complete(&self) -> bool {
        self.state == BlobState::Complete
    }
}

/// Bytes of free space blob data never takes: room for the store's metadata.
pub const RESERVE: u64 = 8 << 20;
/// Free space below which the store writes no metadata (but removals, which free space).
pub const META_RESERVE: u64 = 1 << 20;

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
        let blobs = dir.join("blobs");
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

    /// The directory of blob files (an overlay's data-only layer).
    pub fn blobs_dir(&self) -> PathBuf {
        self.inner.dir.join("blobs")
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
        dir.join("blobs")
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

    /// What is held of a blob.
    pub fn meta(&self, hash: &Hash) -> Result<Option<BlobMeta>, StoreError> {
        if *hash == Hash::EMPTY {
            return Ok(Some(BlobMeta {
                size: 0,
                state: BlobState::Complete,
            }));
        }
        let r = self.inner.db.begin_read().map_err(db_err)?;
        let t = r.open_table(BLOBS).map_err(db_err)?;
        let Some(v) = t.get(hash.0).map_err(db_err)? else {
            return Ok(None);
        };
        let mut meta: BlobMeta = postcard::from_bytes(v.value()).map_err(db_err)?;
        if let BlobState::Partial(held) = &meta.state
            && let Some(extra) = self.inner.unsynced.lock().expect("not poisoned").get(hash)
        {
            let merged = held.to_chunk_ranges() | extra.clone();
            let chunks = meta.size.div_ceil(blob::CHUNK_BYTES).max(1);
            meta.state = BlobState::Partial(RangeList::from_chunk_ranges(&merged, chunks));
        }
        Ok(Some(meta))
    }

    /// Whether the blob is held completely.
    pub fn has_complete(&self, hash: &Hash) -> Result<bool, StoreError> {
        Ok(self.meta(hash)?.is_some_and(|m| m.is_complete()))
    }

    pub(super) fn put_meta(&self, hash: &Hash, meta: &BlobMeta) -> Result<(), StoreError> {
        let w = self.inner.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(BLOBS).map_err(db_err)?;
            let v = postcard::to_stdvec(meta).map_err(db_err)?;
            t.insert(hash.0, v.as_slice()).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// Removes a blob and its record (for eviction and tests).
    pub fn remove(&self, hash: &Hash) -> Result<(), StoreError> {
        let _placing = self.inner.place_lock.lock().expect("not poisoned");
        self.remove_placed(hash)
    }

    /// Removes blobs, in one transaction.
    pub fn remove_many(&self, hashes: &[Hash]) -> Result<(), StoreError> {
        let _placing = self.inner.place_lock.lock().expect("not poisoned");
        {
            let mut unsynced = self.inner.unsynced.lock().expect("not poisoned");
            for h in hashes {
                unsynced.remove(h);
            }
        }
        let w = self.inner.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(BLOBS).map_err(db_err)?;
            for h in hashes {
                t.remove(h.0).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)?;
        if let Some(r) = &self.inner.remote {
            for h in hashes {
                let _ = std::fs::remove_file(self.outboard_path(h));
            }
            return r.delete(hashes);
        }
        for h in hashes {
            let _ = std::fs::remove_file(self.data_path(h));
            let _ = std::fs::remove_file(self.outboard_path(h));
        }
        Ok(())
    }

    /// [`Store::remove`], with the place lock held.
    pub(super) fn remove_placed(&self, hash: &Hash) -> Result<(), StoreError> {
        self.inner
            .unsynced
            .lock()
            .expect("not poisoned")
            .remove(hash);
        let w = self.inner.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(BLOBS).map_err(db_err)?;
            t.remove(hash.0).map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        if let Some(r) = &self.inner.remote {
            let _ = std::fs::remove_file(self.outboard_path(hash));
            return r.delete(&[*hash]);
        }
        let _ = std::fs::remove_file(self.data_path(hash));
        let _ = std::fs::remove_file(self.outboard_path(hash));
        Ok(())
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

    /// Calls `f` with every blob recorded, complete or in part.
    fn each_blob(&self, mut f: impl FnMut(Hash, BlobMeta)) -> Result<(), StoreError> {
        let r = self.inner.db.begin_read().map_err(db_err)?;
        let t = r.open_table(BLOBS).map_err(db_err)?;
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            f(
                Hash(k.value()),
                postcard::from_bytes(v.value()).map_err(db_err)?,
            );
        }
        Ok(())
    }

    /// Whether ranges of the blob are being written (verified, not yet recorded): a
    /// download is still at work on it.
    pub fn is_being_written(&self, hash: &Hash) -> bool {
        self.inner
            .unsynced
            .lock()
            .expect("not poisoned")
            .contains_key(hash)
    }

    /// Every blob recorded, complete or in part, with what is held of it.
    pub fn all_metas(&self) -> Result<Vec<(Hash, BlobMeta)>, StoreError> {
        let mut out = Vec::new();
        self.each_blob(|h, m| out.push((h, m)))?;
        Ok(out)
    }

    /// Every blob recorded, complete or in part, with its size.
    pub fn all_blobs(&self) -> Result<Vec<(Hash, u64)>, StoreError> {
        let mut out = Vec::new();
        self.each_blob(|h, m| out.push((h, m.size)))?;
        Ok(out)
    }

    /// Deletes the objects of blobs whose put into the bucket began but was never
    /// recorded (the put failed, or a crash came between the two); returns how many
    /// blobs. Waits for puts in flight. A store in a folder has nothing to sweep.
    pub fn sweep_unrecorded(&self) -> Result<usize, StoreError> {
        let Some(r) = &self.inner.remote else {
            return Ok(0);
        };
        let _no_puts = self.inner.puts_gate.write().expect("not poisoned");
        let mut begun = Vec::new();
        {
            let rd = self.inner.db.begin_read().map_err(db_err)?;
            let t = rd.open_table(PUTS).map_err(db_err)?;
            for e in t.iter().map_err(db_err)? {
                begun.push(Hash(e.map_err(db_err)?.0.value()));
            }
        }
        let mut orphans = Vec::new();
        for h in &begun {
            // Put again and recorded by a later batch: kept.
            if !self.has_complete(h)? {
                orphans.push(*h);
            }
        }
        for h in &orphans {
            let _ = std::fs::remove_file(self.outboard_path(h));
        }
        r.delete(&orphans)?;
        let w = self.inner.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(PUTS).map_err(db_err)?;
            for h in &begun {
                t.remove(h.0).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)?;
        Ok(orphans.len())
    }

    /// Hashes of all complete blobs (to announce them).
    pub fn complete_blobs(&self) -> Result<Vec<Hash>, StoreError> {
        let mut out = Vec::new();
        self.each_blob(|h, m| {
            if m.is_complete() {
                out.push(h);
            }
        })?;
        Ok(out)
    }
}

/// Pages of a metadata database kept in memory. redb's default (1 GiB) would let an agent
/// that recorded a million blobs hold their records in memory long after.
const DB_CACHE: usize = 32 << 20;

/// Opens (or creates) a metadata database with a bounded cache.
pub fn open_db(file: &Path) -> Result<Database, redb::DatabaseError> {
    redb::Builder::new().set_cache_size(DB_CACHE).create(file)
}

/// Refuses a database that holds any of the tables `old` (written by an older version,
/// whose formats this one does not read and does not migrate).
pub fn refuse_old_tables(db: &Database, file: &Path, old: &[&str]) -> Result<(), StoreError> {
    let r = db.begin_read().map_err(db_err)?;
    for t in r.list_tables().map_err(db_err)? {
        if old.contains(&t.name()) {
            return Err(StoreError::OldFormat {
                file: file.display().to_string(),
                table: t.name().to_string(),
            });
        }
    }
    Ok(())
}

/// Flushes everything written to the file system that holds `path` (`syncfs`): data,
/// metadata and directory entries of every file there, in one call.
pub fn sync_fs_of(path: &Path) -> io::Result<()> {
    use std::os::fd::AsFd;
    let f = File::open(path)?;
    rustix::fs::syncfs(f.as_fd()).map_err(io::Error::from)
}

mod import;
mod pages;
mod ranges;
mod remote;

pub use import::{BATCH_FLUSH, IN_MEMORY_MAX, ImportBatch, PER_FILE_SYNC_MAX};
pub use pages::{PageSink, Pages};
pub use remote::S3Options;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databases_of_an_older_version_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("agent.redb");
        let db = Database::create(&file).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(TableDefinition::<&str, &[u8]>::new("mounts-1"))
            .unwrap();
        w.commit().unwrap();
        refuse_old_tables(&db, &file, &["heads-0"]).unwrap();
        let e = refuse_old_tables(&db, &file, &["heads-0", "mounts-1"]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("older voltool") && msg.contains("mounts-1"),
            "{msg}"
        );
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn import_encode_decode_ranges_and_reject_corruption() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let src = Store::open(a.path()).unwrap();
        let dst = Store::open(b.path()).unwrap();
        let bytes = data(200_000);
        let hash = src.import_bytes(&bytes).unwrap();
        assert_eq!(hash, Hash::of(&bytes));
        let size = bytes.len() as u64;

        dst.begin_partial(&hash, size).unwrap();
        let first = RangeList(vec![(0, 64)]);
        let mut enc = Vec::new();
        src.encode(&hash, size, &first, &mut enc).unwrap();
        let m = dst.write_encoded(&hash, size, &first, &enc).unwrap();
        assert_eq!(m.state, BlobState::Partial(first.clone()));
        // A partial holder serves what it has, and refuses what it lacks.
        let mut again = Vec::new();
        dst.encode(&hash, size, &first, &mut again).unwrap();
        assert_eq!(again, enc);
        let rest = RangeList(vec![(64, 196)]);
        assert!(matches!(
            dst.encode(&hash, size, &rest, Vec::new()),
            Err(StoreError::MissingRanges(_))
        ));
        let mut enc2 = Vec::new();
        src.encode(&hash, size, &rest, &mut enc2).unwrap();
        // One flipped byte: refused, nothing recorded.
        let mut bad = enc2.clone();
        let last = bad.len() - 10;
        bad[last] ^= 1;
        assert!(matches!(
            dst.write_encoded(&hash, size, &rest, &bad),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(dst.meta(&hash).unwrap().unwrap().ranges(), first);
        let m = dst.write_encoded(&hash, size, &rest, &enc2).unwrap();
        assert!(m.is_complete());
        assert_eq!(dst.read_all(&hash).unwrap(), bytes);
    }

    #[test]
    fn damaged_file_is_never_served() {
        let a = tempfile::tempdir().unwrap();
        let s = Store::open(a.path()).unwrap();
        let bytes = data(100_000);
        let hash = s.import_bytes(&bytes).unwrap();
        let p = s.data_path(&hash);
        let mut on_disk = std::fs::read(&p).unwrap();
        on_disk[50_000] ^= 0xff;
        std::fs::write(&p, on_disk).unwrap();
        let r = s.encode(
            &hash,
            bytes.len() as u64,
            &RangeList::all(100_000),
            Vec::new(),
        );
        assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
    }

    #[test]
    fn a_large_batch_places_as_it_goes_and_a_failed_one_takes_its_links_back() {
        let a = tempfile::tempdir().unwrap();
        let s = Store::open(&a.path().join("store")).unwrap();
        let files: Vec<PathBuf> = (0..5)
            .map(|i| {
                let p = a.path().join(format!("f{i}"));
                std::fs::write(&p, format!("file {i}")).unwrap();
                p
            })
            .collect();
        let hashes: Vec<Hash> = (0..5)
            .map(|i| Hash::of(format!("file {i}").as_bytes()))
            .collect();
        // Imported (copied) blobs placed by a flush stay when the batch fails: they are
        // whole and verified, and a retry finds them.
        let b = s.batch_flushing_at(2);
        for f in &files {
            b.import_file(f).unwrap();
        }
        let held = s.has_complete_many(&hashes).unwrap();
        assert_eq!(held, [true, true, true, true, false]);
        drop(b);
        assert_eq!(s.has_complete_many(&hashes).unwrap(), held);
        std::fs::remove_dir_all(a.path().join("store")).unwrap();
        // Linked files are taken back out when the batch fails.
        let s = Store::open(&a.path().join("store")).unwrap();
        let b = s.batch_flushing_at(2);
        for f in &files {
            b.link_file(f).unwrap();
        }
        assert_eq!(s.has_complete_many(&hashes).unwrap(), held);
        drop(b);
        assert_eq!(s.has_complete_many(&hashes).unwrap(), [false; 5]);
        for h in &hashes {
            assert!(!s.data_path(h).exists());
        }
        // A finished one keeps them all, and names the files it linked.
        let b = s.batch_flushing_at(2);
        for f in &files {
            b.link_file(f).unwrap();
        }
        let mut linked = b.finish().unwrap();
        linked.sort_unstable_by_key(|h| h.0);
        let mut want = hashes.clone();
        want.sort_unstable_by_key(|h| h.0);
        assert_eq!(linked, want);
        assert_eq!(s.has_complete_many(&hashes).unwrap(), [true; 5]);
    }

    #[test]
    fn adopt_refuses_wrong_hash() {
        let a = tempfile::tempdir().unwrap();
        let s = Store::open(a.path()).unwrap();
        let tmp = s.tmp_path("t");
        std::fs::write(&tmp, b"hello").unwrap();
        let r = s.adopt_tmp(&tmp, 5, Some(Hash::of(b"other")));
        assert!(matches!(r, Err(StoreError::Corrupt { .. })));
        assert!(!s.has_complete(&Hash::of(b"hello")).unwrap());
    }
}
