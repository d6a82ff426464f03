//! What makes a download durable: verified ranges of large blobs synced and recorded in
//! batches, small blobs written into one store batch per fetch, and the end of a group and
//! of a fetch once all of it is recorded.

use super::*;

/// The recording of a large blob's verified ranges.
#[derive(Default)]
pub(super) struct Record {
    pending: ChunkRanges,
    bytes: u64,
    /// Bytes of this download recorded durable so far.
    recorded: u64,
    in_flight: usize,
    /// Every piece arrived: the group is through once the last record is.
    done: bool,
}

/// Small blobs of a fetch go into one store batch, written on the blocking pool and made
/// durable together when the fetch is through.
pub(super) struct Writer {
    pub(super) tx: mpsc::Sender<(Hash, Vec<u8>)>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

impl Writer {
    pub(super) fn start(store: &Store) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Hash, Vec<u8>)>(256);
        let batch = store.batch();
        let task = tokio::task::spawn_blocking(move || {
            let mut seen = HashSet::new();
            while let Some((hash, bytes)) = rx.blocking_recv() {
                // A unit fetched twice (a request that ran past its deadline and was asked
                // again) is written once.
                if seen.insert(hash) {
                    batch.import_bytes_checked(&bytes, Some(hash))?;
                }
            }
            batch.finish().map(|_| ())
        });
        Writer { tx, task }
    }
}

impl Actor {
    /// A group is done or failed: through once what it verified is recorded (or, with
    /// `keep` false, dropped) and no record of it is on the way.
    pub(super) fn through(&mut self, group: GroupId, keep: bool) {
        let pieces = match &mut self.groups[group.0 as usize].record {
            Some(r) => {
                r.done = true;
                if !keep {
                    r.pending = ChunkRanges::empty();
                }
                true
            }
            None => false,
        };
        if pieces {
            self.record(group);
        } else {
            self.finish_group(group);
        }
    }

    /// A piece was verified and written: it is recorded soon, and subscribers hear of it.
    pub(super) fn verified(&mut self, group: GroupId, unit: u32) {
        let Blobs::Pieces { hash, size, .. } = *self.engine.spec(group) else {
            return;
        };
        let pb = self.ctx.cfg.piece_bytes;
        self.ctx.serving.held(hash, unit);
        self.ctx
            .serving
            .landed
            .held(hash, unit, voltool_protocol::blobs::pieces(size, pb));
        // A group through already (a late twin, or failed on a full disk) records no more.
        let Some(r) = &mut self.groups[group.0 as usize].record else {
            return;
        };
        if r.done {
            return;
        }
        r.pending |= piece_ranges(size, pb, unit).to_chunk_ranges();
        r.bytes += self.engine.unit_bytes(group, unit);
        if r.bytes >= RECORD_BATCH_BYTES {
            self.record(group);
        } else if self.record_due.is_none() {
            self.record_due = Some(Instant::now() + RECORD_INTERVAL);
        }
    }

    /// Syncs and records what is pending of a large blob, on the blocking pool.
    pub(super) fn record(&mut self, group: GroupId) {
        let Blobs::Pieces { hash, size, .. } = *self.engine.spec(group) else {
            return;
        };
        let Some(r) = &mut self.groups[group.0 as usize].record else {
            return;
        };
        if r.pending.is_empty() {
            if r.done && r.in_flight == 0 {
                self.finish_group(group);
            }
            return;
        }
        let ranges = std::mem::replace(&mut r.pending, ChunkRanges::empty());
        let bytes = std::mem::take(&mut r.bytes);
        r.in_flight += 1;
        let store = self.ctx.store.clone();
        self.tasks.spawn(async move {
            let chunks = size.div_ceil(blob::CHUNK_BYTES).max(1);
            let list = RangeList::from_chunk_ranges(&ranges, chunks);
            let result = tokio::task::spawn_blocking(move || {
                store.record_ranges(&hash, size, &list).map(|_| ())
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Db(e.to_string())));
            Done::Recorded {
                group,
                bytes,
                result,
            }
        });
    }
    /// A record is through: a failure fails the fetch; what became pending meanwhile goes
    /// next.
    pub(super) fn recorded(&mut self, group: GroupId, bytes: u64, result: Result<(), StoreError>) {
        let hash = match self.engine.spec(group) {
            Blobs::Pieces { hash, .. } => Some(*hash),
            _ => None,
        };
        let g = &mut self.groups[group.0 as usize];
        if let Some(r) = &mut g.record {
            r.in_flight -= 1;
            if result.is_ok() {
                r.recorded += bytes;
                tracing::debug!(
                    blob = %hash.map(|h| h.to_string()).unwrap_or_default(),
                    recorded = r.recorded,
                    "verified ranges recorded"
                );
            }
        }
        if let Err(e) = result {
            let job = g.job;
            if let Some(j) = self.jobs.get_mut(&job) {
                j.failure.get_or_insert(FetchError::Store(e));
            }
        }
        self.record(group);
    }

    /// A group is through (every unit recorded, or failed).
    fn finish_group(&mut self, group: GroupId) {
        let g = &mut self.groups[group.0 as usize];
        if g.finished {
            return;
        }
        g.finished = true;
        let id = g.job;
        if g.record.is_some() {
            // What it verified is in the store's records now.
            self.ctx.serving.landed.ended(g.first);
        }
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        j.open -= 1;
        if j.open > 0 {
            return;
        }
        let mut j = self.jobs.remove(&id).expect("present");
        let banned = &self.engine.stats().banned;
        j.stats.banned = banned[self.bans_told..]
            .iter()
            .map(|id| peer_name(*id))
            .collect();
        if let Some(m) = &self.ctx.metrics {
            m.bans.inc_by((banned.len() - self.bans_told) as u64);
        }
        self.bans_told = banned.len();
        let (store, tracker) = (self.ctx.store.clone(), self.ctx.tracker.clone());
        self.tasks.spawn(async move {
            if let Some(w) = j.writer {
                drop(w.tx);
                let written = w
                    .task
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Db(e.to_string())));
                if let Err(e) = written {
                    // The store's own failure (a full disk) says more than any other.
                    j.failure = Some(FetchError::Store(e));
                }
            }
            let result = match j.failure {
                Some(e) => {
                    if matches!(e, FetchError::Store(StoreError::DiskFull { .. })) {
                        free_partials(&store, &tracker, j.large).await;
                    }
                    Err(e)
                }
                None => Ok(j.stats),
            };
            let _ = j.reply.send(result);
            Done::Replied
        });
    }
}

/// Drops large blobs held only in part, and tells the tracker: what was verified so far
/// would be resumable, but it takes the space the disk lacks, and the agent must work again
/// once the volume needs less or space returns.
async fn free_partials(store: &Store, tracker: &TrackerClient, hashes: Vec<Hash>) {
    let store = store.clone();
    let dropped = tokio::task::spawn_blocking(move || {
        hashes
            .into_iter()
            .filter(|h| store.has_complete(h).is_ok_and(|c| !c) && store.remove(h).is_ok())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    if !dropped.is_empty() {
        warn!(
            blobs = dropped.len(),
            "freed partial downloads after the local disk filled up"
        );
        tracker.withdraw(dropped).await;
    }
}
