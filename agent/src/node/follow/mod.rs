//! Following volumes (`voltool follow`, `mount --follow`) and preheating one version
//! (`voltool prefetch`): the coordinator pushes each new signed head of a followed volume on
//! one stream the agent keeps open ([`CoordRequest::WatchHeads`]); the agent verifies it
//! like any head and downloads that version's pages and blobs into its store at once, in
//! the background, through the swarm. A mount's view still moves only at `reload`, which
//! then finds every byte here.
//!
//! One worker a followed volume downloads its newest head; a newer head stops the download
//! of the older one (what it verified stays in the store) and starts the newest. The
//! newest version held whole, and the one downloading once its pages are here, count as
//! needed by the disk budget; without room the download waits, says why in `status`, and
//! tries again.
//!
//! Here: the follow records, the heads pushed and `status`; a volume's worker is in
//! `worker`, the preheat and the downloads a reload joins in `prefetch`.

mod prefetch;
mod worker;

use redb::ReadableTable;

use super::*;
use worker::follow_worker;

/// Followed volumes, by id: [`FollowRecord`].
pub(super) const FOLLOWS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("follows-0");

/// The first wait before a failed download is tried again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(2);
/// The longest wait before a failed download is tried again.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Providers banned that `status` names per followed volume, the latest.
const MAX_BANNED_SHOWN: usize = 16;
/// The longest wait before a switch that waited (`--follow=switch`) is tried again.
const SWITCH_RETRY_MAX: Duration = Duration::from_secs(10);

/// A followed volume, as recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct FollowRecord {
    /// The volume's name when it was followed.
    pub(super) name: String,
    /// Followed by the host (`voltool follow`).
    pub(super) host: bool,
    /// Followed by its mount (`mount --follow`): ends with the mount; with
    /// [`control::Follow::Switch`] the mount moves to each version held by itself.
    pub(super) mount: control::Follow,
    /// The newest version held whole here, and its tree's root.
    pub(super) held: Option<(u64, Hash)>,
}

impl Following {
    /// Runs `f` on volume `id`'s progress, if it is followed.
    fn with<T>(&self, id: VolumeId, f: impl FnOnce(&mut Progress) -> T) -> Option<T> {
        self.progress
            .lock()
            .expect("not poisoned")
            .get_mut(&id)
            .map(f)
    }
}

impl FollowRecord {
    /// A volume named `name`, followed by nobody yet.
    fn new(name: &str) -> Self {
        FollowRecord {
            name: name.to_string(),
            host: false,
            mount: control::Follow::No,
            held: None,
        }
    }

    /// The record, if the host or a mount still follows the volume.
    fn still_followed(self) -> Option<Self> {
        (self.host || self.mount != control::Follow::No).then_some(self)
    }
}

/// The follows' part of the agent: what each followed volume's download stands at.
#[derive(Debug)]
pub(super) struct Following {
    /// Wakes the watch when the set of followed volumes changes.
    changed: tokio::sync::Notify,
    progress: Mutex<HashMap<VolumeId, Progress>>,
    /// Moves on at every step of a download (progress, its end), for those who joined it.
    moved: tokio::sync::watch::Sender<u64>,
}

