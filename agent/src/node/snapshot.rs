//! Snapshots of a mount, in either mode: overlays over metadata layers (one write per byte,
//! uncommitted changes are the upper layer) or copied trees (the fallback, with a scan).

use std::collections::BTreeMap;

use voltool_protocol::coord::MAX_COMMIT_PART;

use crate::overlay::{self, Overlay, layer, upper};

use super::*;

/// How an agent makes snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotMode {
    /// Overlays where they can be mounted (found by trying), copies otherwise.
    #[default]
    Auto,
    /// Overlays only: the agent refuses to start without them.
    Overlay,
    /// Copies (reflinks where the file system makes them).
    Copy,
}

impl std::str::FromStr for SnapshotMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SnapshotMode::Auto),
            "overlay" => Ok(SnapshotMode::Overlay),
            "copy" => Ok(SnapshotMode::Copy),
            o => Err(format!("{o:?}: snapshots are auto, overlay or copy")),
        }
    }
}

/// Decides whether snapshots are overlays, by trying one under `data` unless `mode` says
/// copies.
pub(super) fn resolve_mode(data: &Path, mode: SnapshotMode) -> Result<bool, String> {
    if mode == SnapshotMode::Copy {
        return Ok(false);
    }
    match overlay::probe(&data.join("overlay-probe")) {
        Ok(()) => Ok(true),
        Err(e) if mode == SnapshotMode::Overlay => Err(format!(
            "overlay snapshots were asked for but cannot be mounted here: {e}"
        )),
        Err(e) => {
            info!("snapshots are copies: overlays cannot be mounted here ({e})");
            Ok(false)
        }
    }
}

/// Where built layers live in a volume's mounts directory. A layer is named by its path
/// relative to that directory: `layers/<name>` for built ones, `<snapshot>/upper` for the
/// upper layer of a snapshot frozen by a commit.
const LAYERS: &str = "layers";

/// A file in a snapshot's directory while its upper layer is being sealed: a restart that
/// finds it seals the upper again instead of making it writable (its files may already be
/// linked into the store).
pub(super) const SEALING: &str = "sealing";

/// Where retired snapshots and layers wait before they are removed: a process may still be
/// inside an old overlay (detached lazily), and its layers must not change under it.
pub(super) const TRASH: &str = "trash";
/// How long retired snapshots and layers wait in the trash.
pub(super) const TRASH_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Moves `paths` into the trash, and removes from it what has waited [`TRASH_AGE`].
pub(super) fn discard(trash: &Path, paths: Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let _ = std::fs::create_dir_all(trash);
    for p in paths {
        let to = trash.join(format!("{:016x}", rand::random::<u64>()));
        if std::fs::rename(&p, &to).is_err() {
            let _ = scan::remove_tree(&p);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for e in std::fs::read_dir(trash).into_iter().flatten().flatten() {
        // The change time is when it was moved here.
        let age = e.metadata().map_or(i64::MAX, |m| now - m.ctime());
        if age >= TRASH_AGE.as_secs() as i64 {
            let _ = scan::remove_tree(&e.path());
        }
    }
}

/// Layers stacked on one mount before a reload writes one full layer instead of a thin one.
pub const MAX_LAYERS: usize = 32;

/// What [`Inner::local_state`] does with files written through a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Hash them (to find uncommitted changes).
    Hash,
    /// Copy them into the store (to commit them while the mount stays writable).
    Copy,
}

/// A mount's local state: the manifest it shows (its tree's root), with the pages of that
/// tree not yet in the store (the state was only hashed: nothing of it is stored).
#[derive(Debug)]
pub(super) struct Local {
    /// Root of the tree of what the mount holds.
    pub(super) root: PageRef,
    /// Pages of that tree the store lacks.
    pub(super) pages: tree::MemPages,
    /// Stats of the files as hashed.
    pub(super) stats: StatCache,
    /// Bytes read and hashed.
    pub(super) hashed_bytes: u64,
}

/// What a snapshot is built from.
pub(super) enum Source<'a> {
    /// Copy mode: the whole manifest; the files in `reuse` are linked from `prev`'s
    /// snapshot.
    Copy {
        manifest: &'a Manifest,
        prev: Option<&'a MountRecord>,
        reuse: HashSet<VolPath>,
    },
    /// Overlay mode: the tree at `root`, as one full layer.
    Full { root: PageRef },
    /// Overlay mode: `prev`'s layers under a thin layer of `deltas`, which turn the tree
    /// its layers show into the tree at `root`.
    Thin {
        prev: &'a MountRecord,
        deltas: &'a [Delta],
        root: PageRef,
    },
}

