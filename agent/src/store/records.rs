//! What the store records of each blob (redb): its size and the verified ranges held, and
//! the reads of those records; the metadata databases' helpers.

use super::*;

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

    /// Bytes the blob takes in the store: what is held of its data, and its outboard.
    pub fn held_bytes(&self) -> u64 {
        let data = if self.is_complete() {
            self.size
        } else {
            (self.ranges().chunks() * blob::CHUNK_BYTES).min(self.size)
        };
        data + blob::tree(self.size).outboard_size()
    }
}

impl Store {
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

    /// A write transaction on the store's database, refused while less than
    /// [`META_RESERVE`] is free: redb that meets a full disk in a commit refuses every
    /// transaction after it ("previous I/O error") until it is opened again, so a full disk
    /// must be met before, with an error that says so.
    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.room_for_meta()?;
        self.inner.db.begin_write().map_err(db_err)
    }

    pub(super) fn put_meta(&self, hash: &Hash, meta: &BlobMeta) -> Result<(), StoreError> {
        let w = self.begin_write()?;
        {
            let mut t = w.open_table(BLOBS).map_err(db_err)?;
            let v = postcard::to_stdvec(meta).map_err(db_err)?;
            t.insert(hash.0, v.as_slice()).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
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

    /// The bytes the store holds (see [`BlobMeta::held_bytes`]) and its blobs, now.
    pub fn usage(&self) -> Result<(u64, u64), StoreError> {
        let all = self.all_metas()?;
        let bytes = all.iter().map(|(_, m)| m.held_bytes()).sum();
        Ok((bytes, all.len() as u64))
    }

    /// Every blob recorded, complete or in part, with its size.
    pub fn all_blobs(&self) -> Result<Vec<(Hash, u64)>, StoreError> {
        let mut out = Vec::new();
        self.each_blob(|h, m| out.push((h, m.size)))?;
        Ok(out)
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
