//! The provider side: serving verified ranges of held blobs through the swarm's admission
//! (sending slots, a queue served furthest-behind first, busy answers), the origin's choice
//! of piece, and subscriptions that push what this node newly holds.

use std::time::Instant;

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use voltool_protocol::blobs::{pieces, pieces_held, valid_piece};
use voltool_protocol::swarm::{Admission, Admit, Config, NodeId, Subscribers};

use super::*;

mod admission;
pub use admission::{Serving, Turn};

/// Who may fetch from this node.
pub type Allow = Arc<dyn Fn(&EndpointId) -> bool + Send + Sync>;

/// Optional egress limit shared by everything a node sends.
pub type Egress = Option<Arc<TokenBucket>>;

/// How a node serves blobs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Egress limit.
    pub egress: Egress,
    /// Fault injection for tests and the testnet's hostile-peer scenario: flip a byte in
    /// everything sent, after the store's own check, so receivers must catch it.
    pub corrupt: bool,
    /// Admission and subscriptions, shared by every connection of this node.
    pub serving: Arc<Serving>,
    /// Where bytes sent are counted.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl ServeOptions {
    /// Options with the swarm's knobs.
    pub fn new(egress: Egress, corrupt: bool, cfg: Config) -> Self {
        ServeOptions {
            egress,
            corrupt,
            serving: Arc::new(Serving::new(cfg)),
            metrics: None,
        }
    }

    /// Counts bytes sent in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn sent(&self, bytes: usize) {
        if let Some(m) = &self.metrics {
            m.bytes_out.inc_by(bytes as u64);
        }
    }
}

/// Sleeps until `t` (forever for `None`; the caller guards that arm).
pub(crate) async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
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
        let allow = allow.clone();
        tokio::spawn(async move {
            let s = Stream {
                send,
                recv,
                peer: NodeId(*peer.as_bytes()),
                remote: peer,
                allow,
                store,
                opts,
            };
            if let Err(e) = s.serve(allowed).await {
                debug!(peer = %peer.fmt_short(), "blob request failed: {e}");
            }
        });
    }
}

/// How a wait for a sending slot ended.
enum Wait {
    Turn(Turn),
    Busy,
    /// The requester stopped the stream.
    Gone,
}

/// One request's stream.
struct Stream {
    send: SendStream,
    recv: RecvStream,
    peer: NodeId,
    /// The peer, as its endpoint, and who may fetch: a subscription checks again at
    /// every push (a node removed from the fleet hears no more).
    remote: EndpointId,
    allow: Allow,
    store: Store,
    opts: ServeOptions,
}

