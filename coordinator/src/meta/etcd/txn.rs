//! Keys, reads and fenced writes.

use super::*;

/// The leader key a coordinator was elected with: its writes land only while that key
/// exists with this creation revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The key.
    pub key: Vec<u8>,
    /// The revision that created it.
    pub revision: i64,
}

/// The key just past every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Operations of a write, with the bytes of keys and values each carries (what etcd's
/// request limit counts).
#[derive(Default)]
pub(super) struct Ops {
    pub(super) ops: Vec<TxnOp>,
    bytes: Vec<usize>,
}

impl Ops {
    pub(super) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.bytes.push(key.len() + value.len());
        self.ops.push(TxnOp::put(key, value, None));
    }

    pub(super) fn delete(&mut self, key: Vec<u8>, opts: Option<DeleteOptions>) {
        // A range's end is at most as long as a key here.
        self.bytes.push(2 * key.len());
        self.ops.push(TxnOp::delete(key, opts));
    }

    pub(super) fn len(&self) -> usize {
        self.ops.len()
    }

    pub(super) fn total(&self) -> usize {
        self.bytes.iter().sum()
    }

    pub(super) fn extend(&mut self, other: Ops) {
        self.ops.extend(other.ops);
        self.bytes.extend(other.bytes);
    }
}

