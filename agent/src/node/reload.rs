//! `voltool reload`: fetch the newest head and switch the mount to it.

use super::*;

impl Inner {
    pub(super) async fn reload(
        &self,
        name: &str,
        mode: ReloadMode,
        events: &Events,
    ) -> OpResult<ReloadReport> {
        let start = Instant::now();
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let mut rec = self.mount(name)?;
        let from_version = rec.version;
        let mut info = self.verified_head(name).await?;
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
            changed: false,
            fetched_files_bytes: 0,
            sources: Sources::default(),
            committed,
            overwritten_by_others: Vec::new(),
            download_seconds: 0.0,
            build_seconds: 0.0,
            seconds: start.elapsed().as_secs_f64(),
        };
        if info.head.commit.version == rec.version {
            return Ok(unchanged(rec.version, None));
        }
        // Uncommitted changes?
        let mut base = self.read_manifest(rec.manifest).await?;
        let cache = self.stats(name)?;
        let old_snap = self.mounts_dir(rec.id).join(&rec.snapshot);
        let (b2, s2) = (base.clone(), old_snap.clone());
        let scanned =
            tokio::task::spawn_blocking(move || scan::scan(&s2, &b2, &cache, ScanMode::HashOnly))
                .await
                .map_err(failed)?
                .map_err(failed)?;
        let dirty = scan::changes(&base, &scanned.manifest);
        let mut committed = None;
        if !dirty.is_empty() {
            match mode {
                ReloadMode::Refuse => {
                    let some: Vec<String> =
                        dirty.iter().take(5).map(|c| c.path.to_string()).collect();
                    return Err(err(
                        ErrorCode::Dirty,
                        format!(
                            "{} has {} uncommitted change(s) ({}{}); commit them, or reload with --commit-first or --discard",
                            name,
                            dirty.len(),
                            some.join(", "),
                            if dirty.len() > 5 { ", …" } else { "" }
                        ),
                    ));
                }
                ReloadMode::CommitFirst => {
                    let c = self.commit_locked(name, events).await?;
                    rec = self.mount(name)?;
                    info = self.verified_head(name).await?;
                    if info.head.commit.version == rec.version {
                        return Ok(unchanged(rec.version, Some(c)));
                    }
                    base = self.read_manifest(rec.manifest).await?;
                    committed = Some(c);
                }
                ReloadMode::Discard => {}
            }
        }
        let dirty_paths: HashSet<VolPath> = if mode == ReloadMode::Discard {
            dirty.iter().map(|c| c.path.clone()).collect()
        } else {
            HashSet::new()
        };
        let new = self.manifest_of(&info.head.commit).await?;
        let reuse: HashSet<VolPath> = new
            .entries()
            .iter()
            .filter(|(p, e)| {
                matches!(e, Entry::File { .. })
                    && !dirty_paths.contains(*p)
                    && !p.ancestors().any(|a| dirty_paths.contains(&a))
                    && base.get(p).is_some_and(|b| b.same_content(e))
            })
            .map(|(p, _)| p.clone())
            .collect();
        let needed: Vec<(Hash, u64)> = new
            .entries()
            .iter()
            .filter(|(p, _)| !reuse.contains(*p))
            .filter_map(|(_, e)| e.blob())
            .collect();
        let fetched_files_bytes = needed.iter().map(|(_, s)| s).sum();
        let t_fetch = Instant::now();
        let stats = self.fetch_blobs(&needed, events).await?;
        let download_seconds = t_fetch.elapsed().as_secs_f64();
        let t_build = Instant::now();
        let snap_name = format!(
            "v{}-{:08x}",
            info.head.commit.version,
            rand::random::<u32>()
        );
        let snap = self.mounts_dir(rec.id).join(&snap_name);
        let store = self.store.clone();
        let (n2, sn2, old2) = (new.clone(), snap.clone(), old_snap.clone());
        let reuse2 = reuse.clone();
        events.progress("build", 0, 0);
        let new_stats = tokio::task::spawn_blocking(move || {
            scan::build_snapshot(&sn2, &n2, &store, Some(&old2), &reuse2)
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        let lost: Vec<String> = rec
            .own
            .iter()
            .filter(|c| match (&c.entry, new.get(&c.path)) {
                (Some(mine), Some(now)) => !mine.same_content(now),
                (None, None) => false,
                _ => true,
            })
            .map(|c| c.path.to_string())
            .collect();
        if !lost.is_empty() {
            warn!(volume = name, paths = ?lost, "changes committed here were overwritten by another writer");
        }
        let new_rec = MountRecord {
            version: info.head.commit.version,
            manifest: info.head.commit.manifest,
            snapshot: snap_name,
            own: Vec::new(),
            ..rec
        };
        self.put_mount(&new_rec, &new_stats)?;
        switch_link(&new_rec.path, &snap)?;
        // Removing the old snapshot changes the change time of the files the new one shares
        // with it: refresh their stats, or the next scan would rehash them all.
        let (old, snap2) = (old_snap.clone(), snap.clone());
        let fresh = tokio::task::spawn_blocking(move || {
            if let Err(e) = scan::remove_tree(&old) {
                warn!(path = %old.display(), "cannot remove the old snapshot: {e}");
            }
            scan::restat(&snap2, &reuse)
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        if !fresh.is_empty() {
            let mut stats = new_stats;
            stats.extend(fresh);
            self.put_mount(&new_rec, &stats)?;
        }
        let build_seconds = t_build.elapsed().as_secs_f64();
        let report = ReloadReport {
            volume: name.to_string(),
            from_version,
            version: new_rec.version,
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
        };
        info!(
            volume = name,
            from = from_version,
            to = report.version,
            origin_bytes = report.sources.origin_bytes,
            peer_bytes = report.sources.peer_bytes,
            local_bytes = report.sources.local_bytes,
            seconds = report.seconds,
            "reloaded"
        );
        self.last_reload
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), report.clone());
        Ok(report)
    }
}
