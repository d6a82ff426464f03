//! `voltool reload`: fetch the newest head and switch the mount to it.

use super::snapshot::Source;
use super::*;

impl Inner {
    pub(super) async fn reload(
        &self,
        name: &str,
        mode: ReloadMode,
        lazy: bool,
        events: &Events,
    ) -> OpResult<ReloadReport> {
        let start = Instant::now();
        if lazy {
            // Refused before anything is fetched where lazy mounts cannot be.
            self.lazy_layer()?;
        }
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let rec = self.mount(name)?;
        // What a read-only mount holds beside its snapshot (copy mode: writes to the
        // copies) is never kept.
        let mode = if rec.read_only {
            ReloadMode::Discard
        } else {
            mode
        };
        let from_version = rec.version;
        let info = self.verified_head(name).await?;
        if info.id != rec.id {
            return Err(err(
                ErrorCode::NotFound,
                format!("volume {name:?} was deleted and created again"),
            ));
        }
        let unchanged = |version: u64, committed: Option<CommitReport>| ReloadReport {
            volume: name.to_string(),
            from_version,
            version,
            head: None,
            changed: false,
            fetched_files_bytes: 0,
            sources: Sources::default(),
            committed,
            overwritten_by_others: Vec::new(),
            download_seconds: 0.0,
            build_seconds: 0.0,
            seconds: start.elapsed().as_secs_f64(),
            prepared: false,
        };
        // On the head already: nothing to fetch, but --discard and --commit-first still
        // act on what the mount holds uncommitted (a read-only mount keeps nothing).
        let same = info.head.commit.version == rec.version;
        if same && (mode == ReloadMode::Refuse || rec.read_only) {
            return Ok(unchanged(rec.version, None));
        }
        let (rec, info, base, dirty_paths, committed) =
            match self.settle(name, rec, info, mode, events).await? {
                Settled::Ready(r) if same && r.dirty.is_empty() && r.committed.is_none() => {
                    return Ok(unchanged(from_version, None));
                }
                Settled::Ready(r) => (r.rec, r.info, r.base, r.dirty, r.committed),
                Settled::UpToDate(version, c) => return Ok(unchanged(version, Some(*c))),
            };
        let new = info.head.commit.root();
        // A follow that holds this version whole may have prepared the switch.
        let prepared = self
            .holds_whole(info.id, new.hash)
            .then(|| self.take_prepared(&rec, new.hash))
            .flatten();
        let was_prepared = prepared.is_some();
        let plan = match prepared {
            Some((layers, bytes)) => Plan {
                new,
                needed: Needed::List(Vec::new()),
                needed_bytes: bytes,
                how: PlanHow::Over(layers),
            },
            None => self.plan(&rec, new, base, &dirty_paths).await?,
        };
        let fetched_files_bytes = plan.needed_bytes;
        let t_fetch = Instant::now();
        // Lazy (and not prepared whole by a follow): the blobs come with the fill, begun
        // before the switch (it waits for the volume's lock to settle).
        let lazy = lazy && !was_prepared;
        if lazy {
            self.start_fill(name, new).await?;
        } else {
            self.join_prefetch(info.id, info.head.commit.version, events)
                .await;
        }
        let stats = match &plan.needed {
            _ if lazy => FetchStats::default(),
            Needed::List(blobs) => self.fetch_blobs(blobs, events).await?,
            Needed::Diff(old) => {
                let (pages, old, new) = (self.pages.clone(), *old, plan.new);
                self.fetch_walked(plan.needed_bytes, events, move |each| {
                    tree::diff_each(&pages, &old, &new, &mut |d| {
                        if let Some(b) = d.new.as_ref().and_then(|e| e.blob()) {
                            each(b);
                        }
                    })
                })
                .await?
            }
        };
        let download_seconds = t_fetch.elapsed().as_secs_f64();
        self.crash_point("reload-fetched");
        let t_build = Instant::now();
        events.progress("build", 0, 0);
        let (new_rec, lost) = self
            .switch_to_head(&rec, &info, plan, base, mode, lazy)
            .await
            .inspect_err(|_| {
                if lazy {
                    self.stop_fill(name);
                }
            })?;
        let build_seconds = t_build.elapsed().as_secs_f64();
        let report = ReloadReport {
            volume: name.to_string(),
            from_version,
            version: new_rec.version,
            head: Some(info.head.commit.hash().to_string()),
            changed: true,
            fetched_files_bytes,
            sources: Sources {
                origin_bytes: stats.from_origin,
                peer_bytes: stats.peer_bytes(),
                local_bytes: stats.already_held,
                banned: stats.banned,
            },
            committed,
            overwritten_by_others: lost,
            download_seconds,
            build_seconds,
            seconds: start.elapsed().as_secs_f64(),
            prepared: was_prepared,
        };
        self.remember(&report);
        Ok(report)
    }
}

