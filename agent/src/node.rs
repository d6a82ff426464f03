//! The agent role: mounts, commit, reload and volume operations for the local CLI.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::{Endpoint, SecretKey};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use voltool_protocol::coord::{
    self, CoordRequest, CoordResponse, ErrorKind, MAX_HAS, PeerRtt, VolumeInfo,
};
use voltool_protocol::volume::check_volume_name;
use voltool_protocol::{
    Change, Commit, Entry, Hash, HeadError, Manifest, SignedHead, VolPath, VolumeId, blobs,
};

use crate::blobs::{ConnPool, FetchError, FetchStats, Provider};
use crate::control::{
    self, CommitReport, ErrorCode, ErrorReply, Event, LsEntry, MountStatus, ReloadMode,
    ReloadReport, Reply, Request, Sources, StatusReport, VolumeView,
};
use crate::coord_client::{ClientError, CoordClient};
use crate::net::{self, NodeAddr};
use crate::rate::{Rate, TokenBucket};
use crate::scan::{self, ScanMode, StatCache};
use crate::store::Store;

/// Blobs fetched at once by one reload (each in up to `PIECES_IN_FLIGHT` pieces).
const BLOBS_IN_FLIGHT: usize = 2;

const MOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("mounts-0");
const STATS: TableDefinition<&str, &[u8]> = TableDefinition::new("stats-0");
const SEEN: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("seen-heads-0");

/// Agent options.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Data directory: key, store, database, snapshots, control socket.
    pub data: PathBuf,
    /// The coordinator (the fleet's root of trust).
    pub coordinator: NodeAddr,
    /// Address to listen on for peers.
    pub listen: SocketAddr,
    /// Zone label (locality for the swarm).
    pub zone: Option<String>,
    /// Ingress limit (bytes/s) for everything fetched.
    pub max_ingress: Option<Rate>,
    /// Egress limit (bytes/s) for everything served.
    pub max_egress: Option<Rate>,
    /// Fault injection (tests, the testnet's hostile peers): serve corrupt bytes.
    pub corrupt_served_bytes: bool,
    /// Fetch from the origin only, never from peers (the baseline of the fan-out bench).
    pub origin_only: bool,
}

/// An error of an agent operation, as the CLI shows it.
pub type OpError = ErrorReply;
type OpResult<T> = Result<T, OpError>;

fn err(code: ErrorCode, message: impl Into<String>) -> OpError {
    ErrorReply {
        code,
        message: message.into(),
    }
}

fn failed(e: impl std::fmt::Display) -> OpError {
    err(ErrorCode::Failed, e.to_string())
}

impl From<ClientError> for ErrorReply {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Remote { kind, .. } => match kind {
                ErrorKind::NotFound => ErrorCode::NotFound,
                ErrorKind::AlreadyExists => ErrorCode::Exists,
                ErrorKind::Invalid => ErrorCode::Invalid,
                ErrorKind::Corrupt => ErrorCode::Verify,
                _ => ErrorCode::Failed,
            },
            _ => ErrorCode::Failed,
        };
        err(code, e.to_string())
    }
}

impl From<FetchError> for ErrorReply {
    fn from(e: FetchError) -> Self {
        let code = match e {
            FetchError::Corrupt(_) => ErrorCode::Verify,
            _ => ErrorCode::Failed,
        };
        err(code, format!("download failed: {e}"))
    }
}

impl From<HeadError> for ErrorReply {
    fn from(e: HeadError) -> Self {
        err(ErrorCode::Verify, format!("refused head: {e}"))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct MountRecord {
    name: String,
    id: VolumeId,
    path: PathBuf,
    version: u64,
    /// Hash (in the local store) of the manifest the snapshot holds as last synced.
    manifest: Hash,
    snapshot: String,
    background_commit_secs: Option<u64>,
    /// This mount's committed changes not yet seen back in a reload: on reload, those the
    /// new head does not hold were overwritten by another writer, and are reported.
    own: Vec<Change>,
}

/// Progress and data sink of one operation.
#[derive(Clone, Debug)]
pub struct Events {
    tx: Option<mpsc::Sender<Event>>,
}

impl Events {
    /// Events that go nowhere.
    pub fn none() -> Self {
        Events { tx: None }
    }

    fn progress(&self, phase: &str, done: u64, total: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Event::Progress {
                phase: phase.to_string(),
                done,
                total,
            });
        }
    }

    async fn data(&self, bytes: Vec<u8>) -> OpResult<()> {
        match &self.tx {
            Some(tx) => tx
                .send(Event::Data(bytes))
                .await
                .map_err(|_| failed("client went away")),
            None => Ok(()),
        }
    }

    fn counter(&self, phase: &'static str, total: u64) -> Arc<dyn Fn(u64) + Send + Sync> {
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ev = self.clone();
        ev.progress(phase, 0, total);
        Arc::new(move |n| {
            let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            ev.progress(phase, d, total);
        })
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    inner: Arc<Inner>,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

struct Inner {
    opts: AgentOptions,
    store: Store,
    db: Database,
    ep: Endpoint,
    pool: ConnPool,
    serve: crate::blobs::ServeOptions,
    coord: Arc<CoordClient>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    last_reload: Mutex<HashMap<String, ReloadReport>>,
    /// Cancelled when the agent stops; background loops end with it.
    cancel: CancellationToken,
    /// Fleet members as the coordinator last said, and when it said it.
    members: Mutex<(HashSet<iroh::PublicKey>, Option<Instant>)>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("data", &self.opts.data)
            .finish_non_exhaustive()
    }
}

/// A failure to start the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Key trouble.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Transport trouble.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn db_err(e: impl std::fmt::Display) -> OpError {
    failed(format!("agent database: {e}"))
}

