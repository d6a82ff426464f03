//! The provider side: serving verified ranges of held blobs, with sending slots, a queue
//! and busy answers.

use super::*;

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
            let _turn = match header {
                GetHeader::Ok => match admit(&opts).await {
                    Some(turn) => Some(turn),
                    None => return answer_busy(&mut send).await,
                },
                _ => None,
            };
            net::write_frame(&mut send, &header).await?;
            if header == GetHeader::Ok {
                stream_encoded(&mut send, store, hash, size, ranges, opts).await?;
            }
        }
        BlobRequest::GetMany { blobs } => {
            if blobs.len() > MAX_GET_MANY || blobs.iter().any(|(_, s)| *s > MAX_GET_MANY_SIZE) {
                net::write_frame(&mut send, &GetHeader::Invalid).await?;
            } else {
                let Some(_turn) = admit(&opts).await else {
                    return answer_busy(&mut send).await;
                };
                send_many(&mut send, store, blobs, &opts).await?;
            }
        }
        _ => {
            net::write_frame(&mut send, &GetHeader::Invalid).await?;
        }
    }
    send.finish().map_err(NetError::stream)?;
    Ok(())
}

/// A sending turn: a slot at once if one is free, else after a wait in the queue if it
/// has room. `None` when the queue is full too: the request is answered busy.
async fn admit(opts: &ServeOptions) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
    let Some(s) = &opts.slots else {
        return Some(None);
    };
    match s.clone().try_acquire_owned() {
        Ok(turn) => Some(Some(turn)),
        Err(_) => {
            let _place = QueuePlace::take(&opts.waiting)?;
            Some(s.clone().acquire_owned().await.ok())
        }
    }
}

async fn answer_busy(send: &mut SendStream) -> Result<(), NetError> {
    net::write_frame(send, &GetHeader::Busy).await?;
    send.finish().map_err(NetError::stream)
}

/// Bytes of small blobs read from the store at once when answering `GetMany`.
const MANY_READ_GROUP: u64 = 1 << 20;

/// Sends each small blob whole after its header, reading them from the store a group at a
/// time; a blob not held (or whose copy here fails its hash) gets `NotFound` and no bytes.
async fn send_many(
    send: &mut SendStream,
    store: Store,
    blobs: Vec<(Hash, u64)>,
    opts: &ServeOptions,
) -> Result<(), NetError> {
    let mut rest = blobs.as_slice();
    while !rest.is_empty() {
        let n = rest
            .iter()
            .scan(0u64, |total, (_, s)| {
                *total += s;
                (*total <= MANY_READ_GROUP).then_some(())
            })
            .count()
            .max(1);
        let group = rest[..n].to_vec();
        rest = &rest[n..];
        let s = store.clone();
        let read = tokio::task::spawn_blocking(move || {
            group
                .iter()
                .map(|(h, size)| s.read_verified(h, *size))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(NetError::stream)?;
        for r in read {
            let bytes = match r {
                Ok(Some(b)) => b,
                Ok(None) => {
                    net::write_frame(send, &GetHeader::NotFound).await?;
                    continue;
                }
                Err(e) => {
                    warn!("not sending a blob whose copy here fails its check: {e}");
                    net::write_frame(send, &GetHeader::NotFound).await?;
                    continue;
                }
            };
            net::write_frame(send, &GetHeader::Ok).await?;
            if let Some(b) = &opts.egress {
                b.acquire(bytes.len() as u64).await;
            }
            let mut bytes = bytes;
            if opts.corrupt && !bytes.is_empty() {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x55;
            }
            send.write_chunk(Bytes::from(bytes))
                .await
                .map_err(NetError::stream)?;
        }
    }
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
