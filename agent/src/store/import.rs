//! Imports: blobs written whole (committed or uploaded files, received uploads, manifests),
//! made durable together.
//!
//! A batch writes each blob to a temporary file, builds its outboard and checks its hash,
//! without syncing them one by one. [`ImportBatch::finish`] then renames them all into
//! place, makes data and names durable at once (one `syncfs`), and records them in one
//! redb transaction. A blob file at its place but not recorded is never used (a crash
//! before the record leaves such files; the next import or download of the blob replaces
//! them); a batch dropped unfinished (a failed operation) removes its temporary files, so
//! a failure (a full disk) leaves no space taken behind.
//!
//! A batch holds at most [`BATCH_FLUSH`] blobs in temporary files: past that it places
//! them as `finish` would and goes on, so that a commit or reload of a million files holds
//! the memory of that many. What a failed batch placed stays in the store (whole and
//! verified: a retry finds it), but for files it took by hard links, which it takes back
//! out (they are a mount's files, and the mount becomes writable again).

use std::collections::HashSet;
use std::sync::Mutex;

use super::*;

/// At most this many blobs are made durable file by file (`fdatasync` of each, `fsync` of
/// each directory); a larger batch syncs the store's whole file system at once (`syncfs`).
/// Measured here (ext4, `testnet/bench/sync.py`): for 4,096 new 4 KiB files one `syncfs`
/// took 35 ms and `fdatasync` of each (two threads) plus one `fsync` per directory 435 ms,
/// since every `fdatasync` waits for a journal commit of its own while `syncfs` waits for
/// one. But `syncfs` also flushes whatever else is dirty on that file system (a user's
/// checkpoint being written), so a batch of a few blobs (a manifest) syncs only its own.
pub const PER_FILE_SYNC_MAX: usize = 4;

/// Files up to this size are read whole into memory and hashed there when imported.
pub const IN_MEMORY_MAX: u64 = 1 << 20;

/// Blobs a batch keeps in temporary files before it places them (see the module docs).
pub const BATCH_FLUSH: usize = 16_384;

/// Blobs imported by one operation, made durable and recorded together by
/// [`ImportBatch::finish`] (or [`BATCH_FLUSH`] at a time). Safe to fill from several
/// threads at once.
#[derive(Debug)]
pub struct ImportBatch {
    store: Store,
    placed: Mutex<Vec<Placed>>,
    /// Blobs taken by hard links and already placed.
    linked: Mutex<Vec<Hash>>,
    finished: bool,
    /// [`BATCH_FLUSH`], but in tests.
    flush_at: usize,
}

/// A checked blob waiting in temporary files for the batch to finish.
#[derive(Debug)]
struct Placed {
    hash: Hash,
    size: u64,
    tmp_data: PathBuf,
    with_outboard: bool,
    /// Taken by a hard link to a mount's file.
    linked: bool,
}

impl Store {
    /// A new batch of imports.
    pub fn batch(&self) -> ImportBatch {
        ImportBatch {
            store: self.clone(),
            placed: Mutex::default(),
            linked: Mutex::default(),
            finished: false,
            flush_at: BATCH_FLUSH,
        }
    }

    /// A batch that places its blobs `n` at a time.
    #[cfg(test)]
    pub(super) fn batch_flushing_at(&self, n: usize) -> ImportBatch {
        let mut b = self.batch();
        b.flush_at = n;
        b
    }

    /// Copies one file into the store and makes it durable (a batch of one).
    pub fn import_file(&self, src: &Path) -> Result<(Hash, u64), StoreError> {
        let b = self.batch();
        let r = b.import_file(src)?;
        b.finish()?;
        Ok(r)
    }

    /// Imports bytes held in memory (manifests) and makes them durable.
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<Hash, StoreError> {
        let b = self.batch();
        let h = b.import_bytes(bytes)?;
        b.finish()?;
        Ok(h)
    }

