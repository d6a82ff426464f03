//! The coordinators' state in etcd (v3 API), shared by every coordinator of a fleet.
//!
//! Keys under the fleet's prefix `P/` (ids in hex, versions in 16 hex digits so they sort):
//! `v/NAME` a volume's record, `h/ID` its head, `c/ID/VERSION` its commits, `l/ID/PATH` a
//! link's index entry, `d/ID/PATH\0LINK` the links whose resolution looked up `PATH`,
//! `i/ID` the version the link index describes, `x/NODE` a distrusted provider, `b/HASH`
//! a blob the fleet's origin holds in its bucket (its size), `g/HASH` a blob a collection
//! condemned (the revision of the lead that did). Values are postcard, as in redb.
//!
//! Every write is one etcd transaction that also compares the writer's [`Fence`]: the leader
//! key it was elected with must still exist with the revision it was created at. A leader
//! paused past its lease (a GC pause, SIGSTOP) has lost that key when it wakes, so none of
//! its writes can land once another coordinator has taken over, whatever it believes. A
//! head moves in a transaction that also compares the head it read, so it never forks.
//! Writes larger than one transaction allows (etcd's defaults: 128 operations, 1.5 MiB)
//! go in fenced batches: a commit's link-index changes are written after the index is
//! marked stale and before the head moves, so a failure between leaves a stale index, which
//! the next commit rebuilds whole.

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

/// Operations in one transaction: etcd's default `--max-txn-ops` is 128.
const MAX_TXN_OPS: usize = 120;
/// Bytes of keys and values in one transaction: etcd's default request limit is 1.5 MiB.
const MAX_TXN_BYTES: usize = 1 << 20;
/// Keys read in one range request (an answer must stay under gRPC's 4 MiB).
const PAGE: i64 = 1000;
/// How long one call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a fleet's state is: `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    /// The members' client addresses, `HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The fleet's prefix (no leading or trailing `/`).
    pub prefix: String,
}

/// A malformed `--meta` address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{url:?} is not an etcd address (etcd://HOST:PORT[,HOST:PORT…]/PREFIX): {why}")]
pub struct EtcdUrlError {
    url: String,
    why: &'static str,
}

impl std::str::FromStr for EtcdUrl {
    type Err = EtcdUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |why| EtcdUrlError {
            url: url.to_string(),
            why,
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it does not start with etcd://"))?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no prefix"))?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(bad("it names no prefix"));
        }
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(bad("the prefix has an empty, . or .. part"));
        }
        if prefix.chars().any(|c| c.is_control()) {
            return Err(bad("the prefix has a control character"));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = h
                .rsplit_once(':')
                .ok_or_else(|| bad("a member has no :PORT"))?;
            if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
                return Err(bad("a member's host is empty or malformed"));
            }
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("a member's port is not a number from 1 to 65535"))?;
            endpoints.push(h.to_string());
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: prefix.to_string(),
        })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}/{}", self.endpoints.join(","), self.prefix)
    }
}

/// TLS to etcd: the CA that signed the members' certificates, and this coordinator's
/// client certificate and key (PEM files).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA's certificate.
    pub ca: std::path::PathBuf,
    /// This coordinator's certificate.
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
}

/// The leader key a coordinator was elected with: its writes land only while that key
/// exists with this creation revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The key.
    pub key: Vec<u8>,
    /// The revision that created it.
    pub revision: i64,
}

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

/// The key just past every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
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
struct Ops {
    ops: Vec<TxnOp>,
    bytes: Vec<usize>,
}

impl Ops {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.bytes.push(key.len() + value.len());
        self.ops.push(TxnOp::put(key, value, None));
    }

    fn delete(&mut self, key: Vec<u8>, opts: Option<DeleteOptions>) {
        // A range's end is at most as long as a key here.
        self.bytes.push(2 * key.len());
        self.ops.push(TxnOp::delete(key, opts));
    }

    fn len(&self) -> usize {
        self.ops.len()
    }

    fn total(&self) -> usize {
        self.bytes.iter().sum()
    }

    fn extend(&mut self, other: Ops) {
        self.ops.extend(other.ops);
        self.bytes.extend(other.bytes);
    }
}

