//! `voltool mount`: a first snapshot of a volume at a host path.

use super::snapshot::Source;
use super::*;

/// How a volume is mounted.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct How {
    /// Commit in the background every this many seconds, and at shutdown.
    pub(super) background_commit_secs: Option<u64>,
    /// Nothing is written through the mount (overlay mode: a read-only mount of the
    /// overlay, so even root gets EROFS; copy mode: commits are refused and a reload
    /// replaces whatever was written to the copies).
    pub(super) read_only: bool,
    /// Whether the mount follows its volume (see `follow`).
    pub(super) follow: control::Follow,
    /// The user the mount belongs to.
    pub(super) owner: u32,
    /// Ready once the manifest is here; bytes arrive as they are read (see `lazy`).
    pub(super) lazy: bool,
}

impl Inner {
    pub(super) async fn mount_volume(
        self: Arc<Self>,
        name: &str,
        path: &Path,
        how: How,
        events: &Events,
    ) -> OpResult<Reply> {
        let How {
            background_commit_secs,
            read_only,
            follow,
            owner,
            lazy,
        } = how;
        if read_only && background_commit_secs.is_some() {
            return Err(err(
                ErrorCode::Invalid,
                "a read-only mount has nothing to commit in the background",
            ));
        }
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        if self.mount(name).is_ok() {
            return Err(err(
                ErrorCode::Exists,
                format!("volume {name:?} is already mounted here"),
            ));
        }
        // The path's directory is held from here on: nothing at the path is ever reached
        // through a name a user can change again.
        let mp = MountPoint::open(path).map_err(|e| match e {
            super::mount_point::MountPointError::NotAbsolute(_) => {
                err(ErrorCode::Invalid, e.to_string())
            }
            e => failed(e),
        })?;
        // A user other than root mounts only in a directory of its own: the agent makes the
        // link there as root.
        if owner != 0 && mp.id().uid != owner {
            return Err(err(
                ErrorCode::Forbidden,
                format!(
                    "{}: its directory belongs to uid {}; uid {owner} mounts in a directory of its own",
                    path.display(),
                    mp.id().uid
                ),
            ));
        }
        let taken = |e: super::mount_point::MountPointError| match e {
            super::mount_point::MountPointError::Exists(_) => err(ErrorCode::Exists, e.to_string()),
            e => failed(e),
        };
        mp.check_free().map_err(taken)?;
        if lazy {
            // Refused before anything is fetched where lazy mounts cannot be.
            self.lazy_layer()?;
        }
        let info = self.verified_head(name).await?;
        let root = info.head.commit.root();
        self.fetch_tree(root).await?;
        let pages = self.pages.clone();
        let total = self
            .blocking(move || {
                let mut total = 0;
                tree::range(&pages, &root, "", &mut |_, e| {
                    total += e.blob().map_or(0, |(_, s)| s);
                    true
                })?;
                Ok(total)
            })
            .await?;
        let fetched = if lazy {
            // Its blobs are shown in the lazy data layer and filled behind; the fill waits
            // for this mount's record (it takes the volume's lock, held here).
            self.start_fill(name, root).await?;
            FetchStats::default()
        } else {
            self.join_prefetch(info.id, info.head.commit.version, events)
                .await;
            let pages = self.pages.clone();
            self.fetch_walked(total, events, move |each| {
                tree::range(&pages, &root, "", &mut |_, e| {
                    if let Some(b) = e.blob() {
                        each(b);
                    }
                    true
                })
            })
            .await?
        };
        let source = if self.snapshots.layered() {
            Source::Full { root }
        } else {
            Source::Copy {
                manifest: self.read_manifest(root).await?,
                prev: None,
                reuse: HashSet::new(),
            }
        };
        let built = self
            .build(
                info.id,
                info.head.commit.version,
                source,
                read_only,
                owner,
                lazy,
            )
            .await
            .inspect_err(|_| self.stop_fill(name))?;
        // The path becomes a mount point (overlay mode) or makes room for its link.
        if let Err(e) = self.snapshots.prepare(&mp, owner, true) {
            self.stop_fill(name);
            self.drop_built(info.id, &built);
            return Err(taken(e));
        }
        let mhash = root.hash;
        let rec = MountRecord {
            name: name.to_string(),
            id: info.id,
            path: path.to_path_buf(),
            version: info.head.commit.version,
            manifest: mhash,
            snapshot: built.snapshot,
            background_commit_secs,
            own: Some(Vec::new()),
            layers: built.layers,
            lower_manifest: mhash,
            read_only,
            parent: mp.id(),
            owner,
        };
        self.put_mount(&rec, &built.stats)?;
        self.mounted
            .mount_points
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), Arc::new(mp));
        self.switch_mount(&rec, &rec.snapshot)?;
        if follow != control::Follow::No {
            self.follow_mount(&rec, follow)?;
        }
        if let Some(secs) = background_commit_secs {
            let cancel = self.cancel.clone();
            tokio::spawn(background_commits(
                self.clone(),
                name.to_string(),
                secs,
                cancel,
            ));
        }
        if lazy {
            return Ok(Reply::Done(format!(
                "mounted {name} (version {}, lazy{}) at {}; its {total} bytes arrive as they are read",
                rec.version,
                if read_only { ", read-only" } else { "" },
                path.display(),
            )));
        }
        Ok(Reply::Done(format!(
            "mounted {name} (version {}{}{}) at {}; {} bytes from the origin",
            rec.version,
            if read_only { ", read-only" } else { "" },
            match follow {
                control::Follow::No => "",
                control::Follow::Prefetch => ", following",
                control::Follow::Switch => ", following and switching",
            },
            path.display(),
            fetched.from_origin
        )))
    }
}
