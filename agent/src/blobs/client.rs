//! The requester side: one request to one provider, the connection pool, and what a
//! fetch reports.

use super::*;

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
    /// The provider's own copy failed its check while it was sending, and it stopped.
    #[error("the provider's own copy of the blob failed its verification; it refused to send it")]
    SelfCheck,
    /// No provider could send what was asked.
    #[error("{0}")]
    NoProvider(String),
}

/// Opens a stream to a provider, sends `req` and reads the answer's header: the first step
/// of every request but a subscription.
pub async fn ask(
    conn: &Connection,
    req: &BlobRequest,
) -> Result<(RecvStream, GetHeader), FetchError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(NetError::stream)?;
    net::write_frame(&mut send, req).await?;
    send.finish().map_err(NetError::stream)?;
    let header: GetHeader = match net::read_frame(&mut recv, MAX_RESPONSE).await {
        Ok(h) => h,
        Err(NetError::Reset(code)) if code == RESET_SELF_CHECK.into_inner() => {
            return Err(FetchError::SelfCheck);
        }
        // A header that is no header (a length past the bound, bytes that do not decode)
        // is a lie like a bad byte: nothing more is taken from that provider.
        Err(NetError::Frame(e)) => {
            return Err(FetchError::Corrupt(format!("a malformed answer: {e}")));
        }
        Err(e) => return Err(e.into()),
    };
    match header {
        GetHeader::Ok | GetHeader::Picked { .. } => Ok((recv, header)),
        GetHeader::NotFound => Err(FetchError::NotFound),
        GetHeader::Missing => Err(FetchError::Missing),
        GetHeader::Busy => Err(FetchError::Busy),
        other => Err(FetchError::Refused(other)),
    }
}

/// Reads the bao encoding of `ranges` of a blob that follows an `Ok` (or `Picked`) header,
/// up to the most a correct response can be. Verification is the caller's.
pub async fn read_encoded(
    recv: &mut RecvStream,
    hash: Hash,
    size: u64,
    ranges: &RangeList,
    ingress: Option<&TokenBucket>,
) -> Result<Vec<u8>, FetchError> {
    // Read as it arrives, taking ingress tokens chunk by chunk: a capped link is paced
    // while the bytes come in (the stream's flow control holds the sender back), not after.
    let bound = ranges.encoded_bound(size) as usize;
    let mut out = Vec::with_capacity(bound.min(4 << 20));
    loop {
        let chunk = recv.read_chunk(64 * 1024).await.map_err(|e| match e {
            ReadError::Reset(code) if code == RESET_SELF_CHECK => FetchError::SelfCheck,
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

/// Asks a provider for the bao encoding of `ranges` of a blob; returns the raw response,
/// read up to the most a correct response can be. Verification is the caller's.
pub async fn get_encoded(
    conn: &Connection,
    hash: Hash,
    size: u64,
    ranges: &RangeList,
    rank: u16,
    ingress: Option<&TokenBucket>,
) -> Result<Vec<u8>, FetchError> {
    let req = BlobRequest::Get {
        hash,
        size,
        ranges: ranges.clone(),
        rank,
    };
    let (mut recv, _) = ask(conn, &req).await?;
    read_encoded(&mut recv, hash, size, ranges, ingress).await
}

/// Asks a provider for small blobs whole, on one stream; [`Many::next`] reads them as they
/// arrive.
pub async fn get_many<'a>(
    conn: &Connection,
    blobs: &'a [(Hash, u64)],
    rank: u16,
    ingress: Option<&'a TokenBucket>,
) -> Result<Many<'a>, FetchError> {
    let req = BlobRequest::GetMany {
        blobs: blobs.to_vec(),
        rank,
    };
    // Not `ask`: a first header of NotFound is about the first blob only.
    let (mut send, recv) = conn.open_bi().await.map_err(NetError::stream)?;
    net::write_frame(&mut send, &req).await?;
    send.finish().map_err(NetError::stream)?;
    Ok(Many {
        recv,
        blobs,
        next: 0,
        ingress,
    })
}

/// The answer to [`get_many`], a blob at a time.
#[derive(Debug)]
pub struct Many<'a> {
    recv: RecvStream,
    blobs: &'a [(Hash, u64)],
    next: usize,
    ingress: Option<&'a TokenBucket>,
}

impl Many<'_> {
    /// The next blob: its index and its bytes, verified against its hash, or `None` if the
    /// provider does not hold it; `Ok(None)` after the last. Bytes that fail their hash
    /// are [`FetchError::Corrupt`]; blobs not reached stay the caller's to fetch elsewhere.
    pub async fn next(&mut self) -> Result<Option<(usize, Option<Vec<u8>>)>, FetchError> {
        let i = self.next;
        let Some(&(hash, size)) = self.blobs.get(i) else {
            return Ok(None);
        };
        self.next += 1;
        match net::read_frame::<GetHeader>(&mut self.recv, MAX_RESPONSE).await? {
            GetHeader::Ok => {}
            GetHeader::NotFound => return Ok(Some((i, None))),
            GetHeader::Busy if i == 0 => return Err(FetchError::Busy),
            other => return Err(FetchError::Refused(other)),
        }
        if size > MAX_GET_MANY_SIZE {
            return Err(FetchError::Refused(GetHeader::Invalid));
        }
        if let Some(b) = self.ingress {
            b.acquire(size).await;
        }
        let mut bytes = vec![0u8; size as usize];
        self.recv
            .read_exact(&mut bytes)
            .await
            .map_err(|e| FetchError::Net(NetError::stream(e)))?;
        if Hash::of(&bytes) != hash {
            return Err(FetchError::Corrupt(format!(
                "sent bytes of blob {} that fail verification",
                hash.short()
            )));
        }
        Ok(Some((i, Some(bytes))))
    }
}