impl EtcdMeta {
    /// Sets the fence every write compares from now on (none: writes are not fenced, for
    /// tests and tools alone).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.write().expect("not poisoned") = fence;
    }

    /// Cancels `token` when a write finds this writer's fence gone: another coordinator
    /// leads, and this one must stop at once rather than when its lease tells it.
    pub fn on_fenced(&self, token: tokio_util::sync::CancellationToken) {
        *self.fenced.lock().expect("not poisoned") = Some(token);
    }

    pub(super) fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut k = self.url.prefix.as_bytes().to_vec();
        for p in parts {
            k.push(b'/');
            k.extend_from_slice(p);
        }
        k
    }

    pub(super) fn vol_key(&self, name: &str) -> Vec<u8> {
        self.key(&[b"v", name.as_bytes()])
    }

    pub(super) fn head_key(&self, id: VolumeId) -> Vec<u8> {
        self.key(&[b"h", hex::encode(id.0).as_bytes()])
    }

    pub(super) fn commit_key(&self, id: VolumeId, v: u64) -> Vec<u8> {
        self.key(&[
            b"c",
            hex::encode(id.0).as_bytes(),
            format!("{v:016x}").as_bytes(),
        ])
    }

    pub(super) fn link_key(&self, id: VolumeId, path: &str) -> Vec<u8> {
        self.key(&[b"l", hex::encode(id.0).as_bytes(), path.as_bytes()])
    }

    /// `d/ID/PATH\0` (a link's path follows).
    pub(super) fn dep_prefix(&self, id: VolumeId, path: &str) -> Vec<u8> {
        let mut k = self.key(&[b"d", hex::encode(id.0).as_bytes(), path.as_bytes()]);
        k.push(0);
        k
    }

    pub(super) fn indexed_key(&self, id: VolumeId) -> Vec<u8> {
        self.key(&[b"i", hex::encode(id.0).as_bytes()])
    }

    /// `KIND/ID/`: every key of one volume of one kind.
    pub(super) fn of_volume(&self, kind: &[u8], id: VolumeId) -> Vec<u8> {
        let mut k = self.key(&[kind, hex::encode(id.0).as_bytes()]);
        k.push(b'/');
        k
    }

    pub(super) fn get(&self, key: Vec<u8>) -> Result<Option<KeyValue>, MetaError> {
        self.call(false, |c| {
            let (mut kv, key) = (c.kv_client(), key.clone());
            async move { Ok(kv.get(key, None).await?.take_kvs().into_iter().next()) }
        })
    }

    /// Every key in `[start, end)`, in order, a page at a time.
    pub(super) fn scan(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        keys_only: bool,
    ) -> Result<Vec<KeyValue>, MetaError> {
        let mut out: Vec<KeyValue> = Vec::new();
        let mut from = start;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if keys_only {
                opts = opts.with_keys_only();
            }
            let page = self.call(false, |c| {
                let (mut kv, from, opts) = (c.kv_client(), from.clone(), opts.clone());
                async move {
                    let mut r = kv.get(from, Some(opts)).await?;
                    Ok((r.take_kvs(), r.more()))
                }
            })?;
            let (kvs, more) = page;
            let Some(last) = kvs.last() else {
                return Ok(out);
            };
            from = last.key().to_vec();
            from.push(0);
            out.extend(kvs);
            if !more {
                return Ok(out);
            }
        }
    }

    pub(super) fn scan_prefix(
        &self,
        prefix: Vec<u8>,
        keys_only: bool,
    ) -> Result<Vec<KeyValue>, MetaError> {
        let end = prefix_end(&prefix);
        self.scan(prefix, end, keys_only)
    }

    /// Runs a fenced transaction; `Ok(None)` if one of `compares` failed (the fence held),
    /// [`MetaError::Fenced`] if the fence did not.
    pub(super) fn txn(
        &self,
        mut compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<Vec<TxnOpResponse>>, MetaError> {
        let fence = self.fence.read().expect("not poisoned").clone();
        if let Some(f) = &fence {
            compares.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.revision,
            ));
        }
        // Each transaction also leaves a mark of its own in this writer's key: a write whose
        // answer was lost (etcd's leader changed under it, a timeout) may have landed or
        // not, and a linearizable read of the mark says which. Raft settles it for good by
        // then: a new etcd leader serves a linearizable read only once it committed an
        // entry of its own term, and with it every earlier entry that will ever commit.
        let marker = self.key(&[
            b"w",
            format!("{:016x}", fence.as_ref().map_or(0, |f| f.revision)).as_bytes(),
        ]);
        let mut tries = 0;
        let r = loop {
            let mark = self
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_be_bytes();
            let mut all = ops.clone();
            all.push(TxnOp::put(marker.clone(), mark.to_vec(), None));
            let txn = etcd_client::Txn::new().when(compares.clone()).and_then(all);
            let lost = |why: &str| {
                etcd_client::Error::GRpcStatus(tonic::Status::unavailable(format!(
                    "lost on purpose (a test): {why}"
                )))
            };
            let e = if self.lose_one(false) {
                lost("before it was sent")
            } else {
                match self.try_call(true, |c| {
                    let (mut kv, txn) = (c.kv_client(), txn.clone());
                    async move { kv.txn(txn).await }
                })? {
                    Ok(_) if self.lose_one(true) => lost("after it landed"),
                    Ok(r) => break r,
                    Err(e) => e,
                }
            };
            tries += 1;
            if !ambiguous(&e) || tries >= WRITE_TRIES {
                return Err(engine(e));
            }
            let landed = self
                .get(marker.clone())?
                .is_some_and(|kv| kv.value() == mark);
            tracing::warn!(
                landed,
                "etcd: a write's answer was lost ({e}): its mark says"
            );
            if landed {
                // What it answered is lost with the answer; nothing needs it but counts.
                return Ok(Some(Vec::new()));
            }
            // It did not land and never will: the same transaction again.
        };
        if r.succeeded() {
            return Ok(Some(r.op_responses()));
        }
        if self.fenced_out()? {
            return Err(self.fenced_error());
        }
        Ok(None)
    }

    /// For tests: the answers of the next `landed` write transactions that go through are
    /// lost, and the next `unsent` are taken for lost without being sent, as when etcd's
    /// leader changes under them; each is settled by its mark.
    #[doc(hidden)]
    pub fn lose_answers(&self, landed: u32, unsent: u32) {
        *self.lose.lock().expect("not poisoned") = (landed, unsent);
    }

    /// Takes one of the answers to lose, `landed` or not.
    fn lose_one(&self, landed: bool) -> bool {
        let mut l = self.lose.lock().expect("not poisoned");
        let n = if landed { &mut l.0 } else { &mut l.1 };
        let take = *n > 0;
        *n = n.saturating_sub(1);
        take
    }

    /// [`MetaError::Fenced`], once this writer found its fence gone: the lead it held ends
    /// now (see [`Self::on_fenced`]).
    pub(super) fn fenced_error(&self) -> MetaError {
        if let Some(t) = self.fenced.lock().expect("not poisoned").as_ref() {
            t.cancel();
        }
        MetaError::Fenced
    }

    /// Whether this writer's fence is gone (another coordinator leads, or will).
    pub(super) fn fenced_out(&self) -> Result<bool, MetaError> {
        let fence = self.fence.read().expect("not poisoned").clone();
        let Some(f) = fence else {
            return Ok(false);
        };
        let held = self
            .get(f.key.clone())?
            .is_some_and(|kv| kv.create_revision() == f.revision);
        Ok(!held)
    }

    /// Runs `ops` in fenced transactions within etcd's limits, each also comparing
    /// `compares`; `Ok(false)` if one of those failed (what ran before stays).
    pub(super) fn batches(&self, compares: &[Compare], ops: Ops) -> Result<bool, MetaError> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let n = ops.len();
        for (i, (op, b)) in ops.ops.into_iter().zip(ops.bytes).enumerate() {
            bytes += b;
            batch.push(op);
            if batch.len() >= MAX_TXN_OPS || bytes >= MAX_TXN_BYTES || i + 1 == n {
                if self
                    .txn(compares.to_vec(), std::mem::take(&mut batch))?
                    .is_none()
                {
                    return Ok(false);
                }
                bytes = 0;
            }
        }
        Ok(true)
    }

    pub(super) fn volume_kv(&self, name: &str) -> Result<Option<(VolumeRecord, i64)>, MetaError> {
        match self.get(self.vol_key(name))? {
            Some(kv) => {
                let rec = decode(|| format!("the record of volume {name:?}"), kv.value())?;
                Ok(Some((rec, kv.mod_revision())))
            }
            None => Ok(None),
        }
    }
}
