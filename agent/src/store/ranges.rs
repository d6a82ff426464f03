//! Partial blobs: verified ranges received from providers, and ranges sent to them.

use bao_tree::io::sync::{ReadAt, WriteAt};

use super::*;

impl Store {
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
        let mut out = Watched {
            inner: out,
            failed: false,
        };
        if let Some(r) = &self.inner.remote {
            let ob = self.remote_outboard(r, hash, size)?;
            let sent = r.encode(hash, size, ranges, ob, &mut out);
            let sent = out.classify(sent, hash);
            if matches!(sent, Err(StoreError::Corrupt { .. })) {
                // The copy here may be what is damaged: the next request fetches it again.
                let _ = std::fs::remove_file(self.outboard_path(hash));
            }
            return sent;
        }
        let dp = self.data_path(hash);
        let data = File::open(&dp).ctx(&dp)?;
        let ob = PreOrderOutboard {
            root: hash.as_blake3(),
            tree: blob::tree(size),
            data: self.open_outboard(hash, size, false)?,
        };
        let sent = bao_tree::io::sync::encode_ranges_validated(data, ob, &want, &mut out)
            .map_err(|e| encode_error(e, hash, &dp));
        out.classify(sent, hash)
    }

    /// Prepares to receive a blob in ranges: creates its (sparse) files and an empty record
    /// if it has none. Returns what is held.
    pub fn begin_partial(&self, hash: &Hash, size: u64) -> Result<BlobMeta, StoreError> {
        if self.inner.remote.is_some() {
            return Err(StoreError::Remote {
                what: format!("blob {hash}"),
                message: "a store in a bucket takes whole verified blobs only".into(),
            });
        }
        let _placing = self.inner.place_lock.lock().expect("not poisoned");
        if let Some(m) = self.meta(hash)? {
            if m.size == size {
                return Ok(m);
            }
            // A record with another size cannot be this blob; start over.
            self.remove_placed(hash)?;
        }
        self.room_for_meta()?;
        // New files renamed into place: a file already there (unrecorded) is replaced,
        // never truncated, since it may be linked elsewhere.
        let dp = self.data_path(hash);
        let parent = dp.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).ctx(parent)?;
        let tmp = self.tmp_path("partial");
        let d = File::create(&tmp).ctx(&tmp)?;
        d.set_len(size).ctx(&tmp)?;
        d.sync_all().ctx(&tmp)?;
        let ob_size = blob::tree(size).outboard_size();
        if ob_size > 0 {
            let op = self.outboard_path(hash);
            let tmp_ob = tmp.with_extension("obao");
            let o = File::create(&tmp_ob).ctx(&tmp_ob)?;
            o.set_len(ob_size).ctx(&tmp_ob)?;
            o.sync_all().ctx(&tmp_ob)?;
            std::fs::rename(&tmp_ob, &op).ctx(&op)?;
        }
        std::fs::rename(&tmp, &dp).ctx(&dp)?;
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
        self.room_for(encoded.len() as u64, &dp)?;
        let mut data = OpenOptions::new().write(true).open(&dp).ctx(&dp)?;
        let mut ob = PreOrderOutboard {
            root: hash.as_blake3(),
            tree: blob::tree(size),
            data: self.open_outboard(hash, size, true)?,
        };
        let want = ranges.to_chunk_ranges();
        bao_tree::io::sync::decode_ranges(encoded, &want, &mut data, &mut ob).map_err(|e| {
            match e {
                // Writing here failed (a full disk): not the sender's fault.
                bao_tree::io::DecodeError::Io(io) if io.kind() != io::ErrorKind::UnexpectedEof => {
                    StoreError::io(&dp, io)
                }
                e => StoreError::Corrupt {
                    hash: *hash,
                    message: e.to_string(),
                },
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
        File::open(&dp).and_then(|f| f.sync_data()).ctx(&dp)?;
        if let ObFile(Some(f)) = self.open_outboard(hash, size, false)? {
            f.sync_data().ctx(&self.outboard_path(hash))?;
        }
        // Merge under the write transaction, so concurrent writers never lose each other.
        let w = self.begin_write()?;
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
}

impl Store {
    /// The outboard of a blob in the bucket, from the store's folder, fetched into it
    /// first if missing.
    fn remote_outboard(
        &self,
        r: &super::remote::Remote,
        hash: &Hash,
        size: u64,
    ) -> Result<ObFile, StoreError> {
        if blob::tree(size).outboard_size() == 0 {
            return Ok(ObFile(None));
        }
        let op = self.outboard_path(hash);
        match File::open(&op) {
            Ok(f) => return Ok(ObFile(Some(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&op, e)),
        }
        let tmp = self.tmp_path("obao");
        let fetched = r.fetch_outboard(hash, size, &tmp).and_then(|()| {
            let parent = op.parent().expect("blob paths have a parent");
            std::fs::create_dir_all(parent).ctx(parent)?;
            std::fs::rename(&tmp, &op).ctx(&op)
        });
        if let Err(e) = fetched {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        File::open(&op).map(|f| ObFile(Some(f))).ctx(&op)
    }
}

/// What an encoding's failure means: hashes that do not match are a damaged blob; a read
/// that failed is the disk's (or the bucket's) trouble.
pub(super) fn encode_error(e: bao_tree::io::EncodeError, hash: &Hash, what: &Path) -> StoreError {
    use bao_tree::io::EncodeError as E;
    match e {
        E::ParentHashMismatch(_) | E::LeafHashMismatch(_) | E::SizeMismatch => {
            StoreError::Corrupt {
                hash: *hash,
                message: e.to_string(),
            }
        }
        E::Io(source) => StoreError::Io {
            path: what.display().to_string(),
            source,
        },
        other => StoreError::Io {
            path: what.display().to_string(),
            source: io::Error::other(other.to_string()),
        },
    }
}

/// The writer an encoding goes to, watched: a failure to write is the receiver's going,
/// never the blob's fault (a requester that cancels must not make a provider distrust, or
/// drop, its own copy).
struct Watched<W> {
    inner: W,
    failed: bool,
}

impl<W: Write> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

impl<W> Watched<W> {
    fn classify(&self, sent: Result<(), StoreError>, hash: &Hash) -> Result<(), StoreError> {
        match sent {
            Err(_) if self.failed => Err(StoreError::ReceiverGone(*hash)),
            other => other,
        }
    }
}

/// A blob's outboard file. A blob of one chunk group has an empty outboard, and no file.
#[derive(Debug)]
pub(super) struct ObFile(Option<File>);

impl Store {
    /// Opens a blob's outboard (for writing too if `write`).
    pub(super) fn open_outboard(
        &self,
        hash: &Hash,
        size: u64,
        write: bool,
    ) -> Result<ObFile, StoreError> {
        if blob::tree(size).outboard_size() == 0 {
            return Ok(ObFile(None));
        }
        let op = self.outboard_path(hash);
        let f = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&op)
            .ctx(&op)?;
        Ok(ObFile(Some(f)))
    }
}

fn no_outboard() -> io::Error {
    io::Error::other("a blob of one chunk group has no outboard")
}

impl ReadAt for ObFile {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        match &self.0 {
            Some(f) => f.read_at(pos, buf),
            None => Err(no_outboard()),
        }
    }
}

impl WriteAt for ObFile {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(f) => f.write_at(pos, buf),
            None => Err(no_outboard()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
