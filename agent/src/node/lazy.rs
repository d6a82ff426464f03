//! Lazy mounts (`voltool mount --lazy`): the snapshot is over the lazy data layer (see
//! [`crate::lazy`]) from the moment the manifest is here, and a fill downloads the
//! version's blobs behind it through one download, which also serves what readers wait
//! for first. When the fill is through, the mount switches off the lazy data layer (a seal,
//! as a commit's: it waits until no file is open for writing). After a restart the agent
//! mounts the lazy data layer again, the snapshot over it, and starts the fill again,
//! before it answers anyone.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::blobs::Download;
use crate::lazy::{Fill, LazyLayer, READ_DEADLINE};
use voltool_protocol::swarm::PieceSet;

use super::fetch::local_root;
use super::snapshot::{LAZY_DIR, LAZY_NEEDS_OVERLAYS};
use super::*;

/// How long a fill waits before it tries again after a failure, at most.
const FILL_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a fill through tries to switch the mount off the lazy data layer while a
/// file in it is open for writing.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// What the agent keeps of lazy mounts: the lazy data layer (mounted at its first use)
/// and the fills running, by mount.
#[derive(Default)]
pub(super) struct Lazies {
    /// The agent itself, for the fills' tasks (set at start).
    pub(super) me: std::sync::OnceLock<std::sync::Weak<Inner>>,
    layer: Mutex<Option<Arc<LazyLayer>>>,
    fills: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// How far each mount's fill stands, for `status`.
    progress: Arc<Mutex<HashMap<String, control::LazyStatus>>>,
}

impl std::fmt::Debug for Lazies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazies").finish_non_exhaustive()
    }
}

/// A fill as the lazy data layer sees it.
struct NodeFill {
    download: Arc<Download>,
    rt: tokio::runtime::Handle,
    /// Large blobs a reader asked for before the fill began them: fetched on their own.
    apart: Arc<Mutex<HashSet<Hash>>>,
}

impl Fill for NodeFill {
    fn want_now(&self, hash: Hash, size: u64, units: PieceSet) {
        if self.rt.block_on(self.download.want_now(hash, units)) {
            return;
        }
        if !self.apart.lock().expect("not poisoned").insert(hash) {
            return;
        }
        let (download, apart) = (self.download.clone(), self.apart.clone());
        self.rt.spawn(async move {
            let r = download
                .fetch(&[(hash, size)], &Events::none().counter("lazy", size))
                .await;
            if let Err(e) = r {
                debug!(blob = %hash, "a blob a lazy read asked for: {e}");
            }
            apart.lock().expect("not poisoned").remove(&hash);
        });
    }

