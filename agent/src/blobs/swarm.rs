//! One blob from several providers at once: pieces, provider choice, the origin's share,
//! endgame and bans.

use super::*;

/// Chunks (1 KiB) per piece: 1 MiB, a multiple of the 16 KiB chunk group; small enough that
/// simultaneous downloaders spread over many pieces and pass them on soon.
pub const PIECE_CHUNKS: u64 = 1024;
/// Pieces in flight per blob, over all providers.
pub const PIECES_IN_FLIGHT: usize = 8;
/// Pieces in flight per provider.
pub const PIECES_PER_PROVIDER: usize = 4;
/// Longest wait for one piece before the provider is given up on for it.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a partial holder is asked again which ranges it has.
pub const HAVE_REFRESH: Duration = Duration::from_millis(100);
/// Failures (other than bad bytes) after which a provider is dropped for this blob.
pub const MAX_FAILURES: u32 = 3;

/// Splits what is missing of a blob into pieces aligned to chunk groups.
pub fn missing_pieces(size: u64, held: &RangeList) -> Vec<RangeList> {
    let chunks = size.div_ceil(blob::CHUNK_BYTES).max(1);
    let missing = RangeList::all(size).to_chunk_ranges() - held.to_chunk_ranges();
    let missing = RangeList::from_chunk_ranges(&missing, chunks);
    let mut out = Vec::new();
    for (s, e) in missing.0 {
        let mut at = s;
        while at < e {
            let end = ((at / PIECE_CHUNKS + 1) * PIECE_CHUNKS).min(e);
            out.push(RangeList(vec![(at, end)]));
            at = end;
        }
    }
    out
}

/// Callback told the verified bytes of each piece as it lands.
pub type OnBytes = Arc<dyn Fn(u64) + Send + Sync>;

/// Asks the tracker again for a blob's providers.
pub type Lookup = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Provider>> + Send>>
        + Send
        + Sync,
>;

/// Who a download may take pieces from.
#[derive(Clone)]
pub struct Swarm {
    /// This node (to share the origin's pieces out among simultaneous downloaders).
    pub me: EndpointId,
    /// Providers known at the start, nearest first, the origin last.
    pub providers: Vec<Provider>,
    /// Asked every [`LOOKUP_REFRESH`] for providers that joined since.
    pub refresh: Option<Lookup>,
    /// Told once when every missing piece has been handed out (only the last ones are in
    /// flight), so the caller can start on the next blob and keep the link busy.
    pub on_tail: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("me", &self.me)
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

/// How long a download waits with nothing coming in before it takes pieces that are other
/// downloaders' share from the origin.
pub const IDLE_GRACE: Duration = Duration::from_millis(750);

/// How often the tracker is asked again for providers during a download.
pub const LOOKUP_REFRESH: Duration = Duration::from_millis(500);

/// The downloader that should take piece `index` from the origin: of all nodes downloading
/// the blob now, the one whose hash with the piece is highest (rendezvous hashing). Every
/// downloader computes the same owner without talking, so the origin sends each piece about
/// once and the downloaders trade the rest.
fn origin_owner(nodes: &[EndpointId], hash: &Hash, index: u64) -> Option<EndpointId> {
    nodes
        .iter()
        .max_by_key(|id| {
            let mut h = blake3::Hasher::new();
            h.update(id.as_bytes());
            h.update(&hash.0);
            h.update(&index.to_le_bytes());
            *h.finalize().as_bytes()
        })
        .copied()
}

/// What the downloader knows of one provider during one blob's download.
#[derive(Debug)]
struct Source {
    p: Provider,
    /// Verified ranges it holds (all of them for a complete holder).
    have: bao_tree::ChunkRanges,
    complete: bool,
    have_asked: Option<std::time::Instant>,
    have_in_flight: bool,
    in_flight: usize,
    failures: u32,
    banned: bool,
    /// Answered busy: left alone until then.
    busy_until: Option<std::time::Instant>,
}

impl Source {
    fn usable(&self) -> bool {
        !self.banned && self.failures < MAX_FAILURES
    }

