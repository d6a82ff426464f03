//! `voltool/blobs/1`: serving verified ranges from a store, and fetching them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iroh::EndpointId;
use iroh::endpoint::{Connection, ReadError, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use voltool_protocol::blobs::{
    ALPN, BlobRequest, GetHeader, HaveResponse, MAX_REQUEST, MAX_RESPONSE,
};
use voltool_protocol::{Hash, RangeList, blob};

use crate::net::{self, NetError, NodeAddr};
use crate::rate::TokenBucket;
use crate::store::{Store, StoreError};

/// Stream reset code: the provider's copy failed its own verification while encoding.
const RESET_SELF_CHECK: VarInt = VarInt::from_u32(1);

/// Who may fetch from this node.
pub type Allow = Arc<dyn Fn(&EndpointId) -> bool + Send + Sync>;

/// Optional egress limit shared by everything a node sends.
pub type Egress = Option<Arc<TokenBucket>>;

/// How a node serves blobs.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Egress limit.
    pub egress: Egress,
    /// Fault injection for tests and the testnet's hostile-peer scenario: flip a byte in
    /// everything sent, after the store's own check, so receivers must catch it.
    pub corrupt: bool,
    /// Pieces sent at once; further requests wait their turn (first come, first served),
    /// so each piece finishes soon and its receiver can pass it on, instead of every piece
    /// crawling along at a fraction of the link.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Requests waiting for a slot; beyond [`SERVE_QUEUE`] of them a request is answered
    /// [`GetHeader::Busy`] at once, so its sender takes the piece from a provider that can
    /// send it now instead of queueing (BitTorrent's choking, by another route).
    pub waiting: Arc<std::sync::atomic::AtomicUsize>,
}

/// Pieces a node sends at once by default.
pub const SERVE_SLOTS: usize = 2;
/// Requests that may wait for a sending slot; more are answered busy.
pub const SERVE_QUEUE: usize = 3;
/// How long a downloader leaves a provider that answered busy alone.
pub const BUSY_BACKOFF: Duration = Duration::from_millis(200);

impl ServeOptions {
    /// Options with the default number of sending slots.
    pub fn new(egress: Egress, corrupt: bool) -> Self {
        ServeOptions {
            egress,
            corrupt,
            slots: Some(Arc::new(tokio::sync::Semaphore::new(SERVE_SLOTS))),
            waiting: Default::default(),
        }
    }
}

/// Serves one incoming connection on the blob ALPN until it closes.
pub async fn serve(conn: Connection, store: Store, allow: Allow, opts: ServeOptions) {
    let peer = conn.remote_id();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(peer = %peer.fmt_short(), "blob connection closed: {e}");
                return;
            }
        };
        let store = store.clone();
        let allowed = allow(&peer);
        let opts = opts.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(send, recv, store, allowed, opts).await {
                debug!(peer = %peer.fmt_short(), "blob request failed: {e}");
            }
        });
    }
}

async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    store: Store,
    allowed: bool,
    opts: ServeOptions,
) -> Result<(), NetError> {
    let req: BlobRequest = net::read_frame(&mut recv, MAX_REQUEST).await?;
    if !allowed {
        net::write_frame(&mut send, &GetHeader::Forbidden).await?;
        send.finish().map_err(NetError::stream)?;
        return Ok(());
    }
    match req {
        BlobRequest::Have { hash } => {
            let resp = match meta_of(&store, hash).await? {
                Some(m) => HaveResponse {
                    size: Some(m.size),
                    ranges: m.ranges(),
                },
                None => HaveResponse {
                    size: None,
                    ranges: RangeList::default(),
                },
            };
            net::write_frame(&mut send, &resp).await?;
        }
        BlobRequest::Get { hash, size, ranges } => {
            if ranges.validate().is_err() {
                net::write_frame(&mut send, &GetHeader::Invalid).await?;
                send.finish().map_err(NetError::stream)?;
                return Ok(());
            }
            let header = match meta_of(&store, hash).await? {
                None => GetHeader::NotFound,
                Some(m) if m.size != size => GetHeader::NotFound,
                Some(m) => {
                    let want = ranges.to_chunk_ranges();
                    if m.is_complete() || (m.ranges().to_chunk_ranges() & want.clone()) == want {
                        GetHeader::Ok
                    } else {
                        GetHeader::Missing
                    }
                }
            };
            let _turn = match (&opts.slots, header) {
                (Some(s), GetHeader::Ok) => match s.clone().try_acquire_owned() {
                    Ok(turn) => Some(turn),
                    // Every slot is sending: wait in the queue if it has room, else busy.
                    Err(_) => {
                        let Some(_place) = QueuePlace::take(&opts.waiting) else {
                            net::write_frame(&mut send, &GetHeader::Busy).await?;
                            send.finish().map_err(NetError::stream)?;
                            return Ok(());
                        };
                        s.clone().acquire_owned().await.ok()
                    }
                },
                _ => None,
            };
            net::write_frame(&mut send, &header).await?;
            if header == GetHeader::Ok {
                stream_encoded(&mut send, store, hash, size, ranges, opts).await?;
            }
        }
        _ => {
            net::write_frame(&mut send, &GetHeader::Invalid).await?;
        }
    }
    send.finish().map_err(NetError::stream)?;
    Ok(())
}