    fn fetch_now(&self, hash: Hash, size: u64) -> Result<(), String> {
        self.rt
            .block_on(
                self.download
                    .fetch(&[(hash, size)], &Events::none().counter("lazy", size)),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl Inner {
    /// The lazy data layer, mounted at its first use; refused clearly where lazy mounts
    /// cannot be.
    pub(super) fn lazy_layer(&self) -> OpResult<Arc<LazyLayer>> {
        if !self.snapshots.layered() {
            return Err(err(ErrorCode::Invalid, LAZY_NEEDS_OVERLAYS));
        }
        let mut l = self.lazies.layer.lock().expect("not poisoned");
        if let Some(layer) = &*l {
            return Ok(layer.clone());
        }
        let layer = LazyLayer::mount(
            &self.opts.data.join(LAZY_DIR),
            self.store.clone(),
            self.peers.serve.serving.clone(),
            READ_DEADLINE,
        )
        .map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
        info!(dir = %layer.dir().display(), "the lazy data layer is mounted");
        let layer = Arc::new(layer);
        *l = Some(layer.clone());
        Ok(layer)
    }

    /// Starts the fill of lazy mount `name`, whose layers show the tree at `root`: its
    /// blobs are shown in the lazy data layer at once, and downloaded in the background.
    /// The fill switches the mount off the lazy data layer when it is through; it waits
    /// for the volume's lock first, so a mount being made is recorded before.
    pub(super) async fn start_fill(&self, name: &str, root: PageRef) -> OpResult<()> {
        let me = self
            .lazies
            .me
            .get()
            .and_then(|w| w.upgrade())
            .ok_or_else(|| failed("the agent is stopping"))?;
        let layer = self.lazy_layer()?;
        let pages = self.pages.clone();
        let blobs: Vec<(Hash, u64)> = self
            .blocking(move || {
                let mut v = Vec::new();
                tree::range(&pages, &root, "", &mut |_, e| {
                    if let Some(b) = e.blob() {
                        v.push(b);
                    }
                    true
                })?;
                Ok(v)
            })
            .await?;
        let download = Arc::new(self.download());
        let key = rand::random::<u64>();
        layer.show(
            key,
            blobs.iter().copied(),
            Arc::new(NodeFill {
                download: download.clone(),
                rt: tokio::runtime::Handle::current(),
                apart: Default::default(),
            }),
        );
        let stop = self.cancel.child_token();
        let old = self
            .lazies
            .fills
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), (key, stop.clone()));
        if let Some((_, old)) = old {
            old.cancel();
        }
        tokio::spawn(me.fill(name.to_string(), key, download, blobs, stop));
        Ok(())
    }

    /// How far the fill of lazy mount `rec` stands; `None` for a mount that is not lazy.
    pub(super) fn lazy_status(&self, rec: &MountRecord) -> Option<control::LazyStatus> {
        if !self.is_lazy(rec) {
            return None;
        }
        let p = self.lazies.progress.lock().expect("not poisoned");
        Some(p.get(&rec.name).cloned().unwrap_or_default())
    }

    /// Stops the fill of mount `name`, if one runs (an unmount).
    pub(super) fn stop_fill(&self, name: &str) {
        if let Some((_, stop)) = self.lazies.fills.lock().expect("not poisoned").remove(name) {
            stop.cancel();
        }
    }

    async fn fill(
        self: Arc<Self>,
        name: String,
        key: u64,
        download: Arc<Download>,
        blobs: Vec<(Hash, u64)>,
        stop: CancellationToken,
    ) {
        let total = blobs.iter().map(|(_, s)| s).sum();
        let mut pause = Duration::from_secs(1);
        let progress = self.lazies.progress.clone();
        let set = |f: &dyn Fn(&mut control::LazyStatus)| {
            if let Some(p) = progress.lock().expect("not poisoned").get_mut(&name) {
                f(p);
            }
        };
        progress.lock().expect("not poisoned").insert(
            name.clone(),
            control::LazyStatus {
                total,
                ..Default::default()
            },
        );
        loop {
            // Each try counts what is held from the start (what the store holds first).
            set(&|p| p.held = 0);
            let (p, n) = (progress.clone(), name.clone());
            let counter: crate::blobs::OnBytes = Arc::new(move |b| {
                if let Some(s) = p.lock().expect("not poisoned").get_mut(&n) {
                    s.held += b;
                    if b > 0 {
                        s.failed = None;
                    }
                }
            });
            let r = tokio::select! {
                _ = stop.cancelled() => break,
                r = download.fetch(&blobs, &counter) => r,
            };
            match r {
                Ok(s) => {
                    info!(
                        volume = name,
                        origin_bytes = s.from_origin,
                        peer_bytes = s.from_peers.values().sum::<u64>(),
                        "a lazy mount's fill is through"
                    );
                    self.settle_lazy(&name, &stop).await;
                    break;
                }
                Err(e) => {
                    warn!(
                        volume = name,
                        "a lazy mount's fill failed, again in {pause:?}: {e}"
                    );
                    set(&|p| p.failed = Some(e.to_string()));
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(FILL_RETRY_MAX);
                }
            }
        }
        let mut fills = self.lazies.fills.lock().expect("not poisoned");
        if fills.get(&name).is_some_and(|(k, _)| *k == key) {
            fills.remove(&name);
            progress.lock().expect("not poisoned").remove(&name);
        }
        drop(fills);
        if let Some(layer) = &*self.lazies.layer.lock().expect("not poisoned") {
            layer.hide(key);
        }
    }

    /// Switches lazy mount `name` off the lazy data layer, once no file in it is open for
    /// writing.
    async fn settle_lazy(&self, name: &str, stop: &CancellationToken) {
        loop {
            {
                let lock = self.lock_for(name);
                let _g = lock.lock().await;
                let Ok(rec) = self.mount(name) else {
                    return;
                };
                if !self.is_lazy(&rec) {
                    return;
                }
                match self.seal_as(&rec, false).await {
                    Ok(Some(_)) => {
                        info!(volume = name, "the lazy mount reads from the store now");
                        return;
                    }
                    Ok(None) => debug!(
                        volume = name,
                        "a file in the lazy mount is open for writing: it stays lazy a while"
                    ),
                    Err(e) => warn!(
                        volume = name,
                        "cannot switch the lazy mount off the lazy data layer: {}", e.message
                    ),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SETTLE_EVERY) => {}
            }
        }
    }

    /// After a restart: the lazy data layer mounted again (before any snapshot over it),
    /// if a mount needs it.
    pub(super) fn revive_lazy_layer(&self, mounts: &[MountRecord]) -> OpResult<()> {
        if mounts.iter().any(|m| self.is_lazy(m)) {
            self.lazy_layer()?;
        }
        Ok(())
    }

    /// After a restart: the fills of lazy mounts started again.
    pub(super) async fn revive_fills(&self) -> OpResult<()> {
        for m in self.mounts()? {
            if self.is_lazy(&m) {
                info!(volume = m.name, "the lazy mount's fill goes on");
                self.start_fill(&m.name, local_root(m.lower_manifest))
                    .await?;
            }
        }
        Ok(())
    }
}