/// A client of one member, checked with one read (connecting is lazy).
async fn connect_one(endpoint: &str, opts: &ConnectOptions) -> Result<Client, etcd_client::Error> {
    let mut c = Client::connect([endpoint], Some(opts.clone())).await?;
    c.get("voltool-probe", Some(GetOptions::new().with_count_only()))
        .await?;
    Ok(c)
}

/// Whether a call failed for want of its member: for a write, only where the call never
/// left (a transport error, or a connection that could not be made, which tonic reports as
/// `Unavailable` with a connect error); for a read, any `Unavailable`.
pub(crate) fn unreachable(e: &etcd_client::Error, write: bool) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable => {
            !write || s.message().contains("connect")
        }
        _ => false,
    }
}

impl EtcdMeta {
    /// Connects to the members of `url` (TLS with a client certificate unless `tls` is
    /// none) and checks that they answer.
    pub fn connect(url: &EtcdUrl, tls: Option<&EtcdTls>) -> Result<Self, MetaError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(engine)?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_require_leader(true);
        let scheme = match tls {
            Some(t) => {
                let read = |p: &std::path::Path| {
                    std::fs::read(p).map_err(|e| engine(format!("{}: {e}", p.display())))
                };
                let tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        read(&t.cert)?,
                        read(&t.key)?,
                    ));
                opts = opts.with_tls(tls);
                "https"
            }
            None => "http",
        };
        let endpoints: Vec<String> = url
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let mut last = None;
        for (i, e) in endpoints.iter().enumerate() {
            match rt.block_on(connect_one(e, &opts)) {
                Ok(client) => {
                    return Ok(EtcdMeta {
                        rt: Some(rt),
                        endpoints,
                        opts,
                        current: std::sync::Mutex::new((i, client)),
                        url: url.clone(),
                        fence: RwLock::new(None),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(engine(format!(
            "{url}: no member answers: {}",
            last.expect("at least one member")
        )))
    }

    /// A client of the member in use (elections and leases go through it too).
    pub fn client(&self) -> Client {
        self.current.lock().expect("not poisoned").1.clone()
    }

    /// The member in use: its index, to name it in [`Self::move_on`].
    pub fn member(&self) -> usize {
        self.current.lock().expect("not poisoned").0
    }

    /// After a call to member `failed` could not reach it: moves to the next member that
    /// answers (unless another call moved already). Runs on any runtime but etcd's own.
    fn move_on(&self, failed: usize) {
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the state");
        let next = self.next_member(failed);
        if let Ok(Some((i, client))) = futures_lite::future::block_on(rt.spawn(next)) {
            self.moved(failed, i, client);
        }
    }

    /// [`Self::move_on`] from a task on etcd's runtime (the lease's keep-alive, the
    /// campaign).
    pub(crate) async fn move_on_async(&self, failed: usize) {
        if let Some((i, client)) = self.next_member(failed).await {
            self.moved(failed, i, client);
        }
    }

    /// The first member after `failed` that answers, with a client of it (none if another
    /// call moved on already, or none answers).
    fn next_member(
        &self,
        failed: usize,
    ) -> impl Future<Output = Option<(usize, Client)>> + Send + 'static {
        let n = self.endpoints.len();
        let stale = self.member() != failed || n < 2;
        let (endpoints, opts) = (self.endpoints.clone(), self.opts.clone());
        async move {
            if stale {
                return None;
            }
            for k in 1..n {
                let i = (failed + k) % n;
                if let Ok(client) = connect_one(&endpoints[i], &opts).await {
                    return Some((i, client));
                }
            }
            None
        }
    }

    fn moved(&self, failed: usize, i: usize, client: Client) {
        let mut c = self.current.lock().expect("not poisoned");
        if c.0 == failed {
            tracing::warn!(failed = %self.endpoints[failed], now = %self.endpoints[i], "etcd: a member did not answer: moved to another");
            *c = (i, client);
        }
    }

    /// Calls `f` with a client of the member in use; where the member cannot be reached,
    /// calls again with the next. A write goes again only when its call never reached a
    /// member (a connection refused or failing to open); a read also when its answer did
    /// not come.
    fn call<T: Send + 'static, Fut>(
        &self,
        write: bool,
        f: impl Fn(Client) -> Fut,
    ) -> Result<T, MetaError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let tries = 2 * self.endpoints.len();
        let mut attempt = 0;
        loop {
            let (i, client) = {
                let c = self.current.lock().expect("not poisoned");
                (c.0, c.1.clone())
            };
            let rt = self
                .rt
                .as_ref()
                .expect("the runtime lives as long as the state");
            let r = futures_lite::future::block_on(rt.spawn(f(client))).map_err(engine)?;
            match r {
                Ok(v) => return Ok(v),
                Err(e) if attempt + 1 < tries && unreachable(&e, write) => {
                    attempt += 1;
                    self.move_on(i);
                }
                Err(e) => return Err(engine(e)),
            }
        }
    }

    /// Where the state is.
    pub fn url(&self) -> &EtcdUrl {
        &self.url
    }

    /// Runs `f` on the runtime etcd's calls use and waits for it, from any thread.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, MetaError> {
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the state");
        futures_lite::future::block_on(rt.spawn(f))
            .map_err(engine)?
            .map_err(engine)
    }

    /// Runs `f` on the runtime etcd's calls use, without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the state")
            .spawn(f)
    }

    /// Sets the fence every write compares from now on (none: writes are not fenced, for
    /// tests and tools alone).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.write().expect("not poisoned") = fence;
    }

    fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut k = self.url.prefix.as_bytes().to_vec();
        for p in parts {
            k.push(b'/');
            k.extend_from_slice(p);
        }
        k
    }

    fn vol_key(&self, name: &str) -> Vec<u8> {
        self.key(&[b"v", name.as_bytes()])
    }

    fn head_key(&self, id: VolumeId) -> Vec<u8> {
        self.key(&[b"h", hex::encode(id.0).as_bytes()])
    }

    fn commit_key(&self, id: VolumeId, v: u64) -> Vec<u8> {
        self.key(&[
            b"c",
            hex::encode(id.0).as_bytes(),
            format!("{v:016x}").as_bytes(),
        ])
    }

    fn link_key(&self, id: VolumeId, path: &str) -> Vec<u8> {
        self.key(&[b"l", hex::encode(id.0).as_bytes(), path.as_bytes()])
    }

    /// `d/ID/PATH\0` (a link's path follows).
    fn dep_prefix(&self, id: VolumeId, path: &str) -> Vec<u8> {
        let mut k = self.key(&[b"d", hex::encode(id.0).as_bytes(), path.as_bytes()]);
        k.push(0);
        k
    }

    fn indexed_key(&self, id: VolumeId) -> Vec<u8> {
        self.key(&[b"i", hex::encode(id.0).as_bytes()])
    }

    /// `KIND/ID/`: every key of one volume of one kind.
    fn of_volume(&self, kind: &[u8], id: VolumeId) -> Vec<u8> {
        let mut k = self.key(&[kind, hex::encode(id.0).as_bytes()]);
        k.push(b'/');
        k
    }

    fn get(&self, key: Vec<u8>) -> Result<Option<KeyValue>, MetaError> {
        self.call(false, |c| {
            let (mut kv, key) = (c.kv_client(), key.clone());
            async move { Ok(kv.get(key, None).await?.take_kvs().into_iter().next()) }
        })
    }

    /// Every key in `[start, end)`, in order, a page at a time.
    fn scan(
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

    fn scan_prefix(&self, prefix: Vec<u8>, keys_only: bool) -> Result<Vec<KeyValue>, MetaError> {
        let end = prefix_end(&prefix);
        self.scan(prefix, end, keys_only)
    }

    /// Runs a fenced transaction; `Ok(None)` if one of `compares` failed (the fence held),
    /// [`MetaError::Fenced`] if the fence did not.
    fn txn(
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
        let txn = etcd_client::Txn::new().when(compares).and_then(ops);
        let r = self.call(true, |c| {
            let (mut kv, txn) = (c.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })?;
        if r.succeeded() {
            return Ok(Some(r.op_responses()));
        }
        if self.fenced_out()? {
            return Err(MetaError::Fenced);
        }
        Ok(None)
    }

    /// Whether this writer's fence is gone (another coordinator leads, or will).
    fn fenced_out(&self) -> Result<bool, MetaError> {
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
    fn batches(&self, compares: &[Compare], ops: Ops) -> Result<bool, MetaError> {
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

    fn volume_kv(&self, name: &str) -> Result<Option<(VolumeRecord, i64)>, MetaError> {
        match self.get(self.vol_key(name))? {
            Some(kv) => {
                let rec = decode(|| format!("the record of volume {name:?}"), kv.value())?;
                Ok(Some((rec, kv.mod_revision())))
            }
            None => Ok(None),
        }
    }
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
                MetaError::Fenced
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

impl EtcdMeta {
    fn blob_key(&self, h: &Hash) -> Vec<u8> {
        self.key(&[b"b", h.to_hex().as_bytes()])
    }

    fn condemned_key(&self, h: &Hash) -> Vec<u8> {
        self.key(&[b"g", h.to_hex().as_bytes()])
    }

    /// The revision of the leader key this writer's writes are fenced on (0: none).
    pub fn fence_revision(&self) -> i64 {
        self.fence
            .read()
            .expect("not poisoned")
            .as_ref()
            .map_or(0, |f| f.revision)
    }
}

impl BlobRecords for EtcdMeta {
    fn record_blobs(&self, blobs: &[(Hash, u64)]) -> Result<(), MetaError> {
        let mut ops = Ops::default();
        let mut seen = std::collections::HashSet::new();
        for (h, size) in blobs.iter().filter(|(h, _)| seen.insert(*h)) {
            ops.put(self.blob_key(h), size.to_be_bytes().to_vec());
        }
        if !self.batches(&[], ops)? {
            return Err(MetaError::Engine(
                "a blob record's write was refused".into(),
            ));
        }
        Ok(())
    }

    fn condemn_blobs(&self, blobs: &[Hash]) -> Result<(), MetaError> {
        let by = self.fence_revision();
        let mut ops = Ops::default();
        let mut seen = std::collections::HashSet::new();
        for h in blobs.iter().filter(|h| seen.insert(**h)) {
            ops.delete(self.blob_key(h), None);
            ops.put(self.condemned_key(h), by.to_be_bytes().to_vec());
        }
        if !self.batches(&[], ops)? {
            return Err(MetaError::Engine("a condemnation was refused".into()));
        }
        Ok(())
    }

    fn clear_condemned(&self, blobs: &[Hash]) -> Result<(), MetaError> {
        let mut ops = Ops::default();
        let mut seen = std::collections::HashSet::new();
        for h in blobs.iter().filter(|h| seen.insert(**h)) {
            ops.delete(self.condemned_key(h), None);
        }
        if !self.batches(&[], ops)? {
            return Err(MetaError::Engine(
                "clearing a condemnation was refused".into(),
            ));
        }
        Ok(())
    }

    fn condemned(&self) -> Result<Vec<(Hash, i64)>, MetaError> {
        let prefix = self.key(&[b"g", b""]);
        let mut out = Vec::new();
        for kv in self.scan_prefix(prefix.clone(), false)? {
            let bad = |why: &str| MetaError::Corrupt {
                what: "a condemnation mark".to_string(),
                why: why.to_string(),
            };
            let mut h = [0u8; 32];
            hex::decode_to_slice(&kv.key()[prefix.len()..], &mut h)
                .map_err(|_| bad("its key is no hash"))?;
            let by: [u8; 8] = kv.value().try_into().map_err(|_| bad("not 8 bytes"))?;
            out.push((Hash(h), i64::from_be_bytes(by)));
        }
        Ok(out)
    }

    fn all_blobs(&self) -> Result<Vec<(Hash, u64)>, MetaError> {
        let prefix = self.key(&[b"b", b""]);
        let mut out = Vec::new();
        for kv in self.scan_prefix(prefix.clone(), false)? {
            let bad = |why: &str| MetaError::Corrupt {
                what: "a blob record".to_string(),
                why: why.to_string(),
            };
            let mut h = [0u8; 32];
            hex::decode_to_slice(&kv.key()[prefix.len()..], &mut h)
                .map_err(|_| bad("its key is no hash"))?;
            let size: [u8; 8] = kv.value().try_into().map_err(|_| bad("not 8 bytes"))?;
            out.push((Hash(h), u64::from_be_bytes(size)));
        }
        Ok(out)
    }
}
