//! A followed version's switch prepared ahead (layered kinds): once a follow holds a new
//! version whole, the layer that takes a mount from the tree it shows to that version is
//! written at once (a thin layer over the mount's layers, or one full layer), so that the
//! user's `reload` only mounts and switches. A prepared layer serves only the reload that
//! finds the mount as it was prepared for (same layers, same tree); otherwise it goes.

use super::snapshot::{LayerOf, MAX_LAYERS, discard};
use super::*;

/// A layer written ahead for a mount's next reload.
#[derive(Debug)]
pub(super) struct Prepared {
    /// The tree the mount's layers showed (its `lower_manifest`).
    from: Hash,
    /// The tree the layer brings it to.
    to: Hash,
    /// The layer, then the layers under it, topmost first (none under a full layer).
    layers: Vec<String>,
    /// The layer is a full one: it fits whatever the mount's layers show.
    full: bool,
    /// Bytes of the files that differ (what the reload reports as fetched).
    bytes: u64,
}

impl Inner {
    /// Prepares mount `name`'s switch to the tree at `root` (version `version`), held
    /// whole here, unless one is prepared already or the kind is not layered.
    pub(super) async fn prepare_switch(&self, name: &str, version: u64, root: PageRef) {
        if !self.snapshots.layered() {
            return;
        }
        let Ok(rec) = self.mount(name) else { return };
        if rec.version >= version {
            return;
        }
        {
            let held = self.mounted.prepared.lock().expect("not poisoned");
            if held
                .get(name)
                .is_some_and(|p| p.from == rec.lower_manifest && p.to == root.hash)
            {
                return;
            }
        }
        let from = local_root(rec.lower_manifest);
        let under = self.base_layers(&rec);
        let (bytes, of) = match self.reload_diff(from, root, super::reload::THIN_MAX).await {
            Ok((bytes, Some(deltas))) if under.len() < MAX_LAYERS => {
                (bytes, LayerOf::Thin { deltas, root })
            }
            Ok((bytes, _)) => (bytes, LayerOf::Full(root)),
            Err(e) => {
                debug!(volume = name, "cannot prepare the switch: {}", e.message);
                return;
            }
        };
        let full = matches!(of, LayerOf::Full(_));
        let under = if full { Vec::new() } else { under };
        let layer = match self.layer_of(rec.id, version, of, rec.owner).await {
            Ok(l) => l,
            Err(e) => {
                debug!(volume = name, "cannot prepare the switch: {}", e.message);
                return;
            }
        };
        let mut layers = vec![layer];
        layers.extend(under);
        let new = Prepared {
            from: rec.lower_manifest,
            to: root.hash,
            layers,
            full,
            bytes,
        };
        // The mount moved on meanwhile (a commit, a reload): the layer serves nothing.
        let now = self.mount(name).ok();
        let stale = if now.is_some_and(|m| m.lower_manifest == rec.lower_manifest) {
            let old = self
                .mounted
                .prepared
                .lock()
                .expect("not poisoned")
                .insert(name.to_string(), new);
            debug!(
                volume = name,
                version, "prepared the switch to a followed version"
            );
            old
        } else {
            Some(new)
        };
        if let Some(p) = stale {
            self.drop_prepared(rec.id, p);
        }
    }

    /// The layers of mount `rec`'s switch to the tree at `to` if they were prepared for
    /// it as it is now, and the bytes of the files that differ; what was prepared
    /// otherwise goes.
    pub(super) fn take_prepared(&self, rec: &MountRecord, to: Hash) -> Option<(Vec<String>, u64)> {
        let p = self
            .mounted
            .prepared
            .lock()
            .expect("not poisoned")
            .remove(&rec.name)?;
        let under_now = self.base_layers(rec);
        let fits = p.to == to
            && (p.full || (p.from == rec.lower_manifest && p.layers[1..] == under_now))
            && self.mounts_dir(rec.id).join(&p.layers[0]).is_dir();
        if fits {
            return Some((p.layers, p.bytes));
        }
        self.drop_prepared(rec.id, p);
        None
    }

    /// Forgets mount `name`'s prepared switch (an unmount), its layer to the trash.
    pub(super) fn forget_prepared(&self, rec: &MountRecord) {
        let p = self
            .mounted
            .prepared
            .lock()
            .expect("not poisoned")
            .remove(&rec.name);
        if let Some(p) = p {
            self.drop_prepared(rec.id, p);
        }
    }

    fn drop_prepared(&self, id: VolumeId, p: Prepared) {
        let layer = self.mounts_dir(id).join(&p.layers[0]);
        discard(
            &self.opts.data.join(super::snapshot::TRASH),
            vec![layer],
            None,
        );
    }
}