/// Subscribes to what a provider holds of a blob: `on_held` gets each [`Held`] frame (all
/// it holds first, then what it newly holds) until the provider finishes or the caller
/// drops the future.
pub async fn subscribe(
    conn: &Connection,
    hash: Hash,
    size: u64,
    piece_bytes: u64,
    mut on_held: impl FnMut(PieceSet),
) -> Result<(), FetchError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(NetError::stream)?;
    let req = BlobRequest::Subscribe {
        hash,
        size,
        piece_bytes,
    };
    net::write_frame(&mut send, &req).await?;
    // The send side stays open: finishing it ends the subscription.
    let units = voltool_protocol::blobs::pieces(size, piece_bytes);
    while let Some(h) = net::read_frame_or_end::<Held>(&mut recv, MAX_RESPONSE).await? {
        if h.units.len() != units {
            return Err(FetchError::Refused(GetHeader::Invalid));
        }
        on_held(h.units);
    }
    Ok(())
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

/// Longest wait for a connection to a provider.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Open connections on the blob ALPN, reused across requests.
#[derive(Clone, Debug)]
pub struct ConnPool {
    ep: iroh::Endpoint,
    conns: Arc<tokio::sync::Mutex<HashMap<EndpointId, Connection>>>,
    pub(super) ingress: Option<Arc<TokenBucket>>,
}

impl ConnPool {
    /// Connections open now (`None` while the pool is busy).
    pub fn open_count(&self) -> Option<usize> {
        let conns = self.conns.try_lock().ok()?;
        Some(
            conns
                .values()
                .filter(|c| c.close_reason().is_none())
                .count(),
        )
    }

    /// A pool over an endpoint.
    pub fn new(ep: iroh::Endpoint, ingress: Option<Arc<TokenBucket>>) -> Self {
        ConnPool {
            ep,
            conns: Default::default(),
            ingress,
        }
    }

    /// The ingress limit of everything fetched through this pool.
    pub fn ingress(&self) -> Option<&TokenBucket> {
        self.ingress.as_deref()
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
