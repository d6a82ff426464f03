//! Fetching blobs from the swarm, and the manifests of heads.

use voltool_protocol::blobs::MAX_GET_MANY_SIZE;

use crate::blobs::OnBytes;
use crate::store::StoreError;

use super::*;

/// Blobs fetched at once by one reload (each in up to `PIECES_IN_FLIGHT` pieces).
const BLOBS_IN_FLIGHT: usize = 2;
/// Blobs a reload asks for at once (see [`Inner::fetch_walked`]).
const FETCH_PART: usize = 16_384;

impl Inner {
    /// Providers of a blob from the tracker (nearest first, the origin last).
    pub(super) async fn providers_for(&self, hash: Hash) -> Vec<Provider> {
        lookup_providers(&self.coord, self.ep.id(), &self.opts.coordinator, hash).await
    }

    /// Tells the tracker this node holds `blobs` (complete or in part).
    pub(super) async fn announce(&self, blobs: Vec<Hash>, complete: bool) {
        for chunk in blobs.chunks(MAX_HAS) {
            let req = CoordRequest::Announce {
                addr: net::local_addr(&self.ep),
                zone: self.opts.zone.clone(),
                blobs: chunk.to_vec(),
                complete,
            };
            if let Err(e) = self.coord.request(&req).await {
                debug!("announce failed: {e}");
            }
        }
        // With what we hold, the round-trip times to the peers we talk to: the tracker
        // ranks providers for our next lookups by them.
        let rtts: Vec<PeerRtt> = self
            .pool
            .rtts()
            .await
            .into_iter()
            .take(coord::MAX_RTTS)
            .map(|(id, rtt)| PeerRtt {
                id: *id.as_bytes(),
                micros: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
            })
            .collect();
        if !rtts.is_empty()
            && let Err(e) = self.coord.request(&CoordRequest::Rtts { rtts }).await
        {
            debug!("reporting round-trip times failed: {e}");
        }
    }
}

impl Inner {
    /// The manifest of a head, fetched (and verified) if not held yet.
    pub(super) async fn manifest_of(&self, c: &Commit) -> OpResult<Manifest> {
        let root = c.root();
        self.fetch_tree(root).await?;
        self.read_manifest(root).await
    }

    /// A whole manifest whose pages are held, in memory.
    pub(super) async fn read_manifest(&self, root: PageRef) -> OpResult<Manifest> {
        let pages = self.pages.clone();
        self.blocking(move || Manifest::from_tree(&pages, &root))
            .await
    }