impl Stream {
    async fn serve(mut self, allowed: bool) -> Result<(), NetError> {
        let req: BlobRequest = net::read_frame(&mut self.recv, MAX_REQUEST).await?;
        if !allowed {
            return self.answer(GetHeader::Forbidden).await;
        }
        match req {
            BlobRequest::Get {
                hash,
                size,
                ranges,
                rank,
            } => {
                if ranges.validate().is_err() {
                    return self.answer(GetHeader::Invalid).await;
                }
                let header = match meta_of(&self.store, hash).await? {
                    None => GetHeader::NotFound,
                    Some(m) if m.size != size => GetHeader::NotFound,
                    Some(m) => {
                        let want = ranges.to_chunk_ranges();
                        if m.is_complete() || (m.ranges().to_chunk_ranges() & want.clone()) == want
                        {
                            GetHeader::Ok
                        } else {
                            GetHeader::Missing
                        }
                    }
                };
                if header != GetHeader::Ok {
                    return self.answer(header).await;
                }
                let _turn = match self.turn(rank).await {
                    Wait::Turn(t) => t,
                    Wait::Busy => return self.answer(GetHeader::Busy).await,
                    Wait::Gone => return Ok(()),
                };
                net::write_frame(&mut self.send, &header).await?;
                let d = self.deadline(ranges.bytes(size));
                let sent = tokio::time::timeout(d, self.stream_encoded(hash, size, ranges)).await;
                match sent {
                    Ok(r) => r?,
                    Err(_) => return self.too_slow(),
                }
            }
            BlobRequest::Pick {
                hash,
                size,
                piece_bytes,
                among,
                rank,
            } => {
                let units = pieces(size, piece_bytes);
                if !valid_piece(size, piece_bytes) || among.len() != units {
                    return self.answer(GetHeader::Invalid).await;
                }
                let held = match meta_of(&self.store, hash).await? {
                    Some(m) if m.size == size => pieces_held(size, piece_bytes, &m.ranges()),
                    _ => return self.answer(GetHeader::NotFound).await,
                };
                let among = among.and(&held);
                if among.is_empty() {
                    return self.answer(GetHeader::Missing).await;
                }
                let serving = self.opts.serving.clone();
                let Some(unit) = serving.choose(hash, units, &among, &self.peer, rank) else {
                    return self.answer(GetHeader::Busy).await;
                };
                let _turn = match self.turn(rank).await {
                    Wait::Turn(t) => t,
                    other => {
                        // Not sent after all: the piece counts as sent no more.
                        serving.unchoose(hash, unit);
                        return match other {
                            Wait::Busy => self.answer(GetHeader::Busy).await,
                            _ => Ok(()),
                        };
                    }
                };
                net::write_frame(&mut self.send, &GetHeader::Picked { unit }).await?;
                let ranges = voltool_protocol::blobs::piece_ranges(size, piece_bytes, unit);
                let d = self.deadline(ranges.bytes(size));
                let sent = tokio::time::timeout(d, self.stream_encoded(hash, size, ranges)).await;
                match sent {
                    Ok(r) => r?,
                    Err(_) => return self.too_slow(),
                }
            }
            BlobRequest::Subscribe {
                hash,
                size,
                piece_bytes,
            } => return self.subscription(hash, size, piece_bytes).await,
            BlobRequest::GetMany { blobs, rank } => {
                if blobs.len() > MAX_GET_MANY || blobs.iter().any(|(_, s)| *s > MAX_GET_MANY_SIZE) {
                    return self.answer(GetHeader::Invalid).await;
                }
                let _turn = match self.turn(rank).await {
                    Wait::Turn(t) => t,
                    Wait::Busy => return self.answer(GetHeader::Busy).await,
                    Wait::Gone => return Ok(()),
                };
                let d = self.deadline(blobs.iter().map(|(_, s)| s).sum());
                let sent = tokio::time::timeout(d, self.send_many(blobs)).await;
                match sent {
                    Ok(r) => r?,
                    Err(_) => return self.too_slow(),
                }
            }
            _ => return self.answer(GetHeader::Invalid).await,
        }
        self.send.finish().map_err(NetError::stream)
    }

    /// A sending slot for this request, unless it is answered busy or its requester stops
    /// the stream while it waits (it cancelled, or went): then its place in the queue goes.
    async fn turn(&self, rank: u16) -> Wait {
        tokio::select! {
            t = self.opts.serving.admit(self.peer, rank) => t.map_or(Wait::Busy, Wait::Turn),
            _ = self.send.stopped() => Wait::Gone,
        }
    }

    /// The time a requester gives an answer of `bytes` (the swarm's request deadline): a
    /// peer that does not take it by then loses its slot.
    fn deadline(&self, bytes: u64) -> std::time::Duration {
        self.opts.serving.config().deadline_for(bytes)
    }

    /// Ends an answer whose deadline passed: the stream is reset, the slot goes.
    fn too_slow(&mut self) -> Result<(), NetError> {
        debug!(peer = %self.remote.fmt_short(), "send deadline passed: the stream is reset");
        let _ = self.send.reset(0u32.into());
        Err(NetError::Stream(
            "the requester did not take the answer in time".into(),
        ))
    }

    /// Answers with one header and finishes.
    async fn answer(mut self, header: GetHeader) -> Result<(), NetError> {
        net::write_frame(&mut self.send, &header).await?;
        self.send.finish().map_err(NetError::stream)
    }

    /// What this node holds of the blob, then what it newly holds, until the subscriber
    /// goes (or the blob is held whole here).
    async fn subscription(
        mut self,
        hash: Hash,
        size: u64,
        piece_bytes: u64,
    ) -> Result<(), NetError> {
        if !valid_piece(size, piece_bytes) || piece_bytes != self.opts.serving.config().piece_bytes
        {
            // Pieces of another size would name other bytes: no frames at all.
            return self.send.finish().map_err(NetError::stream);
        }
        // Only a blob held here, with the size the requester names: nothing is allocated
        // for a size a peer made up.
        if !matches!(meta_of(&self.store, hash).await?, Some(m) if m.size == size) {
            return self.send.finish().map_err(NetError::stream);
        }
        let units = pieces(size, piece_bytes);
        let serving = self.opts.serving.clone();
        // Subscribed before reading what is held, so that no piece falls in between.
        let (tx, mut rx) = mpsc::channel(16);
        let subscribed = serving.subscribe(self.peer, hash, units, tx);
        let r = async {
            let mut have = match meta_of(&self.store, hash).await? {
                Some(m) if m.size == size => pieces_held(size, piece_bytes, &m.ranges()),
                _ => PieceSet::empty(units),
            };
            let held = Held {
                units: have.clone(),
            };
            net::write_frame(&mut self.send, &held).await?;
            let mut buf = [0u8; 64];
            while subscribed.is_some() && !have.is_full() {
                tokio::select! {
                    pushed = rx.recv() => {
                        let Some(units) = pushed else { break };
                        if !(self.allow)(&self.remote) {
                            break;
                        }
                        have.union_with(&units);
                        net::write_frame(&mut self.send, &Held { units }).await?;
                    }
                    // The subscriber finishes (or resets) its side to end it.
                    r = self.recv.read(&mut buf) => match r {
                        Ok(Some(_)) => {}
                        _ => break,
                    },
                }
            }
            self.send.finish().map_err(NetError::stream)
        }
        .await;
        if let Some(id) = subscribed {
            serving.unsubscribe(self.peer, hash, id);
        }
        r
    }