/// Entries a full layer writes at a time.
const LAYER_PART: usize = 16_384;

/// A snapshot built, ready to be switched to.
#[derive(Debug)]
pub(super) struct Built {
    /// Its directory under the volume's mounts directory.
    pub(super) snapshot: String,
    /// Overlay mode: its metadata layers, topmost first.
    pub(super) layers: Vec<String>,
    /// Copy mode: stats of the files built.
    pub(super) stats: StatCache,
}

impl Inner {
    /// What a mount's host path points at.
    pub(super) fn link_target(&self, id: VolumeId, snapshot: &str) -> PathBuf {
        let dir = self.mounts_dir(id).join(snapshot);
        if self.overlays {
            dir.join("merged")
        } else {
            dir
        }
    }

    fn layers_dir(&self, id: VolumeId) -> PathBuf {
        self.mounts_dir(id).join(LAYERS)
    }

    /// Builds a snapshot of volume `id` at `version` from `source`: copied trees in copy
    /// mode; in overlay mode a thin layer over the previous layers (or one full layer once
    /// there are [`MAX_LAYERS`]) with a fresh upper layer, mounted.
    pub(super) async fn build(
        &self,
        id: VolumeId,
        version: u64,
        source: Source<'_>,
    ) -> OpResult<Built> {
        let snapshot = format!("v{version}-{:08x}", rand::random::<u32>());
        let vol_dir = self.mounts_dir(id);
        std::fs::create_dir_all(&vol_dir).map_err(failed)?;
        let (part, mut layers) = match source {
            Source::Copy {
                manifest,
                prev,
                reuse,
            } => {
                let stats = self
                    .build_copy(&vol_dir, &snapshot, manifest, prev, reuse)
                    .await?;
                return Ok(Built {
                    snapshot,
                    layers: Vec::new(),
                    stats,
                });
            }
            Source::Thin { prev, deltas, root } if prev.layers.len() < MAX_LAYERS => {
                let pages = self.pages.clone();
                let deltas = deltas.to_vec();
                let thin = self
                    .blocking(move || thin_layer(&deltas, &pages, &root))
                    .await?;
                (LayerPart::Thin(thin), prev.layers.clone())
            }
            Source::Thin { root, .. } | Source::Full { root } => {
                (LayerPart::Full(root), Vec::new())
            }
        };
        let name = format!("{LAYERS}/{snapshot}");
        let dir = vol_dir.join(&name);
        std::fs::create_dir_all(self.layers_dir(id)).map_err(failed)?;
        let (d2, pages) = (dir.clone(), self.pages.clone());
        // The layer is durable before a record names it (one syncfs, not one per file).
        let written = tokio::task::spawn_blocking(move || {
            write_part(&d2, part, &pages)?;
            crate::store::sync_fs_of(&d2).map_err(|e| e.to_string())
        })
        .await
        .map_err(failed)?;
        layers.insert(0, name);
        let mounted = match written {
            Ok(()) => self.mount_overlay(id, &snapshot, &layers),
            Err(e) => Err(failed(format!("cannot write a snapshot layer: {e}"))),
        };
        if let Err(e) = mounted {
            // Leave nothing of a failed build behind (a full disk must not stay full).
            let _ = scan::remove_tree(&dir);
            let _ = scan::remove_tree(&vol_dir.join(&snapshot));
            return Err(e);
        }
        Ok(Built {
            snapshot,
            layers,
            stats: StatCache::new(),
        })
    }