/// What a reload fetches and builds.
struct Plan {
    /// The new head's tree.
    new: PageRef,
    /// Blobs to fetch.
    needed: Needed,
    /// Their bytes.
    needed_bytes: u64,
    /// How the snapshot is built: overlay mode, the changes from the tree the layers show;
    /// copy mode, the whole new manifest and the clean files the old snapshot holds as
    /// they are.
    how: PlanHow,
}

/// Which blobs a reload fetches.
enum Needed {
    /// These.
    List(Vec<(Hash, u64)>),
    /// Those of the entries that the new tree holds and the tree at this root does not,
    /// read from the trees a part at a time.
    Diff(PageRef),
}

/// Deltas a reload writes as a thin layer; past this it writes one full layer instead (as
/// fast to write, and read from the tree a part at a time).
pub(super) const THIN_MAX: usize = 65_536;

enum PlanHow {
    /// Layers prepared ahead (see `prepare`): mounted as they are.
    Over(Vec<String>),
    Thin(Vec<Delta>),
    Full,
    Copy(Box<Manifest>, HashSet<VolPath>),
}

impl Inner {
    /// Plans a reload to the tree at `new` from the mount `rec` (last synced at `base`),
    /// fetching the pages that differ: overlay mode reads only those; copy mode reads the
    /// whole manifests.
    async fn plan(
        &self,
        rec: &MountRecord,
        new: PageRef,
        base: PageRef,
        dirty: &HashSet<VolPath>,
    ) -> OpResult<Plan> {
        if self.snapshots.layered() {
            let lowers = local_root(rec.lower_manifest);
            self.fetch_diff(lowers, new).await?;
            let (needed_bytes, deltas) = self.reload_diff(lowers, new, THIN_MAX).await?;
            let how = match deltas {
                Some(d) => PlanHow::Thin(d),
                None => PlanHow::Full,
            };
            return Ok(Plan {
                new,
                needed: Needed::Diff(lowers),
                needed_bytes,
                how,
            });
        }
        self.fetch_tree(new).await?;
        let new_m = self.read_manifest(new).await?;
        let base = self.read_manifest(base).await?;
        let (reuse, needed) = plan_copy(&new_m, &base, dirty);
        Ok(Plan {
            new,
            needed_bytes: needed.iter().map(|(_, s)| s).sum(),
            needed: Needed::List(needed),
            how: PlanHow::Copy(Box::new(new_m), reuse),
        })
    }
}

/// Copy mode: which files of `new` the previous snapshot holds as they are (clean: not
/// among the `dirty` paths being discarded), and the blobs the others need.
fn plan_copy(
    new: &Manifest,
    base: &Manifest,
    dirty: &HashSet<VolPath>,
) -> (HashSet<VolPath>, Vec<(Hash, u64)>) {
    let reuse: HashSet<VolPath> = new
        .entries()
        .iter()
        .filter(|(p, e)| {
            matches!(e, Entry::File { .. })
                && !dirty.contains(*p)
                && !p.ancestors().any(|a| dirty.contains(&a))
                && base.get(p).is_some_and(|b| b.same_content(e))
        })
        .map(|(p, _)| p.clone())
        .collect();
    let needed = new
        .entries()
        .iter()
        .filter(|(p, _)| !reuse.contains(*p))
        .filter_map(|(_, e)| e.blob())
        .collect();
    (reuse, needed)
}

/// This mount's committed changes that the new head (the tree at `new`) no longer holds:
/// another writer overwrote them.
fn lost_changes(
    rec: &MountRecord,
    pages: &crate::store::Pages,
    new: &PageRef,
) -> Result<Vec<String>, tree::TreeError> {
    let mut lost = Vec::new();
    let Some(own) = &rec.own else {
        info!(
            volume = rec.name,
            "more than {MAX_OWN} changes were committed here since the last reload: overwrites of them by other writers are not listed"
        );
        return Ok(lost);
    };
    for c in own {
        let differs = match (&c.entry, tree::get(pages, new, &c.path)?) {
            (Some(mine), Some(now)) => !mine.same_content(&now),
            (None, None) => false,
            _ => true,
        };
        if differs {
            lost.push(c.path.to_string());
        }
    }
    Ok(lost)
}

