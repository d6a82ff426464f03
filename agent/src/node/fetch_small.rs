//! Small blobs in batches: one tracker lookup, one stream from one provider, and one durable
//! store batch for many blobs, so a volume of many small files costs what its bytes cost.
//!
//! Scheduling stays simple on purpose: a batch goes to the best provider that holds all of
//! it, what it lacks to the next, the origin last.

use voltool_protocol::blobs::MAX_GET_MANY;
use voltool_protocol::coord::MAX_LOOKUP_ALL;

use crate::blobs::{BUSY_BACKOFF, OnBytes, get_many};
use crate::store::ImportBatch;

use super::fetch::ask_providers;
use super::*;

/// Batches on the way at once.
const SMALL_LANES: usize = 2;
/// Bytes of small blobs asked of one provider at once.
const SMALL_BATCH_BYTES: u64 = 16 << 20;
/// Rounds over all providers before a batch that none could serve fails.
const SMALL_ROUNDS: u32 = 4;
/// How long a provider may take for a batch, beyond its bytes at [`SLOWEST_LINK`].
const SMALL_BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest link a batch is given time for, bytes per second.
const SLOWEST_LINK: u64 = 1 << 20;

/// What one batch's transfers are handing to the store.
struct Sink<'a> {
    tx: tokio::sync::mpsc::Sender<(Hash, Vec<u8>)>,
    stats: FetchStats,
    banned: HashSet<iroh::PublicKey>,
    counter: &'a OnBytes,
}

impl Inner {
    /// Fetches small blobs (each at most [`MAX_GET_MANY_SIZE`]) whole, in batches. They
    /// are durable and recorded together before this returns, and announced once.
    pub(super) async fn fetch_small(
        &self,
        blobs: &[(Hash, u64)],
        counter: &OnBytes,
    ) -> OpResult<FetchStats> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Hash, Vec<u8>)>(256);
        let batch: ImportBatch = self.store.batch();
        let writer = tokio::task::spawn_blocking(move || {
            while let Some((hash, bytes)) = rx.blocking_recv() {
                batch.import_bytes_checked(&bytes, Some(hash))?;
            }
            batch.finish()
        });
        let max = MAX_GET_MANY.min(MAX_LOOKUP_ALL);
        let groups = crate::blobs::batches(blobs, max, SMALL_BATCH_BYTES);
        // Two batches on the way at once: while one provider reads a batch from its disk,
        // another one's bytes travel and are written here.
        let lane = |first: usize, tx: tokio::sync::mpsc::Sender<(Hash, Vec<u8>)>| {
            let groups = &groups;
            async move {
                let mut sink = Sink {
                    tx,
                    stats: FetchStats::default(),
                    banned: HashSet::new(),
                    counter,
                };
                for group in groups.iter().skip(first).step_by(SMALL_LANES) {
                    self.fetch_group(group, &mut sink).await?;
                }
                Ok::<_, OpError>(sink.stats)
            }
        };
        let (a, b) = tokio::join!(lane(0, tx.clone()), lane(1, tx));
        let result = a.and_then(|mut s| {
            s.merge(&b?);
            s.banned.sort();
            s.banned.dedup();
            Ok(s)
        });
        let written = writer.await.map_err(failed)?;
        // The store's own failure (a full disk) says more than "stopped taking blobs".
        if let Err(e) = written {
            return Err(failed(format!("cannot store fetched blobs: {e}")));
        }
        let stats = result?;
        self.announce(blobs.iter().map(|(h, _)| *h).collect(), true)
            .await;
        Ok(stats)
    }

    /// One batch: asked of the best provider holding all of it, what is left of the next.
    async fn fetch_group(&self, group: &[(Hash, u64)], sink: &mut Sink<'_>) -> OpResult<()> {
        let mut left = group.to_vec();
        for round in 0..SMALL_ROUNDS {
            let hashes = left.iter().map(|(h, _)| *h).collect();
            let req = CoordRequest::LookupAll { hashes };
            let providers =
                ask_providers(&self.coord, self.ep.id(), &self.opts.coordinator, &req).await;
            let mut busy = false;
            for p in providers {
                if left.is_empty() {
                    return Ok(());
                }
                if sink.banned.contains(&p.addr.id) || (self.opts.origin_only && !p.is_origin) {
                    continue;
                }
                busy |= self.fetch_from(&p, &mut left, sink).await?;
            }
            if left.is_empty() {
                return Ok(());
            }
            if busy && round + 1 < SMALL_ROUNDS {
                tokio::time::sleep(BUSY_BACKOFF).await;
            }
        }
        Err(failed(format!(
            "no provider could send {} small blob(s), e.g. {}",
            left.len(),
            left[0].0.short()
        )))
    }

    /// Takes what `p` sends of `left` and removes it from `left`. Returns whether `p`
    /// answered busy. A provider that sends bad bytes is banned for the rest of the fetch.
    async fn fetch_from(
        &self,
        p: &Provider,
        left: &mut Vec<(Hash, u64)>,
        sink: &mut Sink<'_>,
    ) -> OpResult<bool> {
        let Ok(conn) = self.pool.get(&p.addr).await else {
            return Ok(false);
        };
        let mut got: Vec<(usize, Vec<u8>)> = Vec::new();
        let bytes: u64 = left.iter().map(|(_, s)| s).sum();
        let deadline = SMALL_BATCH_TIMEOUT + Duration::from_secs(bytes / SLOWEST_LINK);
        let asked = get_many(&conn, left, self.pool.ingress(), |i, bytes| {
            if let Some(b) = bytes {
                got.push((i, b));
            }
            Ok(())
        });
        // A provider that goes silent is left for the next, with what it did send kept.
        let r = tokio::time::timeout(deadline, asked)
            .await
            .unwrap_or(Err(FetchError::Timeout));
        let mut done = vec![false; left.len()];
        for (i, bytes) in got {
            let n = bytes.len() as u64;
            sink.tx
                .send((left[i].0, bytes))
                .await
                .map_err(|_| failed("the store stopped taking fetched blobs"))?;
            done[i] = true;
            (sink.counter)(n);
            if p.is_origin {
                sink.stats.from_origin += n;
            } else {
                *sink
                    .stats
                    .from_peers
                    .entry(p.addr.id.to_string())
                    .or_default() += n;
            }
        }
        let mut i = 0;
        left.retain(|_| {
            i += 1;
            !done[i - 1]
        });
        match r {
            Ok(()) => Ok(false),
            Err(FetchError::Busy) => Ok(true),
            Err(FetchError::Corrupt(why)) => {
                warn!(provider = %p.addr.id.fmt_short(), "banned: {why}");
                sink.banned.insert(p.addr.id);
                sink.stats.banned.push(p.addr.id.to_string());
                Ok(false)
            }
            Err(e) => {
                debug!(provider = %p.addr.id.fmt_short(), "small blobs: {e}");
                Ok(false)
            }
        }
    }
}