    async fn build_copy(
        &self,
        vol_dir: &Path,
        snapshot: &str,
        manifest: &Manifest,
        prev: Option<&MountRecord>,
        reuse: HashSet<VolPath>,
    ) -> OpResult<StatCache> {
        let store = self.store.clone();
        let (m, dir) = (manifest.clone(), vol_dir.join(snapshot));
        let old = prev.map(|r| vol_dir.join(&r.snapshot));
        tokio::task::spawn_blocking(move || {
            let r = scan::build_snapshot(&dir, &m, &store, old.as_deref(), &reuse);
            if r.is_err() {
                // Leave nothing of a failed build behind (a full disk must not stay full).
                let _ = scan::remove_tree(&dir);
            }
            r
        })
        .await
        .map_err(failed)?
        .map_err(failed)
    }

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
        let merged = self.link_target(rec.id, &rec.snapshot);
        if !overlay::freeze(&merged).map_err(failed)? {
            return Ok(None);
        }
        let snap_dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        let marker = snap_dir.join(SEALING);
        let r = self.seal_frozen(rec, &marker).await;
        if r.as_ref().is_ok_and(|r| r.0.snapshot == rec.snapshot) || r.is_err() {
            // Nothing was sealed (or it failed before any link): writable again.
            let _ = overlay::thaw(&merged);
        }
        let _ = std::fs::remove_file(&marker);
        r.map(Some)
    }

    async fn seal_frozen(
        &self,
        rec: &MountRecord,
        marker: &Path,
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
        .map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
        self.crash_point("commit-sealing");
        let sealed = |root| Local {
            root,
            pages: tree::MemPages::default(),
            stats: StatCache::new(),
            hashed_bytes: hashed,
        };
        if entries == 0 {
            // Nothing was written: the mount stays as it is.
            return Ok((rec.clone(), sealed(state)));
        }
        let mut layers = rec.layers.clone();
        layers.insert(0, format!("{}/upper", rec.snapshot));
        // Its files are now the store's too: nobody but the agent reaches them by this path
        // any more (the kernel reads lower layers with the mounter's rights).
        let upper = snap_dir.join("upper");
        let mode = std::fs::metadata(&upper).map_err(failed)?.permissions();
        std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(failed)?;
        let switched = if layers.len() > MAX_LAYERS {
            self.rebuild(rec, state).await
        } else {
            self.switch_to(rec, layers, state.hash).await
        };
        if switched.is_err() {
            let _ = std::fs::set_permissions(&upper, mode);
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.remove_many(&linked)).await;
        }
        switched.map(|r| (r, sealed(state)))
    }

    /// Mounts a new snapshot over `layers` with a fresh upper, records it and switches the
    /// mount to it; retires the old one.
    async fn switch_to(
        &self,
        rec: &MountRecord,
        layers: Vec<String>,
        lowers: Hash,
    ) -> OpResult<MountRecord> {
        let snapshot = format!("v{}-{:08x}", rec.version, rand::random::<u32>());
        // What the layers hold is durable before a record names them.
        crate::store::sync_fs_of(&self.mounts_dir(rec.id)).map_err(failed)?;
        if let Err(e) = self.mount_overlay(rec.id, &snapshot, &layers) {
            let _ = scan::remove_tree(&self.mounts_dir(rec.id).join(&snapshot));
            return Err(e);
        }
        let new = MountRecord {
            snapshot,
            layers,
            lower_manifest: lowers,
            ..rec.clone()
        };
        self.put_mount(&new, &StatCache::new())?;
        switch_link(&new.path, &self.link_target(new.id, &new.snapshot))?;
        self.retire(rec, &new, HashSet::new()).await?;
        Ok(new)
    }

    /// Like [`Self::switch_to`], over one full layer of `state` (the stack grew too deep).
    async fn rebuild(&self, rec: &MountRecord, state: PageRef) -> OpResult<MountRecord> {
        let built = self
            .build(rec.id, rec.version, Source::Full { root: state })
            .await?;
        let new = MountRecord {
            snapshot: built.snapshot,
            layers: built.layers,
            lower_manifest: state.hash,
            ..rec.clone()
        };
        self.put_mount(&new, &StatCache::new())?;
        switch_link(&new.path, &self.link_target(new.id, &new.snapshot))?;
        self.retire(rec, &new, HashSet::new()).await?;
        Ok(new)
    }

    /// Mounts the overlay of a snapshot: its layers, and its upper layer (new, or kept from
    /// before a restart).
    pub(super) fn mount_overlay(
        &self,
        id: VolumeId,
        snapshot: &str,
        layers: &[String],
    ) -> OpResult<()> {
        let dir = self.mounts_dir(id).join(snapshot);
        for d in ["upper", "work", "merged"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| failed(format!("{}: {e}", p.display())))?;
        }
        mark_unmounted(&dir.join("merged")).map_err(failed)?;
        let data = self.store.blobs_dir();
        let ov = Overlay {
            lowers: layers.iter().map(|l| self.mounts_dir(id).join(l)).collect(),
            data: &data,
            upper: &dir.join("upper"),
            work: &dir.join("work"),
            read_only: false,
        };
        overlay::mount(&ov, &dir.join("merged"))
            .map_err(|e| failed(format!("cannot mount the snapshot overlay: {e}")))
    }

    /// After a switch: detaches and removes the old snapshot and the layers no mount uses.
    /// Copy mode: returns fresh stats of the files `reuse` shares with the removed tree.
    pub(super) async fn retire(
        &self,
        old: &MountRecord,
        new: &MountRecord,
        reuse: HashSet<VolPath>,
    ) -> OpResult<StatCache> {
        let old_dir = self.mounts_dir(old.id).join(&old.snapshot);
        if self.overlays {
            let merged = old_dir.join("merged");
            let keep: HashSet<&String> = new.layers.iter().collect();
            let vol = self.mounts_dir(old.id);
            let old_upper = format!("{}/upper", old.snapshot);
            // The old snapshot goes, but for its upper layer if a commit made it a layer.
            let old_parts: Vec<PathBuf> = if keep.contains(&old_upper) {
                vec![old_dir.join("work"), old_dir.join("merged")]
            } else {
                vec![old_dir]
            };
            let stale: Vec<PathBuf> = old
                .layers
                .iter()
                .filter(|l| !keep.contains(l))
                .map(|l| vol.join(l))
                .chain(old_parts)
                .collect();
            let trash = self.opts.data.join(TRASH);
            let name = old.name.clone();
            // In the background: the operation is done, and turning the old file system
            // read-only drops the kernel's cached entries of every file read through it.
            tokio::task::spawn_blocking(move || retire_overlay(&name, &merged, &trash, stale));
            return Ok(StatCache::new());
        }
        // Removing the old snapshot changes the change time of the files the new one shares
        // with it: refresh their stats, or the next scan would rehash them all.
        let new_dir = self.mounts_dir(new.id).join(&new.snapshot);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = scan::remove_tree(&old_dir) {
                warn!(path = %old_dir.display(), "cannot remove the old snapshot: {e}");
            }
            scan::restat(&new_dir, &reuse)
        })
        .await
        .map_err(failed)?
        .map_err(failed)
    }

    /// The mount's local state: overlay mode, the manifest its layers show with the upper
    /// layer's changes; copy mode, a scan of its tree against its base and the stat cache.
    /// Files written through the mount are hashed, or taken into the store (durable
    /// before this returns, with the state's pages), as `take` says.
    pub(super) async fn local_state(&self, rec: &MountRecord, take: Take) -> OpResult<Local> {
        let cache = self.stats(&rec.name)?;
        let dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        let base = local_root(rec.manifest);
        let lowers = self.overlays.then(|| local_root(rec.lower_manifest));
        let (store, pages) = (self.store.clone(), self.pages.clone());
        tokio::task::spawn_blocking(move || {
            let batch = store.batch();
            let how = match take {
                Take::Hash => ScanMode::HashOnly,
                Take::Copy => ScanMode::Import(&batch),
            };
            let mut mem = tree::MemPages::default();
            let (root, stats, hashed_bytes) = match lowers {
                None => {
                    let base = Manifest::from_tree(&pages, &base)?;
                    let s = scan::scan(&dir, &base, &cache, how)?;
                    let mut new_pages = Vec::new();
                    let built = s
                        .manifest
                        .build(Shape::CANONICAL, &mut |r, b| new_pages.push((r, b)));
                    match take {
                        Take::Copy => pages.put(&batch, &new_pages)?,
                        Take::Hash => {
                            for (r, b) in &new_pages {
                                mem.insert(*r, b)?;
                            }
                        }
                    }
                    (built.root, s.stats, s.hashed_bytes)
                }
                Some(lowers) => {
                    let to_mem = (take == Take::Hash).then_some(&mut mem);
                    let (root, up) = apply_upper(
                        &dir.join("upper"),
                        &pages,
                        &store,
                        [lowers, base],
                        &cache,
                        how,
                        to_mem,
                    )?;
                    (root, up.stats, up.hashed_bytes)
                }
            };
            batch.finish()?;
            Ok::<_, scan::ScanError>(Local {
                root,
                pages: mem,
                stats,
                hashed_bytes,
            })
        })
        .await
        .map_err(failed)?
        .map_err(|e| err(ErrorCode::Invalid, format!("cannot read the mount: {e}")))
    }

    /// Like [`Self::local_changes`], a part at a time: a task on the blocking pool walks
    /// the difference and sends its deltas in parts of at most [`MAX_COMMIT_PART`] (and
    /// [`PART_PATH_BYTES`] of paths), each with whether it is the last. It stops when the
    /// receiver is dropped; it ends with the walk's failure, if any.
    pub(super) fn local_change_parts(
        &self,
        base: PageRef,
        local: &Local,
    ) -> (mpsc::Receiver<(Vec<Delta>, bool)>, Walk) {
        let (pages, mem, root) = (self.pages.clone(), local.pages.clone(), local.root);
        let (tx, rx) = mpsc::channel(1);
        let walk = tokio::task::spawn_blocking(move || {
            let mut parts = PartSplitter::new(tx);
            tree::diff_each(&tree::Layered(&mem, &pages), &base, &root, &mut |d| {
                if !d.mtime_only() {
                    parts.push(d);
                }
            })?;
            parts.finish();
            Ok(())
        });
        (rx, walk)
    }

    /// What changed from the tree at `base` to a local state, leaving out differences of
    /// mtime alone.
    pub(super) async fn local_changes(&self, base: PageRef, local: &Local) -> OpResult<Vec<Delta>> {
        let (pages, mem, root) = (self.pages.clone(), local.pages.clone(), local.root);
        let deltas = self
            .blocking(move || tree::diff(&tree::Layered(&mem, &pages), &base, &root))
            .await?;
        Ok(deltas.into_iter().filter(|d| !d.mtime_only()).collect())
    }
}