    /// Sends each small blob whole after its header, reading them from the store a group
    /// at a time; a blob not held (or whose copy here fails its hash) gets `NotFound` and
    /// no bytes.
    async fn send_many(&mut self, blobs: Vec<(Hash, u64)>) -> Result<(), NetError> {
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
            let s = self.store.clone();
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
                        net::write_frame(&mut self.send, &GetHeader::NotFound).await?;
                        continue;
                    }
                    Err(e) => {
                        warn!("not sending a blob whose copy here fails its check: {e}");
                        net::write_frame(&mut self.send, &GetHeader::NotFound).await?;
                        continue;
                    }
                };
                net::write_frame(&mut self.send, &GetHeader::Ok).await?;
                if let Some(b) = &self.opts.egress {
                    b.acquire(bytes.len() as u64).await;
                }
                let mut bytes = bytes;
                if self.opts.corrupt && !bytes.is_empty() {
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0x55;
                }
                let n = bytes.len();
                self.send
                    .write_chunk(Bytes::from(bytes))
                    .await
                    .map_err(NetError::stream)?;
                self.opts.sent(n);
            }
        }
        Ok(())
    }

    /// Encodes on the blocking pool into a bounded channel and sends chunk by chunk, so a
    /// large range never sits in memory whole.
    async fn stream_encoded(
        &mut self,
        hash: Hash,
        size: u64,
        ranges: RangeList,
    ) -> Result<(), NetError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let store = self.store.clone();
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
            if let Some(b) = &self.opts.egress {
                b.acquire(chunk.len() as u64).await;
            }
            if self.opts.corrupt && !chunk.is_empty() {
                let mut v = chunk.to_vec();
                let mid = v.len() / 2;
                v[mid] ^= 0x55;
                chunk = Bytes::from(v);
            }
            let n = chunk.len();
            self.send
                .write_chunk(chunk)
                .await
                .map_err(NetError::stream)?;
            self.opts.sent(n);
        }
        match task.await.map_err(NetError::stream)? {
            Ok(()) => Ok(()),
            Err(e) => {
                warn!("refusing to finish sending {}: {e}", hash.short());
                let _ = self.send.reset(RESET_SELF_CHECK);
                Err(NetError::stream(e))
            }
        }
    }
}

/// Bytes of small blobs read from the store at once when answering `GetMany`.
const MANY_READ_GROUP: u64 = 1 << 20;

