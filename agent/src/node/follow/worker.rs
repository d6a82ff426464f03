//! A followed volume's worker: downloads the newest head until it is held whole, and
//! switches a `--follow=switch` mount to it.

use super::prefetch::Joinable;
use super::*;

/// What a follow's worker does next.
enum Next {
    /// Download this version.
    Download(SignedHead),
    /// Switch the mount of this name to the version held (`--follow=switch`).
    Switch(String),
    /// Nothing: the worker ends (it was the volume's worker: nothing waits any more).
    Done(bool),
}

/// What worker `n` of followed volume `id` does next: download the newest head if it is
/// not held whole, else switch a `--follow=switch` mount that shows an older version, else
/// end (and say so, unless another worker took over).
fn next_step(inner: &Inner, id: VolumeId, n: u64) -> Next {
    let mut all = inner.following.progress.lock().expect("not poisoned");
    let Some(p) = all.get_mut(&id) else {
        return Next::Done(false);
    };
    let rec = inner.follow_record(id).ok().flatten();
    let held = rec.as_ref().and_then(|f| f.held.map(|(v, _)| v));
    if let Some(h) = &p.newest
        && held.is_none_or(|v| v < h.commit.version)
    {
        return Next::Download(h.clone());
    }
    if let (Some(f), Some(held)) = (&rec, held)
        && f.mount == control::Follow::Switch
        && let Some(m) = inner
            .mounts()
            .ok()
            .and_then(|ms| ms.into_iter().find(|m| m.id == id))
        && m.version < held
    {
        return Next::Switch(m.name);
    }
    let current = p.worker.as_ref().is_some_and(|(w, _)| *w == n);
    if current {
        p.worker = None;
    }
    Next::Done(current)
}

/// Switches mount `name` to the newest version (`--follow=switch`), as `voltool reload`
/// would and only when it would: no uncommitted change, no file open for writing.
async fn switch(inner: &Arc<Inner>, name: &str) -> Result<(), String> {
    let r = {
        let _op = inner.budget.ops.read().await;
        inner
            .reload(name, ReloadMode::Refuse, false, &Events::none())
            .await
    };
    inner.budget.check.notify_one();
    match r {
        Ok(r) => {
            inner.metrics.reloads.inc();
            info!(
                volume = name,
                from = r.from_version,
                to = r.version,
                "switched the mount to the followed version"
            );
            inner.clone().compact_later(name.to_string());
            Ok(())
        }
        Err(e) => Err(e.message),
    }
}