impl Agent {
    /// Opens the data directory, binds, recovers mounts and starts serving the control
    /// socket and peers.
    pub async fn start(opts: AgentOptions) -> Result<Self, StartError> {
        let other = |e: &dyn std::fmt::Display| StartError::Other(e.to_string());
        std::fs::create_dir_all(&opts.data).map_err(|e| other(&e))?;
        let key: SecretKey = crate::keys::load_or_create(&opts.data)?;
        let store = Store::open(&opts.data.join("store"))?;
        let db = Database::create(opts.data.join("agent.redb")).map_err(|e| other(&e))?;
        {
            let w = db.begin_write().map_err(|e| other(&e))?;
            w.open_table(MOUNTS).map_err(|e| other(&e))?;
            w.open_table(STATS).map_err(|e| other(&e))?;
            w.open_table(SEEN).map_err(|e| other(&e))?;
            w.commit().map_err(|e| other(&e))?;
        }
        let ep = net::bind(key, opts.listen, vec![blobs::ALPN.to_vec()]).await?;
        let coord = Arc::new(CoordClient::new(ep.clone(), opts.coordinator.clone()));
        let inner = Arc::new(Inner {
            pool: ConnPool::new(
                ep.clone(),
                opts.max_ingress.map(|r| Arc::new(TokenBucket::new(r))),
            ),
            serve: crate::blobs::ServeOptions::new(
                opts.max_egress.map(|r| Arc::new(TokenBucket::new(r))),
                opts.corrupt_served_bytes,
            ),
            opts,
            store,
            db,
            ep,
            coord,
            locks: Default::default(),
            last_reload: Default::default(),
            cancel: CancellationToken::new(),
            members: Default::default(),
        });
        inner.recover().map_err(|e| other(&e))?;
        let cancel = inner.cancel.clone();
        let mut tasks = tokio::task::JoinSet::new();
        let sock = inner.opts.data.join(control::SOCKET);
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(|e| other(&e))?;
        tasks.spawn(control_loop(inner.clone(), listener, cancel.clone()));
        tasks.spawn(peer_loop(inner.clone(), cancel.clone()));
        for m in inner.mounts().map_err(|e| other(&e))? {
            if let Some(secs) = m.background_commit_secs {
                tasks.spawn(background_commits(
                    inner.clone(),
                    m.name,
                    secs,
                    cancel.clone(),
                ));
            }
        }
        {
            let inner = inner.clone();
            tasks.spawn(async move {
                if let Ok(held) = inner.store.complete_blobs() {
                    inner.announce(held, true).await;
                }
            });
        }
        info!(
            node = %inner.ep.id(),
            addr = %net::local_addr(&inner.ep),
            coordinator = %inner.opts.coordinator,
            "agent running"
        );
        Ok(Agent {
            inner,
            cancel,
            tasks,
        })
    }

    /// This node's address.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr {
            id: self.inner.ep.id(),
            addr: net::local_addr(&self.inner.ep),
        }
    }

    /// The local content store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Checks a head as reload does: the coordinator's signature, and no rollback below the
    /// newest head seen for its volume. Accepted heads become the newest seen.
    pub fn verify_head(&self, head: &SignedHead) -> Result<(), ErrorReply> {
        self.inner.accept_head(head)
    }

    /// Runs one request as if it came over the control socket.
    pub async fn request(&self, req: Request, events: Events) -> Result<Reply, ErrorReply> {
        self.inner.clone().handle(req, events).await
    }

    /// Stops: final commits of mounts with background commits, then closes everything.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        if let Ok(mounts) = self.inner.mounts() {
            for m in mounts
                .into_iter()
                .filter(|m| m.background_commit_secs.is_some())
            {
                match self.inner.commit(&m.name, &Events::none()).await {
                    Ok(r) if r.changed > 0 => {
                        info!(
                            volume = m.name,
                            version = r.version,
                            "final commit at shutdown"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => warn!(volume = m.name, "final commit failed: {e}"),
                }
            }
        }
        let _ = self
            .inner
            .coord
            .request(&CoordRequest::Withdraw { blobs: Vec::new() })
            .await;
        let _ = std::fs::remove_file(self.inner.opts.data.join(control::SOCKET));
        self.inner.ep.close().await;
    }
}

async fn control_loop(inner: Arc<Inner>, listener: UnixListener, cancel: CancellationToken) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { warn!("control socket: {e}"); continue; }
            },
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let req: Request = match control::read_msg(&mut stream).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let done = Event::Done(Box::new(Err(err(ErrorCode::Invalid, e.to_string()))));
                    let _ = control::write_msg(&mut stream, &done).await;
                    return;
                }
            };
            debug!(?req, "control request");
            let (tx, mut rx) = mpsc::channel(64);
            let events = Events { tx: Some(tx) };
            let op = tokio::spawn(inner.handle(req, events));
            while let Some(ev) = rx.recv().await {
                if control::write_msg(&mut stream, &ev).await.is_err() {
                    break;
                }
            }
            let result = op
                .await
                .unwrap_or_else(|e| Err(failed(format!("operation panicked: {e}"))));
            let _ = control::write_msg(&mut stream, &Event::Done(Box::new(result))).await;
        });
    }
}

async fn peer_loop(inner: Arc<Inner>, cancel: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            i = inner.ep.accept() => match i { Some(i) => i, None => return },
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let Ok(accepting) = incoming.accept() else {
                return;
            };
            let Ok(conn) = accepting.await else { return };
            // Only fleet members the coordinator vouches for may fetch.
            let member = inner.is_member(&conn.remote_id()).await;
            if !member {
                warn!(peer = %conn.remote_id().fmt_short(), "refused a node that is not a fleet member");
            }
            let allow: crate::blobs::Allow = Arc::new(move |_| member);
            crate::blobs::serve(conn, inner.store.clone(), allow, inner.serve.clone()).await;
        });
    }
}

async fn background_commits(inner: Arc<Inner>, name: String, secs: u64, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(secs.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match inner.commit(&name, &Events::none()).await {
            Ok(r) if r.changed > 0 => {
                info!(volume = name, version = r.version, "background commit")
            }
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::NotFound => return,
            Err(e) => warn!(volume = name, "background commit failed: {e}"),
        }
    }
}

impl Inner {
    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("not poisoned")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn mounts_dir(&self, id: VolumeId) -> PathBuf {
        self.opts.data.join("mounts").join(id.to_string())
    }

    fn mounts(&self) -> OpResult<Vec<MountRecord>> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(MOUNTS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in redb::ReadableTable::iter(&t).map_err(db_err)? {
            let (_, v) = e.map_err(db_err)?;
            out.push(postcard::from_bytes(v.value()).map_err(db_err)?);
        }
        Ok(out)
    }

