//! `voltool/blobs/1`: serving verified ranges from a store, and fetching them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iroh::EndpointId;
use iroh::endpoint::{Connection, ReadError, ReadToEndError, RecvStream, SendStream, VarInt};
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

/// Serves one incoming connection on the blob ALPN until it closes.
pub async fn serve(conn: Connection, store: Store, allow: Allow, egress: Egress) {
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
        let egress = egress.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(send, recv, store, allowed, egress).await {
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
    egress: Egress,
) -> Result<(), NetError> {
    let req: BlobRequest = net::read_frame(&mut recv, MAX_REQUEST).await?;
    if !allowed {
        net::write_frame(&mut send, &GetHeader::Forbidden).await?;
        send.finish().map_err(NetError::stream)?;
        return Ok(());
    }
    match req {
        BlobRequest::Have { hash } => {
            let s = store.clone();
            let meta = tokio::task::spawn_blocking(move || s.meta(&hash))
                .await
                .map_err(NetError::stream)?
                .map_err(NetError::stream)?;
            let resp = match meta {
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
            let s = store.clone();
            let meta = tokio::task::spawn_blocking(move || s.meta(&hash))
                .await
                .map_err(NetError::stream)?
                .map_err(NetError::stream)?;
            let header = match meta {
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
            net::write_frame(&mut send, &header).await?;
            if header == GetHeader::Ok {
                stream_encoded(&mut send, store, hash, size, ranges, egress).await?;
            }
        }
        _ => {
            net::write_frame(&mut send, &GetHeader::Invalid).await?;
        }
    }
    send.finish().map_err(NetError::stream)?;
    Ok(())
}

/// Encodes on the blocking pool into a bounded channel and sends chunk by chunk, so a large
/// range never sits in memory whole.
async fn stream_encoded(
    send: &mut SendStream,
    store: Store,
    hash: Hash,
    size: u64,
    ranges: RangeList,
    egress: Egress,
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
    while let Some(chunk) = rx.recv().await {
        if let Some(b) = &egress {
            b.acquire(chunk.len() as u64).await;
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
}

/// Asks a provider for the bao encoding of `ranges` of a blob; returns the raw response,
/// read up to the most a correct response can be. Verification is the caller's.
pub async fn get_encoded(
    conn: &Connection,
    hash: Hash,
    size: u64,
    ranges: &RangeList,
) -> Result<Vec<u8>, FetchError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(NetError::stream)?;
    let req = BlobRequest::Get {
        hash,
        size,
        ranges: ranges.clone(),
    };
    net::write_frame(&mut send, &req).await?;
    send.finish().map_err(NetError::stream)?;
    let header: GetHeader = net::read_frame(&mut recv, MAX_RESPONSE).await?;
    match header {
        GetHeader::Ok => {}
        GetHeader::NotFound => return Err(FetchError::NotFound),
        GetHeader::Missing => return Err(FetchError::Missing),
        other => return Err(FetchError::Refused(other)),
    }
    let bound = ranges.encoded_bound(size) as usize;
    recv.read_to_end(bound).await.map_err(|e| match e {
        ReadToEndError::Read(ReadError::Reset(code)) if code == RESET_SELF_CHECK => {
            FetchError::Corrupt(format!(
                "the provider's own copy of blob {} failed its verification; it refused to send it",
                hash.short()
            ))
        }
        e => FetchError::Net(NetError::stream(e)),
    })
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

/// Chunks (1 KiB) per piece: 4 MiB, a multiple of the 16 KiB chunk group.
pub const PIECE_CHUNKS: u64 = 4096;
/// Pieces in flight per blob.
pub const PIECES_IN_FLIGHT: usize = 4;
/// Longest wait for one piece before the provider is given up on for it.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(120);

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

/// Fetches a blob into the store from `providers`, in order of preference, resuming from
/// the verified ranges already held. Every piece is verified before it is recorded; a
/// provider that sends a bad byte is banned for the rest of this fetch.
pub async fn fetch_blob(
    pool: &ConnPool,
    store: &Store,
    providers: &[Provider],
    hash: Hash,
    size: u64,
    on_bytes: OnBytes,
) -> Result<FetchStats, FetchError> {
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
    let pieces = missing_pieces(size, &held);
    let banned: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    // Verified pieces are synced and recorded in batches: one fsync per batch, not per piece.
    let mut pending = bao_tree::ChunkRanges::empty();
    let mut pending_bytes = 0u64;
    let mut last_record = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut queue = pieces.into_iter();
    let mut last_err = None;
    loop {
        while set.len() < PIECES_IN_FLIGHT {
            let Some(piece) = queue.next() else { break };
            let pool = pool.clone();
            let store = store.clone();
            let providers = providers.to_vec();
            let banned = banned.clone();
            set.spawn(async move {
                fetch_piece(&pool, &store, &providers, &banned, hash, size, piece).await
            });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        match done.map_err(|e| FetchError::Net(NetError::stream(e)))? {
            Ok((who, is_origin, piece)) => {
                let bytes = piece.bytes(size);
                pending |= piece.to_chunk_ranges();
                pending_bytes += bytes;
                if pending_bytes >= RECORD_BATCH_BYTES || last_record.elapsed() >= RECORD_INTERVAL {
                    record(store, hash, size, std::mem::take(&mut pending)).await?;
                    pending_bytes = 0;
                    last_record = std::time::Instant::now();
                }
                on_bytes(bytes);
                if is_origin {
                    stats.from_origin += bytes;
                } else {
                    *stats.from_peers.entry(who).or_default() += bytes;
                }
            }
            Err(e) => {
                last_err = Some(e);
                set.abort_all();
                break;
            }
        }
    }
    stats.banned = banned.lock().expect("not poisoned").clone();
    // Keep what was verified, also when the fetch failed: a retry resumes from it.
    if !pending.is_empty() {
        record(store, hash, size, pending).await?;
    }
    match last_err {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

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

async fn fetch_piece(
    pool: &ConnPool,
    store: &Store,
    providers: &[Provider],
    banned: &std::sync::Mutex<Vec<String>>,
    hash: Hash,
    size: u64,
    piece: RangeList,
) -> Result<(String, bool, RangeList), FetchError> {
    let mut last = FetchError::NotFound;
    for p in providers {
        let who = p.addr.id.to_string();
        if banned.lock().expect("not poisoned").contains(&who) {
            continue;
        }
        let conn = match pool.get(&p.addr).await {
            Ok(c) => c,
            Err(e) => {
                last = FetchError::Net(e);
                continue;
            }
        };
        let encoded =
            match tokio::time::timeout(PIECE_TIMEOUT, get_encoded(&conn, hash, size, &piece)).await
            {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    debug!(provider = %p.addr.id.fmt_short(), "piece failed: {e}");
                    last = e;
                    continue;
                }
                Err(_) => {
                    last = FetchError::Timeout;
                    continue;
                }
            };
        if let Some(b) = &pool.ingress {
            b.acquire(encoded.len() as u64).await;
        }
        let s = store.clone();
        let pc = piece.clone();
        let r = tokio::task::spawn_blocking(move || {
            s.write_encoded_unsynced(&hash, size, &pc, &encoded)
        })
        .await
        .map_err(|e| FetchError::Net(NetError::stream(e)))?;
        match r {
            Ok(()) => return Ok((who, p.is_origin, piece)),
            Err(StoreError::Corrupt { message, .. }) => {
                warn!(provider = %p.addr.id.fmt_short(), blob = %hash.short(), "banned: sent bytes that fail verification: {message}");
                banned.lock().expect("not poisoned").push(who);
                last = FetchError::Corrupt(format!(
                    "{} sent bytes of blob {} that fail verification ({message})",
                    if p.is_origin { "the origin" } else { "a peer" },
                    hash.short()
                ));
            }
            Err(e) => return Err(FetchError::Store(e)),
        }
    }
    Err(last)
}

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

    /// A connection to `addr`, reusing a live one.
    pub async fn get(&self, addr: &NodeAddr) -> Result<Connection, NetError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr.id)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let c = net::connect(&self.ep, addr, ALPN).await?;
        conns.insert(addr.id, c.clone());
        Ok(c)
    }
}
