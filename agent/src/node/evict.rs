//! The disk budget (`--store-max`): once the store holds more than its high watermark,
//! blobs that nothing here needs are evicted down to the low watermark, partial blobs of
//! abandoned downloads first, then complete blobs least recently used first; each is
//! withdrawn from the tracker as it goes.
//!
//! Needed, and never evicted: every blob a layer of a snapshot redirects to (found by
//! reading the layers under `mounts/`, then under `trash/`, where a process may still be
//! inside an old overlay: layers only move from the one to the other, so a walk in that
//! order misses none), the pages and blobs of every mount's manifests and of the newest
//! version of every followed volume (see `follow`), and blobs a download is still writing. Operations (a reload, a commit, a `get`) hold the
//! operations gate for reading while they run; an eviction takes it for writing only when
//! no operation runs (it never waits for one, so it never holds the next ones back), and
//! decides while no download is in flight and no snapshot half built. Recency is the later
//! of when a blob was written here and when an eviction last found it needed.

use std::os::unix::fs::MetadataExt;
use std::time::SystemTime;

use super::fetch::tree_error;
use crate::overlay::XATTR_REDIRECT;
use crate::overlay::layer::redirect_hash;

use super::*;

/// How much the store may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreBudget {
    /// The high watermark: past it, an eviction starts.
    pub max: u64,
    /// The low watermark: an eviction frees down to it.
    pub low: u64,
}

impl StoreBudget {
    /// A budget of `max` bytes that evicts down to `low`, or to 90 % of `max`.
    pub fn new(max: u64, low: Option<u64>) -> Self {
        StoreBudget {
            max,
            low: low.unwrap_or(max / 10 * 9).min(max),
        }
    }
}

/// The disk budget's part of the agent: the gate operations hold while they run, and what
/// evictions found and freed. Only this module and the operations' gate reach it.
#[derive(Debug, Default)]
pub(super) struct Budget {
    /// Held for reading by every operation while it runs, for writing by an eviction.
    pub(super) ops: Arc<tokio::sync::RwLock<()>>,
    /// The store's bytes after an eviction that could not get under the budget (all of it
    /// needed): no pass again until the store holds more.
    futile: Mutex<Option<u64>>,
    /// When an eviction last found each blob needed (its recency, with its write time).
    last_needed: Mutex<HashMap<Hash, SystemTime>>,
    /// What evictions freed since the start.
    evicted: Mutex<Evicted>,
    /// Wakes the budget's check (after an operation).
    pub(super) check: tokio::sync::Notify,
}

impl Budget {
    /// What evictions did since the agent started.
    pub(super) fn evicted(&self) -> Evicted {
        *self.evicted.lock().expect("not poisoned")
    }
}

/// What evictions did since the agent started.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Evicted {
    pub(super) blobs: u64,
    pub(super) bytes: u64,
}

impl Inner {
    /// The store's bytes now (read on the blocking pool).
    async fn bytes_held(&self) -> OpResult<u64> {
        let s = self.store.clone();
        let (bytes, _) = tokio::task::spawn_blocking(move || s.usage())
            .await
            .map_err(failed)?
            .map_err(failed)?;
        Ok(bytes)
    }

