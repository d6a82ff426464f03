//! Sealing a mount's upper layer (overlay mode): a commit freezes the mount for a moment,
//! takes the files written through it into the store by hard links, and switches the mount
//! to a snapshot whose top layer is that upper and whose upper is fresh.

use super::local::apply_upper;
use super::snapshot::{MAX_LAYERS, Source};
use super::*;

/// A file in a snapshot's directory while its upper layer is being sealed: a restart that
/// finds it seals the upper again instead of making it writable (its files may already be
/// linked into the store).
pub(super) const SEALING: &str = "sealing";

impl Inner {
    /// Seals a mount's upper layer (overlay mode): freezes the mount read-only (the kernel
    /// refuses while a file in it is open for writing: then `None`), takes the files
    /// written through it into the store by hard links, and switches the mount to a new
    /// snapshot whose top layer is that upper and whose upper is fresh. The mount is
    /// writable again at once, and what it held is from then on in its lower layers
    /// (`lower_manifest`), where a commit finds it as a difference from its base. Once
    /// files are linked the old mount never becomes writable again: a switch that fails
    /// takes them back out of the store first. Returns the new record and the mount's
    /// state as sealed (its manifest and the bytes read), which a commit takes as is.
    pub(super) async fn seal(&self, rec: &MountRecord) -> OpResult<Option<(MountRecord, Local)>> {
        self.seal_as(rec, self.is_lazy(rec)).await
    }

    /// Like [`Self::seal`], switching to a snapshot over the lazy data layer if `lazy`,
    /// else over the store's blobs; from a lazy snapshot to one that is not, it switches
    /// also when nothing was written (the end of a lazy mount's fill).
    pub(super) async fn seal_as(
        &self,
        rec: &MountRecord,
        lazy: bool,
    ) -> OpResult<Option<(MountRecord, Local)>> {
        let merged = self.view(rec, &rec.snapshot);
        if !self.snapshots.freeze(&merged).map_err(failed)? {
            return Ok(None);
        }
        let snap_dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        let marker = snap_dir.join(SEALING);
        let r = self.seal_frozen(rec, &marker, lazy).await;
        if r.as_ref().is_ok_and(|r| r.0.snapshot == rec.snapshot) || r.is_err() {
            // Nothing was sealed (or it failed before any link): writable again.
            let _ = self.snapshots.thaw(&merged);
        }
        let _ = std::fs::remove_file(&marker);
        r.map(Some)
    }

    async fn seal_frozen(
        &self,
        rec: &MountRecord,
        marker: &Path,
        lazy: bool,
    ) -> OpResult<(MountRecord, Local)> {
        let cache = self.stats(&rec.name)?;
        let snap_dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        std::fs::write(marker, b"").map_err(failed)?;
        let (store, pages, upper_dir) = (
            self.store.clone(),
            self.pages.clone(),
            snap_dir.join("upper"),
        );
        let (base, lowers) = (local_root(rec.manifest), local_root(rec.lower_manifest));
        let (state, linked, entries, hashed) = tokio::task::spawn_blocking(move || {
            let batch = store.batch();
            let (state, up) = apply_upper(
                &upper_dir,
                &pages,
                &store,
                [lowers, base],
                &cache,
                ScanMode::Link(&batch),
                None,
            )?;
            let linked = batch.finish()?;
            Ok::<_, scan::ScanError>((state, linked, up.entries, up.hashed_bytes))
        })
        .await
        .map_err(failed)?
        .map_err(|e| scan_err(e, ""))?;
        self.crash_point("commit-sealing");
        let sealed = |root| Local {
            root,
            pages: tree::MemPages::default(),
            stats: StatCache::new(),
            hashed_bytes: hashed,
        };
        if entries == 0 {
            if lazy || !self.is_lazy(rec) {
                // Nothing was written: the mount stays as it is.
                return Ok((rec.clone(), sealed(state)));
            }
            // Off the lazy data layer: the same layers under a fresh upper.
            let layers = self.base_layers(rec);
            return self
                .switch_to(rec, layers, rec.lower_manifest, false)
                .await
                .map(|r| (r, sealed(state)));
        }
        let mut layers = self.base_layers(rec);
        layers.insert(0, format!("{}/upper", rec.snapshot));
        // Its files are now the store's too: nobody but the agent reaches them by this path
        // any more (the kernel reads lower layers with the mounter's rights).
        let upper = snap_dir.join("upper");
        let mode = std::fs::metadata(&upper).map_err(failed)?.permissions();
        std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(failed)?;
        let switched = if layers.len() > MAX_LAYERS {
            self.rebuild(rec, state, lazy).await
        } else {
            self.switch_to(rec, layers, state.hash, lazy).await
        };
        if switched.is_err() {
            let _ = std::fs::set_permissions(&upper, mode);
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.remove_many(&linked)).await;
        }
        switched.map(|r| (r, sealed(state)))
    }

    /// Mounts a new snapshot over `layers` with a fresh upper (over the lazy data layer if
    /// `lazy`), records it and switches the mount to it; retires the old one.
    async fn switch_to(
        &self,
        rec: &MountRecord,
        layers: Vec<String>,
        lowers: Hash,
        lazy: bool,
    ) -> OpResult<MountRecord> {
        // What the layers hold is durable before a record names them.
        crate::store::sync_fs_of(&self.mounts_dir(rec.id)).map_err(failed)?;
        let built = self
            .build(
                rec.id,
                rec.version,
                Source::Over { layers },
                false,
                rec.owner,
                lazy,
            )
            .await?;
        let new = MountRecord {
            snapshot: built.snapshot,
            layers: built.layers,
            lower_manifest: lowers,
            ..rec.clone()
        };
        self.put_mount(&new, &StatCache::new())?;
        self.switch_mount(&new, &new.snapshot)?;
        self.retire(rec, Some(&new), HashSet::new()).await?;
        Ok(new)
    }

    /// Like [`Self::switch_to`], over one full layer of `state` (the stack grew too deep).
    async fn rebuild(
        &self,
        rec: &MountRecord,
        state: PageRef,
        lazy: bool,
    ) -> OpResult<MountRecord> {
        let built = self
            .build(
                rec.id,
                rec.version,
                Source::Full { root: state },
                false,
                rec.owner,
                lazy,
            )
            .await?;
        let new = MountRecord {
            snapshot: built.snapshot,
            layers: built.layers,
            lower_manifest: state.hash,
            ..rec.clone()
        };
        self.put_mount(&new, &StatCache::new())?;
        self.switch_mount(&new, &new.snapshot)?;
        self.retire(rec, Some(&new), HashSet::new()).await?;
        Ok(new)
    }
}