    fn mount(&self, name: &str) -> OpResult<MountRecord> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(MOUNTS).map_err(db_err)?;
        let v = t.get(name).map_err(db_err)?.ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("volume {name:?} is not mounted here"),
            )
        })?;
        postcard::from_bytes(v.value()).map_err(db_err)
    }

    fn stats(&self, name: &str) -> OpResult<StatCache> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(STATS).map_err(db_err)?;
        match t.get(name).map_err(db_err)? {
            Some(v) => {
                let list: Vec<(VolPath, scan::Stat)> =
                    postcard::from_bytes(v.value()).map_err(db_err)?;
                Ok(list.into_iter().collect())
            }
            None => Ok(StatCache::new()),
        }
    }

    fn put_mount(&self, m: &MountRecord, stats: &StatCache) -> OpResult<()> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let enc = postcard::to_stdvec(m).map_err(db_err)?;
            w.open_table(MOUNTS)
                .map_err(db_err)?
                .insert(m.name.as_str(), enc.as_slice())
                .map_err(db_err)?;
            let list: Vec<(&VolPath, &scan::Stat)> = stats.iter().collect();
            let enc = postcard::to_stdvec(&list).map_err(db_err)?;
            w.open_table(STATS)
                .map_err(db_err)?
                .insert(m.name.as_str(), enc.as_slice())
                .map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// After a crash: point every mount at the snapshot its record names (the record is
    /// written only once that snapshot is complete), and remove snapshots no record names.
    fn recover(&self) -> OpResult<()> {
        let mounts = self.mounts()?;
        let keep: HashSet<PathBuf> = mounts
            .iter()
            .map(|m| self.mounts_dir(m.id).join(&m.snapshot))
            .collect();
        for m in &mounts {
            let snap = self.mounts_dir(m.id).join(&m.snapshot);
            if std::fs::read_link(&m.path).ok().as_deref() != Some(snap.as_path()) {
                warn!(
                    volume = m.name,
                    "re-pointing mount at its recorded snapshot"
                );
                switch_link(&m.path, &snap)?;
            }
        }
        let root = self.opts.data.join("mounts");
        if let Ok(rd) = std::fs::read_dir(&root) {
            for vol in rd.flatten() {
                if let Ok(snaps) = std::fs::read_dir(vol.path()) {
                    for s in snaps.flatten() {
                        if !keep.contains(&s.path()) {
                            debug!(path = %s.path().display(), "removing stale snapshot");
                            let _ = scan::remove_tree(&s.path());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle(self: Arc<Self>, req: Request, events: Events) -> Result<Reply, ErrorReply> {
        match req {
            Request::Status => self.status().await.map(Reply::Status),
            Request::VolumeCreate { name } => {
                check_volume_name(&name).map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
                self.coord
                    .request(&CoordRequest::CreateVolume { name: name.clone() })
                    .await?;
                Ok(Reply::Done(format!("created volume {name}")))
            }
            Request::VolumeList => match self.coord.request(&CoordRequest::ListVolumes).await? {
                CoordResponse::Volumes(v) => Ok(Reply::Volumes(
                    v.into_iter()
                        .map(|i| VolumeView {
                            name: i.name,
                            id: i.id.to_string(),
                            version: i.head.commit.version,
                            created_ms: i.created_ms,
                            updated_ms: i.head.commit.time_ms,
                        })
                        .collect(),
                )),
                _ => Err(failed("unexpected answer from the coordinator")),
            },
            Request::VolumeLs { name, path } => {
                self.ls(&name, path.as_deref()).await.map(Reply::Ls)
            }
            Request::VolumePut {
                name,
                local,
                remote,
                force,
            } => {
                self.put(&name, &local, remote.as_deref(), force, &events)
                    .await
            }
            Request::VolumeGet {
                name,
                remote,
                local,
                force,
            } => {
                self.get(&name, &remote, local.as_deref(), force, &events)
                    .await
            }
            Request::VolumeRm {
                name,
                path,
                recursive,
            } => self.rm(&name, &path, recursive).await,
            Request::VolumeCp {
                name,
                srcs,
                dst,
                recursive,
            } => self.cp(&name, &srcs, &dst, recursive).await,
            Request::VolumeRename { from, to } => {
                check_volume_name(&to).map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
                self.coord
                    .request(&CoordRequest::RenameVolume {
                        from: from.clone(),
                        to: to.clone(),
                    })
                    .await?;
                Ok(Reply::Done(format!("renamed volume {from} to {to}")))
            }
            Request::VolumeDelete {
                name,
                allow_missing,
            } => match self
                .coord
                .request(&CoordRequest::DeleteVolume { name: name.clone() })
                .await
            {
                Ok(_) => Ok(Reply::Done(format!("deleted volume {name}"))),
                Err(ClientError::Remote {
                    kind: ErrorKind::NotFound,
                    ..
                }) if allow_missing => Ok(Reply::Done(format!("volume {name} does not exist"))),
                Err(e) => Err(e.into()),
            },
            Request::Mount {
                name,
                path,
                background_commit_secs,
            } => {
                self.clone()
                    .mount_volume(&name, &path, background_commit_secs, &events)
                    .await
            }
            Request::Commit { name } => {
                let name = self.which_mount(name)?;
                self.commit(&name, &events).await.map(Reply::Committed)
            }
            Request::Reload { name, mode } => {
                let name = self.which_mount(name)?;
                self.reload(&name, mode, &events).await.map(Reply::Reloaded)
            }
        }
    }

    fn which_mount(&self, name: Option<String>) -> OpResult<String> {
        if let Some(n) = name {
            return Ok(n);
        }
        let mounts = self.mounts()?;
        match mounts.as_slice() {
            [one] => Ok(one.name.clone()),
            [] => Err(err(ErrorCode::NotFound, "no volume is mounted here")),
            _ => Err(err(
                ErrorCode::Invalid,
                "several volumes are mounted here: name one",
            )),
        }
    }

    /// The volume's head from the coordinator, verified: signature under the configured
    /// coordinator key, and no rollback below the newest head seen.
    async fn verified_head(&self, name: &str) -> OpResult<VolumeInfo> {
        let info = match self
            .coord
            .request(&CoordRequest::GetHead {
                name: name.to_string(),
            })
            .await?
        {
            CoordResponse::Volume(v) => v,
            _ => return Err(failed("unexpected answer from the coordinator")),
        };
        self.accept_head(&info.head)?;
        Ok(info)
    }

    fn accept_head(&self, head: &SignedHead) -> OpResult<()> {
        let seen: Option<Commit> = {
            let r = self.db.begin_read().map_err(db_err)?;
            let t = r.open_table(SEEN).map_err(db_err)?;
            match t.get(head.commit.volume.0).map_err(db_err)? {
                Some(v) => Some(postcard::from_bytes(v.value()).map_err(db_err)?),
                None => None,
            }
        };
        head.verify_against(&self.opts.coordinator.id, seen.as_ref())?;
        if seen.is_none_or(|s| s.version < head.commit.version) {
            let w = self.db.begin_write().map_err(db_err)?;
            w.open_table(SEEN)
                .map_err(db_err)?
                .insert(head.commit.volume.0, head.commit.encode().as_slice())
                .map_err(db_err)?;
            w.commit().map_err(db_err)?;
        }
        Ok(())
    }

    /// Providers of a blob from the tracker (nearest first, the origin last).
    async fn providers_for(&self, hash: Hash) -> Vec<Provider> {
        lookup_providers(&self.coord, self.ep.id(), &self.opts.coordinator, hash).await
    }

    /// Tells the tracker this node holds `blobs` (complete or in part).
    async fn announce(&self, blobs: Vec<Hash>, complete: bool) {
        for chunk in blobs.chunks(MAX_HAS) {
            let req = CoordRequest::Announce {
                addr: net::local_addr(&self.ep),
                zone: self.opts.zone.clone(),
                blobs: chunk.to_vec(),
                complete,
            };
            if let Err(e) = self.coord.request(&req).await {
                debug!("announce failed: {e}");
            }
        }
        // With what we hold, the round-trip times to the peers we talk to: the tracker
        // ranks providers for our next lookups by them.
        let rtts: Vec<PeerRtt> = self
            .pool
            .rtts()
            .await
            .into_iter()
            .take(coord::MAX_RTTS)
            .map(|(id, rtt)| PeerRtt {
                id: *id.as_bytes(),
                micros: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
            })
            .collect();
        if !rtts.is_empty()
            && let Err(e) = self.coord.request(&CoordRequest::Rtts { rtts }).await
        {
            debug!("reporting round-trip times failed: {e}");
        }
    }

    /// Whether `id` is a fleet member the coordinator vouches for (refreshing the list at
    /// most once a second when an unknown node asks).
    async fn is_member(&self, id: &iroh::PublicKey) -> bool {
        if *id == self.opts.coordinator.id {
            return true;
        }
        {
            let m = self.members.lock().expect("not poisoned");
            if m.0.contains(id) {
                return true;
            }
            if m.1.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return false;
            }
        }
        let fresh = match self.coord.request(&CoordRequest::Members).await {
            Ok(CoordResponse::Members(ids)) => ids
                .iter()
                .filter_map(|b| iroh::PublicKey::from_bytes(b).ok())
                .collect(),
            _ => HashSet::new(),
        };
        let mut m = self.members.lock().expect("not poisoned");
        m.0 = fresh;
        m.1 = Some(Instant::now());
        m.0.contains(id)
    }

    /// The manifest of a head, fetched (and verified) if not held yet.
    async fn manifest_of(&self, c: &Commit) -> OpResult<Manifest> {
        self.fetch_blobs(&[(c.manifest, c.manifest_size)], &Events::none())
            .await?;
        self.read_manifest(c.manifest).await
    }

    /// A manifest held in the local store.
    async fn read_manifest(&self, h: Hash) -> OpResult<Manifest> {
        let store = self.store.clone();
        let bytes = tokio::task::spawn_blocking(move || store.read_all(&h))
            .await
            .map_err(failed)?
            .map_err(failed)?;
        Manifest::decode(&bytes)
            .map_err(|e| err(ErrorCode::Verify, format!("refused manifest: {e}")))
    }

    /// Fetches blobs not held completely, a few at a time, from the swarm: peers that hold
    /// them (complete or in part), the origin last.
    async fn fetch_blobs(&self, blobs: &[(Hash, u64)], events: &Events) -> OpResult<FetchStats> {
        let mut seen = HashSet::new();
        let wanted: Vec<(Hash, u64)> = blobs
            .iter()
            .filter(|(h, _)| seen.insert(*h))
            .copied()
            .collect();
        let total = wanted.iter().map(|(_, s)| s).sum();
        let counter = events.counter("download", total);
        // Announce up front: peers reloading at the same moment learn of us at once and
        // ask what we have as it lands.
        self.announce(wanted.iter().map(|(h, _)| *h).collect(), false)
            .await;
        let mut stats = FetchStats::default();
        let mut set = tokio::task::JoinSet::new();
        let mut queue = wanted.iter().copied();
        let mut failure = None;
        // Blobs whose pieces are not all handed out yet: at most BLOBS_IN_FLIGHT of them.
        // A blob in its tail (last pieces in flight) no longer counts, so the next one
        // starts while the tail finishes and the link stays busy.
        let (tail_tx, mut tail_rx) = tokio::sync::mpsc::unbounded_channel::<Hash>();
        let mut heads: HashSet<Hash> = HashSet::new();
        loop {
            while heads.len() < BLOBS_IN_FLIGHT && failure.is_none() {
                let Some((hash, size)) = queue.next() else {
                    break;
                };
                let mut providers = self.providers_for(hash).await;
                if self.opts.origin_only {
                    providers.retain(|p| p.is_origin);
                }
                let pool = self.pool.clone();
                let store = self.store.clone();
                let counter = counter.clone();
                let (coord, me, origin) = (
                    self.coord.clone(),
                    self.ep.id(),
                    self.opts.coordinator.clone(),
                );
                let origin_only = self.opts.origin_only;
                let refresh: crate::blobs::Lookup = Arc::new(move || {
                    let (coord, origin) = (coord.clone(), origin.clone());
                    Box::pin(async move { lookup_providers(&coord, me, &origin, hash).await })
                });
                let tail_tx = tail_tx.clone();
                heads.insert(hash);
                set.spawn(async move {
                    let r = crate::blobs::fetch_blob(
                        &pool,
                        &store,
                        crate::blobs::Swarm {
                            me,
                            providers,
                            refresh: (!origin_only).then_some(refresh),
                            on_tail: Some(Arc::new(move || {
                                let _ = tail_tx.send(hash);
                            })),
                        },
                        hash,
                        size,
                        counter,
                    )
                    .await;
                    (hash, r)
                });
            }
            let (hash, r) = tokio::select! {
                Some(tailed) = tail_rx.recv() => {
                    heads.remove(&tailed);
                    continue;
                }
                joined = set.join_next() => match joined {
                    Some(j) => j.map_err(failed)?,
                    None => break,
                },
            };
            heads.remove(&hash);
            match r {
                Ok(s) => stats.merge(&s),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let complete: Vec<Hash> = wanted
            .iter()
            .filter(|(h, _)| self.store.has_complete(h).unwrap_or(false))
            .map(|(h, _)| *h)
            .collect();
        self.announce(complete, true).await;
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(stats),
        }
    }

    async fn status(&self) -> OpResult<StatusReport> {
        let mut mounts = Vec::new();
        for m in self.mounts()? {
            let remote = match self
                .coord
                .request(&CoordRequest::GetHead {
                    name: m.name.clone(),
                })
                .await
            {
                Ok(CoordResponse::Volume(v)) if self.accept_head(&v.head).is_ok() => {
                    Some(v.head.commit.version)
                }
                _ => None,
            };
            mounts.push(MountStatus {
                last_reload: self
                    .last_reload
                    .lock()
                    .expect("not poisoned")
                    .get(&m.name)
                    .cloned(),
                volume: m.name,
                path: m.path,
                local_version: m.version,
                remote_version: remote,
                background_commit_secs: m.background_commit_secs,
            });
        }
        Ok(StatusReport {
            node_id: self.ep.id().to_string(),
            addr: net::local_addr(&self.ep).to_string(),
            coordinator: self.opts.coordinator.to_string(),
            zone: self.opts.zone.clone(),
            mounts,
        })
    }

    async fn ls(&self, name: &str, path: Option<&str>) -> OpResult<Vec<LsEntry>> {
        let info = self.verified_head(name).await?;
        let m = self.manifest_of(&info.head.commit).await?;
        let dir = user_path(path)?;
        if let Some(d) = &dir {
            match m.get(d) {
                None => return Err(err(ErrorCode::NotFound, format!("no such path: {d}"))),
                Some(e) if !e.is_dir() => return Ok(vec![ls_entry(d, e)]),
                _ => {}
            }
        }
        Ok(m.under(dir.as_ref())
            .filter(|(p, _)| p.parent() == dir)
            .map(|(p, e)| ls_entry(p, e))
            .collect())
    }

    /// Uploads blobs the origin lacks.
    async fn upload_missing(&self, blobs: &[(Hash, u64)], events: &Events) -> OpResult<u64> {
        let mut uniq = HashSet::new();
        let blobs: Vec<(Hash, u64)> = blobs
            .iter()
            .filter(|(h, s)| *s > 0 && uniq.insert(*h))
            .copied()
            .collect();
        let mut missing = Vec::new();
        for chunk in blobs.chunks(MAX_HAS) {
            let hashes = chunk.iter().map(|(h, _)| *h).collect();
            match self
                .coord
                .request(&CoordRequest::HasBlobs { hashes })
                .await?
            {
                CoordResponse::Has(has) if has.len() == chunk.len() => {
                    missing.extend(chunk.iter().zip(has).filter(|(_, h)| !h).map(|(b, _)| *b))
                }
                _ => return Err(failed("unexpected answer from the coordinator")),
            }
        }
        let total: u64 = missing.iter().map(|(_, s)| s).sum();
        let counter = events.counter("upload", total);
        for (hash, size) in &missing {
            let path = self.store.data_path(hash);
            self.coord
                .upload(*hash, *size, &path, counter.as_ref())
                .await?;
        }
        // This node holds them complete too: peers may take them from here.
        self.announce(blobs.iter().map(|(h, _)| *h).collect(), true)
            .await;
        Ok(total)
    }

    /// Sends a change set; returns the verified new head and the overwritten paths.
    async fn send_commit(
        &self,
        info: &VolumeInfo,
        base_version: u64,
        changes: Vec<Change>,
        priors: Vec<Option<Entry>>,
    ) -> OpResult<(SignedHead, Vec<VolPath>)> {
        let req = CoordRequest::Commit {
            name: info.name.clone(),
            volume: info.id,
            base_version,
            changes,
            priors,
        };
        match self.coord.request(&req).await? {
            CoordResponse::Committed { head, overwritten } => {
                self.accept_head(&head)?;
                Ok((head, overwritten))
            }
            _ => Err(failed("unexpected answer from the coordinator")),
        }
    }

    /// Commits a change set made by a volume command (put, rm, cp) on the current head.
    async fn commit_changes(
        &self,
        info: &VolumeInfo,
        current: &Manifest,
        changes: Vec<Change>,
    ) -> OpResult<u64> {
        let priors = changes
            .iter()
            .map(|c| current.get(&c.path).cloned())
            .collect();
        let (head, _) = self
            .send_commit(info, info.head.commit.version, changes, priors)
            .await?;
        Ok(head.commit.version)
    }

    async fn put(
        &self,
        name: &str,
        local: &Path,
        remote: Option<&str>,
        force: bool,
        events: &Events,
    ) -> OpResult<Reply> {
        let info = self.verified_head(name).await?;
        let current = self.manifest_of(&info.head.commit).await?;
        let meta = std::fs::symlink_metadata(local)
            .map_err(|e| err(ErrorCode::NotFound, format!("{}: {e}", local.display())))?;
        let base_name = local
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                err(
                    ErrorCode::Invalid,
                    format!("{}: no usable file name", local.display()),
                )
            })?
            .to_string();
        let into_dir = remote.is_none_or(|r| r.ends_with('/'));
        let target = match (remote, into_dir) {
            (Some(r), false) => user_path(Some(r))?
                .ok_or_else(|| err(ErrorCode::Invalid, "the volume root is not a file"))?,
            (r, _) => {
                let dir = user_path(r)?;
                let leaf =
                    VolPath::new(&base_name).map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
                match dir {
                    Some(d) => d.join(&leaf),
                    None => leaf,
                }
            }
        };
        let store = self.store.clone();
        let local_owned = local.to_path_buf();
        let is_dir = meta.is_dir();
        let dir_mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
            & voltool_protocol::manifest::MODE_MASK;
        let to = target.clone();
        let changes: Vec<Change> = tokio::task::spawn_blocking(move || {
            if !is_dir {
                let entry = scan::import_file_entry(&store, &local_owned)?;
                return Ok::<_, scan::ScanError>(vec![Change {
                    path: to,
                    entry: Some(entry),
                }]);
            }
            let s = scan::scan(
                &local_owned,
                &Manifest::new(),
                &StatCache::new(),
                ScanMode::Import(&store),
            )?;
            let mut out = vec![Change {
                path: to.clone(),
                entry: Some(Entry::Dir { mode: dir_mode }),
            }];
            out.extend(s.manifest.into_entries().into_iter().map(|(p, e)| Change {
                path: to.join(&p),
                entry: Some(e),
            }));
            Ok(out)
        })
        .await
        .map_err(failed)?
        .map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
        if !force
            && let Some(c) = changes.iter().find(|c| {
                current
                    .get(&c.path)
                    .is_some_and(|e| !e.is_dir() || !c.entry.as_ref().is_some_and(|n| n.is_dir()))
            })
        {
            return Err(err(
                ErrorCode::Exists,
                format!(
                    "{name}:{} already exists (use --force to overwrite)",
                    c.path
                ),
            ));
        }
        let blobs: Vec<(Hash, u64)> = changes
            .iter()
            .filter_map(|c| c.entry.as_ref().and_then(|e| e.blob()))
            .collect();
        let bytes: u64 = blobs.iter().map(|(_, s)| s).sum();
        let files = blobs.len();
        self.upload_missing(&blobs, events).await?;
        let version = self.commit_changes(&info, &current, changes).await?;
        Ok(Reply::Done(format!(
            "uploaded {files} file(s), {bytes} bytes, to {name}:{target} (version {version})"
        )))
    }

    async fn get(
        &self,
        name: &str,
        remote: &str,
        local: Option<&Path>,
        force: bool,
        events: &Events,
    ) -> OpResult<Reply> {
        let info = self.verified_head(name).await?;
        let m = self.manifest_of(&info.head.commit).await?;
        let src = user_path(Some(remote))?;
        let entry = match &src {
            Some(p) => Some(
                m.get(p)
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("no such path: {name}:{p}")))?
                    .clone(),
            ),
            None => None,
        };
        let Some(local) = local else {
            // To stdout: one file only.
            let Some(Entry::File { hash, size, .. }) = entry else {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{remote} is not a file; only files can go to stdout"),
                ));
            };
            self.fetch_blobs(&[(hash, size)], &Events::none()).await?;
            if size > 0 {
                let mut f = tokio::fs::File::open(self.store.data_path(&hash))
                    .await
                    .map_err(failed)?;
                let mut left = size;
                while left > 0 {
                    let mut buf = vec![0u8; (256 * 1024).min(left as usize)];
                    tokio::io::AsyncReadExt::read_exact(&mut f, &mut buf)
                        .await
                        .map_err(failed)?;
                    left -= buf.len() as u64;
                    events.data(buf).await?;
                }
            }
            return Ok(Reply::Done(String::new()));
        };
        // The set of entries to write, relative to the destination.
        let base_name = src.as_ref().map(|p| p.file_name().to_string());
        let dest = match std::fs::metadata(local) {
            Ok(md) if md.is_dir() => match &base_name {
                Some(b) => local.join(b),
                None => local.to_path_buf(),
            },
            _ => local.to_path_buf(),
        };
        let mut items: Vec<(PathBuf, Entry)> = Vec::new();
        match &entry {
            Some(e @ (Entry::File { .. } | Entry::Symlink { .. })) => {
                items.push((dest.clone(), e.clone()))
            }
            _ => {
                items.push((dest.clone(), Entry::Dir { mode: 0o755 }));
                for (p, e) in m.under(src.as_ref()) {
                    let rel = match &src {
                        Some(s) => &p.as_str()[s.as_str().len() + 1..],
                        None => p.as_str(),
                    };
                    items.push((dest.join(rel), e.clone()));
                }
            }
        }
        if !force
            && let Some((p, _)) = items
                .iter()
                .find(|(p, e)| !e.is_dir() && std::fs::symlink_metadata(p).is_ok())
        {
            return Err(err(
                ErrorCode::Exists,
                format!("{} already exists (use --force to overwrite)", p.display()),
            ));
        }
        let blobs: Vec<(Hash, u64)> = items.iter().filter_map(|(_, e)| e.blob()).collect();
        let total: u64 = blobs.iter().map(|(_, s)| s).sum();
        self.fetch_blobs(&blobs, events).await?;
        let store = self.store.clone();
        let n = items.len();
        tokio::task::spawn_blocking(move || write_out(&store, &items))
            .await
            .map_err(failed)??;
        Ok(Reply::Done(format!(
            "downloaded {n} entr{} ({total} bytes) to {}",
            if n == 1 { "y" } else { "ies" },
            dest.display()
        )))
    }

    async fn rm(&self, name: &str, path: &str, recursive: bool) -> OpResult<Reply> {
        let info = self.verified_head(name).await?;
        let m = self.manifest_of(&info.head.commit).await?;
        let p = user_path(Some(path))?.ok_or_else(|| {
            err(
                ErrorCode::Invalid,
                "refusing to remove the volume root; delete the volume instead",
            )
        })?;
        match m.get(&p) {
            None => {
                return Err(err(
                    ErrorCode::NotFound,
                    format!("no such path: {name}:{p}"),
                ));
            }
            Some(e) if e.is_dir() && !recursive && m.under(Some(&p)).next().is_some() => {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{name}:{p} is a non-empty directory (use -r)"),
                ));
            }
            _ => {}
        }
        let version = self
            .commit_changes(
                &info,
                &m,
                vec![Change {
                    path: p.clone(),
                    entry: None,
                }],
            )
            .await?;
        Ok(Reply::Done(format!(
            "removed {name}:{p} (version {version})"
        )))
    }

    async fn cp(&self, name: &str, srcs: &[String], dst: &str, recursive: bool) -> OpResult<Reply> {
        if srcs.is_empty() {
            return Err(err(ErrorCode::Invalid, "nothing to copy"));
        }
        let info = self.verified_head(name).await?;
        let m = self.manifest_of(&info.head.commit).await?;
        let dst_path = user_path(Some(dst))?;
        let dst_is_dir = match &dst_path {
            None => true,
            Some(d) => m.get(d).is_some_and(|e| e.is_dir()) || dst.ends_with('/') || srcs.len() > 1,
        };
        let mut changes = Vec::new();
        for s in srcs {
            let sp = user_path(Some(s))?
                .ok_or_else(|| err(ErrorCode::Invalid, "cannot copy the volume root"))?;
            let e = m
                .get(&sp)
                .ok_or_else(|| err(ErrorCode::NotFound, format!("no such path: {name}:{sp}")))?;
            let leaf = VolPath::new(sp.file_name()).map_err(failed)?;
            let to = match (&dst_path, dst_is_dir) {
                (Some(d), true) => d.join(&leaf),
                (None, _) => leaf,
                (Some(d), false) => d.clone(),
            };
            if to == sp || to.is_under(&sp) {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("cannot copy {sp} into itself"),
                ));
            }
            if e.is_dir() && !recursive {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{name}:{sp} is a directory (use -r)"),
                ));
            }
            changes.push(Change {
                path: to.clone(),
                entry: Some(e.clone()),
            });
            for (p, e) in m.under(Some(&sp)) {
                let np = p.rebase(&sp, &to).expect("under the source");
                changes.push(Change {
                    path: np,
                    entry: Some(e.clone()),
                });
            }
        }
        let n = changes.len();
        let version = self.commit_changes(&info, &m, changes).await?;
        Ok(Reply::Done(format!(
            "copied {n} entr{} (version {version})",
            if n == 1 { "y" } else { "ies" }
        )))
    }

    async fn mount_volume(
        self: Arc<Self>,
        name: &str,
        path: &Path,
        background_commit_secs: Option<u64>,
        events: &Events,
    ) -> OpResult<Reply> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        if self.mount(name).is_ok() {
            return Err(err(
                ErrorCode::Exists,
                format!("volume {name:?} is already mounted here"),
            ));
        }
        if !path.is_absolute() {
            return Err(err(ErrorCode::Invalid, "mount path must be absolute"));
        }
        match std::fs::symlink_metadata(path) {
            Err(_) => {}
            Ok(md) if md.is_dir() && std::fs::read_dir(path).map_err(failed)?.next().is_none() => {
                std::fs::remove_dir(path).map_err(failed)?;
            }
            Ok(_) => {
                return Err(err(
                    ErrorCode::Exists,
                    format!(
                        "{} exists; mount on a new path or an empty directory",
                        path.display()
                    ),
                ));
            }
        }
        let info = self.verified_head(name).await?;
        let m = self.manifest_of(&info.head.commit).await?;
        let blobs: Vec<(Hash, u64)> = m.entries().values().filter_map(|e| e.blob()).collect();
        let fetched = self.fetch_blobs(&blobs, events).await?;
        let snap_name = format!(
            "v{}-{:08x}",
            info.head.commit.version,
            rand::random::<u32>()
        );
        let dir = self.mounts_dir(info.id);
        std::fs::create_dir_all(&dir).map_err(failed)?;
        let snap = dir.join(&snap_name);
        let store = self.store.clone();
        let (m2, snap2) = (m.clone(), snap.clone());
        let stats = tokio::task::spawn_blocking(move || {
            scan::build_snapshot(&snap2, &m2, &store, None, &HashSet::new())
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        let mhash = self.store.import_bytes(&m.encode()).map_err(failed)?;
        let rec = MountRecord {
            name: name.to_string(),
            id: info.id,
            path: path.to_path_buf(),
            version: info.head.commit.version,
            manifest: mhash,
            snapshot: snap_name,
            background_commit_secs,
            own: Vec::new(),
        };
        self.put_mount(&rec, &stats)?;
        switch_link(path, &snap)?;
        if let Some(secs) = background_commit_secs {
            let cancel = self.cancel.clone();
            tokio::spawn(background_commits(
                self.clone(),
                name.to_string(),
                secs,
                cancel,
            ));
        }
        Ok(Reply::Done(format!(
            "mounted {name} (version {}) at {}; {} bytes from the origin",
            rec.version,
            path.display(),
            fetched.from_origin
        )))
    }

    async fn commit(&self, name: &str, events: &Events) -> OpResult<CommitReport> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.commit_locked(name, events).await
    }

    async fn commit_locked(&self, name: &str, events: &Events) -> OpResult<CommitReport> {
        let start = Instant::now();
        let rec = self.mount(name)?;
        let base = self.read_manifest(rec.manifest).await?;
        let cache = self.stats(name)?;
        let snap = self.mounts_dir(rec.id).join(&rec.snapshot);
        let store = self.store.clone();
        let base2 = base.clone();
        events.progress("scan", 0, 0);
        let scanned = tokio::task::spawn_blocking(move || {
            scan::scan(&snap, &base2, &cache, ScanMode::Import(&store))
        })
        .await
        .map_err(failed)?
        .map_err(|e| err(ErrorCode::Invalid, format!("cannot commit: {e}")))?;
        let scan_seconds = start.elapsed().as_secs_f64();
        let changes = scan::changes(&base, &scanned.manifest);
        if changes.is_empty() {
            return Ok(CommitReport {
                volume: name.to_string(),
                version: rec.version,
                changed: 0,
                uploaded_bytes: 0,
                hashed_bytes: scanned.hashed_bytes,
                overwritten: Vec::new(),
                scan_seconds,
                upload_seconds: 0.0,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        let info = self.verified_head(name).await?;
        if info.id != rec.id {
            return Err(err(
                ErrorCode::NotFound,
                format!("volume {name:?} was deleted and created again"),
            ));
        }
        let blobs: Vec<(Hash, u64)> = changes
            .iter()
            .filter_map(|c| c.entry.as_ref().and_then(|e| e.blob()))
            .collect();
        let t_upload = Instant::now();
        let uploaded = self.upload_missing(&blobs, events).await?;
        let upload_seconds = t_upload.elapsed().as_secs_f64();
        let priors = changes.iter().map(|c| base.get(&c.path).cloned()).collect();
        let n = changes.len();
        let mut own: BTreeMap<VolPath, Option<Entry>> = rec
            .own
            .iter()
            .map(|c| (c.path.clone(), c.entry.clone()))
            .collect();
        own.extend(changes.iter().map(|c| (c.path.clone(), c.entry.clone())));
        let (head, overwritten) = self
            .send_commit(&info, rec.version, changes, priors)
            .await?;
        let local_hash = self
            .store
            .import_bytes(&scanned.manifest.encode())
            .map_err(failed)?;
        // Other writers' changes merged into the head are not in this snapshot yet: keep
        // the old version then, so the next reload brings them in.
        let version = if head.commit.manifest == local_hash {
            head.commit.version
        } else {
            rec.version
        };
        let new = MountRecord {
            version,
            manifest: local_hash,
            own: own
                .into_iter()
                .map(|(path, entry)| Change { path, entry })
                .collect(),
            ..rec
        };
        self.put_mount(&new, &scanned.stats)?;
        if !overwritten.is_empty() {
            warn!(volume = name, paths = ?overwritten, "this commit overwrote other writers' changes");
        }
        Ok(CommitReport {
            volume: name.to_string(),
            version: head.commit.version,
            changed: n,
            uploaded_bytes: uploaded,
            hashed_bytes: scanned.hashed_bytes,
            overwritten: overwritten.into_iter().map(|p| p.to_string()).collect(),
            scan_seconds,
            upload_seconds,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    async fn reload(
        &self,
        name: &str,
        mode: ReloadMode,
        events: &Events,
    ) -> OpResult<ReloadReport> {
        let start = Instant::now();
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let mut rec = self.mount(name)?;
        let from_version = rec.version;
        let mut info = self.verified_head(name).await?;
        if info.id != rec.id {
            return Err(err(
                ErrorCode::NotFound,
                format!("volume {name:?} was deleted and created again"),
            ));
        }
        let unchanged = |version: u64, committed: Option<CommitReport>| ReloadReport {
            volume: name.to_string(),
            from_version,
            version,
            changed: false,
            fetched_files_bytes: 0,
            sources: Sources::default(),
            committed,
            overwritten_by_others: Vec::new(),
            download_seconds: 0.0,
            build_seconds: 0.0,
            seconds: start.elapsed().as_secs_f64(),
        };
        if info.head.commit.version == rec.version {
            return Ok(unchanged(rec.version, None));
        }
        // Uncommitted changes?
        let mut base = self.read_manifest(rec.manifest).await?;
        let cache = self.stats(name)?;
        let old_snap = self.mounts_dir(rec.id).join(&rec.snapshot);
        let (b2, s2) = (base.clone(), old_snap.clone());
        let scanned =
            tokio::task::spawn_blocking(move || scan::scan(&s2, &b2, &cache, ScanMode::HashOnly))
                .await
                .map_err(failed)?
                .map_err(failed)?;
        let dirty = scan::changes(&base, &scanned.manifest);
        let mut committed = None;
        if !dirty.is_empty() {
            match mode {
                ReloadMode::Refuse => {
                    let some: Vec<String> =
                        dirty.iter().take(5).map(|c| c.path.to_string()).collect();
                    return Err(err(
                        ErrorCode::Dirty,
                        format!(
                            "{} has {} uncommitted change(s) ({}{}); commit them, or reload with --commit-first or --discard",
                            name,
                            dirty.len(),
                            some.join(", "),
                            if dirty.len() > 5 { ", …" } else { "" }
                        ),
                    ));
                }
                ReloadMode::CommitFirst => {
                    let c = self.commit_locked(name, events).await?;
                    rec = self.mount(name)?;
                    info = self.verified_head(name).await?;
                    if info.head.commit.version == rec.version {
                        return Ok(unchanged(rec.version, Some(c)));
                    }
                    base = self.read_manifest(rec.manifest).await?;
                    committed = Some(c);
                }
                ReloadMode::Discard => {}
            }
        }
        let dirty_paths: HashSet<VolPath> = if mode == ReloadMode::Discard {
            dirty.iter().map(|c| c.path.clone()).collect()
        } else {
            HashSet::new()
        };
        let new = self.manifest_of(&info.head.commit).await?;
        let reuse: HashSet<VolPath> = new
            .entries()
            .iter()
            .filter(|(p, e)| {
                matches!(e, Entry::File { .. })
                    && !dirty_paths.contains(*p)
                    && !p.ancestors().any(|a| dirty_paths.contains(&a))
                    && base.get(p).is_some_and(|b| b.same_content(e))
            })
            .map(|(p, _)| p.clone())
            .collect();
        let needed: Vec<(Hash, u64)> = new
            .entries()
            .iter()
            .filter(|(p, _)| !reuse.contains(*p))
            .filter_map(|(_, e)| e.blob())
            .collect();
        let fetched_files_bytes = needed.iter().map(|(_, s)| s).sum();
        let t_fetch = Instant::now();
        let stats = self.fetch_blobs(&needed, events).await?;
        let download_seconds = t_fetch.elapsed().as_secs_f64();
        let t_build = Instant::now();
        let snap_name = format!(
            "v{}-{:08x}",
            info.head.commit.version,
            rand::random::<u32>()
        );
        let snap = self.mounts_dir(rec.id).join(&snap_name);
        let store = self.store.clone();
        let (n2, sn2, old2) = (new.clone(), snap.clone(), old_snap.clone());
        let reuse2 = reuse.clone();
        events.progress("build", 0, 0);
        let new_stats = tokio::task::spawn_blocking(move || {
            scan::build_snapshot(&sn2, &n2, &store, Some(&old2), &reuse2)
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        let lost: Vec<String> = rec
            .own
            .iter()
            .filter(|c| match (&c.entry, new.get(&c.path)) {
                (Some(mine), Some(now)) => !mine.same_content(now),
                (None, None) => false,
                _ => true,
            })
            .map(|c| c.path.to_string())
            .collect();
        if !lost.is_empty() {
            warn!(volume = name, paths = ?lost, "changes committed here were overwritten by another writer");
        }
        let new_rec = MountRecord {
            version: info.head.commit.version,
            manifest: info.head.commit.manifest,
            snapshot: snap_name,
            own: Vec::new(),
            ..rec
        };
        self.put_mount(&new_rec, &new_stats)?;
        switch_link(&new_rec.path, &snap)?;
        // Removing the old snapshot changes the change time of the files the new one shares
        // with it: refresh their stats, or the next scan would rehash them all.
        let (old, snap2) = (old_snap.clone(), snap.clone());
        let fresh = tokio::task::spawn_blocking(move || {
            if let Err(e) = scan::remove_tree(&old) {
                warn!(path = %old.display(), "cannot remove the old snapshot: {e}");
            }
            scan::restat(&snap2, &reuse)
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        if !fresh.is_empty() {
            let mut stats = new_stats;
            stats.extend(fresh);
            self.put_mount(&new_rec, &stats)?;
        }
        let build_seconds = t_build.elapsed().as_secs_f64();
        let report = ReloadReport {
            volume: name.to_string(),
            from_version,
            version: new_rec.version,
            changed: true,
            fetched_files_bytes,
            sources: Sources {
                origin_bytes: stats.from_origin,
                peer_bytes: stats.peer_bytes(),
                local_bytes: stats.already_held,
                banned: stats.banned,
            },
            committed,
            overwritten_by_others: lost,
            download_seconds,
            build_seconds,
            seconds: start.elapsed().as_secs_f64(),
        };
        info!(
            volume = name,
            from = from_version,
            to = report.version,
            origin_bytes = report.sources.origin_bytes,
            peer_bytes = report.sources.peer_bytes,
            local_bytes = report.sources.local_bytes,
            seconds = report.seconds,
            "reloaded"
        );
        self.last_reload
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), report.clone());
        Ok(report)
    }
}

/// Providers of a blob from the tracker (nearest first, the origin last), never this node;
/// the origin alone if the tracker cannot be asked.
async fn lookup_providers(
    coord: &CoordClient,
    me: iroh::PublicKey,
    origin: &NodeAddr,
    hash: Hash,
) -> Vec<Provider> {
    let origin = || Provider {
        addr: origin.clone(),
        is_origin: true,
    };
    match coord.request(&CoordRequest::Lookup { hash }).await {
        Ok(CoordResponse::Providers(list)) => {
            let mut out: Vec<Provider> = list
                .into_iter()
                .filter_map(|p| {
                    let id = iroh::PublicKey::from_bytes(&p.id).ok()?;
                    (id != me).then_some(Provider {
                        addr: NodeAddr { id, addr: p.addr },
                        is_origin: p.origin,
                    })
                })
                .collect();
            if !out.iter().any(|p| p.is_origin) {
                out.push(origin());
            }
            out
        }
        _ => vec![origin()],
    }
}

fn user_path(p: Option<&str>) -> OpResult<Option<VolPath>> {
    match p {
        None => Ok(None),
        Some(s) if s.trim_matches('/').is_empty() || s == "." => Ok(None),
        Some(s) => VolPath::parse_user(s)
            .map(Some)
            .map_err(|e| err(ErrorCode::Invalid, e.to_string())),
    }
}

fn ls_entry(p: &VolPath, e: &Entry) -> LsEntry {
    let (kind, size, mode, mtime_ns, target) = match e {
        Entry::File {
            size,
            mode,
            mtime_ns,
            ..
        } => ("file", *size, *mode, *mtime_ns, None),
        Entry::Dir { mode } => ("dir", 0, *mode, 0, None),
        Entry::Symlink { target } => ("symlink", 0, 0o777, 0, Some(target.clone())),
    };
    LsEntry {
        path: p.to_string(),
        kind: kind.to_string(),
        size,
        mode,
        mtime_ns,
        target,
    }
}

/// Points `link` at `target` atomically (a new symlink renamed over the old one).
fn switch_link(link: &Path, target: &Path) -> OpResult<()> {
    let tmp = link.with_file_name(format!(
        ".{}.voltool-{:08x}",
        link.file_name().and_then(|n| n.to_str()).unwrap_or("mount"),
        rand::random::<u32>()
    ));
    std::os::unix::fs::symlink(target, &tmp)
        .and_then(|_| std::fs::rename(&tmp, link))
        .map_err(|e| failed(format!("cannot switch {}: {e}", link.display())))
}

/// Writes fetched entries to local paths (for `get`): files through a temporary name and a
/// rename; never through an existing symlink.
fn write_out(store: &Store, items: &[(PathBuf, Entry)]) -> OpResult<()> {
    use std::os::unix::fs::PermissionsExt;
    for (p, e) in items {
        let io = |e: std::io::Error| failed(format!("{}: {e}", p.display()));
        match e {
            Entry::Dir { .. } => match std::fs::symlink_metadata(p) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(err(
                        ErrorCode::Exists,
                        format!("{} exists and is not a directory", p.display()),
                    ));
                }
                Err(_) => std::fs::create_dir(p).map_err(io)?,
            },
            Entry::Symlink { target } => {
                let _ = std::fs::remove_file(p);
                std::os::unix::fs::symlink(target, p).map_err(io)?;
            }
            Entry::File { hash, mode, .. } => {
                let tmp = p.with_file_name(format!(
                    ".{}.voltool-{:08x}",
                    p.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
                    rand::random::<u32>()
                ));
                if *hash == Hash::EMPTY {
                    std::fs::File::create(&tmp).map_err(io)?;
                } else {
                    std::fs::copy(store.data_path(hash), &tmp).map_err(io)?;
                }
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
                    .map_err(io)?;
                std::fs::rename(&tmp, p).map_err(io)?;
            }
        }
    }
    Ok(())
}
