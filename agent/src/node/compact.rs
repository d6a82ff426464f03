//! Compaction in the background: a mount whose layers have piled up (a thin one for each
//! reload, the sealed upper of each commit) gets one full layer of the same tree, built
//! while the mount works on, and switches to it once it holds no uncommitted change. A
//! reload or commit writes a full layer itself only past [`MAX_LAYERS`], which compaction
//! keeps it from reaching while the mount is idle now and then.

use std::collections::HashSet;

use crate::overlay;

use super::snapshot::{Built, TRASH, discard};
use super::*;

/// Layers under a mount from which a reload or commit starts a compaction.
pub const COMPACT_AT: usize = 8;

impl Inner {
    /// Starts a compaction of `name`'s layers in the background if it has
    /// [`COMPACT_AT`] or more.
    pub(super) fn compact_later(self: Arc<Self>, name: String) {
        if !self.overlays || self.mount(&name).is_ok_and(|r| r.layers.len() < COMPACT_AT) {
            return;
        }
        if !self
            .compacting
            .lock()
            .expect("not poisoned")
            .insert(name.clone())
        {
            return;
        }
        tokio::spawn(async move {
            let r = self.compact(&name).await;
            self.compacting.lock().expect("not poisoned").remove(&name);
            match r {
                Ok(true) => info!(volume = name, "compacted the snapshot's layers into one"),
                Ok(false) => debug!(
                    volume = name,
                    "compaction left for later: the mount changed, holds uncommitted changes or a file open for writing"
                ),
                Err(e) => warn!(volume = name, "compaction failed: {}", e.message),
            }
        });
    }

    /// Builds one full layer of the tree a mount's layers show (the slow part, while the
    /// mount works on), then switches the mount to it if the mount still shows that tree
    /// and holds no uncommitted change; else drops it. Returns whether it switched.
    pub(super) async fn compact(&self, name: &str) -> OpResult<bool> {
        let rec = self.mount(name)?;
        if rec.layers.len() < COMPACT_AT {
            return Ok(false);
        }
        let lowers = local_root(rec.lower_manifest);
        let built = self
            .build(
                rec.id,
                rec.version,
                Source::Full { root: lowers },
                rec.read_only,
                rec.owner,
            )
            .await?;
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let switched = self.switch_compacted(name, &rec, &built).await;
        if !matches!(switched, Ok(true)) {
            self.drop_built(rec.id, &built);
        }
        switched
    }

    async fn switch_compacted(
        &self,
        name: &str,
        seen: &MountRecord,
        built: &Built,
    ) -> OpResult<bool> {
        let rec = self.mount(name)?;
        if rec.snapshot != seen.snapshot {
            // A commit or reload switched the mount meanwhile.
            return Ok(false);
        }
        let upper = self.mounts_dir(rec.id).join(&rec.snapshot).join("upper");
        if !is_empty_dir(&upper)? {
            return Ok(false);
        }
        let merged = self.link_target(rec.id, &rec.snapshot);
        if !overlay::freeze(&merged).map_err(failed)? {
            return Ok(false);
        }
        // Written between the look and the freeze: the next compaction, then.
        if !is_empty_dir(&upper)? {
            self.thaw(&rec);
            return Ok(false);
        }
        let new = MountRecord {
            snapshot: built.snapshot.clone(),
            layers: built.layers.clone(),
            ..rec.clone()
        };
        if let Err(e) = self.put_mount(&new, &StatCache::new()) {
            self.thaw(&rec);
            return Err(e);
        }
        self.switch_mount(&new, &new.snapshot)?;
        self.retire(&rec, &new, HashSet::new()).await?;
        Ok(true)
    }

    /// Detaches and removes a snapshot built but not used.
    pub(super) fn drop_built(&self, id: VolumeId, built: &Built) {
        let dir = self.mounts_dir(id);
        let merged = self.link_target(id, &built.snapshot);
        if self.overlays
            && let Err(e) = overlay::unmount_lazy(&merged)
        {
            warn!("cannot detach an unused snapshot: {e}");
        }
        let mut parts = vec![dir.join(&built.snapshot)];
        parts.extend(built.layers.iter().map(|l| dir.join(l)));
        discard(&self.opts.data.join(TRASH), parts);
    }
}

fn is_empty_dir(dir: &Path) -> OpResult<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| failed(format!("{}: {e}", dir.display())))?
        .next()
        .is_none())
}
