//! Fetching blobs from the swarm, and the manifests of heads.

use crate::blobs::{Download, SwarmCtx};

use super::*;

/// Blobs a reload asks for at once (see [`Inner::fetch_walked`]).
const FETCH_PART: usize = 16_384;

impl Inner {
    /// Tells the tracker this node holds `blobs` (complete or in part).
    /// A heartbeat; when the tracker did not know this node (the coordinator started
    /// afresh, or this node's entry expired), everything the store holds whole, announced
    /// again. The tracker is soft state: this is how it rebuilds itself.
    pub(super) async fn stay_tracked(&self) {
        if !self.remote.tracker.heartbeat().await {
            return;
        }
        match self.store.complete_blobs() {
            Ok(held) => {
                info!(
                    blobs = held.len(),
                    "announcing what this node holds to the tracker"
                );
                self.announce(held, true).await;
            }
            Err(e) => warn!("cannot list the store's blobs for the tracker: {e}"),
        }
    }

    pub(super) async fn announce(&self, blobs: Vec<Hash>, complete: bool) {
        self.remote.tracker.announce(blobs, complete).await;
    }

    /// A new download from the swarm: its bans last as long as it does.
    pub(super) fn download(&self) -> Download {
        self.download_ranked(crate::blobs::Rank::foreground())
    }

    /// A download of the priority `rank` says (see [`crate::blobs::Rank`]).
    pub(super) fn download_ranked(&self, rank: crate::blobs::Rank) -> Download {
        Download::ranked(
            SwarmCtx {
                pool: self.peers.pool.clone(),
                store: self.store.clone(),
                tracker: self.remote.tracker.clone(),
                origin: self.remote.coord.addr(),
                me: self.peers.ep.id(),
                cfg: self.peers.serve.serving.config().clone(),
                origin_only: self.opts.origin_only,
                serving: self.peers.serve.serving.clone(),
                metrics: Some(self.metrics.clone()),
                arbiter: self.peers.arbiter.clone(),
            },
            rank,
        )
    }
}

impl Inner {
    /// The manifest of a head, fetched (and verified) if not held yet.
    pub(super) async fn manifest_of(&self, c: &Commit) -> OpResult<Manifest> {
        let root = c.root();
        self.fetch_tree(root).await?;
        self.read_manifest(root).await
    }

    /// A whole manifest whose pages are held, in memory.
    pub(super) async fn read_manifest(&self, root: PageRef) -> OpResult<Manifest> {
        let pages = self.pages.clone();
        self.blocking(move || Manifest::from_tree(&pages, &root))
            .await
    }