/// A walk of a tree on the blocking pool.
pub(super) type Walk = tokio::task::JoinHandle<Result<(), tree::TreeError>>;

/// Bytes of paths (and symlink targets) in one part of a change set at most.
pub(super) const PART_PATH_BYTES: usize = 8 << 20;

/// Splits a stream of deltas into parts for [`Inner::local_change_parts`]; it holds one
/// part back, to know which one is the last.
struct PartSplitter {
    tx: mpsc::Sender<(Vec<Delta>, bool)>,
    part: Vec<Delta>,
    bytes: usize,
    ready: Option<Vec<Delta>>,
    open: bool,
}

impl PartSplitter {
    fn new(tx: mpsc::Sender<(Vec<Delta>, bool)>) -> Self {
        PartSplitter {
            tx,
            part: Vec::new(),
            bytes: 0,
            ready: None,
            open: true,
        }
    }

    fn push(&mut self, d: Delta) {
        if !self.open {
            return;
        }
        self.bytes += d.path.as_str().len()
            + match &d.new {
                Some(Entry::Symlink { target }) => target.len(),
                _ => 0,
            };
        self.part.push(d);
        if self.part.len() >= MAX_COMMIT_PART || self.bytes >= PART_PATH_BYTES {
            self.bytes = 0;
            let full = std::mem::take(&mut self.part);
            if let Some(prev) = self.ready.replace(full) {
                self.open = self.tx.blocking_send((prev, false)).is_ok();
            }
        }
    }

