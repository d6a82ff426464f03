//! Talking to the coordinator: verified heads, membership, uploads and change sets.

use voltool_protocol::coord::{CommitPart, MAX_COMMIT_PART, MAX_UPLOAD_BLOBS};

use crate::blobs::OnBytes;

use super::*;

pub(super) const SEEN: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("seen-heads-0");

impl Inner {
    /// The volume's head from the coordinator, verified: signature under the configured
    /// coordinator key, and no rollback below the newest head seen.
    pub(super) async fn verified_head(&self, name: &str) -> OpResult<VolumeInfo> {
        let info = match self
            .remote
            .coord
            .request(&CoordRequest::GetHead {
                name: name.to_string(),
            })
            .await?
        {
            CoordResponse::Volume(v) => v,
            _ => return Err(failed("unexpected answer from the coordinator")),
        };
        self.accept_head(&info.head)?;
        Ok(info)
    }

    pub(super) fn accept_head(&self, head: &SignedHead) -> OpResult<()> {
        let seen: Option<Commit> = {
            let r = self.db.begin_read().map_err(db_err)?;
            let t = r.open_table(SEEN).map_err(db_err)?;
            match t.get(head.commit.volume.0).map_err(db_err)? {
                Some(v) => Some(postcard::from_bytes(v.value()).map_err(db_err)?),
                None => None,
            }
        };
        head.verify_against(&self.opts.signer(), seen.as_ref())?;
        if seen.is_none_or(|s| s.version < head.commit.version) {
            let w = self.db_write()?;
            w.open_table(SEEN)
                .map_err(db_err)?
                .insert(head.commit.volume.0, head.commit.encode().as_slice())
                .map_err(db_err)?;
            w.commit().map_err(db_err)?;
        }
        Ok(())
    }
}

/// The coordinator link: its requests, the tracker's side, and the fleet's members as the
/// coordinator last said.
#[derive(Debug)]
pub(super) struct Remote {
    pub(super) coord: Arc<CoordClient>,
    pub(super) tracker: Arc<TrackerClient>,
    pub(super) members: Mutex<Members>,
}

/// The fleet's members as the coordinator last said.
#[derive(Debug, Default)]
pub(super) struct Members {
    ids: HashSet<iroh::PublicKey>,
    /// When the list was last asked for (asked again for an unknown node at most once a
    /// second).
    asked: Option<Instant>,
    /// Whether the coordinator keeps a list (pushed on the watch): then every request a
    /// peer sends is checked against it. An open fleet's, or before the first push, only
    /// connections are.
    listed: bool,
}

impl Inner {
    /// Whether `id` is a fleet member the coordinator vouches for (refreshing the list at
    /// most once a second when an unknown node asks; a failed refresh keeps the list).
    pub(super) async fn is_member(&self, id: &iroh::PublicKey) -> bool {
        if self.opts.is_coordinator(id) {
            return true;
        }
        {
            let mut m = self.remote.members.lock().expect("not poisoned");
            if m.ids.contains(id) {
                return true;
            }
            if m.asked
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return false;
            }
            m.asked = Some(Instant::now());
        }
        if let Ok(CoordResponse::Members(ids)) =
            self.remote.coord.request(&CoordRequest::Members).await
        {
            let mut m = self.remote.members.lock().expect("not poisoned");
            m.ids = parse_ids(&ids);
            return m.ids.contains(id);
        }
        false
    }

    /// Whether `id` may send this request (no refresh): in a fleet with a list of members,
    /// a node the coordinator removed is refused at once.
    pub(super) fn is_listed_member(&self, id: &iroh::PublicKey) -> bool {
        let m = self.remote.members.lock().expect("not poisoned");
        !m.listed || self.opts.is_coordinator(id) || m.ids.contains(id)
    }

    /// What the watch pushed: the members, or `None` for an open fleet.
    fn pushed(&self, ids: Option<&[[u8; 32]]>) {
        let mut m = self.remote.members.lock().expect("not poisoned");
        m.listed = ids.is_some();
        if let Some(ids) = ids {
            m.ids = parse_ids(ids);
            m.asked = Some(Instant::now());
        }
    }
}

fn parse_ids(ids: &[[u8; 32]]) -> HashSet<iroh::PublicKey> {
    ids.iter()
        .filter_map(|b| iroh::PublicKey::from_bytes(b).ok())
        .collect()
}

