//! A mount's local state: the tree it shows (its layers with its upper layer's changes, or
//! a scan in copy mode), and the difference from its base, whole or a part at a time.

use voltool_protocol::coord::MAX_COMMIT_PART;

use crate::overlay::upper;

use super::*;

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

impl Inner {
    /// The mount's local state: overlay mode, the manifest its layers show with the upper
    /// layer's changes; copy mode, a scan of its tree against its base and the stat cache.
    /// Files written through the mount are hashed, or taken into the store (durable
    /// before this returns, with the state's pages), as `take` says.
    pub(super) async fn local_state(&self, rec: &MountRecord, take: Take) -> OpResult<Local> {
        let cache = self.stats(&rec.name)?;
        let dir = self.mounts_dir(rec.id).join(&rec.snapshot);
        let base = local_root(rec.manifest);
        let lowers = self
            .snapshots
            .layered()
            .then(|| local_root(rec.lower_manifest));
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
        .map_err(|e| scan_err(e, "cannot read the mount: "))
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
pub(super) fn apply_upper(
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
