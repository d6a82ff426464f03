//! Compaction in the background: a mount whose layers have piled up (a thin one for each
//! reload, the sealed upper of each commit) gets one full layer of the same tree, written
//! while the mount works on. Nothing switches for it: the next switch the mount makes
//! anyway (a reload, a commit's seal) stacks on that one layer instead of the pile, so a
//! compaction never freezes a mount, never makes an open or a write fail and never drops a
//! write. A reload or commit writes a full layer itself only past [`MAX_LAYERS`], which
//! compaction keeps it from reaching.

use super::snapshot::{Built, LayerOf, TRASH, discard};
use super::*;

/// Layers under a mount from which a reload or commit starts a compaction.
pub const COMPACT_AT: usize = 8;

/// A compacted layer waiting for its mount's next switch, by volume name: the layer's name
/// (relative to the volume's mounts directory) and the tree it shows (the mount's
/// `lower_manifest` when it was written).
pub(super) const COMPACTED: TableDefinition<&str, &[u8]> = TableDefinition::new("compacted-0");

/// The layer a compaction left for a mount, and the tree it shows.
#[derive(Serialize, Deserialize)]
struct Compacted {
    layer: String,
    shows: Hash,
}

impl Inner {
    /// Starts a compaction of `name`'s layers in the background if it has
    /// [`COMPACT_AT`] or more.
    pub(super) fn compact_later(self: Arc<Self>, name: String) {
        if !self.snapshots.layered() || self.mount(&name).is_ok_and(|r| r.layers.len() < COMPACT_AT)
        {
            return;
        }
        if !self
            .mounted
            .compacting
            .lock()
            .expect("not poisoned")
            .insert(name.clone())
        {
            return;
        }
        tokio::spawn(async move {
            let r = self.compact(&name).await;
            self.mounted
                .compacting
                .lock()
                .expect("not poisoned")
                .remove(&name);
            match r {
                Ok(true) => info!(
                    volume = name,
                    "compacted the snapshot's layers into one, for the mount's next switch"
                ),
                Ok(false) => debug!(
                    volume = name,
                    "compaction dropped: the mount moved on meanwhile"
                ),
                Err(e) => warn!(volume = name, "compaction failed: {}", e.message),
            }
        });
    }

    /// Writes one full layer of the tree a mount's layers show (the slow part, while the
    /// mount works on) and leaves it for the mount's next switch, if the mount still shows
    /// that tree; else drops it. Returns whether it was left.
    pub(super) async fn compact(&self, name: &str) -> OpResult<bool> {
        let rec = self.mount(name)?;
        if rec.layers.len() < COMPACT_AT {
            return Ok(false);
        }
        let lowers = local_root(rec.lower_manifest);
        let layer = self
            .layer_of(rec.id, rec.version, LayerOf::Full(lowers), rec.owner)
            .await?;
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let now = self.mount(name)?;
        if now.lower_manifest != rec.lower_manifest {
            // A commit or reload moved the mount on meanwhile.
            self.trash_layers(rec.id, vec![layer]);
            return Ok(false);
        }
        let c = Compacted {
            layer,
            shows: rec.lower_manifest,
        };
        let w = self.db_write()?;
        {
            let enc = postcard::to_stdvec(&c).map_err(db_err)?;
            w.open_table(COMPACTED)
                .map_err(db_err)?
                .insert(name, enc.as_slice())
                .map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        Ok(true)
    }

    /// The compacted layer left for mount `name`, if any.
    fn compacted(&self, name: &str) -> Option<Compacted> {
        let r = self.db.begin_read().ok()?;
        let t = r.open_table(COMPACTED).ok()?;
        let v = t.get(name).ok()??;
        postcard::from_bytes(v.value()).ok()
    }

    /// The layers a new snapshot of mount `rec` stacks on: one compacted layer of the same
    /// tree where a compaction left one, else the mount's own.
    pub(super) fn base_layers(&self, rec: &MountRecord) -> Vec<String> {
        match self.compacted(&rec.name) {
            Some(c)
                if c.shows == rec.lower_manifest
                    && self.mounts_dir(rec.id).join(&c.layer).is_dir() =>
            {
                vec![c.layer]
            }
            _ => rec.layers.clone(),
        }
    }

    /// In a write transaction that records mount `m`: forgets a compacted layer that no
    /// longer fits it (the switch used it, or went past it); one that `m` does not use goes
    /// to the trash once the transaction is done.
    pub(super) fn settle_compacted(
        &self,
        w: &redb::WriteTransaction,
        m: &MountRecord,
        drop: bool,
    ) -> OpResult<Option<String>> {
        use redb::ReadableTable;
        let mut t = w.open_table(COMPACTED).map_err(db_err)?;
        let Some(c) = t
            .get(m.name.as_str())
            .map_err(db_err)?
            .and_then(|v| postcard::from_bytes::<Compacted>(v.value()).ok())
        else {
            return Ok(None);
        };
        if !drop && c.shows == m.lower_manifest {
            return Ok(None);
        }
        t.remove(m.name.as_str()).map_err(db_err)?;
        Ok((drop || !m.layers.contains(&c.layer)).then_some(c.layer))
    }

    /// The layer a compaction left for `m`, kept through a restart's sweep.
    pub(super) fn compacted_layer(&self, m: &MountRecord) -> Option<PathBuf> {
        self.compacted(&m.name)
            .map(|c| self.mounts_dir(m.id).join(c.layer))
    }

    /// Moves layers of volume `id` no mount uses to the trash.
    pub(super) fn trash_layers(&self, id: VolumeId, layers: Vec<String>) {
        let dir = self.mounts_dir(id);
        let parts = layers.iter().map(|l| dir.join(l)).collect();
        discard(&self.opts.data.join(TRASH), parts, None);
    }

    /// Detaches and removes a snapshot built but not used.
    pub(super) fn drop_built(&self, id: VolumeId, built: &Built) {
        let dir = self.mounts_dir(id);
        let view = self.snapshots.view(&dir.join(&built.snapshot));
        if crate::overlay::is_mounted(&view)
            && let Err(e) = crate::overlay::unmount_lazy(&view)
        {
            warn!("cannot detach an unused snapshot: {e}");
        }
        let mut parts = vec![dir.join(&built.snapshot)];
        parts.extend(built.layers.iter().map(|l| dir.join(l)));
        discard(&self.opts.data.join(TRASH), parts, None);
    }
}