/// Keeps the member list current as the coordinator pushes it, reconnecting (with a
/// bounded back-off) when the watch breaks.
pub(super) async fn watch_members(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let watched = async {
            let mut w = inner.remote.coord.watch_members().await?;
            // A new connection: the coordinator may have restarted, its tracker empty.
            inner.stay_tracked().await;
            loop {
                let ids = w.next().await?;
                inner.pushed(ids.as_deref());
                backoff = Duration::from_millis(200);
            }
        };
        let r: Result<(), crate::coord_client::ClientError> = tokio::select! {
            _ = cancel.cancelled() => return,
            r = watched => r,
        };
        if let Err(e) = r {
            debug!("watching the fleet's members: {e}");
            // Refused (not a member now): ask again rarely.
            if matches!(
                e,
                crate::coord_client::ClientError::Remote {
                    kind: voltool_protocol::coord::ErrorKind::Forbidden,
                    ..
                }
            ) {
                backoff = Duration::from_secs(60);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

impl Inner {
    /// Uploads blobs the origin lacks, adding their bytes to the progress's total (`grow`)
    /// when found and to what is done (`done`) as they go; returns how many bytes.
    pub(super) async fn upload_missing(
        &self,
        blobs: &[(Hash, u64)],
        grow: &OnBytes,
        done: &OnBytes,
    ) -> OpResult<u64> {
        let mut uniq = HashSet::new();
        let blobs: Vec<(Hash, u64)> = blobs
            .iter()
            .filter(|(h, s)| *s > 0 && uniq.insert(*h))
            .copied()
            .collect();
        let mut missing = Vec::new();
        for chunk in blobs.chunks(MAX_HAS) {
            let hashes = chunk.iter().map(|(h, _)| *h).collect();
            match self
                .remote
                .coord
                .request(&CoordRequest::HasBlobs { hashes })
                .await?
            {
                CoordResponse::Has(has) if has.len() == chunk.len() => {
                    missing.extend(chunk.iter().zip(has).filter(|(_, h)| !h).map(|(b, _)| *b))
                }
                _ => return Err(failed("unexpected answer from the coordinator")),
            }
        }
        let total: u64 = missing.iter().map(|(_, s)| s).sum();
        grow(total);
        // Batches of many small blobs (or one large one), two on the way at once so the
        // origin checks and syncs one while the next travels.
        let mut set = tokio::task::JoinSet::new();
        for batch in crate::blobs::batches(&missing, MAX_UPLOAD_BLOBS, UPLOAD_BATCH_BYTES) {
            if set.len() >= UPLOADS_IN_FLIGHT
                && let Some(r) = set.join_next().await
            {
                r.map_err(failed)??;
            }
            let list: Vec<(Hash, u64, PathBuf)> = batch
                .iter()
                .map(|(h, s)| (*h, *s, self.store.data_path(h)))
                .collect();
            let (coord, counter) = (self.remote.coord.clone(), done.clone());
            set.spawn(async move { coord.upload(&list, counter.as_ref()).await });
        }
        while let Some(r) = set.join_next().await {
            r.map_err(failed)??;
        }
        // This node holds them complete too: peers may take them from here.
        self.announce(blobs.iter().map(|(h, _)| *h).collect(), true)
            .await;
        Ok(total)
    }

    /// Sends a change set as the parts `parts` yields (see [`CoordClient::commit`]);
    /// returns the verified new head, the overwritten paths (the first of them) and how
    /// many there were.
    pub(super) async fn send_commit(
        &self,
        info: &VolumeInfo,
        base_version: u64,
        parts: &mut tokio::sync::mpsc::Receiver<CommitPart>,
    ) -> OpResult<(SignedHead, Vec<VolPath>, u64)> {
        let req = CoordRequest::Commit {
            name: info.name.clone(),
            volume: info.id,
            base_version,
        };
        match self.remote.coord.commit(&req, parts).await? {
            CoordResponse::Committed {
                head,
                overwritten,
                overwritten_total,
            } => {
                self.accept_head(&head)?;
                Ok((head, overwritten, overwritten_total))
            }
            _ => Err(failed("unexpected answer from the coordinator")),
        }
    }

    /// Commits a change set made by a volume command (put, rm, cp) on the current head.
    pub(super) async fn commit_changes(
        &self,
        info: &VolumeInfo,
        current: &Manifest,
        changes: Vec<Change>,
    ) -> OpResult<u64> {
        let n = changes.len().div_ceil(MAX_COMMIT_PART).max(1);
        let (tx, mut rx) = tokio::sync::mpsc::channel(n);
        let mut rest = changes;
        for i in 0..n {
            let tail = rest.split_off(rest.len().min(MAX_COMMIT_PART));
            let changes = std::mem::replace(&mut rest, tail);
            let priors = changes
                .iter()
                .map(|c| current.get(&c.path).cloned())
                .collect();
            let part = CommitPart {
                changes,
                priors,
                last: i + 1 == n,
            };
            tx.try_send(part).expect("room for every part");
        }
        drop(tx);
        let (head, _, _) = self
            .send_commit(info, info.head.commit.version, &mut rx)
            .await?;
        Ok(head.commit.version)
    }
}

/// Upload batches on the way at once.
const UPLOADS_IN_FLIGHT: usize = 2;
/// Bytes in one upload batch (a larger blob travels alone).
const UPLOAD_BATCH_BYTES: u64 = 64 << 20;
