//! Lazy mounts' data layer: a FUSE file system that shows the store's blob directory
//! (`/.voltool-blobs/ab/<hash>.data`, where overlay metadata layers redirect) with every
//! blob of a lazy snapshot's version at its full size, whether its bytes are here yet or
//! not. A read of bytes not yet verified waits until they are: the pieces it needs (and a
//! readahead) go before every other piece of the fill that downloads the version (see
//! [`crate::blobs::Download::want_now`]); a small blob is fetched whole at once. A range
//! that does not come within the deadline, or whose download fails, reads as `EIO`: never
//! zeros, never a wait without end.
//!
//! The overlay of a lazy snapshot stacks today's metadata layers over this file system as
//! its data-only layer, so the tree, metadata, copy-up and upper layer are those of every
//! snapshot; only blob bytes are lazy. Nothing is written through it.
//!
//! `fs` is the file system (its inodes and reads); here is what the node tells it: which
//! blobs lazy snapshots show, and what fetches them.

mod fs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use voltool_protocol::Hash;
use voltool_protocol::swarm::PieceSet;

use crate::blobs::Serving;
use crate::store::Store;

/// How long a read waits for bytes that are not here before it fails with `EIO`.
pub const READ_DEADLINE: Duration = Duration::from_secs(60);

/// Bytes past a read that are asked for with it, for sequential readers.
pub const READAHEAD: u64 = 8 << 20;

/// What fetches a lazy snapshot's blobs: the node's download of its version.
pub trait Fill: Send + Sync {
    /// A reader waits for pieces `units` of the large blob `hash` of `size` bytes: they
    /// go first (and the blob's download begins if it has not).
    fn want_now(&self, hash: Hash, size: u64, units: PieceSet);
    /// Fetches the small blob `hash` of `size` bytes whole, now (blocking).
    fn fetch_now(&self, hash: Hash, size: u64) -> Result<(), String>;
}

/// Errors of the lazy data layer.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("lazy mounts need FUSE: {0}")]
    NoFuse(String),
    #[error("cannot mount the lazy data layer at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the file system knows of the node: the store, the pieces landing, the knobs.
pub(crate) struct Shared {
    store: Store,
    serving: Arc<Serving>,
    piece_bytes: u64,
    small_max: u64,
    deadline: Duration,
    shown: Mutex<Shown>,
}

/// The blobs lazy snapshots show, and the fills that fetch them.
#[derive(Default)]
struct Shown {
    /// Each blob's size and the snapshots that show it.
    blobs: HashMap<Hash, (u64, Vec<u64>)>,
    fills: HashMap<u64, Arc<dyn Fill>>,
}

/// The node's lazy data layer: mounted once, at `dir`, while the agent runs.
pub struct LazyLayer {
    shared: Arc<Shared>,
    dir: PathBuf,
    session: Mutex<Option<fuser::BackgroundSession>>,
}

impl std::fmt::Debug for LazyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLayer").field("dir", &self.dir).finish()
    }
}

impl LazyLayer {
    /// Mounts the lazy data layer at `dir` (made if missing; a mount left there by an
    /// agent that died is detached first). Fails where FUSE is not to be had.
    pub fn mount(
        dir: &Path,
        store: Store,
        serving: Arc<Serving>,
        deadline: Duration,
    ) -> Result<LazyLayer, LazyError> {
        if !Path::new("/dev/fuse").exists() {
            return Err(LazyError::NoFuse("/dev/fuse is missing".into()));
        }
        // A dead FUSE mount (its agent killed) answers ENOTCONN: detach it.
        let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
        std::fs::create_dir_all(dir).map_err(|source| LazyError::Mount {
            path: dir.to_path_buf(),
            source,
        })?;
        let cfg = serving.config().clone();
        let shared = Arc::new(Shared {
            store,
            serving,
            piece_bytes: cfg.piece_bytes,
            small_max: cfg.small_max,
            deadline,
            shown: Mutex::default(),
        });
        let session = fs::mount(shared.clone(), dir).map_err(|source| LazyError::Mount {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(LazyLayer {
            shared,
            dir: dir.to_path_buf(),
            session: Mutex::new(Some(session)),
        })
    }

    /// Where it is mounted: the data-only layer of lazy snapshots.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Snapshot `key` shows `blobs`, fetched by `fill`.
    pub fn show(
        &self,
        key: u64,
        blobs: impl IntoIterator<Item = (Hash, u64)>,
        fill: Arc<dyn Fill>,
    ) {
        let mut s = self.shared.shown.lock().expect("not poisoned");
        for (hash, size) in blobs {
            let e = s.blobs.entry(hash).or_insert((size, Vec::new()));
            if !e.1.contains(&key) {
                e.1.push(key);
            }
        }
        s.fills.insert(key, fill);
    }

    /// Snapshot `key` shows nothing any more (its fill is through, or it is gone).
    pub fn hide(&self, key: u64) {
        let mut s = self.shared.shown.lock().expect("not poisoned");
        s.fills.remove(&key);
        s.blobs.retain(|_, (_, keys)| {
            keys.retain(|k| *k != key);
            !keys.is_empty()
        });
    }

    /// Unmounts it: files open through it read as errors from now on.
    pub fn unmount(&self) {
        if let Some(s) = self.session.lock().expect("not poisoned").take() {
            let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
            drop(s);
        }
    }
}

impl Drop for LazyLayer {
    fn drop(&mut self) {
        self.unmount();
    }
}

impl Shared {
    /// The size of blob `hash` and a fill that fetches it, if a lazy snapshot shows it.
    fn shown(&self, hash: &Hash) -> Option<(u64, Option<Arc<dyn Fill>>)> {
        let s = self.shown.lock().expect("not poisoned");
        let (size, keys) = s.blobs.get(hash)?;
        let fill = keys.iter().rev().find_map(|k| s.fills.get(k).cloned());
        Some((*size, fill))
    }
}