    /// Takes a complete temporary data file into the store (see [`ImportBatch::adopt_tmp`])
    /// and makes it durable.
    pub fn adopt_tmp(
        &self,
        tmp_data: &Path,
        size: u64,
        expected: Option<Hash>,
    ) -> Result<(Hash, u64), StoreError> {
        let b = self.batch();
        let r = b.adopt_tmp(tmp_data, size, expected)?;
        b.finish()?;
        Ok(r)
    }

    /// Whether each blob is held completely, in one read transaction.
    pub fn has_complete_many(&self, hashes: &[Hash]) -> Result<Vec<bool>, StoreError> {
        let r = self.inner.db.begin_read().map_err(db_err)?;
        let t = r.open_table(BLOBS).map_err(db_err)?;
        hashes
            .iter()
            .map(|h| {
                if *h == Hash::EMPTY {
                    return Ok(true);
                }
                match t.get(h.0).map_err(db_err)? {
                    Some(v) => {
                        let m: BlobMeta = postcard::from_bytes(v.value()).map_err(db_err)?;
                        Ok(m.is_complete())
                    }
                    None => Ok(false),
                }
            })
            .collect()
    }
}

impl ImportBatch {
    /// Copies a file into the store, hashing it in the same read. The store keeps its own
    /// copy: later writes to `src` never touch it.
    pub fn import_file(&self, src: &Path) -> Result<(Hash, u64), StoreError> {
        self.import_open(File::open(src).ctx(src)?, src)
    }

    /// Copies the file `f` (opened from `src`, which names it in messages) into the store,
    /// hashing it in the same read.
    pub fn import_open(&self, mut f: File, src: &Path) -> Result<(Hash, u64), StoreError> {
        let hint = f.metadata().map(|m| m.len()).unwrap_or(0);
        if hint <= IN_MEMORY_MAX {
            // Small files: one read, hashed in memory, one write.
            let mut bytes = Vec::with_capacity(hint as usize + 1);
            (&mut f)
                .take(IN_MEMORY_MAX + 1)
                .read_to_end(&mut bytes)
                .ctx(src)?;
            if bytes.len() as u64 <= IN_MEMORY_MAX {
                let size = bytes.len() as u64;
                return Ok((self.import_bytes_checked(&bytes, None)?, size));
            }
            // It grew while we read: copy what was read, then the rest.
            return self.import_reader(io::Cursor::new(bytes).chain(f), src);
        }
        self.import_reader(f, src)
    }

    /// Takes a file into the store by a hard link to it, reading it only to hash it (and
    /// build its outboard): for files nothing will write to again. Copies it where a link
    /// cannot be made (another file system).
    pub fn link_file(&self, src: &Path) -> Result<(Hash, u64), StoreError> {
        let size = std::fs::symlink_metadata(src).ctx(src)?.len();
        let tmp = self.store.tmp_path("link");
        match std::fs::hard_link(src, &tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => return self.import_file(src),
            Err(e) => return Err(StoreError::io(&tmp, e)),
        }
        self.adopt(&tmp, size, None, true)
    }

    /// Imports bytes held in memory.
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<Hash, StoreError> {
        self.import_bytes_checked(bytes, None)
    }

    /// Imports bytes held in memory, refusing them unless they hash to `expected` (if
    /// given). A blob of one chunk group is checked before anything is written.
    pub fn import_bytes_checked(
        &self,
        bytes: &[u8],
        expected: Option<Hash>,
    ) -> Result<Hash, StoreError> {
        let size = bytes.len() as u64;
        if blob::tree(size).outboard_size() > 0 {
            let tmp = self.write_tmp(bytes)?;
            return Ok(self.adopt_tmp(&tmp, size, expected)?.0);
        }
        let hash = Hash::of(bytes);
        if let Some(exp) = expected
            && exp != hash
        {
            return Err(StoreError::Corrupt {
                hash: exp,
                message: format!("content hashes to {hash}"),
            });
        }
        if self.store.has_complete(&hash)? {
            return Ok(hash);
        }
        let tmp_data = self.write_tmp(bytes)?;
        self.place(Placed {
            hash,
            size,
            tmp_data,
            with_outboard: false,
            linked: false,
        })?;
        Ok(hash)
    }