    /// Usable, not resting after a busy answer, and with a free slot of `limit`.
    fn can_take(&self, limit: usize) -> bool {
        self.usable()
            && self.in_flight < limit
            && self
                .busy_until
                .is_none_or(|t| t <= std::time::Instant::now())
    }
}

enum Done {
    Piece(usize, RangeList, Result<(), FetchError>),
    Have(usize, Option<HaveResponse>),
    Providers(Vec<Provider>),
}

/// Fetches a blob into the store from several providers at once, resuming from the
/// verified ranges already held.
///
/// The blob is cut into pieces aligned to chunk groups, taken in random order so that
/// simultaneous downloaders spread out. A piece goes to a peer that holds it (partial
/// holders are asked what they have every [`HAVE_REFRESH`], so a fleet feeds itself while it
/// downloads); the origin (last in `providers`) serves what no usable peer holds. Every piece
/// is verified before it is written; a provider that sends a bad byte is banned for the rest
/// of this fetch and its piece goes elsewhere. Verified ranges are synced and recorded in
/// batches, so a restart resumes from them.
pub async fn fetch_blob(
    pool: &ConnPool,
    store: &Store,
    swarm: Swarm,
    hash: Hash,
    size: u64,
    on_bytes: OnBytes,
) -> Result<FetchStats, FetchError> {
    use rand::seq::SliceRandom;
    let mut stats = FetchStats::default();
    let s = store.clone();
    let meta = tokio::task::spawn_blocking(move || s.begin_partial(&hash, size))
        .await
        .map_err(|e| FetchError::Net(NetError::stream(e)))?
        .map_err(FetchError::Store)?;
    if meta.is_complete() {
        stats.already_held = size;
        on_bytes(size);
        return Ok(stats);
    }
    let held = meta.ranges();
    stats.already_held = held.bytes(size);
    on_bytes(stats.already_held);
    let mut todo = missing_pieces(size, &held);
    todo.shuffle(&mut rand::rng());
    let all = RangeList::all(size).to_chunk_ranges();
    let new_source = |p: Provider| Source {
        have: if p.is_origin {
            all.clone()
        } else {
            bao_tree::ChunkRanges::empty()
        },
        complete: p.is_origin,
        p,
        have_asked: None,
        have_in_flight: false,
        in_flight: 0,
        failures: 0,
        banned: false,
        busy_until: None,
    };
    let mut sources: Vec<Source> = swarm.providers.iter().cloned().map(new_source).collect();
    let mut on_tail = swarm.on_tail.clone();
    let mut last_lookup = std::time::Instant::now();
    let mut lookup_in_flight = false;
    let mut looked_twice = false;
    let mut set: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    let mut pieces_in_flight = 0usize;
    let mut pending = bao_tree::ChunkRanges::empty();
    let mut pending_bytes = 0u64;
    let mut last_record = std::time::Instant::now();
    let mut last_err: Option<FetchError> = None;
    let mut last_progress = std::time::Instant::now();
    // Pieces in flight by first chunk: when asked first, and the tasks fetching them (a
    // second one in the endgame). Finished pieces whose duplicate is still running.
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut tasks: HashMap<tokio::task::Id, (usize, u64, tokio::task::AbortHandle)> =
        HashMap::new();
    let result = loop {
        if let Some(refresh) = &swarm.refresh
            && !lookup_in_flight
            && last_lookup.elapsed() >= LOOKUP_REFRESH
        {
            lookup_in_flight = true;
            last_lookup = std::time::Instant::now();
            let refresh = refresh.clone();
            set.spawn(async move { Done::Providers(refresh().await) });
        }
        // Nodes downloading this blob now: the origin's pieces are shared out among them.
        let mut downloaders: Vec<EndpointId> = sources
            .iter()
            .filter(|s| !s.p.is_origin && !s.complete && s.usable())
            .map(|s| s.p.addr.id)
            .collect();
        downloaders.push(swarm.me);
        // Full speed from the origin only once a second look at the tracker shows nobody
        // else downloading (downloaders that start together find each other that late).
        let alone = looked_twice && downloaders.len() == 1 && sources.iter().all(|s| s.p.is_origin);
        let origin_slots = if alone || swarm.refresh.is_none() && sources.len() == 1 {
            PIECES_IN_FLIGHT
        } else {
            2
        };
        // Ask partial holders what they have now.
        for (i, src) in sources.iter_mut().enumerate() {
            if src.complete || !src.usable() || src.have_in_flight {
                continue;
            }
            if src.have_asked.is_some_and(|t| t.elapsed() < HAVE_REFRESH) {
                continue;
            }
            src.have_asked = Some(std::time::Instant::now());
            src.have_in_flight = true;
            let pool = pool.clone();
            let addr = src.p.addr.clone();
            set.spawn(async move {
                let r = async {
                    let c = pool.get(&addr).await.ok()?;
                    tokio::time::timeout(PIECE_TIMEOUT, have(&c, hash))
                        .await
                        .ok()?
                        .ok()
                }
                .await;
                Done::Have(i, r)
            });
        }
        // Hand out pieces: to a usable peer holding the piece with a free slot (fewest in
        // flight first, then list order: nearest first), else to the origin.
        let idle = pieces_in_flight == 0 && last_progress.elapsed() >= IDLE_GRACE;
        let mut k = 0;
        while k < todo.len() && pieces_in_flight < PIECES_IN_FLIGHT {
            let want = todo[k].to_chunk_ranges();
            let index = todo[k].0[0].0 / PIECE_CHUNKS;
            // From the origin: this node's share of the pieces, or anything when nothing
            // else is coming in (no peer can serve in time).
            let origin_ok = idle || origin_owner(&downloaders, &hash, index) == Some(swarm.me);
            let pick = sources
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    !s.p.is_origin
                        && s.can_take(PIECES_PER_PROVIDER)
                        && (s.have.clone() & want.clone()) == want
                })
                .min_by_key(|(i, s)| (s.in_flight, *i))
                .map(|(i, _)| i)
                .or_else(|| {
                    sources
                        .iter()
                        .position(|s| origin_ok && s.p.is_origin && s.can_take(origin_slots))
                });
            let Some(i) = pick else {
                k += 1;
                continue;
            };
            let piece = todo.swap_remove(k);
            let start = piece.0[0].0;
            let h = spawn_piece(
                &mut set,
                pool,
                store,
                &mut sources[i],
                i,
                hash,
                size,
                piece.clone(),
            );
            let id = h.id();
            pieces_in_flight += 1;
            tasks.insert(id, (i, start, h));
            running
                .entry(start)
                .or_insert_with(|| (piece, std::time::Instant::now(), Vec::new()))
                .2
                .push((i, id));
        }
        // Endgame: nothing left to hand out, so ask a second provider for pieces that have
        // been in flight long; the first copy to arrive wins and the other is cancelled.
        if todo.is_empty() {
            if let Some(tail) = on_tail.take() {
                tail();
            }
            let mut slow: Vec<(u64, std::time::Instant)> = running
                .iter()
                .filter(|(_, (_, t, copies))| copies.len() == 1 && t.elapsed() >= ENDGAME_AFTER)
                .map(|(s, (_, t, _))| (*s, *t))
                .collect();
            slow.sort_by_key(|(_, t)| *t);
            for (start, _) in slow {
                if pieces_in_flight >= PIECES_IN_FLIGHT {
                    break;
                }
                let (piece, _, copies) = &running[&start];
                let want = piece.to_chunk_ranges();
                let busy = copies[0].0;
                let Some(i) = sources
                    .iter()
                    .position(|s| {
                        s.can_take(PIECES_PER_PROVIDER) && (s.have.clone() & want.clone()) == want
                    })
                    .filter(|i| *i != busy)
                else {
                    continue;
                };
                let piece = piece.clone();
                let h = spawn_piece(&mut set, pool, store, &mut sources[i], i, hash, size, piece);
                let id = h.id();
                pieces_in_flight += 1;
                tasks.insert(id, (i, start, h));
                running.get_mut(&start).expect("running").2.push((i, id));
            }
        }
        if todo.is_empty() && pieces_in_flight == 0 {
            break Ok(());
        }
        let nobody = !sources.iter().any(|s| s.usable());
        if pieces_in_flight == 0 && (nobody || last_progress.elapsed() > PIECE_TIMEOUT) {
            // Nothing in flight and nobody can take what is left.
            break Err(last_err.take().unwrap_or(FetchError::NotFound));
        }
        if set.is_empty() {
            // Waiting for the grace period or the next look at the tracker.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let done = match tokio::time::timeout(HAVE_REFRESH, set.join_next_with_id()).await {
            Ok(Some(Ok((id, d)))) => {
                tasks.remove(&id);
                d
            }
            Ok(Some(Err(e))) if e.is_cancelled() => {
                // A duplicate whose twin arrived first.
                if let Some((i, start, _)) = tasks.remove(&e.id()) {
                    pieces_in_flight -= 1;
                    sources[i].in_flight -= 1;
                    if let Some(r) = running.get_mut(&start) {
                        r.2.retain(|(_, t)| *t != e.id());
                        if r.2.is_empty() {
                            running.remove(&start);
                        }
                    }
                }
                continue;
            }
            Ok(Some(Err(e))) => return Err(FetchError::Net(NetError::stream(e))),
            Ok(None) | Err(_) => continue,
        };
        match done {
            Done::Providers(list) => {
                lookup_in_flight = false;
                looked_twice = true;
                for p in list {
                    if !sources.iter().any(|s| s.p.addr.id == p.addr.id) {
                        debug!(provider = %p.addr.id.fmt_short(), "new provider");
                        // Appended: in-flight work refers to sources by index.
                        sources.push(new_source(p));
                    }
                }
            }
            Done::Have(i, r) => {
                let src = &mut sources[i];
                src.have_in_flight = false;
                match r {
                    Some(h) if h.size == Some(size) => {
                        src.have = h.ranges.to_chunk_ranges();
                        src.complete = (src.have.clone() & all.clone()) == all;
                    }
                    Some(_) => {}
                    None => src.failures += 1,
                }
            }
            Done::Piece(i, piece, r) => {
                pieces_in_flight -= 1;
                sources[i].in_flight -= 1;
                let start = piece.0[0].0;
                if !running.contains_key(&start) {
                    // The late twin of a piece that already arrived: nothing to count.
                    continue;
                }
                let twins: Vec<tokio::task::Id> = running
                    .get_mut(&start)
                    .map(|r| {
                        r.2.retain(|(j, _)| *j != i);
                        r.2.iter().map(|(_, t)| *t).collect()
                    })
                    .unwrap_or_default();
                let src = &mut sources[i];
                match r {
                    Ok(()) => {
                        // Cancel the other copy, if any; it reports back as cancelled.
                        running.remove(&start);
                        for t in twins {
                            if let Some((_, _, h)) = tasks.get(&t) {
                                h.abort();
                            }
                        }
                        last_progress = std::time::Instant::now();
                        let bytes = piece.bytes(size);
                        if src.p.is_origin {
                            stats.from_origin += bytes;
                        } else {
                            *stats
                                .from_peers
                                .entry(src.p.addr.id.to_string())
                                .or_default() += bytes;
                        }
                        pending |= piece.to_chunk_ranges();
                        pending_bytes += bytes;
                        on_bytes(bytes);
                        if pending_bytes >= RECORD_BATCH_BYTES
                            || last_record.elapsed() >= RECORD_INTERVAL
                        {
                            record(store, hash, size, std::mem::take(&mut pending)).await?;
                            pending_bytes = 0;
                            last_record = std::time::Instant::now();
                        }
                    }
                    Err(e) => {
                        if twins.is_empty() {
                            running.remove(&start);
                            todo.push(piece);
                        }
                        match &e {
                            FetchError::Corrupt(_) => {
                                if !src.banned {
                                    warn!(provider = %src.p.addr.id.fmt_short(), blob = %hash.short(), "banned for this download: {e}");
                                    src.banned = true;
                                    stats.banned.push(src.p.addr.id.to_string());
                                }
                            }
                            FetchError::Busy => {
                                src.busy_until = Some(std::time::Instant::now() + BUSY_BACKOFF);
                                continue;
                            }
                            // The local store failed (a full disk): no provider is at
                            // fault, and none can help.
                            FetchError::Store(_) => break Err(e),
                            FetchError::Missing => {
                                // It announced more than it holds, or lost it: ask again.
                                src.have = bao_tree::ChunkRanges::empty();
                                src.complete = src.p.is_origin;
                                src.failures += 1;
                            }
                            // Unreachable or gone: drop it for the rest of this download.
                            FetchError::Net(NetError::Connect { .. }) => {
                                src.failures = MAX_FAILURES
                            }
                            _ => src.failures += 1,
                        }
                        debug!(provider = %src.p.addr.id.fmt_short(), "piece failed: {e}");
                        last_err = Some(e);
                    }
                }
            }
        }
    };
    set.abort_all();
    // Keep what was verified, also when the fetch failed: a retry resumes from it.
    if !pending.is_empty() {
        record(store, hash, size, pending).await?;
    }
    result.map(|()| stats)
}