/// Where a reload goes on from once uncommitted changes are dealt with.
struct Ready {
    rec: MountRecord,
    info: VolumeInfo,
    base: PageRef,
    /// Uncommitted paths being discarded.
    dirty: HashSet<VolPath>,
    /// The commit made first, if any.
    committed: Option<CommitReport>,
}

/// Where a reload stands once uncommitted changes are dealt with.
enum Settled {
    /// Go on.
    Ready(Box<Ready>),
    /// Committing first left the mount at the head (this version): nothing to reload.
    UpToDate(u64, Box<CommitReport>),
}

impl Inner {
    /// Builds the snapshot of the head `info` as `plan` says and switches the mount to it;
    /// returns the new record and the paths committed here that another writer overwrote.
    async fn switch_to_head(
        &self,
        rec: &MountRecord,
        info: &VolumeInfo,
        plan: Plan,
        base: PageRef,
        mode: ReloadMode,
        lazy: bool,
    ) -> OpResult<(MountRecord, Vec<String>)> {
        self.freeze_for_switch(rec, base, mode, "reload").await?;
        let version = info.head.commit.version;
        let new = plan.new;
        let (source, reuse) = match plan.how {
            PlanHow::Thin(deltas) => (
                Source::Thin {
                    under: self.base_layers(rec),
                    deltas,
                    root: new,
                },
                HashSet::new(),
            ),
            PlanHow::Full => (Source::Full { root: new }, HashSet::new()),
            PlanHow::Over(layers) => (Source::Over { layers }, HashSet::new()),
            PlanHow::Copy(m, reuse) => (
                Source::Copy {
                    manifest: *m,
                    prev: Some(rec.snapshot.clone()),
                    reuse: reuse.clone(),
                },
                reuse,
            ),
        };
        let built = self
            // A lazy mount stays lazy until its fill is through: the files the reload did
            // not fetch may not all be here yet.
            .build(
                rec.id,
                version,
                source,
                rec.read_only,
                rec.owner,
                lazy || self.is_lazy(rec),
            )
            .await;
        let built = built.inspect_err(|_| self.thaw(rec))?;
        self.crash_point("reload-built");
        let (pages, r2) = (self.pages.clone(), rec.clone());
        let lost = self
            .blocking(move || lost_changes(&r2, &pages, &new))
            .await?;
        if !lost.is_empty() {
            warn!(volume = rec.name, paths = ?lost, "changes committed here were overwritten by another writer");
        }
        let new_rec = MountRecord {
            version,
            manifest: info.head.commit.manifest,
            snapshot: built.snapshot,
            own: Some(Vec::new()),
            layers: built.layers,
            lower_manifest: info.head.commit.manifest,
            ..rec.clone()
        };
        self.put_mount(&new_rec, &built.stats)
            .inspect_err(|_| self.thaw(rec))?;
        self.crash_point("reload-recorded");
        self.switch_mount(&new_rec, &new_rec.snapshot)?;
        let fresh = self.retire(rec, Some(&new_rec), reuse).await?;
        if !fresh.is_empty() {
            let mut stats = built.stats;
            stats.extend(fresh);
            self.put_mount(&new_rec, &stats)?;
        }
        Ok((new_rec, lost))
    }

    /// Logs a reload and keeps its report for `voltool status`.
    fn remember(&self, report: &ReloadReport) {
        info!(
            volume = report.volume,
            from = report.from_version,
            to = report.version,
            origin_bytes = report.sources.origin_bytes,
            peer_bytes = report.sources.peer_bytes,
            local_bytes = report.sources.local_bytes,
            seconds = report.seconds,
            "reloaded"
        );
        self.mounted
            .last_reload
            .lock()
            .expect("not poisoned")
            .insert(report.volume.clone(), report.clone());
    }