    fn write_tmp(&self, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let tmp = self.store.tmp_path("import");
        self.store.room_for(bytes.len() as u64, &tmp)?;
        std::fs::write(&tmp, bytes).ctx(&tmp)?;
        Ok(tmp)
    }

    /// Copies what `src` reads (until its end) into the store, hashing it in the same read;
    /// `what` names it in messages.
    pub fn import_reader(
        &self,
        mut src: impl Read,
        what: &Path,
    ) -> Result<(Hash, u64), StoreError> {
        let tmp_data = self.store.tmp_path("import");
        let mut out = File::create(&tmp_data).ctx(&tmp_data)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        let copied = (|| {
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err((e, what)),
                };
                if let Err(StoreError::DiskFull { .. }) = self.store.room_for(n as u64, &tmp_data) {
                    return Err((io::ErrorKind::StorageFull.into(), tmp_data.as_path()));
                }
                out.write_all(&buf[..n])
                    .map_err(|e| (e, tmp_data.as_path()))?;
                size += n as u64;
            }
        })();
        drop(out);
        if let Err((e, path)) = copied {
            let _ = std::fs::remove_file(&tmp_data);
            return Err(e).ctx(path);
        }
        self.adopt_tmp(&tmp_data, size, None)
    }

    /// Takes a complete temporary data file (from [`Store::tmp_path`]) into the store:
    /// builds its outboard, checks the hash against `expected` if given, and moves it into
    /// place. Durable and recorded only at [`ImportBatch::finish`].
    pub fn adopt_tmp(
        &self,
        tmp_data: &Path,
        size: u64,
        expected: Option<Hash>,
    ) -> Result<(Hash, u64), StoreError> {
        self.adopt(tmp_data, size, expected, false)
    }

    fn adopt(
        &self,
        tmp_data: &Path,
        size: u64,
        expected: Option<Hash>,
        linked: bool,
    ) -> Result<(Hash, u64), StoreError> {
        let tree = blob::tree(size);
        let with_outboard = tree.outboard_size() > 0;
        let tmp_ob = tmp_data.with_extension("obao");
        let cleanup = || {
            let _ = std::fs::remove_file(tmp_data);
            let _ = std::fs::remove_file(&tmp_ob);
        };
        let hash = match self.hash_and_outboard(tmp_data, &tmp_ob, size, with_outboard) {
            Ok(h) => h,
            Err(e) => {
                cleanup();
                return Err(e);
            }
        };
        if let Some(exp) = expected
            && exp != hash
        {
            cleanup();
            return Err(StoreError::Corrupt {
                hash: exp,
                message: format!("content hashes to {hash}"),
            });
        }
        if self.store.has_complete(&hash)? {
            cleanup();
            return Ok((hash, size));
        }
        self.place(Placed {
            hash,
            size,
            tmp_data: tmp_data.to_path_buf(),
            with_outboard,
            linked,
        })?;
        Ok((hash, size))
    }

    /// Keeps a checked temporary data file (and its outboard) for [`ImportBatch::finish`],
    /// or places the blobs kept so far once there are [`BATCH_FLUSH`].
    fn place(&self, p: Placed) -> Result<(), StoreError> {
        let full = {
            let mut placed = self.placed.lock().expect("not poisoned");
            placed.push(p);
            if placed.len() < self.flush_at {
                return Ok(());
            }
            std::mem::take(&mut *placed)
        };
        self.flush(full)
    }

    /// Places blobs: durable, moved into place, recorded as complete.
    fn flush(&self, mut placed: Vec<Placed>) -> Result<(), StoreError> {
        placed.sort_unstable_by_key(|p| p.hash.0);
        let mut dups = Vec::new();
        placed.dedup_by(|a, b| {
            let same = a.hash == b.hash;
            if same {
                dups.push(a.tmp_data.clone());
            }
            same
        });
        for d in dups {
            remove_tmp(&d);
        }
        if placed.is_empty() {
            return Ok(());
        }
        let r = self.store.place_all(&placed);
        if r.is_err() {
            // What was not moved yet goes; what was is unrecorded and replaced later.
            for p in &placed {
                remove_tmp(&p.tmp_data);
            }
        }
        r?;
        self.linked
            .lock()
            .expect("not poisoned")
            .extend(placed.iter().filter(|p| p.linked).map(|p| p.hash));
        Ok(())
    }

    /// Hashes a data file; writes its outboard to `ob_path` when it has one (blobs of more
    /// than one chunk group).
    fn hash_and_outboard(
        &self,
        data_path: &Path,
        ob_path: &Path,
        size: u64,
        with_outboard: bool,
    ) -> Result<Hash, StoreError> {
        let data = File::open(data_path).ctx(data_path)?;
        if !with_outboard {
            let mut h = blake3::Hasher::new();
            h.update_reader(data).ctx(data_path)?;
            if h.count() != size {
                return Err(StoreError::Corrupt {
                    hash: Hash::from(h.finalize()),
                    message: format!("{} bytes where {size} were expected", h.count()),
                });
            }
            return Ok(Hash::from(h.finalize()));
        }
        let tree = blob::tree(size);
        let ob_file = File::create(ob_path).ctx(ob_path)?;
        ob_file.set_len(tree.outboard_size()).ctx(ob_path)?;
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
        .ctx(data_path)?;
        Ok(Hash::from(root))
    }

    /// Makes every blob of the batch durable, moves it into place, makes that durable
    /// too, then records them all as complete in one transaction (but those placed
    /// already, [`BATCH_FLUSH`] at a time). Returns the blobs it took by hard links.
    pub fn finish(mut self) -> Result<Vec<Hash>, StoreError> {
        let placed = std::mem::take(&mut *self.placed.lock().expect("not poisoned"));
        self.flush(placed)?;
        self.finished = true;
        Ok(std::mem::take(
            &mut *self.linked.lock().expect("not poisoned"),
        ))
    }
}