/// A piece in flight: the piece, when it was first asked for, and the (source, task) pairs
/// fetching it.
type Running = (RangeList, std::time::Instant, Vec<(usize, tokio::task::Id)>);

/// Starts fetching one piece from source `i`; returns the task's abort handle.
#[allow(clippy::too_many_arguments)]
fn spawn_piece(
    set: &mut tokio::task::JoinSet<Done>,
    pool: &ConnPool,
    store: &Store,
    src: &mut Source,
    i: usize,
    hash: Hash,
    size: u64,
    piece: RangeList,
) -> tokio::task::AbortHandle {
    src.in_flight += 1;
    let (pool, store, p) = (pool.clone(), store.clone(), src.p.clone());
    set.spawn(async move {
        let r = fetch_piece(&pool, &store, &p, hash, size, &piece).await;
        Done::Piece(i, piece, r)
    })
}

/// How long a piece is in flight before the endgame asks a second provider for it.
pub const ENDGAME_AFTER: Duration = Duration::from_millis(750);

/// Verified bytes written before their ranges are synced and recorded.
pub const RECORD_BATCH_BYTES: u64 = 64 << 20;
/// Longest time verified bytes wait to be synced and recorded: a crash loses at most this
/// much of a download.
pub const RECORD_INTERVAL: Duration = Duration::from_secs(1);

