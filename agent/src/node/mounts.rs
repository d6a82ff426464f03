//! Mount records, their stat caches, crash recovery and the atomic switch of a mount.

use super::*;

pub(super) const MOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("mounts-4");
pub(super) const STATS: TableDefinition<&str, &[u8]> = TableDefinition::new("stats-3");
/// Mount records without their parent directory's identity (taken over at start).
const MOUNTS_3: TableDefinition<&str, &[u8]> = TableDefinition::new("mounts-3");

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct MountRecord {
    pub(super) name: String,
    pub(super) id: VolumeId,
    pub(super) path: PathBuf,
    pub(super) version: u64,
    /// Hash (in the local store) of the manifest the snapshot holds as last synced.
    pub(super) manifest: Hash,
    pub(super) snapshot: String,
    pub(super) background_commit_secs: Option<u64>,
    /// This mount's committed changes not yet seen back in a reload: on reload, those the
    /// new head does not hold were overwritten by another writer, and are reported. `None`
    /// once there are more than [`MAX_OWN`] (a record stays small; such overwrites are then
    /// not listed).
    pub(super) own: Option<Vec<Change>>,
    /// Overlay mode: the snapshot's metadata layers, topmost first.
    pub(super) layers: Vec<String>,
    /// Overlay mode: the manifest those layers show (its upper layer holds the rest).
    pub(super) lower_manifest: Hash,
    /// Mounted read-only: nothing is written through it, nothing is committed.
    pub(super) read_only: bool,
    /// The mount path's directory, as it was when mounted: the path is only ever handled
    /// through that directory, and a restart refuses a directory that is another.
    pub(super) parent: ParentId,
    /// The user it belongs to: only it (and root) may commit, reload or unmount it.
    pub(super) owner: u32,
}

/// A mount record as `mounts-3` held it: all of [`MountRecord`] but its parent.
#[derive(Deserialize)]
struct MountRecord3 {
    name: String,
    id: VolumeId,
    path: PathBuf,
    version: u64,
    manifest: Hash,
    snapshot: String,
    background_commit_secs: Option<u64>,
    own: Option<Vec<Change>>,
    layers: Vec<String>,
    lower_manifest: Hash,
    read_only: bool,
}

/// Takes the mount records of `mounts-3` over into [`MOUNTS`], each with the identity of
/// its path's directory as it is now (a directory reached through a symbolic link is
/// refused, and its mount dropped with a warning: unmount it by hand).
pub(super) fn migrate_mounts(db: &Database) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let r = db.begin_read().map_err(|x| e(&x))?;
    if !r
        .list_tables()
        .map_err(|x| e(&x))?
        .any(|t| redb::TableHandle::name(&t) == "mounts-3")
    {
        return Ok(());
    }
    let t = r.open_table(MOUNTS_3).map_err(|x| e(&x))?;
    let mut new = Vec::new();
    for entry in redb::ReadableTable::iter(&t).map_err(|x| e(&x))? {
        let (_, v) = entry.map_err(|x| e(&x))?;
        let o: MountRecord3 = postcard::from_bytes(v.value()).map_err(|x| e(&x))?;
        let parent = match MountPoint::open(&o.path) {
            Ok(mp) => mp.id(),
            Err(err) => {
                warn!(
                    volume = o.name,
                    "dropping a mount whose path cannot be held: {err}"
                );
                continue;
            }
        };
        new.push(MountRecord {
            name: o.name,
            id: o.id,
            path: o.path,
            version: o.version,
            manifest: o.manifest,
            snapshot: o.snapshot,
            background_commit_secs: o.background_commit_secs,
            own: o.own,
            layers: o.layers,
            lower_manifest: o.lower_manifest,
            read_only: o.read_only,
            parent,
            owner: 0,
        });
    }
    drop(t);
    drop(r);
    let w = db.begin_write().map_err(|x| e(&x))?;
    {
        let mut t = w.open_table(MOUNTS).map_err(|x| e(&x))?;
        for m in &new {
            let enc = postcard::to_stdvec(m).map_err(|x| e(&x))?;
            t.insert(m.name.as_str(), enc.as_slice())
                .map_err(|x| e(&x))?;
        }
    }
    w.delete_table(MOUNTS_3).map_err(|x| e(&x))?;
    w.commit().map_err(|x| e(&x))?;
    info!(
        mounts = new.len(),
        "mount records taken over with their directories"
    );
    Ok(())
}

/// Committed changes a mount keeps to report overwrites by other writers at its next reload.
pub(super) const MAX_OWN: usize = 10_000;