/// A place in a provider's queue for a sending slot, given back when dropped.
struct QueuePlace(Arc<std::sync::atomic::AtomicUsize>);

impl QueuePlace {
    /// A place, if fewer than [`SERVE_QUEUE`] requests wait.
    fn take(waiting: &Arc<std::sync::atomic::AtomicUsize>) -> Option<Self> {
        use std::sync::atomic::Ordering::SeqCst;
        waiting
            .fetch_update(SeqCst, SeqCst, |n| (n < SERVE_QUEUE).then_some(n + 1))
            .ok()?;
        Some(QueuePlace(waiting.clone()))
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn meta_of(store: &Store, hash: Hash) -> Result<Option<crate::store::BlobMeta>, NetError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.meta(&hash))
        .await
        .map_err(NetError::stream)?
        .map_err(NetError::stream)
}

/// Encodes on the blocking pool into a bounded channel and sends chunk by chunk, so a large
/// range never sits in memory whole.
async fn stream_encoded(
    send: &mut SendStream,
    store: Store,
    hash: Hash,
    size: u64,
    ranges: RangeList,
    opts: ServeOptions,
) -> Result<(), NetError> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let task = tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHANNEL_CHUNK),
        };
        let r = store.encode(&hash, size, &ranges, &mut w);
        let r2 = std::io::Write::flush(&mut w);
        r.and(r2.map_err(|_| StoreError::NotFound(hash)))
    });
    while let Some(mut chunk) = rx.recv().await {
        if let Some(b) = &opts.egress {
            b.acquire(chunk.len() as u64).await;
        }
        if opts.corrupt && !chunk.is_empty() {
            let mut v = chunk.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x55;
            chunk = Bytes::from(v);
        }
        send.write_chunk(chunk).await.map_err(NetError::stream)?;
    }
    match task.await.map_err(NetError::stream)? {
        Ok(()) => Ok(()),
        Err(e) => {
            warn!("refusing to finish sending {}: {e}", hash.short());
            let _ = send.reset(RESET_SELF_CHECK);
            Err(NetError::stream(e))
        }
    }
}

const CHANNEL_CHUNK: usize = 256 * 1024;

struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHANNEL_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = Bytes::from(std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(CHANNEL_CHUNK),
            ));
            self.tx.blocking_send(chunk).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone")
            })?;
        }
        Ok(())
    }
}

/// Why a fetch from one provider failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The provider does not hold the blob.
    #[error("provider does not hold the blob")]
    NotFound,
    /// The provider lacks some requested ranges.
    #[error("provider lacks the requested ranges")]
    Missing,
    /// The provider refused us.
    #[error("provider refused the request ({0:?})")]
    Refused(GetHeader),
    /// Transport failure.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The provider sent bytes that fail verification.
    #[error("provider sent bytes that fail verification: {0}")]
    Corrupt(String),
    /// Local store failure.
    #[error(transparent)]
    Store(StoreError),
    /// Timed out.
    #[error("provider did not answer in time")]
    Timeout,
    /// The provider is sending all it will now; not a failure.
    #[error("provider is busy")]
    Busy,
}

/// Asks a provider for the bao encoding of `ranges` of a blob; returns the raw response,
/// read up to the most a correct response can be. Verification is the caller's.
pub async fn get_encoded(
    conn: &Connection,
    hash: Hash,
    size: u64,
    ranges: &RangeList,
    ingress: Option<&TokenBucket>,
) -> Result<Vec<u8>, FetchError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(NetError::stream)?;
    let req = BlobRequest::Get {
        hash,
        size,
        ranges: ranges.clone(),
    };
    net::write_frame(&mut send, &req).await?;
    send.finish().map_err(NetError::stream)?;
    let self_check_failed = || {
        FetchError::Corrupt(format!(
            "the provider's own copy of blob {} failed its verification; it refused to send it",
            hash.short()
        ))
    };
    let header: GetHeader = match net::read_frame(&mut recv, MAX_RESPONSE).await {
        Ok(h) => h,
        Err(NetError::Reset(code)) if code == RESET_SELF_CHECK.into_inner() => {
            return Err(self_check_failed());
        }
        Err(e) => return Err(e.into()),
    };
    match header {
        GetHeader::Ok => {}
        GetHeader::NotFound => return Err(FetchError::NotFound),
        GetHeader::Missing => return Err(FetchError::Missing),
        GetHeader::Busy => return Err(FetchError::Busy),
        other => return Err(FetchError::Refused(other)),
    }
    // Read as it arrives, taking ingress tokens chunk by chunk: a capped link is paced
    // while the bytes come in (the stream's flow control holds the sender back), not after.
    let bound = ranges.encoded_bound(size) as usize;
    let mut out = Vec::with_capacity(bound.min(4 << 20));
    loop {
        let chunk = recv.read_chunk(64 * 1024).await.map_err(|e| match e {
            ReadError::Reset(code) if code == RESET_SELF_CHECK => self_check_failed(),
            e => FetchError::Net(NetError::stream(e)),
        })?;
        let Some(chunk) = chunk else {
            break Ok(out);
        };
        if out.len() + chunk.len() > bound {
            break Err(FetchError::Corrupt(format!(
                "a provider sent more than the {bound} bytes blob {} can encode to",
                hash.short()
            )));
        }
        if let Some(b) = ingress {
            b.acquire(chunk.len() as u64).await;
        }
        out.extend_from_slice(&chunk);
    }
}