async fn meta_of(store: &Store, hash: Hash) -> Result<Option<crate::store::BlobMeta>, NetError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.meta(&hash))
        .await
        .map_err(NetError::stream)?
        .map_err(NetError::stream)
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

    fn cfg(slots: usize, queue: usize) -> Config {
        Config {
            serve_slots: slots,
            serve_queue: queue,
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn a_slot_passes_to_the_waiting_request_furthest_behind() {
        let s = Arc::new(Serving::new(cfg(1, 2)));
        let first = s.admit(NodeId([1; 32]), 500).await.expect("a free slot");
        let (ahead, behind) = (s.clone(), s.clone());
        let ahead = tokio::spawn(async move { ahead.admit(NodeId([2; 32]), 900).await.is_some() });
        // Both wait (bounded: a lost wake-up fails the test, it does not hang it).
        let wait_queued = |n: usize| {
            let s = s.clone();
            async move {
                for _ in 0..1000 {
                    if s.state.lock().unwrap().adm.waiting() == n {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                panic!("never {n} waiting");
            }
        };
        wait_queued(1).await;
        let behind = tokio::spawn(async move {
            let t = behind.admit(NodeId([3; 32]), 100).await;
            (t.is_some(), behind.state.lock().unwrap().adm.waiting())
        });
        wait_queued(2).await;
        drop(first);
        // The one behind goes first; the one ahead still waits.
        let (got, still) = tokio::time::timeout(std::time::Duration::from_secs(10), behind)
            .await
            .expect("turn given")
            .unwrap();
        assert!(got);
        assert_eq!(still, 1);
        ahead.abort();
        let _ = ahead.await;
        // Its place went with it.
        assert_eq!(s.state.lock().unwrap().adm.waiting(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_and_pushes_out_the_one_furthest_along() {
        let s = Arc::new(Serving::new(cfg(1, 1)));
        let _first = s.admit(NodeId([4; 32]), 0).await.expect("a free slot");
        let s2 = s.clone();
        let far = tokio::spawn(async move { s2.admit(NodeId([5; 32]), 800).await.is_some() });
        for _ in 0..1000 {
            if s.state.lock().unwrap().adm.waiting() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        // One further along than the waiting one: busy at once.
        assert!(s.admit(NodeId([6; 32]), 900).await.is_none());
        // One further behind takes its place: the waiting one is answered busy.
        let s3 = s.clone();
        let near = tokio::spawn(async move { s3.admit(NodeId([7; 32]), 100).await.is_some() });
        let pushed_out = tokio::time::timeout(std::time::Duration::from_secs(10), far)
            .await
            .expect("answered")
            .unwrap();
        assert!(!pushed_out);
        near.abort();
    }

    #[tokio::test]
    async fn a_turn_given_to_a_request_that_went_passes_on() {
        let s = Arc::new(Serving::new(cfg(1, 4)));
        let first = s.admit(NodeId([8; 32]), 0).await.expect("a free slot");
        let s2 = s.clone();
        let gone = tokio::spawn(async move { s2.admit(NodeId([9; 32]), 10).await.map(|_| ()) });
        for _ in 0..1000 {
            if s.state.lock().unwrap().adm.waiting() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(first);
        // Every slot is free again: a new request is served at once.
        let again = s.admit(NodeId([10; 32]), 0).await;
        assert!(again.is_some());
        assert_eq!(s.state.lock().unwrap().adm.sending(), 1);
    }

    #[tokio::test]
    async fn one_peer_holds_its_share_of_slots_and_places_and_no_more() {
        let s = Arc::new(Serving::new(Config::default()));
        let hog = NodeId([66; 32]);
        // Two slots of three, at the rank that would go first.
        let _a = s.admit(hog, 0).await.expect("a slot");
        let _b = s.admit(hog, 0).await.expect("a slot");
        let (s1, s2) = (s.clone(), s.clone());
        let q1 = tokio::spawn(async move { s1.admit(hog, 0).await.is_some() });
        let q2 = tokio::spawn(async move { s2.admit(hog, 0).await.is_some() });
        for _ in 0..1000 {
            if s.state.lock().unwrap().adm.waiting() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(s.state.lock().unwrap().adm.waiting(), 2);
        // A fifth request of the hog is busy, while another peer is served at once.
        assert!(s.admit(hog, 0).await.is_none());
        let other = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.admit(NodeId([1; 32]), 900),
        )
        .await
        .expect("served at once");
        assert!(other.is_some());
        q1.abort();
        q2.abort();
    }

    #[tokio::test]
    async fn a_peer_holds_a_few_feeds_of_a_blob_and_one_ending_leaves_the_others_subscribed() {
        let s = Arc::new(Serving::new(Config::default()));
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run_pushes(cancel.clone()));
        let (peer, hash) = (NodeId([7; 32]), Hash([9; 32]));
        let mut feeds = Vec::new();
        for _ in 0..admission::FEEDS_PER_PEER {
            let (tx, rx) = mpsc::channel(8);
            let id = s.subscribe(peer, hash, 16, tx).expect("a feed");
            feeds.push((id, rx));
        }
        // One more is refused; another peer is not.
        let (tx, _rx) = mpsc::channel(8);
        assert!(s.subscribe(peer, hash, 16, tx).is_none());
        let (tx, _other) = mpsc::channel(8);
        assert!(s.subscribe(NodeId([8; 32]), hash, 16, tx).is_some());
        // One feed ends: the others still hear of a piece newly held.
        let (gone, _) = feeds.remove(0);
        s.unsubscribe(peer, hash, gone);
        s.held(hash, 3);
        for (_, rx) in &mut feeds {
            let set = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("a push")
                .expect("the feed is open");
            assert_eq!(set.iter().collect::<Vec<_>>(), vec![3]);
        }
        cancel.cancel();
    }
}