    /// Runs tree work on the blocking pool; a manifest that does not hold together is
    /// refused as unverified.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, tree::TreeError> + Send + 'static,
    ) -> OpResult<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(failed)?
            .map_err(tree_error)
    }

    /// Fetches the pages of the tree at `root` not held yet, a level at a time.
    pub(super) async fn fetch_tree(&self, root: PageRef) -> OpResult<()> {
        self.fetch_until_held(move |pages| tree::missing(pages, &root))
            .await
    }

    /// Fetches the pages that a diff from `old` (held) to `new` needs: those of `new` that
    /// differ from `old`'s, a level at a time.
    pub(super) async fn fetch_diff(&self, old: PageRef, new: PageRef) -> OpResult<()> {
        self.fetch_until_held(move |pages| tree::missing_for_diff(pages, &old, &new))
            .await
    }

    /// Fetches the pages of the tree at `root` that may hold paths starting with `prefix`.
    pub(super) async fn fetch_prefix(&self, root: PageRef, prefix: String) -> OpResult<()> {
        self.fetch_until_held(move |pages| tree::missing_in(pages, &root, &prefix))
            .await
    }

    /// Asks `missing` which pages are needed and not held, and fetches them, until none is.
    async fn fetch_until_held(
        &self,
        missing: impl Fn(&crate::store::Pages) -> Result<Vec<PageRef>, tree::TreeError>
        + Clone
        + Send
        + 'static,
    ) -> OpResult<()> {
        loop {
            let (pages, f) = (self.pages.clone(), missing.clone());
            let want = self.blocking(move || f(&pages)).await?;
            if want.is_empty() {
                return Ok(());
            }
            self.fetch_pages(&want).await?;
        }
    }

    async fn fetch_pages(&self, pages: &[PageRef]) -> OpResult<()> {
        let blobs: Vec<(Hash, u64)> = pages.iter().map(|r| (r.hash, r.size)).collect();
        self.fetch_blobs(&blobs, &Events::none()).await.map(|_| ())
    }

    /// What a reload from the held tree at `old` to the tree at `new` needs: the bytes of
    /// the files that differ, and the deltas themselves unless there are more than
    /// `max_deltas` (then `None`: a full layer is cheaper than a thin one that large, and
    /// the deltas are never held in memory at once).
    pub(super) async fn reload_diff(
        &self,
        old: PageRef,
        new: PageRef,
        max_deltas: usize,
    ) -> OpResult<(u64, Option<Vec<Delta>>)> {
        let pages = self.pages.clone();
        self.blocking(move || {
            let (mut bytes, mut deltas) = (0, Some(Vec::new()));
            tree::diff_each(&pages, &old, &new, &mut |d| {
                bytes += d.new.as_ref().and_then(|e| e.blob()).map_or(0, |(_, s)| s);
                if let Some(ds) = &mut deltas {
                    if ds.len() < max_deltas {
                        ds.push(d);
                    } else {
                        deltas = None;
                    }
                }
            })?;
            Ok((bytes, deltas))
        })
        .await
    }

    /// Fetches blobs not held completely from the swarm: small ones whole, in batches
    /// (one lookup, one stream from one provider and one durable store batch each), the
    /// others in pieces from several providers at once; peers first, the origin last.
    pub(super) async fn fetch_blobs(
        &self,
        blobs: &[(Hash, u64)],
        events: &Events,
    ) -> OpResult<FetchStats> {
        let mut seen = HashSet::new();
        let total = blobs
            .iter()
            .filter(|(h, _)| seen.insert(*h))
            .map(|(_, s)| s)
            .sum();
        let counter = events.counter("download", total);
        self.fetch_part(blobs, &counter).await
    }

    /// Like [`Self::fetch_blobs`], for the blobs that `walk` names (it runs on the
    /// blocking pool, over trees): a part of [`FETCH_PART`] at a time, so that a reload of
    /// a million files never holds their list. `total`: their bytes, for progress.
    pub(super) async fn fetch_walked(
        &self,
        total: u64,
        events: &Events,
        walk: impl FnOnce(&mut dyn FnMut((Hash, u64))) -> Result<(), tree::TreeError> + Send + 'static,
    ) -> OpResult<FetchStats> {
        let counter = events.counter("download", total);
        let (tx, mut rx) = mpsc::channel::<Vec<(Hash, u64)>>(1);
        let walker = tokio::task::spawn_blocking(move || {
            let (mut part, mut open) = (Vec::new(), true);
            walk(&mut |b| {
                if open {
                    part.push(b);
                    if part.len() == FETCH_PART {
                        open = tx.blocking_send(std::mem::take(&mut part)).is_ok();
                    }
                }
            })?;
            if open && !part.is_empty() {
                let _ = tx.blocking_send(part);
            }
            Ok(())
        });
        let mut stats = FetchStats::default();
        while let Some(part) = rx.recv().await {
            stats.merge(&self.fetch_part(&part, &counter).await?);
        }
        walker.await.map_err(failed)?.map_err(tree_error)?;
        Ok(stats)
    }

    /// [`Self::fetch_blobs`] with the caller's progress counter.
    async fn fetch_part(&self, blobs: &[(Hash, u64)], counter: &OnBytes) -> OpResult<FetchStats> {
        let mut seen = HashSet::new();
        let wanted: Vec<(Hash, u64)> = blobs
            .iter()
            .filter(|(h, _)| seen.insert(*h))
            .copied()
            .collect();
        let hashes: Vec<Hash> = wanted.iter().map(|(h, _)| *h).collect();
        let held = self.store.has_complete_many(&hashes).map_err(failed)?;
        let mut stats = FetchStats::default();
        let (mut small, mut large) = (Vec::new(), Vec::new());
        for ((h, size), held) in wanted.into_iter().zip(held) {
            if held {
                stats.already_held += size;
                counter(size);
            } else if size <= MAX_GET_MANY_SIZE {
                small.push((h, size));
            } else {
                large.push((h, size));
            }
        }
        if !small.is_empty() {
            stats.merge(&self.fetch_small(&small, counter).await?);
        }
        if !large.is_empty() {
            stats.merge(&self.fetch_large(&large, counter.clone()).await?);
        }
        Ok(stats)
    }

    /// Fetches blobs a few at a time, each in pieces from several providers at once.
    async fn fetch_large(&self, wanted: &[(Hash, u64)], counter: OnBytes) -> OpResult<FetchStats> {
        // Announce up front: peers reloading at the same moment learn of us at once and
        // ask what we have as it lands.
        self.announce(wanted.iter().map(|(h, _)| *h).collect(), false)
            .await;
        let mut stats = FetchStats::default();
        let mut set = tokio::task::JoinSet::new();
        let mut queue = wanted.iter().copied();
        let mut failure = None;
        // Blobs whose pieces are not all handed out yet: at most BLOBS_IN_FLIGHT of them.
        // A blob in its tail (last pieces in flight) no longer counts, so the next one
        // starts while the tail finishes and the link stays busy.
        let (tail_tx, mut tail_rx) = tokio::sync::mpsc::unbounded_channel::<Hash>();
        let mut heads: HashSet<Hash> = HashSet::new();
        loop {
            while heads.len() < BLOBS_IN_FLIGHT && failure.is_none() {
                let Some((hash, size)) = queue.next() else {
                    break;
                };
                let mut providers = self.providers_for(hash).await;
                if self.opts.origin_only {
                    providers.retain(|p| p.is_origin);
                }
                let pool = self.pool.clone();
                let store = self.store.clone();
                let counter = counter.clone();
                let (coord, me, origin) = (
                    self.coord.clone(),
                    self.ep.id(),
                    self.opts.coordinator.clone(),
                );
                let origin_only = self.opts.origin_only;
                let refresh: crate::blobs::Lookup = Arc::new(move || {
                    let (coord, origin) = (coord.clone(), origin.clone());
                    Box::pin(async move { lookup_providers(&coord, me, &origin, hash).await })
                });
                let tail_tx = tail_tx.clone();
                heads.insert(hash);
                set.spawn(async move {
                    let r = crate::blobs::fetch_blob(
                        &pool,
                        &store,
                        crate::blobs::Swarm {
                            me,
                            providers,
                            refresh: (!origin_only).then_some(refresh),
                            on_tail: Some(Arc::new(move || {
                                let _ = tail_tx.send(hash);
                            })),
                        },
                        hash,
                        size,
                        counter,
                    )
                    .await;
                    (hash, r)
                });
            }
            let (hash, r) = tokio::select! {
                Some(tailed) = tail_rx.recv() => {
                    heads.remove(&tailed);
                    continue;
                }
                joined = set.join_next() => match joined {
                    Some(j) => j.map_err(failed)?,
                    None => break,
                },
            };
            heads.remove(&hash);
            match r {
                Ok(s) => stats.merge(&s),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let hashes: Vec<Hash> = wanted.iter().map(|(h, _)| *h).collect();
        let held = self.store.has_complete_many(&hashes).unwrap_or_default();
        let (complete, partial): (Vec<_>, Vec<_>) =
            hashes.into_iter().zip(held).partition(|(_, held)| *held);
        self.announce(complete.into_iter().map(|(h, _)| h).collect(), true)
            .await;
        match failure {
            Some(e) => {
                if matches!(e, FetchError::Store(StoreError::DiskFull { .. })) {
                    // What was verified so far would be resumable, but it takes the space
                    // the disk lacks: free it, so the agent works again once the volume
                    // needs less or space returns.
                    self.free_partials(partial.into_iter().map(|(h, _)| h).collect())
                        .await;
                }
                Err(e.into())
            }
            None => Ok(stats),
        }
    }

    /// Drops blobs held only in part, and tells the tracker.
    async fn free_partials(&self, hashes: Vec<Hash>) {
        let store = self.store.clone();
        let dropped = tokio::task::spawn_blocking(move || {
            hashes
                .into_iter()
                .filter(|h| store.remove(h).is_ok())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if !dropped.is_empty() {
            warn!(
                blobs = dropped.len(),
                "freed partial downloads after the local disk filled up"
            );
            let _ = self
                .coord
                .request(&CoordRequest::Withdraw { blobs: dropped })
                .await;
        }
    }
}

/// Providers of a blob from the tracker (nearest first, the origin last), never this node;
/// the origin alone if the tracker cannot be asked.
async fn lookup_providers(
    coord: &CoordClient,
    me: iroh::PublicKey,
    origin: &NodeAddr,
    hash: Hash,
) -> Vec<Provider> {
    ask_providers(coord, me, origin, &CoordRequest::Lookup { hash }).await
}

/// Providers from a tracker lookup (`Lookup` or `LookupAll`), never this node, the origin
/// last; the origin alone if the tracker cannot be asked.
pub(super) async fn ask_providers(
    coord: &CoordClient,
    me: iroh::PublicKey,
    origin: &NodeAddr,
    req: &CoordRequest,
) -> Vec<Provider> {
    let origin = || Provider {
        addr: origin.clone(),
        is_origin: true,
    };
    match coord.request(req).await {
        Ok(CoordResponse::Providers(list)) => {
            let mut out: Vec<Provider> = list
                .into_iter()
                .filter_map(|p| {
                    let id = iroh::PublicKey::from_bytes(&p.id).ok()?;
                    (id != me).then_some(Provider {
                        addr: NodeAddr { id, addr: p.addr },
                        is_origin: p.origin,
                    })
                })
                .collect();
            if !out.iter().any(|p| p.is_origin) {
                out.push(origin());
            }
            out
        }
        _ => vec![origin()],
    }
}

/// A root page held in the local store (its size is needed only to fetch it).
pub(super) fn local_root(hash: Hash) -> PageRef {
    PageRef { hash, size: 0 }
}

pub(super) fn tree_error(e: tree::TreeError) -> OpError {
    match e {
        tree::TreeError::Source(m) => failed(m),
        e => err(ErrorCode::Verify, format!("refused manifest: {e}")),
    }
}