/// Asks a provider which ranges of a blob it holds.
pub async fn have(conn: &Connection, hash: Hash) -> Result<HaveResponse, FetchError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(NetError::stream)?;
    net::write_frame(&mut send, &BlobRequest::Have { hash }).await?;
    send.finish().map_err(NetError::stream)?;
    Ok(net::read_frame(&mut recv, MAX_RESPONSE).await?)
}

/// A source of blobs: a peer or the origin.
#[derive(Clone, Debug)]
pub struct Provider {
    /// Where it is.
    pub addr: NodeAddr,
    /// Whether this is the origin (reported apart).
    pub is_origin: bool,
}

/// Bytes received per provider, and bans.
#[derive(Clone, Debug, Default)]
pub struct FetchStats {
    /// Verified bytes received from the origin.
    pub from_origin: u64,
    /// Verified bytes received per peer (node id).
    pub from_peers: HashMap<String, u64>,
    /// Providers banned for sending bytes that failed verification.
    pub banned: Vec<String>,
    /// Bytes already held before the fetch (resumed).
    pub already_held: u64,
}

impl FetchStats {
    /// Adds another fetch's figures.
    pub fn merge(&mut self, o: &FetchStats) {
        self.from_origin += o.from_origin;
        for (k, v) in &o.from_peers {
            *self.from_peers.entry(k.clone()).or_default() += v;
        }
        self.banned.extend(o.banned.iter().cloned());
        self.already_held += o.already_held;
    }

    /// Verified bytes received from peers, all together.
    pub fn peer_bytes(&self) -> u64 {
        self.from_peers.values().sum()
    }
}

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

/// Longest wait for a connection to a provider.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Open connections on the blob ALPN, reused across requests.
#[derive(Clone, Debug)]
pub struct ConnPool {
    ep: iroh::Endpoint,
    conns: Arc<tokio::sync::Mutex<HashMap<EndpointId, Connection>>>,
    ingress: Option<Arc<TokenBucket>>,
}

impl ConnPool {
    /// A pool over an endpoint.
    pub fn new(ep: iroh::Endpoint, ingress: Option<Arc<TokenBucket>>) -> Self {
        ConnPool {
            ep,
            conns: Default::default(),
            ingress,
        }
    }

    /// Smoothed round-trip times of the live connections, by peer (what the tracker ranks
    /// providers by).
    pub async fn rtts(&self) -> Vec<(EndpointId, Duration)> {
        self.conns
            .lock()
            .await
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .filter_map(|(id, c)| {
                let paths = c.paths();
                let rtt = paths.iter().find(|p| p.is_selected())?.rtt();
                Some((*id, rtt))
            })
            .collect()
    }

    /// A connection to `addr`, reusing a live one.
    pub async fn get(&self, addr: &NodeAddr) -> Result<Connection, NetError> {
        if let Some(c) = self.conns.lock().await.get(&addr.id)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        // Connect without holding the lock: a dead peer must not hold up the others.
        let c = tokio::time::timeout(CONNECT_TIMEOUT, net::connect(&self.ep, addr, ALPN))
            .await
            .map_err(|_| NetError::Connect {
                peer: addr.to_string(),
                message: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })??;
        self.conns.lock().await.insert(addr.id, c.clone());
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_places_run_out_and_come_back() {
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let places: Vec<QueuePlace> = (0..SERVE_QUEUE)
            .map(|_| QueuePlace::take(&waiting).expect("room in the queue"))
            .collect();
        assert!(
            QueuePlace::take(&waiting).is_none(),
            "a full queue answers busy"
        );
        drop(places);
        assert_eq!(waiting.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(QueuePlace::take(&waiting).is_some());
    }
}
