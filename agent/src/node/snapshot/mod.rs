//! Snapshots of a mount, of one kind per agent behind one trait ([`Snapshots`]): overlays
//! over metadata layers (one write per byte, uncommitted changes are the upper layer;
//! `overlays`) or copied trees (the fallback, with a scan; `copies`). Here: choosing the
//! kind, and what the agent does with any kind: build a snapshot, show it at the mount
//! path, stop writes for a switch, retire the one it replaces. Metadata layers are written
//! in `layers`; sealing an upper layer is in `seal`, reading a mount's state in `local`.

mod copies;
mod layers;
mod overlays;

pub(super) use layers::LayerOf;

use std::sync::Arc;

use crate::overlay;

use super::*;
use mount_point::MountPointError;

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

/// The kind of snapshots an agent with data directory `data` makes: overlays, found by
/// trying one under `data` unless `mode` says copies.
pub(super) fn resolve(
    data: &Path,
    mode: SnapshotMode,
    store: &Store,
    pages: &crate::store::Pages,
) -> Result<Arc<dyn Snapshots>, String> {
    let trash = data.join(TRASH);
    let copies = || -> Arc<dyn Snapshots> {
        Arc::new(copies::Copies {
            store: store.clone(),
            trash: trash.clone(),
        })
    };
    if mode == SnapshotMode::Copy {
        return Ok(copies());
    }
    match overlay::probe(&data.join("overlay-probe")) {
        Ok(()) => Ok(Arc::new(overlays::Overlays {
            store: store.clone(),
            pages: pages.clone(),
            trash: trash.clone(),
            lazy: data.join(LAZY_DIR),
        })),
        Err(e) if mode == SnapshotMode::Overlay => Err(format!(
            "overlay snapshots were asked for but cannot be mounted here: {e}"
        )),
        Err(e) => {
            info!("snapshots are copies: overlays cannot be mounted here ({e})");
            Ok(copies())
        }
    }
}

/// One kind of snapshot: how a tree becomes a file system, how a mount path shows it, how
/// writes to it stop for a switch, and how a replaced one is retired. An agent makes one
/// kind (its `--snapshots`); a lazy kind (blob bytes fetched as they are read) will be a
/// third, layered like the overlays.
///
/// A snapshot lives in its directory under the volume's mounts directory (`vol`), named by
/// its record; what a mount path shows of it is its view ([`Snapshots::view`]). Methods
/// that touch the disk block: the agent calls them from blocking tasks where they may be
/// slow.
pub(super) trait Snapshots: Send + Sync + std::fmt::Debug {
    /// Its name in `status` and in messages: `overlay`, `copy`.
    fn name(&self) -> &'static str;
    /// Whether its snapshots are stacks of metadata layers under an upper layer (what a
    /// mount holds is the tree its layers show plus the upper's changes; a commit seals
    /// the upper; a reload adds a thin layer of the pages that differ) rather than whole
    /// trees read by a scan.
    fn layered(&self) -> bool;
    /// Readies the data directory at start, before recovery.
    fn start(&self, data: &Path) -> Result<(), String>;
    /// The mode of the data directory.
    fn data_mode(&self) -> u32;
    /// What a mount path shows of the snapshot in directory `dir`.
    fn view(&self, dir: &Path) -> PathBuf;
    /// Builds snapshot `snapshot` in `vol` from `source`, read-only if `read_only`, its
    /// files `owner`'s; `lazy`: over the lazy data layer (mounted at the data directory's
    /// [`LAZY_DIR`] already), so that its files read their bytes as they arrive. Nothing
    /// of it is left when it fails.
    fn build(
        &self,
        vol: &Path,
        snapshot: &str,
        source: Source,
        read_only: bool,
        owner: u32,
        lazy: bool,
    ) -> Result<Built, String>;
    /// Makes a mount path ready to show snapshots: for a new mount (`fresh`) or again
    /// after a restart or a reboot.
    fn prepare(&self, mp: &MountPoint, owner: u32, fresh: bool) -> Result<(), MountPointError>;
    /// Shows `view` at the mount path, atomically.
    fn show(&self, mp: &MountPoint, view: &Path) -> Result<(), MountPointError>;
    /// Whether the mount path shows `view`.
    fn shows(&self, mp: &MountPoint, view: &Path) -> bool;
    /// Removes what the mount path shows (unmount).
    fn remove(&self, mp: &MountPoint) -> Result<(), MountPointError>;
    /// Stops writes to the snapshot at `view` for a switch, through every mount of it;
    /// `false` (and nothing done) while a file in it is open for writing.
    fn freeze(&self, view: &Path) -> std::io::Result<bool>;
    /// Lets a frozen snapshot be written again (a switch that did not happen).
    fn thaw(&self, view: &Path) -> std::io::Result<()>;
    /// After a restart or a reboot: makes mount `rec`'s recorded snapshot live again.
    fn revive(&self, vol: &Path, rec: &MountRecord) -> Result<(), String>;
    /// After a restart: thaws the snapshot at `view` if a switch froze it and never
    /// happened.
    fn unfreeze(&self, view: &Path, rec: &MountRecord) -> Result<(), String>;
    /// After a switch from `old` to `new` (`None`: an unmount), takes `old`'s snapshot and
    /// what `new` does not use away; a process inside it keeps its view until it leaves.
    /// Returns fresh stats of the `reuse` files `new` shares with it (the copy kind).
    fn retire(
        &self,
        vol: &Path,
        old: &MountRecord,
        new: Option<&MountRecord>,
        reuse: &HashSet<VolPath>,
    ) -> Result<StatCache, String>;
}