    /// Sends what is left; the last part may be empty only when the whole stream is.
    fn finish(mut self) {
        if !self.open {
            return;
        }
        let tail = std::mem::take(&mut self.part);
        match self.ready.take() {
            Some(prev) if tail.is_empty() => {
                let _ = self.tx.blocking_send((prev, true));
            }
            Some(prev) => {
                if self.tx.blocking_send((prev, false)).is_ok() {
                    let _ = self.tx.blocking_send((tail, true));
                }
            }
            None => {
                let _ = self.tx.blocking_send((tail, true));
            }
        }
    }
}

/// Reads an upper layer as changes to the tree at `lowers` (`trees`: that, and the mount's
/// base, the last synced state) and applies them a part at a time, so that a million of
/// them are never held at once. The new pages go to `mem` when given (a state only
/// hashed), else into the store; either way each part's pages are there before the next
/// part reads them. Returns the new tree's root, and what the read found.
fn apply_upper(
    upper: &Path,
    pages: &crate::store::Pages,
    store: &Store,
    trees: [PageRef; 2],
    cache: &StatCache,
    how: ScanMode<'_>,
    mut mem: Option<&mut tree::MemPages>,
) -> Result<(PageRef, upper::UpperChanges), scan::ScanError> {
    let [lowers, base] = trees;
    let view = |root| scan::TreeView {
        src: pages.clone(),
        root,
    };
    let mut root = lowers;
    let up = upper::read_upper(upper, &view(lowers), &view(base), cache, how, &mut |part| {
        match mem.as_deref_mut() {
            Some(mem) => {
                let mut new = Vec::new();
                let built = tree::apply(
                    &tree::Layered(mem, pages),
                    &root,
                    &part,
                    Shape::CANONICAL,
                    &mut |r, b| new.push((r, b)),
                )?;
                for (r, b) in &new {
                    mem.insert(*r, b)?;
                }
                root = built.root;
            }
            None => {
                let batch = store.batch();
                let mut sink = pages.sink(&batch);
                let built = tree::apply(pages, &root, &part, Shape::CANONICAL, &mut |r, b| {
                    sink.add(r, &b)
                })?;
                sink.done()?;
                batch.finish()?;
                root = built.root;
            }
        }
        Ok(())
    })?;
    Ok((root, up))
}