    /// Deals with uncommitted changes as `mode` says: refuses, commits them first, or marks
    /// them to be discarded.
    async fn settle(
        &self,
        name: &str,
        rec: MountRecord,
        info: VolumeInfo,
        mode: ReloadMode,
        events: &Events,
    ) -> OpResult<Settled> {
        let base = local_root(rec.manifest);
        let local = self.local_state(&rec, Take::Hash).await.map_err(|e| {
            err(
                e.code,
                format!("cannot check for uncommitted changes: {}", e.message),
            )
        })?;
        let dirty = self.local_changes(base, &local).await?;
        if dirty.is_empty() {
            return Ok(Settled::Ready(Box::new(Ready {
                rec,
                info,
                base,
                dirty: HashSet::new(),
                committed: None,
            })));
        }
        match mode {
            ReloadMode::Refuse => Err(dirty_refusal(name, &dirty, "reload")),
            ReloadMode::CommitFirst => {
                let c = self.commit_locked(name, events).await?;
                let rec = self.mount(name)?;
                let info = self.verified_head(name).await?;
                if info.head.commit.version == rec.version {
                    return Ok(Settled::UpToDate(rec.version, Box::new(c)));
                }
                let base = local_root(rec.manifest);
                Ok(Settled::Ready(Box::new(Ready {
                    rec,
                    info,
                    base,
                    dirty: HashSet::new(),
                    committed: Some(c),
                })))
            }
            ReloadMode::Discard => {
                let paths = dirty.iter().map(|d| d.path.clone()).collect();
                Ok(Settled::Ready(Box::new(Ready {
                    rec,
                    info,
                    base,
                    dirty: paths,
                    committed: None,
                })))
            }
        }
    }

    /// Freezes the mount for the switch, so nothing written from now on can be lost with
    /// the old snapshot. A file open for writing refuses it (its writer would stay on the
    /// old snapshot), and so does a change made since the dirty check (unless the reload
    /// discards changes; the copy kind's scan follows the switch instead).
    pub(super) async fn freeze_for_switch(
        &self,
        rec: &MountRecord,
        base: PageRef,
        mode: ReloadMode,
        what: &str,
    ) -> OpResult<()> {
        let merged = self.view(rec, &rec.snapshot);
        if !self.snapshots.freeze(&merged).map_err(failed)? {
            let which = crate::overlay::openfiles::first_open_for_writing(&merged)
                .map(|p| {
                    p.strip_prefix(&merged)
                        .map(|r| rec.path.join(r))
                        .unwrap_or(p)
                        .display()
                        .to_string()
                })
                .unwrap_or_else(|| "a file in the mount".into());
            return Err(err(
                ErrorCode::Dirty,
                format!(
                    "{which} is open for writing; close it, then {what} (its writes would be lost)"
                ),
            ));
        }
        if mode == ReloadMode::Discard || !self.snapshots.layered() {
            // A copied tree is read by the scan the switch follows.
            return Ok(());
        }
        let written = match self.local_state(rec, Take::Hash).await {
            Ok(l) => self.local_changes(base, &l).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(c) if c.is_empty() => Ok(()),
            Ok(c) => {
                self.thaw(rec);
                Err(err(
                    ErrorCode::Dirty,
                    format!(
                        "{} was written to during the {what} ({}); commit it, or {what} with --commit-first or --discard",
                        rec.name, c[0].path
                    ),
                ))
            }
            Err(e) => {
                self.thaw(rec);
                Err(e)
            }
        }
    }

    /// Makes a mount frozen for a switch that did not happen writable again (its file
    /// system: a read-only mount stays read-only by its own flag).
    pub(super) fn thaw(&self, rec: &MountRecord) {
        if let Err(e) = self.snapshots.thaw(&self.view(rec, &rec.snapshot)) {
            warn!(
                volume = rec.name,
                "cannot make the mount writable again: {e}"
            );
        }
    }
}

/// The refusal of an operation (`what`: reload, unmount) on a mount with uncommitted
/// changes, naming the first few.
pub(super) fn dirty_refusal(name: &str, dirty: &[Delta], what: &str) -> OpError {
    let some: Vec<String> = dirty.iter().take(5).map(|d| d.path.to_string()).collect();
    err(
        ErrorCode::Dirty,
        format!(
            "{} has {} uncommitted change(s) ({}{}); commit them, or {what} with --commit-first or --discard",
            name,
            dirty.len(),
            some.join(", "),
            if dirty.len() > 5 { ", …" } else { "" }
        ),
    )
}