/// What the agent keeps of its mounts besides their records: a lock per volume that its
/// operations take in turn, each mount's last reload, the mounts being compacted, and the
/// held parents of mount paths.
#[derive(Debug, Default)]
pub(super) struct Mounted {
    pub(super) locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(super) last_reload: Mutex<HashMap<String, ReloadReport>>,
    pub(super) compacting: Mutex<HashSet<String>>,
    pub(super) mount_points: Mutex<HashMap<String, Arc<MountPoint>>>,
    /// Switches prepared ahead for followed versions, by mount.
    pub(super) prepared: Mutex<HashMap<String, super::prepare::Prepared>>,
}

impl Inner {
    pub(super) fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.mounted
            .locks
            .lock()
            .expect("not poisoned")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub(super) fn mounts_dir(&self, id: VolumeId) -> PathBuf {
        self.opts.data.join("mounts").join(id.to_string())
    }

    pub(super) fn mounts(&self) -> OpResult<Vec<MountRecord>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(MOUNTS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in redb::ReadableTable::iter(&t).map_err(db_err)? {
            let (_, v) = e.map_err(db_err)?;
            out.push(postcard::from_bytes(v.value()).map_err(db_err)?);
        }
        Ok(out)
    }

    pub(super) fn mount(&self, name: &str) -> OpResult<MountRecord> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(MOUNTS).map_err(db_err)?;
        let v = t.get(name).map_err(db_err)?.ok_or_else(|| {
            err(
                ErrorCode::NotMounted,
                format!("volume {name:?} is not mounted on this host (voltool mount {name} PATH)"),
            )
        })?;
        postcard::from_bytes(v.value()).map_err(db_err)
    }

    pub(super) fn stats(&self, name: &str) -> OpResult<StatCache> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(STATS).map_err(db_err)?;
        match t.get(name).map_err(db_err)? {
            Some(v) => {
                let list: Vec<(VolPath, scan::Stat)> =
                    postcard::from_bytes(v.value()).map_err(db_err)?;
                Ok(list.into_iter().collect())
            }
            None => Ok(StatCache::new()),
        }
    }

    /// A write transaction on the agent's database, refused while the disk is full (see
    /// [`Store::begin_write`]: the database shares the store's file system).
    pub(super) fn db_write(&self) -> OpResult<redb::WriteTransaction> {
        self.store.room_for_meta().map_err(failed)?;
        self.db.begin_write().map_err(db_err)
    }

    pub(super) fn put_mount(&self, m: &MountRecord, stats: &StatCache) -> OpResult<()> {
        let w = self.db_write()?;
        let unused = self.settle_compacted(&w, m, false)?;
        {
            let enc = postcard::to_stdvec(m).map_err(db_err)?;
            w.open_table(MOUNTS)
                .map_err(db_err)?
                .insert(m.name.as_str(), enc.as_slice())
                .map_err(db_err)?;
            let list: Vec<(&VolPath, &scan::Stat)> = stats.iter().collect();
            let enc = postcard::to_stdvec(&list).map_err(db_err)?;
            w.open_table(STATS)
                .map_err(db_err)?
                .insert(m.name.as_str(), enc.as_slice())
                .map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        if let Some(l) = unused {
            self.trash_layers(m.id, vec![l]);
        }
        Ok(())
    }

    /// Forgets a mount: its record, its stat cache and a compacted layer left for it, in
    /// one transaction.
    pub(super) fn drop_mount(&self, m: &MountRecord) -> OpResult<()> {
        let name = m.name.as_str();
        let w = self.db_write()?;
        let unused = self.settle_compacted(&w, m, true)?;
        {
            w.open_table(MOUNTS)
                .map_err(db_err)?
                .remove(name)
                .map_err(db_err)?;
            w.open_table(STATS)
                .map_err(db_err)?
                .remove(name)
                .map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        if let Some(l) = unused {
            self.trash_layers(m.id, vec![l]);
        }
        Ok(())
    }

    /// After a crash, a restart or a reboot: mount every recorded snapshot again (overlay
    /// mode; the upper layer with uncommitted changes is kept), finish sealing an upper
    /// layer a commit was cut off in (it may hold files linked into the store, so it never
    /// becomes writable again), point every mount at the snapshot its record names (the
    /// record is written only once that snapshot is complete), then detach and remove
    /// snapshots and layers no record names. A volume that cannot be recovered is
    /// reported and left; the others still are.
    pub(super) async fn recover(&self) -> OpResult<()> {
        // Lazy snapshots are mounted over the lazy data layer: it goes first.
        if let Err(e) = self.revive_lazy_layer(&self.mounts()?) {
            warn!("lazy mounts cannot be served: {}", e.message);
        }
        for m in self.mounts()? {
            if self.snapshots.layered() == m.layers.is_empty() {
                let was = if m.layers.is_empty() {
                    "copy"
                } else {
                    "overlay"
                };
                return Err(failed(format!(
                    "volume {} was mounted with {was} snapshots, and this agent makes {} snapshots; start it with --snapshots {was} (or from another data directory)",
                    m.name,
                    self.snapshots.name(),
                )));
            }
            if let Err(e) = self.recover_one(&m).await {
                warn!(volume = m.name, "cannot recover this mount: {}", e.message);
            }
        }
        let mounts = self.mounts()?;
        let mut keep: HashSet<PathBuf> = HashSet::new();
        for m in &mounts {
            let vol = self.mounts_dir(m.id);
            keep.insert(vol.join(&m.snapshot));
            keep.extend(m.layers.iter().map(|l| vol.join(l)));
            keep.extend(self.compacted_layer(m));
        }
        let current: HashSet<PathBuf> = mounts
            .iter()
            .map(|m| self.mounts_dir(m.id).join(&m.snapshot))
            .collect();
        self.sweep(&current, &keep);
        let trash = self.opts.data.join(super::snapshot::TRASH);
        tokio::task::spawn_blocking(move || super::snapshot::discard(&trash, Vec::new(), None))
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn recover_one(&self, m: &MountRecord) -> OpResult<()> {
        let view = self.view(m, &m.snapshot);
        self.snapshots
            .revive(&self.mounts_dir(m.id), m)
            .map_err(failed)?;
        let sealing = self
            .mounts_dir(m.id)
            .join(&m.snapshot)
            .join(super::seal::SEALING);
        if sealing.exists() {
            info!(
                volume = m.name,
                "finishing the seal of an upper layer a commit began"
            );
            if self.seal(m).await?.is_none() {
                return Err(failed("a file in the mount is open for writing"));
            }
            return Ok(());
        }
        self.snapshots.unfreeze(&view, m).map_err(failed)?;
        // The path ready again after a reboot (or in place of a link an older voltool
        // made), and the recorded snapshot shown.
        let mp = self.mount_point(m)?;
        self.snapshots
            .prepare(&mp, m.owner, false)
            .map_err(failed)?;
        if !self.snapshots.shows(&mp, &view) {
            info!(
                volume = m.name,
                "showing the recorded snapshot at the mount path"
            );
            self.snapshots.show(&mp, &view).map_err(failed)?;
        }
        Ok(())
    }

    /// The held parent of mount `m`'s path: opened at its first use since the agent
    /// started, and checked against the directory the record names.
    pub(super) fn mount_point(&self, m: &MountRecord) -> OpResult<Arc<MountPoint>> {
        let mut held = self.mounted.mount_points.lock().expect("not poisoned");
        if let Some(mp) = held.get(&m.name)
            && mp.path() == m.path
            && mp.id() == m.parent
        {
            return Ok(mp.clone());
        }
        let mp = Arc::new(MountPoint::reopen(&m.path, m.parent).map_err(failed)?);
        held.insert(m.name.clone(), mp.clone());
        Ok(mp)
    }

    /// Shows snapshot `snapshot` at mount `m`'s path, through its held parent.
    pub(super) fn switch_mount(&self, m: &MountRecord, snapshot: &str) -> OpResult<()> {
        let mp = self.mount_point(m)?;
        self.snapshots
            .show(&mp, &self.view(m, snapshot))
            .map_err(|e| failed(format!("cannot switch the mount: {e}")))
    }

    /// Detaches overlays that are not `current` snapshots, and removes what lies under the
    /// mounts directory beside the paths in `keep` (snapshots and layers in use).
    fn sweep(&self, current: &HashSet<PathBuf>, keep: &HashSet<PathBuf>) {
        let root = self.opts.data.join("mounts");
        for m in crate::overlay::mounts_under(&root).unwrap_or_default() {
            let snapshot = m.parent().map(Path::to_path_buf).unwrap_or_default();
            if m != root && !current.contains(&snapshot) {
                debug!(path = %m.display(), "detaching a stale snapshot");
                let _ = crate::overlay::unmount_lazy(&m);
            }
        }
        let Ok(vols) = std::fs::read_dir(&root) else {
            return;
        };
        let mut stale = Vec::new();
        for vol in vols.flatten() {
            let layers = vol.path().join("layers");
            let entries = std::fs::read_dir(vol.path())
                .into_iter()
                .chain(std::fs::read_dir(&layers))
                .flat_map(|rd| rd.flatten());
            for s in entries {
                let p = s.path();
                if !keep.iter().any(|k| k.starts_with(&p)) && p != layers {
                    debug!(path = %p.display(), "removing stale snapshot");
                    stale.push(p);
                }
            }
        }
        super::snapshot::discard(&self.opts.data.join(super::snapshot::TRASH), stale, None);
    }
}