/// Turns a replaced overlay read-only as a whole (so that a process still writing into it
/// through another mount of it, a container's bind mount, gets an error rather than losing
/// its writes with the old upper layer), detaches it, and moves its parts to the trash.
fn retire_overlay(volume: &str, merged: &Path, trash: &Path, stale: Vec<PathBuf>) {
    if overlay::is_mounted(merged) {
        match overlay::freeze(merged) {
            Ok(true) => {}
            Ok(false) => warn!(
                volume,
                "a file in the replaced snapshot is still open for writing (through another mount of it); what is written there is not committed"
            ),
            Err(e) => warn!(volume, "cannot make the replaced snapshot read-only: {e}"),
        }
        if let Err(e) = overlay::unmount_lazy(merged) {
            warn!("cannot detach the old snapshot: {e}");
        }
    }
    discard(trash, stale);
}

/// The file a mount point holds under its overlay: after a reboot, until the agent has
/// mounted the snapshot again, a user's path shows this instead of an empty directory.
pub const NOT_MOUNTED: &str = "VOLTOOL-NOT-MOUNTED";

/// Puts [`NOT_MOUNTED`] in a mount point that does not hold it yet, and makes the mount
/// point read-only for everyone but root.
fn mark_unmounted(mount_point: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let marker = mount_point.join(NOT_MOUNTED);
    if !marker.exists() {
        std::fs::write(
            &marker,
            "This volume is not mounted: its voltool agent has not started (yet).\n",
        )?;
        std::fs::set_permissions(mount_point, std::fs::Permissions::from_mode(0o555))?;
    }
    Ok(())
}

/// What a layer holds: every entry of a tree, or the thin layer of a change.
enum LayerPart {
    Full(PageRef),
    Thin(Vec<(VolPath, Option<Entry>)>),
}

/// Writes a layer, a full one in parts as its entries are read.
fn write_part(dir: &Path, part: LayerPart, pages: &crate::store::Pages) -> Result<(), String> {
    let mut w = layer::LayerWriter::create(dir).map_err(|e| e.to_string())?;
    match part {
        LayerPart::Thin(entries) => w.add(&entries).map_err(|e| e.to_string())?,
        LayerPart::Full(root) => {
            let mut chunk = Vec::with_capacity(LAYER_PART);
            let mut failed = None;
            tree::range(pages, &root, "", &mut |p, e| {
                chunk.push((p.clone(), Some(e.clone())));
                if chunk.len() == LAYER_PART {
                    if let Err(e) = w.add(&chunk) {
                        failed = Some(e.to_string());
                        return false;
                    }
                    chunk.clear();
                }
                true
            })
            .map_err(|e| e.to_string())?;
            if let Some(e) = failed {
                return Err(e);
            }
            w.add(&chunk).map_err(|e| e.to_string())?;
        }
    }
    w.finish().map_err(|e| e.to_string())
}

/// What turns the layers showing one tree into another (`deltas` between them, the new
/// tree at `new`): changed entries, whiteouts for removed ones (the topmost removed path
/// only), and the parent directories of both with their modes in the new tree.
fn thin_layer(
    deltas: &[Delta],
    pages: &crate::store::Pages,
    new: &PageRef,
) -> Result<Vec<(VolPath, Option<Entry>)>, tree::TreeError> {
    let mut out: BTreeMap<VolPath, Option<Entry>> = BTreeMap::new();
    // A change below a removed path or below a path that became a non-directory is hidden
    // by that one already.
    let hiding: HashSet<&VolPath> = deltas
        .iter()
        .filter(|d| d.new.as_ref().is_none_or(|e| !e.is_dir()))
        .map(|d| &d.path)
        .collect();
    for d in deltas {
        if d.path.ancestors().any(|a| hiding.contains(&a)) {
            continue;
        }
        for a in d.path.ancestors() {
            if out.contains_key(&a) {
                break;
            }
            if let Some(e) = tree::get(pages, new, &a)? {
                out.insert(a, Some(e));
            }
        }
        out.insert(d.path.clone(), d.new.clone());
    }
    Ok(out.into_iter().collect())
}