    /// Runs tree work on the blocking pool; a manifest that does not hold together is
    /// refused as unverified.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, tree::TreeError> + Send + 'static,
    ) -> OpResult<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(failed)?
            .map_err(tree_error)
    }

    /// Fetches the pages of the tree at `root` not held yet, a level at a time.
    pub(super) async fn fetch_tree(&self, root: PageRef) -> OpResult<()> {
        self.fetch_tree_by(&self.download(), root).await
    }

    /// Like [`Self::fetch_tree`], by `download` (a follow's, in the background).
    pub(super) async fn fetch_tree_by(&self, download: &Download, root: PageRef) -> OpResult<()> {
        self.fetch_until_held(download, move |pages| tree::missing(pages, &root))
            .await
    }

    /// Fetches the pages that a diff from `old` (held) to `new` needs: those of `new` that
    /// differ from `old`'s, a level at a time.
    pub(super) async fn fetch_diff(&self, old: PageRef, new: PageRef) -> OpResult<()> {
        self.fetch_until_held(&self.download(), move |pages| {
            tree::missing_for_diff(pages, &old, &new)
        })
        .await
    }

    /// Fetches the pages of the tree at `root` that may hold paths starting with `prefix`.
    pub(super) async fn fetch_prefix(&self, root: PageRef, prefix: String) -> OpResult<()> {
        self.fetch_until_held(&self.download(), move |pages| {
            tree::missing_in(pages, &root, &prefix)
        })
        .await
    }

    /// Asks `missing` which pages are needed and not held, and fetches them, until none is.
    async fn fetch_until_held(
        &self,
        download: &Download,
        missing: impl Fn(&crate::store::Pages) -> Result<Vec<PageRef>, tree::TreeError>
        + Clone
        + Send
        + 'static,
    ) -> OpResult<()> {
        loop {
            let (pages, f) = (self.pages.clone(), missing.clone());
            let want = self.blocking(move || f(&pages)).await?;
            if want.is_empty() {
                return Ok(());
            }
            let blobs: Vec<(Hash, u64)> = want.iter().map(|r| (r.hash, r.size)).collect();
            download
                .fetch(&blobs, &Events::none().counter("pages", 0))
                .await?;
        }
    }

    /// What a reload from the held tree at `old` to the tree at `new` needs: the bytes of
    /// the files that differ, and the deltas themselves unless there are more than
    /// `max_deltas` (then `None`: a full layer is cheaper than a thin one that large, and
    /// the deltas are never held in memory at once).
    pub(super) async fn reload_diff(
        &self,
        old: PageRef,
        new: PageRef,
        max_deltas: usize,
    ) -> OpResult<(u64, Option<Vec<Delta>>)> {
        let pages = self.pages.clone();
        self.blocking(move || {
            let (mut bytes, mut deltas) = (0, Some(Vec::new()));
            tree::diff_each(&pages, &old, &new, &mut |d| {
                bytes += d.new.as_ref().and_then(|e| e.blob()).map_or(0, |(_, s)| s);
                if let Some(ds) = &mut deltas {
                    if ds.len() < max_deltas {
                        ds.push(d);
                    } else {
                        deltas = None;
                    }
                }
            })?;
            Ok((bytes, deltas))
        })
        .await
    }

    /// Fetches blobs not held completely from the swarm (see [`Download::fetch`]).
    pub(super) async fn fetch_blobs(
        &self,
        blobs: &[(Hash, u64)],
        events: &Events,
    ) -> OpResult<FetchStats> {
        let mut seen = HashSet::new();
        let total = blobs
            .iter()
            .filter(|(h, _)| seen.insert(*h))
            .map(|(_, s)| s)
            .sum();
        let counter = events.counter("download", total);
        Ok(self.download().fetch(blobs, &counter).await?)
    }

    /// Like [`Self::fetch_blobs`], for the blobs that `walk` names (it runs on the
    /// blocking pool, over trees): a part of [`FETCH_PART`] at a time, so that a reload of
    /// a million files never holds their list; one download for all parts, so a ban lasts
    /// for all of them. `total`: their bytes, for progress.
    pub(super) async fn fetch_walked(
        &self,
        total: u64,
        events: &Events,
        walk: impl FnOnce(&mut dyn FnMut((Hash, u64))) -> Result<(), tree::TreeError> + Send + 'static,
    ) -> OpResult<FetchStats> {
        self.fetch_walked_by(&self.download(), total, events, walk)
            .await
    }

    /// Like [`Self::fetch_walked`], by `download`.
    pub(super) async fn fetch_walked_by(
        &self,
        download: &Download,
        total: u64,
        events: &Events,
        walk: impl FnOnce(&mut dyn FnMut((Hash, u64))) -> Result<(), tree::TreeError> + Send + 'static,
    ) -> OpResult<FetchStats> {
        let counter = events.counter("download", total);
        let (tx, mut rx) = mpsc::channel::<Vec<(Hash, u64)>>(1);
        let walker = tokio::task::spawn_blocking(move || {
            let (mut part, mut open) = (Vec::new(), true);
            walk(&mut |b| {
                if open {
                    part.push(b);
                    if part.len() == FETCH_PART {
                        open = tx.blocking_send(std::mem::take(&mut part)).is_ok();
                    }
                }
            })?;
            if open && !part.is_empty() {
                let _ = tx.blocking_send(part);
            }
            Ok(())
        });
        let mut stats = FetchStats::default();
        while let Some(part) = rx.recv().await {
            stats.merge(&download.fetch(&part, &counter).await?);
        }
        walker.await.map_err(failed)?.map_err(tree_error)?;
        Ok(stats)
    }
}

/// A root page held in the local store (its size is needed only to fetch it).
pub(super) fn local_root(hash: Hash) -> PageRef {
    PageRef { hash, size: 0 }
}

pub(super) fn tree_error(e: tree::TreeError) -> OpError {
    match e {
        tree::TreeError::Source(m) => failed(m),
        e => err(ErrorCode::Verify, format!("refused manifest: {e}")),
    }
}
