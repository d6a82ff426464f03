//! Preheating one version (`voltool prefetch`), and the downloads of followed versions
//! that a reload of the same version joins.

use super::*;

impl Inner {
    /// `voltool prefetch NAME [--version N]`: downloads a version of volume `name` (its
    /// newest by default) into the store once (a preheat), with progress.
    pub(in crate::node) async fn prefetch(
        &self,
        name: &str,
        version: Option<u64>,
        events: &Events,
    ) -> OpResult<Reply> {
        let commit = self.verified_version(name, version).await?;
        let root = commit.root();
        self.fetch_tree(root).await?;
        let download = self.download_ranked(crate::blobs::Rank::background());
        let stats = self
            .prefetch_blobs(&download, root, events)
            .await
            .map_err(|e| match e {
                Stop::NoRoom(m) => err(ErrorCode::Failed, m),
                Stop::Failed(e) => e,
            })?;
        let peers: u64 = stats.from_peers.values().sum();
        self.metrics
            .prefetched_bytes
            .inc_by(stats.from_origin + peers);
        self.metrics.prefetched_versions.inc();
        Ok(Reply::Done(format!(
            "{name} version {} is here: {peers} bytes from peers, {} from the origin, {} held already",
            commit.version, stats.from_origin, stats.already_held
        )))
    }

    /// Version `version` of volume `name` (its head if `None`), verified: the head like any
    /// head, an older version link by link from it.
    async fn verified_version(&self, name: &str, version: Option<u64>) -> OpResult<Commit> {
        let from = match version {
            None => return Ok(self.verified_head(name).await?.head.commit),
            Some(v) => v,
        };
        let req = CoordRequest::GetVersions {
            name: name.to_string(),
            from,
        };
        let (head, commits) = match self.remote.coord.request(&req).await? {
            CoordResponse::Versions { head, commits } => (head, commits),
            _ => return Err(failed("unexpected answer from the coordinator")),
        };
        self.accept_head(&head)?;
        let oldest = voltool_protocol::commit::verify_chain(&head.commit, &commits)
            .map_err(|e| err(ErrorCode::HeadRefused, e.to_string()))?;
        if oldest.version != from {
            return Err(err(
                ErrorCode::HeadRefused,
                format!(
                    "asked for version {from} of {name}, the coordinator answered from version {}",
                    oldest.version
                ),
            ));
        }
        Ok(oldest.clone())
    }

    /// Fetches the blobs of the tree at `root` (its pages here) that the store lacks, if
    /// the store's budget has room for them.
    pub(super) async fn prefetch_blobs(
        &self,
        download: &crate::blobs::Download,
        root: PageRef,
        events: &Events,
    ) -> Result<FetchStats, Stop> {
        let (pages, store) = (self.pages.clone(), self.store.clone());
        let (total, missing) = self
            .blocking(move || {
                let (mut total, mut missing) = (0u64, 0u64);
                let mut seen = HashSet::new();
                tree::range(&pages, &root, "", &mut |_, e| {
                    if let Some((h, s)) = e.blob()
                        && seen.insert(h)
                    {
                        total += s;
                        let held = store.meta(&h).ok().flatten().map_or(0, |m| m.held_bytes());
                        missing += s.saturating_sub(held);
                    }
                    true
                })?;
                Ok((total, missing))
            })
            .await?;
        if let Some(budget) = self.opts.store_max {
            let s = self.store.clone();
            let (used, _) = tokio::task::spawn_blocking(move || s.usage())
                .await
                .map_err(failed)?
                .map_err(failed)?;
            if used + missing > budget.max {
                return Err(Stop::NoRoom(format!(
                    "no room: {missing} bytes to download, {used} held, the store's budget is {}",
                    budget.max
                )));
            }
        }
        let pages = self.pages.clone();
        let stats = self
            .fetch_walked_by(download, total, events, move |each| {
                tree::range(&pages, &root, "", &mut |_, e| {
                    if let Some(b) = e.blob() {
                        each(b);
                    }
                    true
                })
            })
            .await?;
        Ok(stats)
    }
}

/// A followed version's download that a reload of that version may join (see
/// [`Inner::join_prefetch`]): registered while it lives.
pub(super) struct Joinable<'a> {
    inner: &'a Inner,
    id: VolumeId,
}

impl<'a> Joinable<'a> {
    pub(super) fn new(
        inner: &'a Inner,
        id: VolumeId,
        version: u64,
        rank: crate::blobs::Rank,
    ) -> Self {
        inner.following.with(id, |p| {
            p.downloading = Some((version, rank));
        });
        Joinable { inner, id }
    }
}

impl Drop for Joinable<'_> {
    fn drop(&mut self) {
        self.inner.following.with(self.id, |p| p.downloading = None);
        self.inner.following.moved.send_modify(|n| *n += 1);
    }
}

impl Inner {
    /// Before a foreground download of version `version` of volume `id` (a reload, a
    /// mount): if a follow is downloading that very version, raises it to foreground and
    /// waits for it to end (its progress shown as this operation's), so nothing is
    /// fetched twice; what it could not fetch the caller fetches itself.
    pub(in crate::node) async fn join_prefetch(&self, id: VolumeId, version: u64, events: &Events) {
        let mut moved = self.following.moved.subscribe();
        let mut joined = false;
        loop {
            {
                let all = self.following.progress.lock().expect("not poisoned");
                match all.get(&id) {
                    Some(Progress {
                        downloading: Some((v, rank)),
                        done,
                        total,
                        ..
                    }) if *v == version => {
                        if !joined {
                            joined = true;
                            info!(volume = %id, version, "joining the follow's download of this version");
                        }
                        rank.raise();
                        events.progress("download", *done, *total);
                    }
                    _ => return,
                }
            }
            if moved.changed().await.is_err() {
                return;
            }
        }
    }
}
