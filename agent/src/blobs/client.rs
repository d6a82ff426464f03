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

/// Asks a provider for small blobs whole, on one stream. `on_blob` gets each blob's bytes
/// as they arrive, verified against its hash, or `None` if the provider does not hold it;
/// it may stop the transfer with an error. Bytes that fail their hash end the transfer
/// with [`FetchError::Corrupt`]; blobs not reached stay the caller's to fetch elsewhere.
pub async fn get_many(
    conn: &Connection,
    blobs: &[(Hash, u64)],
    ingress: Option<&TokenBucket>,
    mut on_blob: impl FnMut(usize, Option<Vec<u8>>) -> Result<(), FetchError>,
) -> Result<(), FetchError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(NetError::stream)?;
    let req = BlobRequest::GetMany {
        blobs: blobs.to_vec(),
    };
    net::write_frame(&mut send, &req).await?;
    send.finish().map_err(NetError::stream)?;
    for (i, &(hash, size)) in blobs.iter().enumerate() {
        match net::read_frame::<GetHeader>(&mut recv, MAX_RESPONSE).await? {
            GetHeader::Ok => {}
            GetHeader::NotFound => {
                on_blob(i, None)?;
                continue;
            }
            GetHeader::Busy if i == 0 => return Err(FetchError::Busy),
            other => return Err(FetchError::Refused(other)),
        }
        if size > MAX_GET_MANY_SIZE {
            return Err(FetchError::Refused(GetHeader::Invalid));
        }
        if let Some(b) = ingress {
            b.acquire(size).await;
        }
        let mut bytes = vec![0u8; size as usize];
        recv.read_exact(&mut bytes)
            .await
            .map_err(|e| FetchError::Net(NetError::stream(e)))?;
        if Hash::of(&bytes) != hash {
            return Err(FetchError::Corrupt(format!(
                "sent bytes of blob {} that fail verification",
                hash.short()
            )));
        }
        on_blob(i, Some(bytes))?;
    }
    Ok(())
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