async fn record(
    store: &Store,
    hash: Hash,
    size: u64,
    ranges: bao_tree::ChunkRanges,
) -> Result<(), FetchError> {
    let s = store.clone();
    let list = RangeList::from_chunk_ranges(&ranges, size.div_ceil(blob::CHUNK_BYTES).max(1));
    tokio::task::spawn_blocking(move || s.record_ranges(&hash, size, &list))
        .await
        .map_err(|e| FetchError::Net(NetError::stream(e)))?
        .map_err(FetchError::Store)?;
    Ok(())
}

/// Fetches one piece from one provider and writes it, verified, into the store.
async fn fetch_piece(
    pool: &ConnPool,
    store: &Store,
    p: &Provider,
    hash: Hash,
    size: u64,
    piece: &RangeList,
) -> Result<(), FetchError> {
    let conn = pool.get(&p.addr).await?;
    let ingress = pool.ingress.as_deref();
    let encoded = tokio::time::timeout(
        PIECE_TIMEOUT,
        get_encoded(&conn, hash, size, piece, ingress),
    )
    .await
    .map_err(|_| FetchError::Timeout)??;
    let s = store.clone();
    let pc = piece.clone();
    let r =
        tokio::task::spawn_blocking(move || s.write_encoded_unsynced(&hash, size, &pc, &encoded))
            .await
            .map_err(|e| FetchError::Net(NetError::stream(e)))?;
    match r {
        Ok(()) => Ok(()),
        Err(StoreError::Corrupt { message, .. }) => Err(FetchError::Corrupt(format!(
            "{} sent bytes of blob {} that fail verification ({message})",
            if p.is_origin { "the origin" } else { "a peer" },
            hash.short()
        ))),
        Err(e) => Err(FetchError::Store(e)),
    }
}
