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
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bao_tree::ChunkRanges;
use bao_tree::io::outboard::PreOrderOutboard;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use voltool_protocol::{Hash, RangeList, blob};

const BLOBS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("blobs-0");

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
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

trait IoCtx<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoCtx<T> for io::Result<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })
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
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&blobs).ctx(&blobs)?;
        // Leftovers of imports interrupted by a crash: never referenced by metadata.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).ctx(&tmp)?;
        let db = Database::create(dir.join("store.redb")).map_err(db_err)?;
        let w = db.begin_write().map_err(db_err)?;
        w.open_table(BLOBS).map_err(db_err)?;
        w.commit().map_err(db_err)?;
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                db,
                unsynced: Default::default(),
            }),
        })
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

    fn outboard_path(&self, hash: &Hash) -> PathBuf {
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

    fn put_meta(&self, hash: &Hash, meta: &BlobMeta) -> Result<(), StoreError> {
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
        let w = self.inner.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(BLOBS).map_err(db_err)?;
            t.remove(hash.0).map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        let _ = std::fs::remove_file(self.data_path(hash));
        let _ = std::fs::remove_file(self.outboard_path(hash));
        Ok(())
    }

    /// Copies a file into the store, hashing it and building its outboard in the same read.
    /// The store keeps its own copy: later writes to `src` never touch it.
    pub fn import_file(&self, src: &Path) -> Result<(Hash, u64), StoreError> {
        let f = File::open(src).ctx(src)?;
        self.import_reader(f, src)
    }

    /// Imports bytes held in memory (manifests).
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<Hash, StoreError> {
        Ok(self.import_reader(bytes, Path::new("<memory>"))?.0)
    }

    fn import_reader(&self, src: impl Read, what: &Path) -> Result<(Hash, u64), StoreError> {
        let tmp_data = self.tmp_path("import");
        let out = File::create(&tmp_data).ctx(&tmp_data)?;
        let mut tee = Tee {
            r: src,
            w: BufWriter::with_capacity(1 << 20, out),
            n: 0,
        };
        // The size is not known before the read ends; hash first into a growing outboard
        // is not possible with a pre-order layout, so build the outboard after the copy
        // from the copy itself (it is in the page cache).
        io::copy(&mut tee, &mut io::sink()).ctx(what)?;
        let size = tee.n;
        let out = tee
            .w
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx(&tmp_data)?;
        out.sync_data().ctx(&tmp_data)?;
        drop(out);
        self.adopt_tmp(&tmp_data, size, None)
    }

    /// Takes a complete temporary data file into the store: builds its outboard, checks the
    /// hash against `expected` if given, syncs, and moves both files into place.
    pub fn adopt_tmp(
        &self,
        tmp_data: &Path,
        size: u64,
        expected: Option<Hash>,
    ) -> Result<(Hash, u64), StoreError> {
        let tree = blob::tree(size);
        let tmp_ob = tmp_data.with_extension("obao");
        let ob_file = File::create(&tmp_ob).ctx(&tmp_ob)?;
        ob_file.set_len(tree.outboard_size()).ctx(&tmp_ob)?;
        let data = File::open(tmp_data).ctx(tmp_data)?;
        let mut ob = PreOrderOutboard {
            root: blake3::Hash::from_bytes([0; 32]),
            tree,
            data: ob_file,
        };
        let root = bao_tree::io::sync::outboard(
            io::BufReader::with_capacity(1 << 20, data),
            tree,
            &mut ob,
        )
        .ctx(tmp_data)?;
        let hash = Hash::from(root);
        if let Some(exp) = expected
            && exp != hash
        {
            let _ = std::fs::remove_file(tmp_data);
            let _ = std::fs::remove_file(&tmp_ob);
            return Err(StoreError::Corrupt {
                hash: exp,
                message: format!("content hashes to {hash}"),
            });
        }
        ob.data.sync_data().ctx(&tmp_ob)?;
        if self.has_complete(&hash)? {
            let _ = std::fs::remove_file(tmp_data);
            let _ = std::fs::remove_file(&tmp_ob);
            return Ok((hash, size));
        }
        let dst = self.data_path(&hash);
        let parent = dst.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).ctx(parent)?;
        std::fs::rename(&tmp_ob, self.outboard_path(&hash)).ctx(&tmp_ob)?;
        std::fs::rename(tmp_data, &dst).ctx(&dst)?;
        File::open(parent).and_then(|d| d.sync_all()).ctx(parent)?;
        self.put_meta(
            &hash,
            &BlobMeta {
                size,
                state: BlobState::Complete,
            },
        )?;
        Ok((hash, size))
    }

    /// Reads a whole complete blob into memory (manifests; small blobs).
    pub fn read_all(&self, hash: &Hash) -> Result<Vec<u8>, StoreError> {
        if *hash == Hash::EMPTY {
            return Ok(Vec::new());
        }
        if !self.has_complete(hash)? {
            return Err(StoreError::NotFound(*hash));
        }
        let p = self.data_path(hash);
        std::fs::read(&p).ctx(&p)
    }

    /// Writes the bao encoding of `ranges` of a held blob to `out`, checking every byte
    /// against the outboard first: a store whose file was damaged on disk never sends it.
    pub fn encode(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &RangeList,
        out: impl Write,
    ) -> Result<(), StoreError> {
        let meta = self.meta(hash)?.ok_or(StoreError::NotFound(*hash))?;
        if meta.size != size {
            return Err(StoreError::NotFound(*hash));
        }
        let want = ranges.to_chunk_ranges();
        if !meta.is_complete() && (meta.ranges().to_chunk_ranges() & want.clone()) != want {
            return Err(StoreError::MissingRanges(*hash));
        }
        let dp = self.data_path(hash);
        let op = self.outboard_path(hash);
        let data = File::open(&dp).ctx(&dp)?;
        let ob = PreOrderOutboard {
            root: hash.as_blake3(),
            tree: blob::tree(size),
            data: File::open(&op).ctx(&op)?,
        };
        bao_tree::io::sync::encode_ranges_validated(data, ob, &want, out).map_err(|e| {
            StoreError::Corrupt {
                hash: *hash,
                message: e.to_string(),
            }
        })
    }

    /// Prepares to receive a blob in ranges: creates its (sparse) files and an empty record
    /// if it has none. Returns what is held.
    pub fn begin_partial(&self, hash: &Hash, size: u64) -> Result<BlobMeta, StoreError> {
        if let Some(m) = self.meta(hash)? {
            if m.size == size {
                return Ok(m);
            }
            // A record with another size cannot be this blob; start over.
            self.remove(hash)?;
        }
        let dp = self.data_path(hash);
        let parent = dp.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).ctx(parent)?;
        let d = File::create(&dp).ctx(&dp)?;
        d.set_len(size).ctx(&dp)?;
        let op = self.outboard_path(hash);
        let o = File::create(&op).ctx(&op)?;
        o.set_len(blob::tree(size).outboard_size()).ctx(&op)?;
        d.sync_all().ctx(&dp)?;
        o.sync_all().ctx(&op)?;
        File::open(parent).and_then(|d| d.sync_all()).ctx(parent)?;
        let meta = BlobMeta {
            size,
            state: BlobState::Partial(RangeList::default()),
        };
        self.put_meta(hash, &meta)?;
        Ok(meta)
    }

    /// Verifies a bao response for `ranges` and writes it into the blob's files, then syncs
    /// and records the ranges. Returns the blob's state afterwards.
    pub fn write_encoded(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &RangeList,
        encoded: &[u8],
    ) -> Result<BlobMeta, StoreError> {
        self.write_encoded_unsynced(hash, size, ranges, encoded)?;
        self.record_ranges(hash, size, ranges)
    }

    /// Verifies a bao response for `ranges` and writes it into the blob's files, without
    /// syncing or recording: nothing is claimed until [`Store::record_ranges`]. A response
    /// with one bad byte fails before that byte is written.
    pub fn write_encoded_unsynced(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &RangeList,
        encoded: &[u8],
    ) -> Result<(), StoreError> {
        let dp = self.data_path(hash);
        let op = self.outboard_path(hash);
        let mut data = OpenOptions::new().write(true).open(&dp).ctx(&dp)?;
        let ob_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&op)
            .ctx(&op)?;
        let mut ob = PreOrderOutboard {
            root: hash.as_blake3(),
            tree: blob::tree(size),
            data: ob_file,
        };
        let want = ranges.to_chunk_ranges();
        bao_tree::io::sync::decode_ranges(encoded, &want, &mut data, &mut ob).map_err(|e| {
            StoreError::Corrupt {
                hash: *hash,
                message: e.to_string(),
            }
        })?;
        *self
            .inner
            .unsynced
            .lock()
            .expect("not poisoned")
            .entry(*hash)
            .or_insert_with(ChunkRanges::empty) |= want;
        Ok(())
    }

    /// Syncs the blob's files and records `ranges` (already verified and written) as held.
    /// Returns the blob's state afterwards.
    pub fn record_ranges(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &RangeList,
    ) -> Result<BlobMeta, StoreError> {
        let dp = self.data_path(hash);
        let op = self.outboard_path(hash);
        File::open(&dp).and_then(|f| f.sync_data()).ctx(&dp)?;
        File::open(&op).and_then(|f| f.sync_data()).ctx(&op)?;
        // Merge under the write transaction, so concurrent writers never lose each other.
        let w = self.inner.db.begin_write().map_err(db_err)?;
        let meta = {
            let mut t = w.open_table(BLOBS).map_err(db_err)?;
            let old: Option<BlobMeta> = match t.get(hash.0).map_err(db_err)? {
                Some(v) => Some(postcard::from_bytes(v.value()).map_err(db_err)?),
                None => None,
            };
            let held = old.map(|m| m.ranges()).unwrap_or_default();
            let merged = held.to_chunk_ranges() | ranges.to_chunk_ranges();
            let chunks = size.div_ceil(blob::CHUNK_BYTES).max(1);
            let list = RangeList::from_chunk_ranges(&merged, chunks);
            let state = if list.covers_all(size) {
                BlobState::Complete
            } else {
                BlobState::Partial(list)
            };
            let meta = BlobMeta { size, state };
            let v = postcard::to_stdvec(&meta).map_err(db_err)?;
            t.insert(hash.0, v.as_slice()).map_err(db_err)?;
            meta
        };
        w.commit().map_err(db_err)?;
        let mut unsynced = self.inner.unsynced.lock().expect("not poisoned");
        if let Some(u) = unsynced.get_mut(hash) {
            *u = u.clone() - ranges.to_chunk_ranges();
            if u.is_empty() || meta.is_complete() {
                unsynced.remove(hash);
            }
        }
        Ok(meta)
    }

    /// Hashes of all complete blobs (to announce them).
    pub fn complete_blobs(&self) -> Result<Vec<Hash>, StoreError> {
        let r = self.inner.db.begin_read().map_err(db_err)?;
        let t = r.open_table(BLOBS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            let m: BlobMeta = postcard::from_bytes(v.value()).map_err(db_err)?;
            if m.is_complete() {
                out.push(Hash(k.value()));
            }
        }
        Ok(out)
    }
}

struct Tee<R, W> {
    r: R,
    w: W,
    n: u64,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        self.n += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