    /// Evicts down to the low watermark if the store holds more than the high one. With
    /// `wait`, waits for operations in progress (and an eviction) to end, holding new ones
    /// back; without, does nothing while any runs.
    pub(super) async fn enforce_budget(self: &Arc<Self>, wait: bool) -> OpResult<()> {
        let Some(budget) = self.opts.store_max else {
            return Ok(());
        };
        let used = self.bytes_held().await?;
        if used <= budget.max {
            return Ok(());
        }
        // A pass that found everything needed is not repeated until the store grows.
        if self
            .budget
            .futile
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| used <= at)
        {
            return Ok(());
        }
        let gate = if wait {
            self.budget.ops.clone().write_owned().await
        } else {
            // Operations in progress: the one that ends last checks again.
            match self.budget.ops.clone().try_write_owned() {
                Ok(g) => g,
                Err(_) => return Ok(()),
            }
        };
        // Another pass may have run meanwhile.
        let used = self.bytes_held().await?;
        if used <= budget.max {
            return Ok(());
        }
        let s = self.clone();
        let (evicted, after) = tokio::task::spawn_blocking(move || {
            let r = s.evict(budget);
            drop(gate);
            r
        })
        .await
        .map_err(failed)??;
        *self.budget.futile.lock().expect("not poisoned") = (after > budget.max).then_some(after);
        if !evicted.is_empty() {
            self.remote.tracker.withdraw(evicted).await;
        }
        Ok(())
    }

    /// Chooses and removes what goes (with the gate held); returns the blobs removed and
    /// the bytes held after.
    fn evict(&self, budget: StoreBudget) -> OpResult<(Vec<Hash>, u64)> {
        let needed = self.needed()?;
        let now = SystemTime::now();
        let all = self.store.all_metas().map_err(failed)?;
        let mut used: u64 = all.iter().map(|(_, m)| m.held_bytes()).sum();
        let mut candidates = Vec::new();
        {
            let mut seen = self.budget.last_needed.lock().expect("not poisoned");
            for h in &needed {
                seen.insert(*h, now);
            }
            for (h, m) in all {
                if needed.contains(&h) || self.store.is_being_written(&h) {
                    continue;
                }
                let written = std::fs::metadata(self.store.data_path(&h))
                    .and_then(|md| md.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let last = seen.get(&h).map_or(written, |t| (*t).max(written));
                // Partial blobs first: nothing is downloading now, so they were abandoned.
                candidates.push((m.is_complete(), last, h, m.held_bytes()));
            }
        }
        candidates.sort_unstable();
        let mut gone = Vec::new();
        let mut freed = 0u64;
        for (_, _, h, bytes) in candidates {
            if used <= budget.low {
                break;
            }
            gone.push(h);
            used -= bytes;
            freed += bytes;
        }
        for chunk in gone.chunks(4096) {
            self.store.remove_many(chunk).map_err(failed)?;
        }
        {
            // Recency is kept for what the store still holds.
            let mut seen = self.budget.last_needed.lock().expect("not poisoned");
            for h in &gone {
                seen.remove(h);
            }
        }
        {
            let mut e = self.budget.evicted.lock().expect("not poisoned");
            e.blobs += gone.len() as u64;
            e.bytes += freed;
        }
        self.metrics.evictions.inc_by(gone.len() as u64);
        self.metrics.evicted_bytes.inc_by(freed);
        if used > budget.max {
            warn!(
                held = used,
                max = budget.max,
                "the store holds more than its budget, all of it needed by mounted snapshots"
            );
        }
        if !gone.is_empty() {
            info!(
                blobs = gone.len(),
                bytes = freed,
                held = used,
                "evicted from the store"
            );
        }
        Ok((gone, used))
    }

    /// Blobs (and manifest pages) that must stay: what the layers of every snapshot here
    /// redirect to, and the trees of every mount's manifests.
    fn needed(&self) -> OpResult<HashSet<Hash>> {
        let mut blobs = HashSet::new();
        let mut pages = HashSet::new();
        for m in self.mounts()? {
            for root in [m.manifest, m.lower_manifest] {
                tree::mark(&self.pages, &local_root(root), &mut pages, &mut blobs)
                    .map_err(tree_error)?;
            }
        }
        // The newest version of each followed volume (held whole, or downloading with its
        // pages here): a prefetch is not undone.
        for root in self.followed_roots()? {
            tree::mark(&self.pages, &local_root(root), &mut pages, &mut blobs)
                .map_err(tree_error)?;
        }
        for dir in ["mounts", snapshot::TRASH] {
            redirects_under(&self.opts.data.join(dir), &mut blobs).map_err(failed)?;
        }
        blobs.extend(pages);
        Ok(blobs)
    }
}

/// Adds every blob that a metadata layer's file under `dir` redirects to, without
/// crossing into mounted file systems (the snapshots' overlays).
fn redirects_under(dir: &Path, out: &mut HashSet<Hash>) -> std::io::Result<()> {
    let dev = match std::fs::metadata(dir) {
        Ok(m) => m.dev(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // Gone meanwhile (the trash empties itself): nothing to add. Anything else fails the
    // pass: an eviction never guesses what is needed.
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut buf = vec![0u8; 128];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            let md = match e.metadata() {
                Ok(md) => md,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if md.dev() != dev {
                continue;
            }
            if md.is_dir() {
                todo.push(e.path());
            } else if md.is_file() {
                match rustix::fs::lgetxattr(e.path(), XATTR_REDIRECT, &mut buf) {
                    Ok(n) => out.extend(redirect_hash(&buf[..n])),
                    Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOENT) => {}
                    // Copies on a file system without extended attributes name no blob.
                    Err(rustix::io::Errno::OPNOTSUPP) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_name_blobs_and_nothing_else() {
        let h = Hash::of(b"x");
        let r = crate::overlay::layer::data_redirect(&h);
        assert_eq!(redirect_hash(r.as_bytes()), Some(h));
        assert_eq!(redirect_hash(b"/dir/renamed"), None);
        assert_eq!(redirect_hash(b"/ab/zz.data"), None);
        let old = format!("/{}/{}.data", &h.to_hex()[..2], h.to_hex());
        assert_eq!(
            redirect_hash(old.as_bytes()),
            None,
            "the old form names no blob"
        );
        assert_eq!(redirect_hash(&[0xff, 0xfe]), None);
    }

    #[test]
    fn the_low_watermark_defaults_below_the_high() {
        assert_eq!(StoreBudget::new(1000, None).low, 900);
        assert_eq!(StoreBudget::new(1000, Some(5000)).low, 1000);
    }
}
