//! `voltool commit`: scan the mount, upload what the origin lacks, send the change set.

use voltool_protocol::coord::CommitPart;

use super::fetch::tree_error;
use super::*;

impl Inner {
    /// `voltool commit`: commits the mount, then brings it to the merged head, as Modal's
    /// `commit()` does, so a writer sees the other writers' files too. The commit stands
    /// whatever the reload does: when the reload is refused (a file open for writing, a
    /// change written during the commit) or fails, the mount stays on its own view and the
    /// report says why.
    pub(super) async fn commit_and_follow(
        &self,
        name: &str,
        events: &Events,
    ) -> OpResult<CommitReport> {
        let mut report = self.commit(name, events).await?;
        let rec = self.mount(name)?;
        if report.changed > 0 && rec.version == report.version {
            return Ok(report);
        }
        match self.reload(name, ReloadMode::Refuse, false, events).await {
            Ok(r) => {
                report.seconds += r.seconds;
                if r.changed {
                    report.reloaded = Some(Box::new(r));
                }
            }
            Err(e) => {
                info!(
                    volume = name,
                    "the mount stays on its own view: {}", e.message
                );
                report.stayed = Some(e.message);
            }
        }
        Ok(report)
    }

    pub(super) async fn commit(&self, name: &str, events: &Events) -> OpResult<CommitReport> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.commit_locked(name, events).await
    }

    /// Commits a mount. In overlay mode its upper layer is sealed first (see
    /// [`Inner::seal`]): the mount is read-only only for that moment, the written files join
    /// the store by hard links (one write per byte), and the commit reads the sealed state
    /// while the mount takes new writes in a fresh upper. While a file in the mount is open
    /// for writing, the files are copied into the store instead and the mount stays as it is.
    pub(super) async fn commit_locked(
        &self,
        name: &str,
        events: &Events,
    ) -> OpResult<CommitReport> {
        let start = Instant::now();
        let mut rec = self.mount(name)?;
        if rec.read_only {
            return Err(err(
                ErrorCode::Invalid,
                format!("{name} is mounted read-only: there is nothing to commit"),
            ));
        }
        let mut local = None;
        if self.snapshots.layered()
            && let Some((sealed, state)) = self
                .seal(&rec)
                .await
                .map_err(|e| err(e.code, format!("cannot commit: {}", e.message)))?
        {
            (rec, local) = (sealed, Some(state));
        }
        let seal_seconds = start.elapsed().as_secs_f64();
        self.crash_point("commit-stored");
        let mut report = self.commit_once(rec, local, events).await?;
        report.scan_seconds += seal_seconds;
        report.seconds += seal_seconds;
        Ok(report)
    }

    /// Records a commit's result in the mount: its local state as the new base, and the
    /// head's version if the head is exactly that state (else other writers' changes
    /// await the next reload, so the old version stays).
    fn record_commit(
        &self,
        rec: MountRecord,
        head: &SignedHead,
        local: &Local,
        own: Option<Vec<Change>>,
    ) -> OpResult<()> {
        let local_hash = local.root.hash;
        let version = if head.commit.manifest == local_hash {
            head.commit.version
        } else {
            rec.version
        };
        let new = MountRecord {
            version,
            manifest: local_hash,
            own,
            ..rec
        };
        self.put_mount(&new, &local.stats)
    }

    /// Commits what the mount holds (`local`: its state, if already read by a seal).
    /// The difference from the mount's base is read twice, a part at a time, so that a
    /// commit of a million files holds a part of it at once: first to upload the blobs the
    /// origin lacks, then to send the change set.
    async fn commit_once(
        &self,
        rec: MountRecord,
        local: Option<Local>,
        events: &Events,
    ) -> OpResult<CommitReport> {
        let name = rec.name.clone();
        let name = name.as_str();
        let start = Instant::now();
        let base = local_root(rec.manifest);
        events.progress("scan", 0, 0);
        let scanned = match local {
            // A sealed upper: its state is known, nothing more to read.
            Some(sealed) => sealed,
            None => self
                .local_state(&rec, Take::Copy)
                .await
                .map_err(|e| err(e.code, format!("cannot commit: {}", e.message)))?,
        };
        let scan_seconds = start.elapsed().as_secs_f64();
        let t_upload = Instant::now();
        let (changed, uploaded) = self.upload_changes(base, &scanned, events).await?;
        let upload_seconds = t_upload.elapsed().as_secs_f64();
        if changed == 0 {
            let report = CommitReport {
                volume: name.to_string(),
                version: rec.version,
                head: None,
                changed: 0,
                uploaded_bytes: 0,
                hashed_bytes: scanned.hashed_bytes,
                overwritten: Vec::new(),
                scan_seconds,
                upload_seconds: 0.0,
                seconds: start.elapsed().as_secs_f64(),
                reloaded: None,
                stayed: None,
            };
            return Ok(report);
        }
        let info = self.verified_head(name).await?;
        if info.id != rec.id {
            return Err(err(
                ErrorCode::NotFound,
                format!("volume {name:?} was deleted and created again"),
            ));
        }
        self.crash_point("commit-uploaded");
        // The change set, a part at a time, to the coordinator.
        let (mut deltas, walk) = self.local_change_parts(base, &scanned);
        let (tx, mut parts) = mpsc::channel(1);
        let mut mine = Some(Vec::new());
        let make_parts = async {
            while let Some((part, last)) = deltas.recv().await {
                let (priors, changes): (Vec<Option<Entry>>, Vec<Change>) = part
                    .into_iter()
                    .map(|d| (d.old.clone(), d.into_change()))
                    .unzip();
                mine = mine.take().and_then(|mut m: Vec<Change>| {
                    (m.len() + changes.len() <= MAX_OWN).then(|| {
                        m.extend_from_slice(&changes);
                        m
                    })
                });
                let part = CommitPart {
                    changes,
                    priors,
                    last,
                };
                if tx.send(part).await.is_err() {
                    break;
                }
            }
            drop(tx);
        };
        let ((), sent) = tokio::join!(make_parts, self.send_commit(&info, rec.version, &mut parts));
        walk.await.map_err(failed)?.map_err(tree_error)?;
        let (head, overwritten, overwritten_total) = sent?;
        self.crash_point("commit-sent");
        let own = match (rec.own.as_deref(), mine) {
            (Some(own), Some(mine)) => merge_own(own, &mine),
            _ => None,
        };
        self.record_commit(rec, &head, &scanned, own)?;
        if overwritten_total > 0 {
            warn!(volume = name, count = overwritten_total, paths = ?overwritten, "this commit overwrote other writers' changes");
        }
        let report = CommitReport {
            volume: name.to_string(),
            version: head.commit.version,
            head: Some(head.commit.hash().to_string()),
            changed,
            uploaded_bytes: uploaded,
            hashed_bytes: scanned.hashed_bytes,
            overwritten: overwritten.into_iter().map(|p| p.to_string()).collect(),
            scan_seconds,
            upload_seconds,
            seconds: start.elapsed().as_secs_f64(),
            reloaded: None,
            stayed: None,
        };
        Ok(report)
    }

    /// Uploads the blobs of the changes from `base` to `local` that the origin lacks, a
    /// part of the change set at a time; returns how many changes there are and the bytes
    /// uploaded.
    async fn upload_changes(
        &self,
        base: PageRef,
        local: &Local,
        events: &Events,
    ) -> OpResult<(usize, u64)> {
        let (grow, done) = events.growing_counter("upload");
        let (mut deltas, walk) = self.local_change_parts(base, local);
        let (mut changed, mut uploaded) = (0, 0);
        while let Some((part, _)) = deltas.recv().await {
            changed += part.len();
            let blobs: Vec<(Hash, u64)> = part
                .iter()
                .filter_map(|d| d.new.as_ref().and_then(|e| e.blob()))
                .collect();
            if !blobs.is_empty() {
                uploaded += self.upload_missing(&blobs, &grow, &done).await?;
            }
        }
        walk.await.map_err(failed)?.map_err(tree_error)?;
        Ok((changed, uploaded))
    }
}

/// The mount's committed changes not yet seen back in a reload, with `changes` added
/// (the later change of a path wins); `None` past [`MAX_OWN`].
fn merge_own(own: &[Change], changes: &[Change]) -> Option<Vec<Change>> {
    if own.len() + changes.len() > MAX_OWN {
        return None;
    }
    let mut merged: BTreeMap<&VolPath, &Option<Entry>> =
        own.iter().map(|c| (&c.path, &c.entry)).collect();
    merged.extend(changes.iter().map(|c| (&c.path, &c.entry)));
    Some(
        merged
            .into_iter()
            .map(|(path, entry)| Change {
                path: path.clone(),
                entry: entry.clone(),
            })
            .collect(),
    )
}
