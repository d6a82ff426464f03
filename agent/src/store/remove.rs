//! Removing blobs: their records and their bytes (files, or objects in the bucket), and
//! the sweep of puts into a bucket that never ended.

use super::*;

impl Store {
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
        let w = self.begin_write()?;
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

    /// Makes this store's records of a bucket those of `fleet`, the records another
    /// coordinator of the fleet kept (blobs the fleet holds in the bucket, with their
    /// sizes): records what this store lacks as complete (the bytes are in the bucket; an
    /// outboard is fetched back when first needed) and drops, without touching the
    /// bucket, records the fleet does not have. Returns how many it added and dropped. A
    /// store in a folder holds its own bytes: refused.
    pub fn sync_records(&self, fleet: &[(Hash, u64)]) -> Result<(usize, usize), StoreError> {
        if self.inner.remote.is_none() {
            return Err(StoreError::Db(
                "records of another store apply only to a store in a bucket".into(),
            ));
        }
        let _placing = self.inner.place_lock.lock().expect("not poisoned");
        let wanted: std::collections::HashMap<Hash, u64> = fleet.iter().copied().collect();
        let mine: std::collections::HashMap<Hash, u64> = self.all_blobs()?.into_iter().collect();
        let add: Vec<(Hash, u64)> = fleet
            .iter()
            .filter(|(h, size)| mine.get(h) != Some(size))
            .copied()
            .collect();
        let drop: Vec<Hash> = mine
            .keys()
            .filter(|h| !wanted.contains_key(h))
            .copied()
            .collect();
        for part in add.chunks(16_384) {
            let w = self.begin_write()?;
            {
                let mut t = w.open_table(BLOBS).map_err(db_err)?;
                for (h, size) in part {
                    let meta = BlobMeta {
                        size: *size,
                        state: BlobState::Complete,
                    };
                    let v = postcard::to_stdvec(&meta).map_err(db_err)?;
                    t.insert(h.0, v.as_slice()).map_err(db_err)?;
                }
            }
            w.commit().map_err(db_err)?;
        }
        {
            let mut unsynced = self.inner.unsynced.lock().expect("not poisoned");
            for h in &drop {
                unsynced.remove(h);
            }
        }
        for part in drop.chunks(16_384) {
            let w = self.begin_write()?;
            {
                let mut t = w.open_table(BLOBS).map_err(db_err)?;
                for h in part {
                    t.remove(h.0).map_err(db_err)?;
                }
            }
            w.commit().map_err(db_err)?;
            for h in part {
                let _ = std::fs::remove_file(self.outboard_path(h));
            }
        }
        Ok((add.len(), drop.len()))
    }

    /// [`Store::remove`], with the place lock held.
    pub(super) fn remove_placed(&self, hash: &Hash) -> Result<(), StoreError> {
        self.inner
            .unsynced
            .lock()
            .expect("not poisoned")
            .remove(hash);
        let w = self.begin_write()?;
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
        let w = self.begin_write()?;
        {
            let mut t = w.open_table(PUTS).map_err(db_err)?;
            for h in &begun {
                t.remove(h.0).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)?;
        Ok(orphans.len())
    }
}