/// Downloads the newest head of followed volume `id` until it is held whole; stops when
/// `token` is cancelled (a newer head starts a new worker; an unfollow ends it).
pub(super) async fn follow_worker(
    inner: Arc<Inner>,
    id: VolumeId,
    n: u64,
    token: CancellationToken,
) {
    let mut retry = RETRY_FIRST;
    loop {
        let head = match next_step(&inner, id, n) {
            Next::Download(head) => head,
            Next::Switch(name) => {
                let switched = tokio::select! {
                    _ = token.cancelled() => return,
                    r = switch(&inner, &name) => r,
                };
                let wait = match switched {
                    Ok(()) => {
                        retry = RETRY_FIRST;
                        continue;
                    }
                    Err(why) => {
                        debug!(
                            volume = name,
                            "the switch to the followed version waits: {why}"
                        );
                        set_waiting(&inner, id, Some(format!("the switch waits: {why}")));
                        retry.min(SWITCH_RETRY_MAX)
                    }
                };
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            Next::Done(current) => {
                if current {
                    set_waiting(&inner, id, None);
                }
                return;
            }
        };
        let mut done = tokio::select! {
            _ = token.cancelled() => return,
            r = download_head(&inner, id, &head) => r,
        };
        if let Err(Stop::NoRoom(m)) = &done {
            // Room made by evicting what nothing needs, then one more try.
            set_waiting(&inner, id, Some(m.clone()));
            let again = async {
                if let Err(e) = inner.enforce_budget(true).await {
                    warn!(volume = %id, "evicting for a followed version failed: {}", e.message);
                }
                download_head(&inner, id, &head).await
            };
            done = tokio::select! {
                _ = token.cancelled() => return,
                r = again => r,
            };
        }
        let wait = match done {
            Ok(()) => {
                retry = RETRY_FIRST;
                continue;
            }
            Err(Stop::NoRoom(m)) => {
                info!(volume = %id, "a followed version waits for room in the store: {m}");
                set_waiting(&inner, id, Some(m));
                retry
            }
            Err(Stop::Failed(e)) => {
                warn!(volume = %id, version = head.commit.version, "downloading a followed version failed: {}", e.message);
                set_waiting(&inner, id, Some(e.message));
                retry
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Says why followed volume `id`'s download waits (`None`: it does not), in `status` and
/// in the count of waiting follows.
fn set_waiting(inner: &Inner, id: VolumeId, why: Option<String>) {
    let all = {
        let mut all = inner.following.progress.lock().expect("not poisoned");
        if let Some(p) = all.get_mut(&id) {
            p.waiting = why;
        }
        all.values().filter(|p| p.waiting.is_some()).count()
    };
    inner.metrics.follows_waiting.set(all as i64);
}

/// Downloads version `head` of followed volume `id` into the store and records it held.
async fn download_head(inner: &Arc<Inner>, id: VolumeId, head: &SignedHead) -> Result<(), Stop> {
    let root = head.commit.root();
    let stats = {
        let _op = inner.budget.ops.read().await;
        // One background download for the version's pages and blobs: a foreground one
        // (a reload) goes first, and a ban lasts for all of it.
        let download = inner.download_ranked(crate::blobs::Rank::background());
        inner.fetch_tree_by(&download, root).await?;
        inner.following.with(id, |p| {
            p.pages_here = Some(root.hash);
            (p.total, p.done) = (0, 0);
        });
        let (events, mut rx) = {
            let (tx, rx) = mpsc::channel(64);
            (Events { tx: Some(tx) }, rx)
        };
        let watch = {
            let inner = inner.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    if let Event::Progress { done, total, .. } = ev {
                        inner
                            .following
                            .with(id, |p| (p.done, p.total) = (done, total));
                        inner.following.moved.send_modify(|n| *n += 1);
                    }
                }
            })
        };
        let _joinable = Joinable::new(inner, id, head.commit.version, download.rank().clone());
        let r = inner.prefetch_blobs(&download, root, &events).await;
        drop(events);
        let _ = watch.await;
        if let Ok(stats) = &r {
            inner.following.with(id, |p| {
                p.origin_bytes += stats.from_origin;
                p.peer_bytes += stats.from_peers.values().sum::<u64>();
                p.banned.extend(stats.banned.iter().cloned());
                let extra = p.banned.len().saturating_sub(MAX_BANNED_SHOWN);
                p.banned.drain(..extra);
            });
        }
        r?
    };
    // A mount that follows gets its switch prepared (before the version counts as held, so
    // that a reload of it finds the switch ready), so that its reload only switches.
    let following_mount = inner
        .follow_record(id)
        .ok()
        .flatten()
        .is_some_and(|f| f.mount != control::Follow::No);
    if following_mount
        && let Some(m) = inner
            .mounts()
            .ok()
            .and_then(|ms| ms.into_iter().find(|m| m.id == id))
    {
        inner
            .prepare_switch(&m.name, head.commit.version, root)
            .await;
    }
    inner.update_follow(id, |old| {
        old.map(|mut f| {
            if f.held.is_none_or(|(v, _)| v < head.commit.version) {
                f.held = Some((head.commit.version, root.hash));
            }
            f
        })
    })?;
    inner.following.with(id, |p| p.pages_here = None);
    set_waiting(inner, id, None);
    let peers: u64 = stats.from_peers.values().sum();
    inner
        .metrics
        .prefetched_bytes
        .inc_by(stats.from_origin + peers);
    inner.metrics.prefetched_versions.inc();
    info!(
        volume = %id,
        version = head.commit.version,
        origin_bytes = stats.from_origin,
        peer_bytes = peers,
        "a followed version is here"
    );
    Ok(())
}
