//! The coordinators' state in etcd (v3 API), shared by every coordinator of a fleet.
//!
//! Keys under the fleet's prefix `P/` (ids in hex, versions in 16 hex digits so they sort):
//! `v/NAME` a volume's record, `h/ID` its head, `c/ID/VERSION` its commits, `l/ID/PATH` a
//! link's index entry, `d/ID/PATH\0LINK` the links whose resolution looked up `PATH`,
//! `i/ID` the version the link index describes, `x/NODE` a distrusted provider, `b/HASH`
//! a blob the fleet's origin holds in its bucket (its size), `g/HASH` a blob a collection
//! condemned (the revision of the lead that did), `w/LEAD` the mark of the last write of
//! the lead elected at revision `LEAD`. Values are postcard, as in redb.
//!
//! Every write is one etcd transaction that also compares the writer's [`Fence`]: the leader
//! key it was elected with must still exist with the revision it was created at. A leader
//! paused past its lease (a GC pause, SIGSTOP) has lost that key when it wakes, so none of
//! its writes can land once another coordinator has taken over, whatever it believes. A
//! head moves in a transaction that also compares the head it read, so it never forks.
//! Writes larger than one transaction allows (etcd's defaults: 128 operations, 1.5 MiB)
//! go in fenced batches: a commit's link-index changes are written after the index is
//! marked stale and before the head moves, so a failure between leaves a stale index, which
//! the next commit rebuilds whole. A write whose answer was lost (etcd's leader changed
//! under it) is settled by its mark: it landed, or it goes again.

use std::future::Future;
use std::ops::Range;
use std::sync::RwLock;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, TxnOp,
    TxnOpResponse,
};
use voltool_protocol::{Commit, Hash, SignedHead, VolumeId};

use super::{
    BlobRecords, LinkUpdate, Meta, MetaError, VolumeRecord, check_successor, decode, encode,
};

mod blobs;
mod conn;
mod import;
mod txn;
mod url;

use conn::ambiguous;
pub(crate) use conn::unreachable;
pub use import::Imported;
pub use txn::Fence;
use txn::{Ops, prefix_end};
pub use url::{EtcdTls, EtcdUrl, EtcdUrlError};

/// Operations in one transaction: etcd's default `--max-txn-ops` is 128.
const MAX_TXN_OPS: usize = 120;
/// Bytes of keys and values in one transaction: etcd's default request limit is 1.5 MiB.
const MAX_TXN_BYTES: usize = 1 << 20;
/// Tries of a write transaction whose answer was lost and that did not land.
const WRITE_TRIES: usize = 3;
/// Keys read in one range request (an answer must stay under gRPC's 4 MiB).
const PAGE: i64 = 1000;
/// How long one call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The coordinators' state in etcd.
pub struct EtcdMeta {
    /// The runtime etcd's calls run on: the trait is blocking, its callers on any thread.
    rt: Option<tokio::runtime::Runtime>,
    /// The members' addresses as clients dial them (`http://…` or `https://…`).
    endpoints: Vec<String>,
    opts: ConnectOptions,
    /// The member in use (an index into `endpoints`) and a client of it alone: with all
    /// members in one client, a call routed to a dead member fails rather than going to a
    /// live one, so calls go to one member and move on to the next when it fails.
    current: std::sync::Mutex<(usize, Client)>,
    url: EtcdUrl,
    fence: RwLock<Option<Fence>>,
    /// The mark the next write transaction leaves (see [`EtcdMeta::txn`]).
    writes: std::sync::atomic::AtomicU64,
    /// Answers of writes to lose on purpose, for tests: (after they landed, before they
    /// were sent).
    lose: std::sync::Mutex<(u32, u32)>,
    /// The store's revision at the last [`Meta::compact_history`].
    compact_at: std::sync::atomic::AtomicI64,
    /// Cancelled when a write finds this writer's fence gone (see [`EtcdMeta::on_fenced`]).
    fenced: std::sync::Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl std::fmt::Debug for EtcdMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMeta")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn engine(e: impl std::fmt::Display) -> MetaError {
    MetaError::Engine(format!("etcd: {e}"))
}

impl Drop for EtcdMeta {
    fn drop(&mut self) {
        // Dropped from async code too, where a runtime may not block to shut down.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Meta for EtcdMeta {
    fn engine(&self) -> &'static str {
        "etcd"
    }

    fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        Ok(self.volume_kv(name)?.map(|(r, _)| r))
    }

    fn volumes(&self) -> Result<Vec<(String, VolumeRecord)>, MetaError> {
        let prefix = self.key(&[b"v", b""]);
        let mut out = Vec::new();
        for kv in self.scan_prefix(prefix.clone(), false)? {
            let name = String::from_utf8(kv.key()[prefix.len()..].to_vec())
                .map_err(|e| engine(format!("a volume name that is not UTF-8: {e}")))?;
            let rec = decode(|| format!("the record of volume {name:?}"), kv.value())?;
            out.push((name, rec));
        }
        Ok(out)
    }

    fn head(&self, id: VolumeId) -> Result<Option<SignedHead>, MetaError> {
        match self.get(self.head_key(id))? {
            Some(kv) => decode(|| format!("the head of volume {id}"), kv.value()).map(Some),
            None => Ok(None),
        }
    }

    fn heads(&self) -> Result<Vec<SignedHead>, MetaError> {
        self.scan_prefix(self.key(&[b"h", b""]), false)?
            .iter()
            .map(|kv| decode(|| "a volume's head".to_string(), kv.value()))
            .collect()
    }

    fn commits(
        &self,
        id: VolumeId,
        versions: Range<u64>,
    ) -> Result<Vec<Option<Commit>>, MetaError> {
        let mut out = vec![None; versions.end.saturating_sub(versions.start) as usize];
        if out.is_empty() {
            return Ok(out);
        }
        let (start, end) = (
            self.commit_key(id, versions.start),
            self.commit_key(id, versions.end),
        );
        for kv in self.scan(start, end, false)? {
            let c: Commit = decode(|| format!("a commit of volume {id}"), kv.value())?;
            if let Some(slot) = c
                .version
                .checked_sub(versions.start)
                .and_then(|i| out.get_mut(i as usize))
            {
                *slot = Some(c);
            }
        }
        Ok(out)
    }

    fn create(&self, name: &str, rec: VolumeRecord, head: &SignedHead) -> Result<(), MetaError> {
        let c = &head.commit;
        let ops = vec![
            TxnOp::put(self.vol_key(name), encode(&rec)?, None),
            TxnOp::put(self.head_key(rec.id), encode(head)?, None),
            TxnOp::put(self.commit_key(rec.id, c.version), c.encode(), None),
        ];
        let absent = Compare::create_revision(self.vol_key(name), CompareOp::Equal, 0);
        match self.txn(vec![absent], ops)? {
            Some(_) => Ok(()),
            None => Err(MetaError::Exists(name.to_string())),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), MetaError> {
        loop {
            let (rec, rev) = self
                .volume_kv(from)?
                .ok_or_else(|| MetaError::NoVolume(from.to_string()))?;
            if self.volume_kv(to)?.is_some() {
                return Err(MetaError::Exists(to.to_string()));
            }
            let compares = vec![
                Compare::mod_revision(self.vol_key(from), CompareOp::Equal, rev),
                Compare::create_revision(self.vol_key(to), CompareOp::Equal, 0),
            ];
            let ops = vec![
                TxnOp::delete(self.vol_key(from), None),
                TxnOp::put(self.vol_key(to), encode(&rec)?, None),
            ];
            if self.txn(compares, ops)?.is_some() {
                return Ok(());
            }
            // Either name changed meanwhile: look again.
        }
    }

    fn delete(&self, name: &str) -> Result<VolumeRecord, MetaError> {
        loop {
            let (rec, rev) = self
                .volume_kv(name)?
                .ok_or_else(|| MetaError::NoVolume(name.to_string()))?;
            let id = rec.id;
            let all = || Some(DeleteOptions::new().with_prefix());
            let ops = vec![
                TxnOp::delete(self.vol_key(name), None),
                TxnOp::delete(self.head_key(id), None),
                TxnOp::delete(self.of_volume(b"c", id), all()),
                TxnOp::delete(self.of_volume(b"l", id), all()),
                TxnOp::delete(self.of_volume(b"d", id), all()),
                TxnOp::delete(self.indexed_key(id), None),
            ];
            let same = Compare::mod_revision(self.vol_key(name), CompareOp::Equal, rev);
            if self.txn(vec![same], ops)?.is_some() {
                return Ok(rec);
            }
        }
    }

    fn move_head(
        &self,
        head: &SignedHead,
        links: &LinkUpdate,
        pages: &[(Hash, u64)],
    ) -> Result<(), MetaError> {
        let c = &head.commit;
        let id = c.volume;
        let head_key = self.head_key(id);
        let (now, rev) = match self.get(head_key.clone())? {
            Some(kv) => {
                let h: SignedHead = decode(|| format!("the head of volume {id}"), kv.value())?;
                (Some(h.commit.version), kv.mod_revision())
            }
            None => (None, 0),
        };
        if let Err(e) = check_successor(id, now, head) {
            // The head moved under a leader that lost the lead: that is the news.
            return Err(if self.fenced_out()? {
                self.fenced_error()
            } else {
                e
            });
        }
        let moved = || MetaError::HeadMoved {
            id,
            expected: c.version - 1,
            now: self.head(id).ok().flatten().map(|h| h.commit.version),
        };
        let same_head = vec![Compare::mod_revision(
            head_key.clone(),
            CompareOp::Equal,
            rev,
        )];
        let mut index = Ops::default();
        // etcd refuses a transaction that names one key twice: a key put is not also
        // deleted.
        for e in &links.entries {
            let new = e.new.as_deref().unwrap_or_default();
            let mut seen: std::collections::BTreeSet<&String> = new.iter().collect();
            for d in e.old.iter().flatten().filter(|d| seen.insert(*d)) {
                let mut k = self.dep_prefix(id, d);
                k.extend_from_slice(e.link.as_bytes());
                index.delete(k, None);
            }
            let mut seen = std::collections::BTreeSet::new();
            for d in new.iter().filter(|d| seen.insert(*d)) {
                let mut k = self.dep_prefix(id, d);
                k.extend_from_slice(e.link.as_bytes());
                index.put(k, Vec::new());
            }
            match &e.new {
                Some(new) => index.put(self.link_key(id, &e.link), encode(new)?),
                None => index.delete(self.link_key(id, &e.link), None),
            }
        }
        // The pages' records go with the head when they fit; else before it, in batches
        // (a record of a page no head names is a page the next collection frees).
        let mut records = Ops::default();
        let mut seen = std::collections::HashSet::new();
        for (h, size) in pages.iter().filter(|(h, _)| seen.insert(*h)) {
            records.put(self.blob_key(h), size.to_be_bytes().to_vec());
        }
        let mut moves = Ops::default();
        moves.put(head_key, encode(head)?);
        moves.put(self.commit_key(id, c.version), c.encode());
        moves.put(self.indexed_key(id), c.version.to_be_bytes().to_vec());
        let ops = index.len() + moves.len() + records.len();
        if ops <= MAX_TXN_OPS && index.total() + moves.total() + records.total() < MAX_TXN_BYTES {
            index.extend(moves);
            index.extend(records);
            return match self.txn(same_head, index.ops)? {
                Some(_) => Ok(()),
                None => Err(moved()),
            };
        }
        if !self.batches(&same_head, records)? {
            return Err(moved());
        }
        // Too large for one transaction: the index is marked stale, changed in batches, and
        // described again by the head's own transaction.
        let stale = vec![TxnOp::delete(self.indexed_key(id), None)];
        if self.txn(same_head.clone(), stale)?.is_none()
            || !self.batches(&same_head, index)?
            || self.txn(same_head, moves.ops)?.is_none()
        {
            return Err(moved());
        }
        Ok(())
    }

    fn drop_versions(&self, id: VolumeId, first: u64) -> Result<u64, MetaError> {
        let range = DeleteOptions::new().with_range(self.commit_key(id, first));
        let ops = vec![TxnOp::delete(self.commit_key(id, 0), Some(range))];
        let r = self.txn(Vec::new(), ops)?.unwrap_or_default();
        Ok(r.iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted() as u64,
                _ => 0,
            })
            .sum())
    }

    fn links_indexed(&self, id: VolumeId) -> Result<Option<u64>, MetaError> {
        match self.get(self.indexed_key(id))? {
            Some(kv) => {
                let b: [u8; 8] = kv.value().try_into().map_err(|_| MetaError::Corrupt {
                    what: format!("the link index's version of volume {id}"),
                    why: format!("{} bytes, not 8", kv.value().len()),
                })?;
                Ok(Some(u64::from_be_bytes(b)))
            }
            None => Ok(None),
        }
    }

    fn has_links(&self, id: VolumeId) -> Result<bool, MetaError> {
        let prefix = self.of_volume(b"l", id);
        let end = prefix_end(&prefix);
        let opts = GetOptions::new().with_range(end).with_count_only();
        let n = self.call(false, |c| {
            let (mut kv, prefix, opts) = (c.kv_client(), prefix.clone(), opts.clone());
            async move { Ok(kv.get(prefix, Some(opts)).await?.count()) }
        })?;
        Ok(n > 0)
    }

    fn links(&self, id: VolumeId) -> Result<Vec<(String, Vec<String>)>, MetaError> {
        let prefix = self.of_volume(b"l", id);
        let mut out = Vec::new();
        for kv in self.scan_prefix(prefix.clone(), false)? {
            let path = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            let looked = decode(|| format!("the index entry of link {path:?}"), kv.value())?;
            out.push((path, looked));
        }
        Ok(out)
    }

    fn link(&self, id: VolumeId, path: &str) -> Result<Option<Vec<String>>, MetaError> {
        match self.get(self.link_key(id, path))? {
            Some(kv) => {
                decode(|| format!("the index entry of link {path:?}"), kv.value()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn link_deps(&self, id: VolumeId, path: &str) -> Result<Vec<String>, MetaError> {
        let prefix = self.dep_prefix(id, path);
        Ok(self
            .scan_prefix(prefix.clone(), true)?
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned())
            .collect())
    }

    fn links_below(&self, id: VolumeId, dir: &str) -> Result<Vec<String>, MetaError> {
        // Paths below `dir` sort between `dir/` and `dir0` ('0' follows '/').
        let base = self.of_volume(b"l", id);
        let mut start = base.clone();
        start.extend_from_slice(format!("{dir}/").as_bytes());
        let mut end = base.clone();
        end.extend_from_slice(format!("{dir}0").as_bytes());
        Ok(self
            .scan(start, end, true)?
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key()[base.len()..]).into_owned())
            .collect())
    }

    fn distrusted(&self) -> Result<Vec<([u8; 32], u64)>, MetaError> {
        let prefix = self.key(&[b"x", b""]);
        let mut out = Vec::new();
        for kv in self.scan_prefix(prefix.clone(), false)? {
            let bad = |why: &str| MetaError::Corrupt {
                what: "a distrusted provider's record".to_string(),
                why: why.to_string(),
            };
            let mut id = [0u8; 32];
            hex::decode_to_slice(&kv.key()[prefix.len()..], &mut id)
                .map_err(|_| bad("its key is no node id"))?;
            let until: [u8; 8] = kv.value().try_into().map_err(|_| bad("not 8 bytes"))?;
            out.push((id, u64::from_be_bytes(until)));
        }
        Ok(out)
    }

    fn compact_history(&self) -> Result<(), MetaError> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.call(false, |c| {
            let mut kv = c.kv_client();
            async move {
                let r = kv.get(vec![0], None).await?;
                Ok(r.header().map_or(0, |h| h.revision()))
            }
        })?;
        let before = self.compact_at.swap(now, Relaxed);
        if before <= 0 || before >= now {
            return Ok(());
        }
        let done = self.call(true, |c| {
            let mut kv = c.kv_client();
            async move { kv.compact(before, None).await }
        });
        match done {
            Ok(_) => {
                tracing::info!(
                    revision = before,
                    "etcd: history before this revision compacted"
                );
                Ok(())
            }
            // Compacted further already (etcd's own auto-compaction, another coordinator).
            Err(e) if e.to_string().contains("compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn distrust(&self, node: [u8; 32], until_ms: u64) -> Result<(), MetaError> {
        let key = self.key(&[b"x", hex::encode(node).as_bytes()]);
        let ops = vec![TxnOp::put(key, until_ms.to_be_bytes().to_vec(), None)];
        self.txn(Vec::new(), ops)?;
        Ok(())
    }

    fn forget_distrust(&self, now_ms: u64) -> Result<(), MetaError> {
        let mut ops = Ops::default();
        for (id, until) in self.distrusted()? {
            if until <= now_ms {
                ops.delete(self.key(&[b"x", hex::encode(id).as_bytes()]), None);
            }
        }
        self.batches(&[], ops)?;
        Ok(())
    }

    fn blob_records(&self) -> Option<&dyn BlobRecords> {
        Some(self)
    }
}
