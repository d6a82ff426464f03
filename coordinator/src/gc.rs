//! Origin retention: the last versions of every volume and what they reference are kept;
//! older versions, deleted volumes and blobs nothing references any more are freed.
//!
//! A collection runs with the write lock held, so no commit or registry change is half
//! done meanwhile: a commit's new pages and the blobs it checked are named by a head (or
//! the commit failed) by the time the collection reads the heads. What the lock cannot
//! cover is an upload, or a "does the origin hold this?" answer, that a commit in flight has
//! yet to refer to: every blob uploaded or found held is kept for [`Retention::grace`]
//! after that, and for a grace after the coordinator starts (the memory of it is not
//! kept across restarts).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::volumes::meta_fail;
use super::*;

/// What the origin keeps, and when it looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Versions of each volume kept (the head and those before it); at least 1.
    pub keep_versions: u64,
    /// How long a blob uploaded or found held, and not yet referenced, is kept for the
    /// commit that is about to refer to it.
    pub grace: Duration,
    /// Time between collections (a deleted volume starts one at once).
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_versions: 10,
            grace: Duration::from_secs(3600),
            interval: Duration::from_secs(600),
        }
    }
}

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Volumes whose versions were read.
    pub volumes: usize,
    /// Version records dropped (older than the versions kept).
    pub versions_dropped: u64,
    /// Blobs and manifest pages the versions kept reference.
    pub live: usize,
    /// Blobs freed, and their bytes.
    pub freed: usize,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Blobs unreferenced but kept for their grace.
    pub in_grace: usize,
    /// Blobs whose put into the origin's bucket began but never ended (a failed upload,
    /// a crash), their objects deleted.
    pub unrecorded: usize,
}

/// Blobs uploaded or found held lately, for the commits that will refer to them.
#[derive(Debug)]
pub(super) struct Recent {
    started: Instant,
    touched: HashMap<Hash, Instant>,
}

impl Recent {
    pub(super) fn new() -> Self {
        Recent {
            started: Instant::now(),
            touched: HashMap::new(),
        }
    }

    /// Blobs a commit may refer to soon.
    pub(super) fn touch(&mut self, hashes: impl IntoIterator<Item = Hash>) {
        let now = Instant::now();
        self.touched.extend(hashes.into_iter().map(|h| (h, now)));
    }
}

impl State {
    /// Keeps the last versions of every volume and what they reference; frees the rest.
    /// The caller holds the write lock.
    pub(super) fn collect(&self) -> Result<GcStats, Fail> {
        let keep = self.retention.keep_versions.max(1);
        let mut stats = GcStats::default();
        stats.freed += self.finish_condemned()?;
        let mut roots = Vec::new();
        let mut drops = Vec::new();
        let heads = self.meta.heads().map_err(meta_fail)?;
        stats.volumes = heads.len();
        for head in heads {
            let (id, now) = (head.commit.volume, head.commit.version);
            let first = now.saturating_sub(keep - 1);
            roots.push(head.commit.root());
            for c in self.meta.commits(id, first..now).map_err(meta_fail)? {
                // A version record missing here was dropped before: what it named is not
                // kept for it.
                roots.extend(c.map(|c| c.root()));
            }
            drops.push((id, first));
        }
        let (mut pages, mut blobs) = (HashSet::new(), HashSet::new());
        for root in &roots {
            tree::mark(&self.pages, root, &mut pages, &mut blobs)
                .map_err(|e| internal(format!("reading the manifests the origin keeps: {e}")))?;
        }
        stats.live = pages.len() + blobs.len();
        let now = Instant::now();
        let mut recent = self.recent.lock().expect("not poisoned");
        let cutoff = now.checked_sub(self.retention.grace);
        recent.touched.retain(|_, t| cutoff.is_none_or(|c| *t > c));
        // Within a grace of the start, an answer given before a restart may still be used.
        let all_in_grace = cutoff.is_none_or(|c| recent.started > c);
        let mut dead = Vec::new();
        for (h, size) in self.origin.all_blobs().map_err(internal)? {
            if pages.contains(&h) || blobs.contains(&h) {
                continue;
            }
            if all_in_grace || recent.touched.contains_key(&h) {
                stats.in_grace += 1;
                continue;
            }
            dead.push(h);
            stats.freed_bytes += size;
        }
        drop(recent);
        stats.freed += dead.len();
        // The version records go first: a crash between the two leaves blobs that the next
        // collection frees, never a kept version without its blobs.
        for (id, first) in drops {
            stats.versions_dropped += self.meta.drop_versions(id, first).map_err(meta_fail)?;
        }
        for chunk in dead.chunks(4096) {
            // Where coordinators share the records, the condemnation is written (fenced:
            // only the leader's lands) before any object goes, and the lead must hold past
            // the chunk's deletes: the collection stops a margin before its lease's end.
            self.condemn(chunk)?;
            if let Some(hook) = &self.hooks.before_gc_deletes {
                hook();
            }
            self.delete_condemned(chunk)?;
        }
        self.metrics.gc_freed_bytes.inc_by(stats.freed_bytes);
        if stats.freed > 0 || stats.versions_dropped > 0 {
            info!(
                freed = stats.freed,
                freed_bytes = stats.freed_bytes,
                versions_dropped = stats.versions_dropped,
                live = stats.live,
                in_grace = stats.in_grace,
                "origin garbage collected"
            );
        }
        Ok(stats)
    }
}

/// Collects every [`Retention::interval`], and at once when asked (a volume deleted); then
/// compacts the state's history (on etcd).
pub(super) async fn gc_loop(state: Arc<State>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(state.retention.interval) => {}
            _ = state.gc_now.notified() => {}
        }
        if let Err(e) = run(&state).await {
            warn!("origin garbage collection failed: {e}");
        }
        // etcd keeps every revision until compacted: what was current a collection ago
        // goes.
        let st = state.clone();
        match tokio::task::spawn_blocking(move || st.meta.compact_history()).await {
            Ok(Err(e)) => warn!("compacting the state's history failed: {e}"),
            Err(e) => warn!("compacting the state's history failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

/// One collection, with the write lock held, on the blocking pool; then, without it, a
/// sweep of puts into the origin's bucket that never ended (it waits for puts in flight,
/// not for commits).
pub(super) async fn run(state: &Arc<State>) -> Result<GcStats, Fail> {
    let mut stats = {
        let _guard = state.write_lock.lock().await;
        let st = state.clone();
        tokio::task::spawn_blocking(move || st.collect())
            .await
            .map_err(internal)??
    };
    let st = state.clone();
    stats.unrecorded = tokio::task::spawn_blocking(move || st.origin.sweep_unrecorded())
        .await
        .map_err(internal)?
        .map_err(internal)?;
    if stats.unrecorded > 0 {
        info!(
            blobs = stats.unrecorded,
            "origin: objects of puts that never ended deleted"
        );
    }
    Ok(stats)
}