impl Default for Following {
    fn default() -> Self {
        Following {
            changed: Default::default(),
            progress: Default::default(),
            moved: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// Where a followed volume's download stands.
#[derive(Debug, Default)]
struct Progress {
    /// The newest head pushed and verified.
    newest: Option<SignedHead>,
    /// The tree being downloaded, once all its pages are here.
    pages_here: Option<Hash>,
    /// Bytes of the version being downloaded, and bytes of it verified so far.
    total: u64,
    done: u64,
    /// Why the download waits, if it does (no room, a failure).
    waiting: Option<String>,
    /// Why the last head pushed was refused, if one was.
    refused: Option<String>,
    /// Providers its downloads banned (the latest few).
    banned: Vec<String>,
    /// Verified bytes its downloads received from the origin and from peers.
    origin_bytes: u64,
    peer_bytes: u64,
    /// The worker that runs for it (its number), and what stops its download.
    worker: Option<(u64, CancellationToken)>,
    /// The version downloading now, and its download's priority (a reload of that
    /// version raises it and waits for it).
    downloading: Option<(u64, crate::blobs::Rank)>,
}

/// Why a download stopped before it began fetching blobs.
enum Stop {
    /// The store's budget has no room for what is missing.
    NoRoom(String),
    Failed(OpError),
}

impl From<OpError> for Stop {
    fn from(e: OpError) -> Self {
        Stop::Failed(e)
    }
}

impl Inner {
    /// Followed volumes, by id.
    pub(super) fn follows(&self) -> OpResult<Vec<(VolumeId, FollowRecord)>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(FOLLOWS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            out.push((
                VolumeId(k.value()),
                postcard::from_bytes(v.value()).map_err(db_err)?,
            ));
        }
        Ok(out)
    }

    fn follow_record(&self, id: VolumeId) -> OpResult<Option<FollowRecord>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(FOLLOWS).map_err(db_err)?;
        t.get(id.0)
            .map_err(db_err)?
            .map(|v| postcard::from_bytes(v.value()).map_err(db_err))
            .transpose()
    }

    /// Changes volume `id`'s record: `change` gets the record (`None`: not followed) and
    /// returns the new one (`None`: not followed any more).
    fn update_follow(
        &self,
        id: VolumeId,
        change: impl FnOnce(Option<FollowRecord>) -> Option<FollowRecord>,
    ) -> OpResult<Option<FollowRecord>> {
        let w = self.db_write()?;
        let new = {
            let mut t = w.open_table(FOLLOWS).map_err(db_err)?;
            let old = t
                .get(id.0)
                .map_err(db_err)?
                .map(|v| postcard::from_bytes::<FollowRecord>(v.value()).map_err(db_err))
                .transpose()?;
            let new = change(old);
            match &new {
                Some(rec) => {
                    let enc = postcard::to_stdvec(rec).map_err(db_err)?;
                    t.insert(id.0, enc.as_slice()).map_err(db_err)?;
                }
                None => {
                    t.remove(id.0).map_err(db_err)?;
                }
            }
            new
        };
        w.commit().map_err(db_err)?;
        if new.is_none() {
            let mut p = self.following.progress.lock().expect("not poisoned");
            if let Some((_, w)) = p.remove(&id).and_then(|p| p.worker) {
                w.cancel();
            }
            let waiting = p.values().filter(|p| p.waiting.is_some()).count();
            self.metrics.follows_waiting.set(waiting as i64);
        }
        self.following.changed.notify_one();
        Ok(new)
    }

    /// `voltool follow NAME` (`on`), or `unfollow`: the host keeps the newest version of
    /// volume `name` in its store, or no longer does (a mount that follows it still does).
    pub(super) async fn follow_volume(&self, name: &str, on: bool) -> OpResult<Reply> {
        let info = self.verified_head(name).await?;
        let rec = self.update_follow(info.id, |old| {
            let mut rec = old.unwrap_or_else(|| FollowRecord::new(name));
            rec.host = on;
            rec.still_followed()
        })?;
        Ok(Reply::Done(match (on, rec) {
            (true, _) => format!(
                "following {name}: each new version is downloaded here as soon as it is committed"
            ),
            (false, Some(_)) => {
                format!("{name} is no longer followed by the host (its mount still follows it)")
            }
            (false, None) => format!("{name} is no longer followed"),
        }))
    }

    /// Makes mount `rec`'s volume followed by the mount as `how` says, or no longer by it
    /// ([`control::Follow::No`]).
    pub(super) fn follow_mount(&self, rec: &MountRecord, how: control::Follow) -> OpResult<()> {
        let exists = self.follow_record(rec.id)?.is_some();
        if how == control::Follow::No && !exists {
            return Ok(());
        }
        self.update_follow(rec.id, |old| {
            let mut f = old.unwrap_or_else(|| FollowRecord::new(&rec.name));
            f.mount = how;
            f.still_followed()
        })?;
        Ok(())
    }

    /// A head pushed for a followed volume: verified like any (a forged or rolled-back one
    /// is refused and reported, and the follow goes on), then downloaded if it is new.
    fn pushed_head(self: &Arc<Self>, head: SignedHead) {
        let id = head.commit.volume;
        let accepted = self.accept_head(&head);
        let mut all = self.following.progress.lock().expect("not poisoned");
        let p = all.entry(id).or_default();
        if let Err(e) = accepted {
            self.metrics.heads_refused.inc();
            warn!(volume = %id, version = head.commit.version, "refused a head the coordinator pushed: {}", e.message);
            p.refused = Some(format!("version {}: {}", head.commit.version, e.message));
            return;
        }
        let newer = p
            .newest
            .as_ref()
            .is_none_or(|n| n.commit.version < head.commit.version);
        if newer {
            p.newest = Some(head);
            // An older version's download stops; what it verified stays in the store.
            if let Some((_, w)) = p.worker.take() {
                w.cancel();
            }
        }
        if p.worker.is_none() {
            let token = self.cancel.child_token();
            let n = rand::random();
            p.worker = Some((n, token.clone()));
            tokio::spawn(follow_worker(self.clone(), id, n, token));
        }
    }

    /// Whether the follow of volume `id` holds the tree at `root` whole.
    pub(super) fn holds_whole(&self, id: VolumeId, root: Hash) -> bool {
        self.follow_record(id)
            .ok()
            .flatten()
            .and_then(|f| f.held)
            .is_some_and(|(_, r)| r == root)
    }

    /// The trees the disk budget keeps for followed volumes: each one's newest version
    /// held whole, and the one downloading once its pages are here.
    pub(super) fn followed_roots(&self) -> OpResult<Vec<Hash>> {
        let mut roots: Vec<Hash> = self
            .follows()?
            .into_iter()
            .filter_map(|(_, f)| f.held.map(|(_, root)| root))
            .collect();
        let p = self.following.progress.lock().expect("not poisoned");
        roots.extend(p.values().filter_map(|p| p.pages_here));
        Ok(roots)
    }

    /// What `status` shows of each followed volume.
    pub(super) fn follow_status(&self) -> OpResult<Vec<control::FollowStatus>> {
        let follows = self.follows()?;
        let mounts = self.mounts()?;
        let p = self.following.progress.lock().expect("not poisoned");
        Ok(follows
            .into_iter()
            .map(|(id, f)| {
                let now = p.get(&id);
                let held = f.held.map(|(v, _)| v);
                let newest = now.and_then(|p| p.newest.as_ref().map(|h| h.commit.version));
                let downloading = newest.is_some_and(|n| held.is_none_or(|h| h < n));
                control::FollowStatus {
                    mount: mounts
                        .iter()
                        .find(|m| m.id == id && f.mount != control::Follow::No)
                        .map(|m| m.path.clone()),
                    switch: f.mount == control::Follow::Switch,
                    volume: f.name,
                    host: f.host,
                    newest,
                    held,
                    bytes_to_go: match now {
                        Some(p) if downloading => p.total.saturating_sub(p.done),
                        _ => 0,
                    },
                    waiting: now.and_then(|p| p.waiting.clone()),
                    refused: now.and_then(|p| p.refused.clone()),
                    banned: now.map(|p| p.banned.clone()).unwrap_or_default(),
                    origin_bytes: now.map_or(0, |p| p.origin_bytes),
                    peer_bytes: now.map_or(0, |p| p.peer_bytes),
                }
            })
            .collect())
    }
}

/// Keeps the watch of followed volumes' heads open, reconnecting (with a bounded back-off)
/// when it breaks and opening it again when the set of followed volumes changes. Each new
/// watch starts with the heads as they are, so a follower catches up after a reconnect or a
/// coordinator's restart.
pub(super) async fn follow_loop(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let ids: Vec<VolumeId> = match inner.follows() {
            Ok(f) => f.into_iter().map(|(id, _)| id).collect(),
            Err(e) => {
                warn!("cannot read the followed volumes: {}", e.message);
                Vec::new()
            }
        };
        let changed = inner.following.changed.notified();
        if ids.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changed => continue,
            }
        }
        let watched = async {
            let mut w = inner.remote.coord.watch_heads(ids).await?;
            loop {
                let heads = w.next().await?;
                backoff = Duration::from_millis(200);
                for h in heads {
                    inner.pushed_head(h);
                }
            }
        };
        let r: Result<(), crate::coord_client::ClientError> = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = changed => continue,
            r = watched => r,
        };
        if let Err(e) = r {
            debug!("watching followed volumes' heads: {e}");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Follows the volumes the agent was started with (`--follow`), trying again while the
/// coordinator cannot be reached; a volume that does not exist is reported and left.
pub(super) async fn follow_configured(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut todo = inner.opts.follow.clone();
    let mut retry = RETRY_FIRST;
    while !todo.is_empty() {
        let mut left = Vec::new();
        for name in todo {
            match inner.follow_volume(&name, true).await {
                Ok(_) => info!(volume = name, "following"),
                Err(e) if e.code == ErrorCode::NotFound => {
                    warn!(volume = name, "cannot follow: {}", e.message)
                }
                Err(e) => {
                    debug!(volume = name, "cannot follow yet: {}", e.message);
                    left.push(name);
                }
            }
        }
        todo = left;
        if todo.is_empty() {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}