impl Store {
    fn place_all(&self, placed: &[Placed]) -> Result<(), StoreError> {
        self.room_for_meta()?;
        if let Some(r) = &self.inner.remote {
            return self.place_remote(r, placed);
        }
        let _placing = self.inner.place_lock.lock().expect("not poisoned");
        let mut dirs = HashSet::new();
        for p in placed {
            let dst = self.data_path(&p.hash);
            let parent = dst.parent().expect("blob paths have a parent");
            if dirs.insert(parent.to_path_buf()) {
                std::fs::create_dir_all(parent).ctx(parent)?;
            }
            if p.with_outboard {
                let tmp_ob = p.tmp_data.with_extension("obao");
                std::fs::rename(&tmp_ob, self.outboard_path(&p.hash)).ctx(&tmp_ob)?;
            }
            std::fs::rename(&p.tmp_data, &dst).ctx(&dst)?;
        }
        dirs.insert(self.blobs_dir());
        let files: Vec<(PathBuf, bool)> = placed
            .iter()
            .map(|p| (self.data_path(&p.hash), p.with_outboard))
            .collect();
        self.sync_files(&files)?;
        self.sync_dirs(&dirs, placed.len())?;
        self.record_complete(placed)
    }

    /// Puts blobs into the bucket, then records them: the put's beginning is recorded
    /// first, so that one that never ends is swept ([`Store::sweep_unrecorded`]). The
    /// staged files go once the bucket holds them.
    fn place_remote(&self, r: &super::remote::Remote, placed: &[Placed]) -> Result<(), StoreError> {
        let _putting = self.inner.puts_gate.read().expect("not poisoned");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let w = self.begin_write()?;
        {
            let mut t = w.open_table(PUTS).map_err(db_err)?;
            for p in placed {
                t.insert(p.hash.0, now).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)?;
        r.put_files(
            placed
                .iter()
                .map(|p| (p.hash, p.tmp_data.clone(), p.with_outboard))
                .collect(),
        )?;
        // The outboards stay here too, where encoding reads them.
        for p in placed {
            let _ = std::fs::remove_file(&p.tmp_data);
            if p.with_outboard {
                let (tmp_ob, op) = (
                    p.tmp_data.with_extension("obao"),
                    self.outboard_path(&p.hash),
                );
                let parent = op.parent().expect("blob paths have a parent");
                std::fs::create_dir_all(parent).ctx(parent)?;
                std::fs::rename(&tmp_ob, &op).ctx(&op)?;
            }
        }
        let _placing = self.inner.place_lock.lock().expect("not poisoned");
        self.record_complete(placed)
    }

    /// Records placed blobs as complete (and their puts as ended), in one transaction.
    fn record_complete(&self, placed: &[Placed]) -> Result<(), StoreError> {
        let w = self.begin_write()?;
        {
            let mut t = w.open_table(BLOBS).map_err(db_err)?;
            for p in placed {
                let meta = BlobMeta {
                    size: p.size,
                    state: BlobState::Complete,
                };
                let v = postcard::to_stdvec(&meta).map_err(db_err)?;
                t.insert(p.hash.0, v.as_slice()).map_err(db_err)?;
            }
            let mut puts = w.open_table(PUTS).map_err(db_err)?;
            for p in placed {
                puts.remove(p.hash.0).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }
}

impl Drop for ImportBatch {
    /// A batch not finished (its operation failed) leaves no temporary file behind, and
    /// takes the files it linked back out of the store.
    fn drop(&mut self) {
        for p in self.placed.lock().expect("not poisoned").drain(..) {
            remove_tmp(&p.tmp_data);
        }
        let linked = std::mem::take(&mut *self.linked.lock().expect("not poisoned"));
        if !self.finished
            && !linked.is_empty()
            && let Err(e) = self.store.remove_many(&linked)
        {
            tracing::warn!("cannot take linked files back out of the store: {e}");
        }
    }
}

fn remove_tmp(tmp_data: &Path) {
    let _ = std::fs::remove_file(tmp_data);
    let _ = std::fs::remove_file(tmp_data.with_extension("obao"));
}

impl Store {
    /// Makes files durable: file by file (`fdatasync`) for a few, the whole file system at
    /// once (`syncfs`) for many.
    fn sync_files(&self, files: &[(PathBuf, bool)]) -> Result<(), StoreError> {
        if files.len() > PER_FILE_SYNC_MAX {
            let dir = self.blobs_dir();
            return sync_fs_of(&dir).ctx(&dir);
        }
        for (data, with_outboard) in files {
            File::open(data).and_then(|f| f.sync_data()).ctx(data)?;
            if *with_outboard {
                let ob = data.with_extension("obao");
                File::open(&ob).and_then(|f| f.sync_data()).ctx(&ob)?;
            }
        }
        Ok(())
    }

    /// Makes renames into `dirs` durable: each directory for a few blobs; for many, the
    /// `syncfs` of [`Store::sync_files`] did it already.
    fn sync_dirs(&self, dirs: &HashSet<PathBuf>, blobs: usize) -> Result<(), StoreError> {
        if blobs > PER_FILE_SYNC_MAX {
            return Ok(());
        }
        for d in dirs {
            File::open(d).and_then(|f| f.sync_all()).ctx(d)?;
        }
        Ok(())
    }
}