pub(super) use super::trash::{TRASH, discard};

/// Where the lazy data layer is mounted in the data directory (see [`crate::lazy`]).
pub(super) const LAZY_DIR: &str = "lazy";

/// A file in the directory of a snapshot built over the lazy data layer.
pub(super) const LAZY_MARKER: &str = "lazy";

/// Why a kind of snapshot other than overlays cannot be lazy.
pub(super) const LAZY_NEEDS_OVERLAYS: &str =
    "lazy mounts need overlay snapshots (this agent makes copies: see --snapshots)";

/// Layers stacked on one mount before a reload writes one full layer instead of a thin one.
pub const MAX_LAYERS: usize = 32;

/// What a snapshot is built from.
pub(super) enum Source {
    /// The copy kind: the whole manifest; the files in `reuse` are linked from snapshot
    /// `prev`.
    Copy {
        manifest: Manifest,
        prev: Option<String>,
        reuse: HashSet<VolPath>,
    },
    /// A layered kind: the tree at `root`, as one full layer.
    Full { root: PageRef },
    /// A layered kind: a thin layer of `deltas` over the layers `under` (topmost first),
    /// which turns the tree they show into the tree at `root`.
    Thin {
        under: Vec<String>,
        deltas: Vec<Delta>,
        root: PageRef,
    },
    /// A layered kind: the layers given (a sealed upper on top), under a fresh upper.
    Over { layers: Vec<String> },
}

/// A snapshot built, ready to be switched to.
#[derive(Debug)]
pub(super) struct Built {
    /// Its directory under the volume's mounts directory.
    pub(super) snapshot: String,
    /// A layered kind: its metadata layers, topmost first.
    pub(super) layers: Vec<String>,
    /// The copy kind: stats of the files built.
    pub(super) stats: StatCache,
}

impl Built {
    fn layers(snapshot: &str, layers: Vec<String>) -> Built {
        Built {
            snapshot: snapshot.to_string(),
            layers,
            stats: StatCache::new(),
        }
    }
}

impl Inner {
    /// Whether mount `rec`'s snapshot is over the lazy data layer.
    pub(super) fn is_lazy(&self, rec: &MountRecord) -> bool {
        self.mounts_dir(rec.id)
            .join(&rec.snapshot)
            .join(LAZY_MARKER)
            .exists()
    }

    /// What mount `rec`'s path shows when it shows snapshot `snapshot`.
    pub(super) fn view(&self, rec: &MountRecord, snapshot: &str) -> PathBuf {
        self.snapshots.view(&self.mounts_dir(rec.id).join(snapshot))
    }

    /// Builds a snapshot of volume `id` at `version` from `source` (a thin layer over
    /// [`MAX_LAYERS`] others becomes one full layer), over the lazy data layer if `lazy`.
    pub(super) async fn build(
        &self,
        id: VolumeId,
        version: u64,
        source: Source,
        read_only: bool,
        owner: u32,
        lazy: bool,
    ) -> OpResult<Built> {
        let snapshot = format!("v{version}-{:08x}", rand::random::<u32>());
        let vol = self.mounts_dir(id);
        std::fs::create_dir_all(&vol).map_err(failed)?;
        let source = match source {
            Source::Thin { under, root, .. } if under.len() >= MAX_LAYERS => Source::Full { root },
            s => s,
        };
        let kind = self.snapshots.clone();
        tokio::task::spawn_blocking(move || {
            kind.build(&vol, &snapshot, source, read_only, owner, lazy)
        })
        .await
        .map_err(failed)?
        .map_err(failed)
    }

    /// After a switch from `old` to `new` (`None`: an unmount): retires the old snapshot
    /// and the layers no mount uses. Returns fresh stats of the files `reuse` shares with
    /// the removed tree (the copy kind).
    pub(super) async fn retire(
        &self,
        old: &MountRecord,
        new: Option<&MountRecord>,
        reuse: HashSet<VolPath>,
    ) -> OpResult<StatCache> {
        let (kind, vol) = (self.snapshots.clone(), self.mounts_dir(old.id));
        let (old, new) = (old.clone(), new.cloned());
        tokio::task::spawn_blocking(move || kind.retire(&vol, &old, new.as_ref(), &reuse))
            .await
            .map_err(failed)?
            .map_err(failed)
    }
}

/// The user whose files a snapshot shows, when it is not root (whose they are anyway).
fn owner_of(owner: u32) -> Option<u32> {
    (owner != 0).then_some(owner)
}
