//! The coordinator role: volume registry, signed heads, commits (per-path last writer
//! wins), the tracker, and the origin blob store, behind `voltool/coord/8` and
//! `voltool/blobs/4`. Its durable state sits behind [`meta::Meta`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::{Endpoint, EndpointId, SecretKey};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use voltool_protocol::coord::{
    self, CoordRequest, CoordResponse, ErrorKind, MAX_HAS, MAX_REQUEST, VolumeInfo,
};
use voltool_protocol::tree::{self, Shape};
use voltool_protocol::volume::check_volume_name;
use voltool_protocol::{Commit, Hash, Manifest, SignedHead, VolumeId, blobs};

use voltool_agent::metrics::{Metrics, observe};
use voltool_agent::net::{self, NetError, NodeAddr};
use voltool_agent::rate::{Rate, TokenBucket};
use voltool_agent::store::{Store, StoreError};

/// File in the data directory holding `NODE_ID@IP:PORT` once the coordinator listens.
pub const ADDR_FILE: &str = "coordinator.addr";

/// Coordinator options.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    /// Data directory (key, database, origin blobs).
    pub data: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Node ids allowed in the fleet; `None` admits any node (a warning is logged).
    pub members: Option<HashSet<EndpointId>>,
    /// Node ids that may write (they are members too); `None`: every member may.
    pub writers: Option<HashSet<EndpointId>>,
    /// Egress limit of the origin (bytes/s).
    pub max_egress: Option<Rate>,
    /// The QUIC congestion controller.
    pub congestion: voltool_agent::net::Congestion,
    /// The swarm's knobs (the tracker's, and the origin's as a provider).
    pub swarm: voltool_protocol::swarm::Config,
    /// What the origin keeps.
    pub retention: Retention,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
    /// Keep the origin's blobs in this S3-compatible bucket rather than under `data`
    /// (which keeps the metadata either way).
    pub s3: Option<voltool_agent::store::S3Options>,
    /// Longest time a commit may take to send its change set: it holds the lock every
    /// commit takes meanwhile (default [`COMMIT_DEADLINE`]).
    pub commit_deadline: std::time::Duration,
    /// Where the volumes, heads and version records are.
    pub meta: MetaOptions,
    /// The key that signs heads, a file every coordinator of the fleet holds (`None`: this
    /// coordinator's own `node.key`, which then also names it on the network).
    pub fleet_key: Option<PathBuf>,
    /// Fault injection for tests (none by default).
    pub hooks: Hooks,
}

/// Points where a test stops the coordinator (fault injection); none by default.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called (blocking, on the blocking pool) when a commit has signed its new head and is
    /// about to move the head: a test pauses the leader here.
    pub before_head_moves: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Called (blocking) when a collection has condemned a chunk of blobs and is about to
    /// delete their objects.
    pub before_gc_deletes: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("before_head_moves", &self.before_head_moves.is_some())
            .field("before_gc_deletes", &self.before_gc_deletes.is_some())
            .finish()
    }
}

impl CoordinatorOptions {
    /// Options with every default: the data directory `data`, 127.0.0.1 on a free port, no
    /// members list (any node may join), no limits, state in redb, the node key signing.
    pub fn new(data: PathBuf) -> Self {
        CoordinatorOptions {
            data,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            members: None,
            writers: None,
            max_egress: None,
            congestion: Default::default(),
            swarm: Default::default(),
            retention: Retention::default(),
            metrics: None,
            s3: None,
            commit_deadline: COMMIT_DEADLINE,
            meta: MetaOptions::Redb,
            fleet_key: None,
            hooks: Hooks::default(),
        }
    }
}

/// Where a coordinator keeps the fleet's state.
#[derive(Clone, Debug, Default)]
pub enum MetaOptions {
    /// A redb file in the data directory: one coordinator.
    #[default]
    Redb,
    /// An etcd cluster, shared by the fleet's coordinators, of which one leads at a time
    /// (with the origin on S3, shared as well).
    Etcd {
        /// The members and the fleet's prefix.
        url: meta::EtcdUrl,
        /// TLS with a client certificate (`None`: plain connections, `--open`).
        tls: Option<meta::EtcdTls>,
        /// The lead's lease: a leader that stops renewing it loses the lead this long after.
        lease_ttl: std::time::Duration,
    },
}

/// The lease of the lead by default.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a commit may take to send its change set by default.
pub const COMMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// A coordinator failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// Key trouble.
    #[error(transparent)]
    Key(#[from] voltool_agent::keys::KeyError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Trouble with the coordinator's state.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A garbage collection failed.
    #[error("garbage collection: {0}")]
    Gc(String),
    /// Options that cannot work together.
    #[error("{0}")]
    Config(String),
    /// Transport trouble.
    #[error(transparent)]
    Net(#[from] NetError),
    /// File trouble.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    state: Arc<State>,
    /// The lead, for a coordinator on etcd.
    leadership: Option<leader::Leadership>,
    ep: Endpoint,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics_addr: Option<SocketAddr>,
}

struct State {
    /// Signs heads: the fleet key, or the node key.
    key: SecretKey,
    /// Volumes, heads, version records, the links index, distrusted providers.
    meta: Arc<dyn Meta>,
    origin: Store,
    /// The manifest pages in the origin store.
    pages: voltool_agent::store::Pages,
    roster: members::Roster,
    /// Wakes the followers' watches when a head is signed.
    heads_moved: follow::HeadsMoved,
    serve: voltool_agent::blobs::ServeOptions,
    /// Where the origin serves blobs (handed out as the last provider).
    addr: NodeAddr,
    /// Who holds what (in memory: agents announce again when a heartbeat's answer says
    /// the tracker does not know them).
    tracker: std::sync::Mutex<Tracker>,
    /// The tracker's epoch: new at each start.
    epoch: u64,
    /// The swarm's knobs (the tracker's, and the origin's as a provider).
    swarm: voltool_protocol::swarm::Config,
    /// Serialises commits, registry changes and garbage collections.
    write_lock: tokio::sync::Mutex<()>,
    /// What the origin keeps.
    retention: Retention,
    /// Blobs uploaded or found held lately (kept for the commits about to name them).
    recent: std::sync::Mutex<gc::Recent>,
    /// Starts a collection now.
    gc_now: tokio::sync::Notify,
    /// See [`CoordinatorOptions::commit_deadline`].
    commit_deadline: std::time::Duration,
    hooks: Hooks,
    /// The lead's lease and its revision, on etcd.
    lease: Option<(leader::Lease, i64)>,
    /// Blobs condemned and not cleared (on etcd; see [`condemned`]).
    marks: condemned::Marks,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl State {
    /// Records blobs the origin now holds (uploaded, or pages written) in the fleet's
    /// records, where coordinators share them; nothing to do where the origin's store alone
    /// keeps them. Blocking.
    fn record_held(&self, blobs: &[(Hash, u64)]) -> Result<(), Fail> {
        match self.meta.blob_records() {
            Some(r) => r.record_blobs(blobs).map_err(volumes::meta_fail),
            None => Ok(()),
        }
    }

    /// Writes manifest pages into the origin, durable and recorded; the caller holds the
    /// write lock. Blocking.
    fn put_pages(&self, pages: &[(tree::PageRef, Vec<u8>)]) -> Result<(), Fail> {
        let held = self.write_pages(pages)?;
        self.record_held(&held)
    }

    /// Writes manifest pages into the origin, durable, and returns the records the fleet's
    /// records still need (a commit writes them with its head); the caller holds the write
    /// lock. Blocking.
    fn write_pages(&self, pages: &[(tree::PageRef, Vec<u8>)]) -> Result<Vec<(Hash, u64)>, Fail> {
        let hashes: Vec<Hash> = pages.iter().map(|(r, _)| r.hash).collect();
        self.unmark_for_write(&hashes)?;
        self.pages.put_now(pages).map_err(volumes::internal)?;
        Ok(pages.iter().map(|(r, _)| (r.hash, r.size)).collect())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A refused or failed request, sent back as [`CoordResponse::Error`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Fail {
    kind: ErrorKind,
    message: String,
}

impl From<Fail> for CoordResponse {
    fn from(f: Fail) -> Self {
        CoordResponse::Error {
            kind: f.kind,
            message: f.message,
        }
    }
}

fn fail(kind: ErrorKind, message: impl Into<String>) -> Fail {
    Fail {
        kind,
        message: message.into(),
    }
}

/// The file in the origin's folder naming where its blob bytes are (`dir`, or the
/// bucket's `s3://…` address): records made for one place mean nothing for another.
const ORIGIN_FILE: &str = "where";

/// Opens the origin store, refusing one whose blobs were kept elsewhere.
fn open_origin(
    dir: &Path,
    s3: Option<&voltool_agent::store::S3Options>,
) -> Result<Store, CoordinatorError> {
    let want = s3.map_or_else(|| "dir".to_string(), |o| o.url());
    let file = dir.join(ORIGIN_FILE);
    let io = |source| CoordinatorError::Io {
        path: file.display().to_string(),
        source,
    };
    let was = match std::fs::read_to_string(&file) {
        Ok(was) => Some(was.trim().to_string()),
        // A store made before this file existed kept its blobs in the folder.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            dir.join("store.redb").exists().then(|| "dir".to_string())
        }
        Err(e) => return Err(io(e)),
    };
    if let Some(was) = was.filter(|w| *w != want) {
        let name = |w: &str| {
            if w == "dir" {
                format!(
                    "the folder {}",
                    dir.join(voltool_agent::store::BLOBS_DIR).display()
                )
            } else {
                w.to_string()
            }
        };
        return Err(io(std::io::Error::other(format!(
            "this data directory's origin keeps its blobs in {}, not {}: start it with the same origin, or with a fresh data directory",
            name(&was),
            name(&want)
        ))));
    }
    let store = Store::open_with(dir, s3)?;
    if !file.exists() {
        std::fs::write(&file, format!("{want}\n")).map_err(io)?;
    }
    Ok(store)
}

impl Coordinator {
    /// Opens the data directory, binds, writes [`ADDR_FILE`] and starts serving.
    pub async fn start(opts: CoordinatorOptions) -> Result<Self, CoordinatorError> {
        // The coordinator's alone: its node key, database, origin blobs.
        voltool_agent::keys::check_data_dir(&opts.data, 0o700)?;
        let node_key = voltool_agent::keys::load_or_create(&opts.data)?;
        let key = match &opts.fleet_key {
            Some(f) => voltool_agent::keys::load(f)?,
            None => node_key.clone(),
        };
        if matches!(opts.meta, MetaOptions::Etcd { .. }) && opts.s3.is_none() {
            return Err(CoordinatorError::Config(
                "coordinators on etcd share the fleet's origin: give --origin s3://BUCKET/PREFIX (an origin in a directory is one host's)".into(),
            ));
        }
        let origin = open_origin(&opts.data.join("origin"), opts.s3.as_ref())?;
        // The prefix belongs to whoever signs heads: the fleet, when its coordinators share
        // a fleet key.
        origin.claim(&key.public().to_string())?;
        let (meta, etcd): (Arc<dyn Meta>, Option<Arc<meta::EtcdMeta>>) = match &opts.meta {
            MetaOptions::Redb => (
                Arc::new(RedbMeta::open(&opts.data.join("coordinator.redb"))?),
                None,
            ),
            MetaOptions::Etcd { url, tls, .. } => {
                let (url, tls) = (url.clone(), tls.clone());
                let m = tokio::task::spawn_blocking(move || {
                    meta::EtcdMeta::connect(&url, tls.as_ref())
                })
                .await
                .map_err(|e| CoordinatorError::Meta(MetaError::Engine(e.to_string())))??;
                let m = Arc::new(m);
                (m.clone(), Some(m))
            }
        };
        if opts.members.is_none() {
            warn!("no members list: any node that can reach this coordinator may join the fleet");
        }
        let ep = net::bind(
            node_key.clone(),
            opts.listen,
            vec![coord::ALPN.to_vec(), blobs::ALPN.to_vec()],
            opts.congestion,
        )
        .await?;
        let addr = NodeAddr {
            id: ep.id(),
            addr: net::local_addr(&ep),
        };
        let leadership = match (&etcd, &opts.meta) {
            (Some(m), MetaOptions::Etcd { lease_ttl, .. }) => {
                info!(%addr, meta = %m.url(), "campaigning for the lead");
                // Until it leads, it refuses connections: a client that lists every
                // coordinator of the fleet moves on to the next at once.
                let refusing = tokio::spawn(refuse_all(ep.clone()));
                let won = leader::campaign(m.clone(), *lease_ttl, addr.to_string()).await;
                refusing.abort();
                Some(won?)
            }
            _ => None,
        };
        let mut marks = std::collections::HashMap::new();
        if let Some(m) = &etcd {
            // The origin store's records become the fleet's: what other leaders uploaded is
            // served and counted here, what they freed is no longer claimed; and what their
            // collections condemned is known.
            let (m, o) = (m.clone(), origin.clone());
            let (added, dropped, condemned) = tokio::task::spawn_blocking(move || {
                let fleet = m.all_blobs()?;
                let (added, dropped) = o.sync_records(&fleet)?;
                Ok::<_, CoordinatorError>((added, dropped, m.condemned()?))
            })
            .await
            .map_err(|e| CoordinatorError::Meta(MetaError::Engine(e.to_string())))??;
            info!(
                added,
                dropped,
                condemned = condemned.len(),
                "the origin's records are the fleet's"
            );
            marks.extend(condemned);
        }
        let addr_file = opts.data.join(ADDR_FILE);
        let tmp = addr_file.with_extension("tmp");
        std::fs::write(&tmp, format!("{addr}\n"))
            .and_then(|_| std::fs::rename(&tmp, &addr_file))
            .map_err(|source| CoordinatorError::Io {
                path: addr_file.display().to_string(),
                source,
            })?;
        info!(%addr, meta = meta.engine(), "coordinator listening");
        let swarm = opts.swarm.clone();
        let metrics = Metrics::new(true);
        let mut tracker = Tracker::new(swarm.clone(), rand::random());
        tracker::restore_distrust(meta.as_ref(), &mut tracker)?;
        let state = Arc::new(State {
            key,
            meta,
            pages: voltool_agent::store::Pages::new(origin.clone()),
            origin,
            roster: members::Roster::new(Membership {
                members: opts.members,
                writers: opts.writers,
            }),
            heads_moved: Default::default(),
            serve: voltool_agent::blobs::ServeOptions::new(
                opts.max_egress.map(|r| Arc::new(TokenBucket::new(r))),
                false,
                swarm.clone(),
            )
            .with_metrics(metrics.clone()),
            addr: addr.clone(),
            tracker: std::sync::Mutex::new(tracker),
            epoch: rand::random(),
            swarm,
            write_lock: Default::default(),
            retention: opts.retention,
            recent: std::sync::Mutex::new(gc::Recent::new()),
            gc_now: tokio::sync::Notify::new(),
            commit_deadline: opts.commit_deadline,
            hooks: opts.hooks.clone(),
            lease: leadership
                .as_ref()
                .zip(etcd.as_ref())
                .map(|(l, m)| (l.lease.clone(), m.fence_revision())),
            marks: std::sync::Mutex::new(marks),
            metrics,
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(ep.clone(), state.clone(), cancel.clone()));
        tokio::spawn(tracker::expire_loop(state.clone(), cancel.clone()));
        tokio::spawn(gc::gc_loop(state.clone(), cancel.clone()));
        let metrics_addr = match opts.metrics {
            Some(addr) => {
                // Weak: the metrics belong to the state, which must drop when it stops.
                let st = Arc::downgrade(&state);
                state.metrics.on_scrape(Box::new(move |m| {
                    let Some(st) = st.upgrade() else {
                        return;
                    };
                    m.read_store(&st.origin);
                    let entries = st.tracker.lock().expect("not poisoned").entries();
                    m.tracker_entries.set(entries as i64);
                }));
                let served =
                    voltool_agent::metrics::serve(addr, state.metrics.clone(), cancel.clone())
                        .await;
                let served = served.map_err(|e| CoordinatorError::Io {
                    path: e.addr.to_string(),
                    source: e.source,
                })?;
                info!(addr = %served, "metrics at /metrics");
                Some(served)
            }
            None => None,
        };
        if let Some(l) = &leadership {
            // A coordinator that no longer leads stops serving at once: no new request is
            // taken, those in flight answer (a write is refused by its fence), and then
            // every connection closes, so its clients move on to the next coordinator.
            let (lost, cancel) = (l.lost.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = lost.cancelled() => {
                        warn!("no longer leading: stopped serving");
                        cancel.cancel();
                    }
                    _ = cancel.cancelled() => {}
                }
            });
        }
        Ok(Coordinator {
            state,
            leadership,
            ep,
            cancel,
            task,
            metrics_addr,
        })
    }

    /// Where the coordinator listens.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr {
            id: self.ep.id(),
            addr: net::local_addr(&self.ep),
        }
    }

    /// Where Prometheus metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The origin store (tests corrupt it on purpose).
    pub fn origin(&self) -> &Store {
        &self.state.origin
    }

    /// Replaces the fleet's members and writers: refused at once, and pushed to the agents
    /// that watch them (their peers stop serving a removed node).
    pub fn set_membership(&self, m: Membership) {
        info!(
            members = m.members.as_ref().map(|s| s.len()),
            writers = m.writers.as_ref().map(|s| s.len()),
            "fleet membership replaced"
        );
        self.state.roster.set(m);
    }

    /// Collects the origin's garbage now (it also runs every [`Retention::interval`]).
    pub async fn collect_garbage(&self) -> Result<GcStats, CoordinatorError> {
        gc::run(&self.state)
            .await
            .map_err(|f| CoordinatorError::Gc(f.message))
    }

    /// Waits until this coordinator no longer leads (on etcd: its lease ended or went
    /// unrenewed); never returns for a coordinator on redb.
    pub async fn lead_lost(&self) {
        match &self.leadership {
            Some(l) => l.lost.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Stops serving and closes the endpoint; on etcd, steps down so that another
    /// coordinator leads at once.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if let Some(l) = self.leadership {
            l.step_down().await;
        }
        self.ep.close().await;
        let _ = self.task.await;
    }
}

/// Refuses every connection (a coordinator that does not lead serves nobody).
async fn refuse_all(ep: Endpoint) {
    while let Some(incoming) = ep.accept().await {
        incoming.refuse();
    }
}

async fn accept_loop(ep: Endpoint, state: Arc<State>, cancel: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            i = ep.accept() => match i { Some(i) => i, None => return },
        };
        let (state, cancel) = (state.clone(), cancel.clone());
        tokio::spawn(async move {
            let conn = match incoming.accept() {
                Ok(a) => match a.await {
                    Ok(c) => c,
                    Err(e) => return debug!("handshake failed: {e}"),
                },
                Err(e) => return debug!("accept failed: {e}"),
            };
            let peer = conn.remote_id();
            if !state.is_member(&peer) {
                warn!(peer = %peer.fmt_short(), "refused a node that is not a fleet member");
                conn.close(coord::CLOSE_NOT_MEMBER.into(), b"not a fleet member");
                return;
            }
            match conn.alpn() {
                a if a == coord::ALPN => serve_coord(conn, state, cancel).await,
                a if a == blobs::ALPN => {
                    let st = state.clone();
                    let allow: voltool_agent::blobs::Allow = Arc::new(move |id| st.is_member(id));
                    voltool_agent::blobs::serve(
                        conn,
                        state.origin.clone(),
                        allow,
                        state.serve.clone(),
                    )
                    .await
                }
                _ => conn.close(2u32.into(), b"unknown protocol"),
            }
        });
    }
}

async fn serve_coord(conn: Connection, state: Arc<State>, cancel: CancellationToken) {
    let peer = conn.remote_id();
    // Its further streams wait unread, in its connection's receive window.
    let permits = Arc::new(tokio::sync::Semaphore::new(coord::REQUESTS_PER_MEMBER));
    // Requests in flight other than watches (which last as long as the connection), until
    // their answers are received: a count, never a limit (the permits above are that).
    let busy = Arc::new(tokio::sync::Semaphore::new(BUSY_COUNT as usize));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (send, recv) = tokio::select! {
            _ = cancel.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (state, busy) = (state.clone(), busy.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_request(send, recv, state, peer, permit, busy).await {
                debug!(peer = %peer.fmt_short(), "coordinator request failed: {e}");
            }
        });
    }
    // Stopped serving (the lead lost, or a shutdown): the requests in flight answer first,
    // within a commit's deadline.
    let _ = tokio::time::timeout(state.commit_deadline, busy.acquire_many(BUSY_COUNT)).await;
    conn.close(0u32.into(), b"this coordinator stopped serving");
}

/// Requests one connection may have in flight, counted (far past the permits that bound
/// them).
const BUSY_COUNT: u32 = 1 << 20;

/// Serves one request; `permit` is the member's, held until the answer is sent.
async fn serve_request(
    mut send: SendStream,
    mut recv: RecvStream,
    state: Arc<State>,
    peer: EndpointId,
    permit: tokio::sync::OwnedSemaphorePermit,
    busy: Arc<tokio::sync::Semaphore>,
) -> Result<(), NetError> {
    let req: CoordRequest = net::read_frame(&mut recv, MAX_REQUEST).await?;
    let _busy = match req {
        CoordRequest::WatchMembers | CoordRequest::WatchHeads { .. } => None,
        _ => busy.acquire_owned().await.ok(),
    };
    // Checked at every request: a node removed from the fleet is refused at once.
    if let Err(refused) = state.admit(&peer, &req) {
        net::write_frame(&mut send, &CoordResponse::from(refused)).await?;
        send.finish().map_err(NetError::stream)?;
        return Ok(());
    }
    let resp = match req {
        CoordRequest::WatchMembers => return members::watch(&mut send, &state, &peer).await,
        CoordRequest::WatchHeads { volumes } => {
            return follow::watch(&mut send, &state, volumes).await;
        }
        CoordRequest::Upload { blobs } => upload(&state, &mut recv, blobs).await,
        CoordRequest::Commit {
            name,
            volume,
            base_version,
        } => {
            let _guard = state.write_lock.lock().await;
            let started = std::time::Instant::now();
            let r = commit::commit(&state, &mut recv, name, volume, base_version, peer).await;
            if matches!(r, Ok(CoordResponse::Committed { .. })) {
                state.heads_moved.moved();
                state.metrics.commits.inc();
                observe(&state.metrics.commit_seconds, started.elapsed());
            }
            r.unwrap_or_else(Into::into)
        }
        other => {
            let state = state.clone();
            let _guard = if matches!(
                other,
                CoordRequest::CreateVolume { .. }
                    | CoordRequest::RenameVolume { .. }
                    | CoordRequest::DeleteVolume { .. }
            ) {
                Some(state.write_lock.lock().await)
            } else {
                None
            };
            let st = state.clone();
            tokio::task::spawn_blocking(move || handle(&st, other, peer))
                .await
                .unwrap_or_else(|e| fail(ErrorKind::Internal, e.to_string()).into())
        }
    };
    net::write_frame(&mut send, &resp).await?;
    send.finish().map_err(NetError::stream)?;
    drop(permit);
    // The request counts as in flight until its answer is received (bounded): a
    // connection closed as this coordinator stops serving must not drop an answer.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
    Ok(())
}

fn handle(state: &State, req: CoordRequest, peer: EndpointId) -> CoordResponse {
    let r = match req {
        CoordRequest::CreateVolume { name } => create(state, &name),
        CoordRequest::ListVolumes => list(state),
        CoordRequest::RenameVolume { from, to } => rename(state, &from, &to),
        CoordRequest::DeleteVolume { name } => delete(state, &name),
        CoordRequest::GetHead { name } => info(state, &name).map(CoordResponse::Volume),
        CoordRequest::GetVersions { name, from } => volumes::versions(state, &name, from),
        CoordRequest::HasBlobs { hashes } => {
            if hashes.len() > MAX_HAS {
                return fail(ErrorKind::Invalid, "too many hashes in one request").into();
            }
            let held = state
                .origin
                .has_complete_many(&hashes)
                .map_err(|e| fail(ErrorKind::Internal, e.to_string()));
            // A blob found held is kept a while for the commit that will name it (only a
            // writer's: a reader cannot keep garbage alive by asking).
            if let Ok(held) = &held
                && state.roster.get().may_write(&peer)
            {
                let found = hashes.iter().zip(held).filter(|(_, h)| **h);
                let mut recent = state.recent.lock().expect("not poisoned");
                recent.touch(found.map(|(h, _)| *h));
            }
            held.map(CoordResponse::Has)
        }
        CoordRequest::Announce {
            addr,
            zone,
            blobs,
            complete,
        } => {
            if let Err(f) = check_zone(zone.as_deref()) {
                return f.into();
            }
            if blobs.len() > MAX_HAS {
                return fail(ErrorKind::Invalid, "too many blobs in one announcement").into();
            }
            // Only blobs the origin holds (uploaded, or named by a kept version) enter the
            // tracker: random hashes cost nothing here.
            let known = match state.origin.has_complete_many(&blobs) {
                Ok(k) => k,
                Err(e) => return fail(ErrorKind::Internal, e.to_string()).into(),
            };
            let blobs: Vec<Hash> = blobs
                .into_iter()
                .zip(known)
                .filter_map(|(h, k)| k.then_some(h))
                .collect();
            let mut t = state.tracker.lock().expect("not poisoned");
            let now = std::time::Instant::now();
            let left_out = t.announce(now, node_id(&peer), addr, zone, &blobs, complete);
            if left_out > 0 {
                warn!(peer = %peer.fmt_short(), left_out, "tracker: a member announced more blobs than it may enter");
            }
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Heartbeat { addr, zone } => {
            if let Err(f) = check_zone(zone.as_deref()) {
                return f.into();
            }
            let mut t = state.tracker.lock().expect("not poisoned");
            let now = std::time::Instant::now();
            let id = node_id(&peer);
            let known = t.knows(&id);
            t.announce(now, id, addr, zone, &[], false);
            Ok(CoordResponse::Tracked {
                epoch: state.epoch,
                known,
            })
        }
        CoordRequest::Withdraw { blobs } if blobs.len() > MAX_HAS => {
            Err(fail(ErrorKind::Invalid, "too many blobs in one withdrawal"))
        }
        CoordRequest::Withdraw { blobs } => {
            let mut t = state.tracker.lock().expect("not poisoned");
            if blobs.is_empty() {
                t.forget(&node_id(&peer));
            } else {
                t.withdraw(&node_id(&peer), &blobs);
            }
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Report { provider, hash } => {
            let liar = voltool_protocol::swarm::NodeId(provider);
            tracker::report(state, &node_id(&peer), liar, &hash);
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Rtts { rtts } => {
            if rtts.len() > coord::MAX_RTTS {
                return fail(
                    ErrorKind::Invalid,
                    format!(
                        "{} round-trip times; at most {}",
                        rtts.len(),
                        coord::MAX_RTTS
                    ),
                )
                .into();
            }
            let mine: Vec<(voltool_protocol::swarm::NodeId, u32)> = rtts
                .iter()
                .map(|r| (voltool_protocol::swarm::NodeId(r.id), r.micros))
                .collect();
            let mut t = state.tracker.lock().expect("not poisoned");
            t.rtts(&node_id(&peer), &mine);
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Lookup { hash } => Ok(CoordResponse::Providers(lookup(state, &peer, &hash))),
        CoordRequest::LookupAll { hashes } => {
            if hashes.len() > coord::MAX_LOOKUP_ALL {
                return fail(ErrorKind::Invalid, "too many hashes in one lookup").into();
            }
            Ok(CoordResponse::Providers(lookup_all(state, &peer, &hashes)))
        }
        CoordRequest::Members => Ok(CoordResponse::Members(state.member_ids())),
        CoordRequest::Upload { .. } | CoordRequest::Commit { .. } => {
            Err(fail(ErrorKind::Invalid, "request out of place"))
        }
        _ => Err(fail(ErrorKind::Invalid, "unknown request")),
    };
    r.unwrap_or_else(Into::into)
}

/// Refuses a zone label longer than [`coord::MAX_ZONE`] bytes: every lookup answer that
/// names its member carries it.
fn check_zone(zone: Option<&str>) -> Result<(), Fail> {
    match zone {
        Some(z) if z.len() > coord::MAX_ZONE => Err(fail(
            ErrorKind::Invalid,
            format!(
                "a zone label of {} bytes; at most {}",
                z.len(),
                coord::MAX_ZONE
            ),
        )),
        _ => Ok(()),
    }
}

/// Reads the members file: one node id per line, `#` comments.
pub fn read_members(path: &Path) -> Result<HashSet<EndpointId>, CoordinatorError> {
    let text = std::fs::read_to_string(path).map_err(|source| CoordinatorError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let id = line.parse().map_err(|_| CoordinatorError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(format!("line {}: not a node id: {line:?}", i + 1)),
        })?;
        out.insert(id);
    }
    Ok(out)
}

mod commit;
mod condemned;
mod follow;
mod gc;
mod leader;
mod links;
mod members;
pub mod meta;
mod tracker;
mod upload;
mod volumes;

pub use gc::{GcStats, Retention};
pub use members::Membership;
use meta::{BlobRecords, Meta, MetaError, RedbMeta, VolumeRecord};
use tracker::{Tracker, lookup, lookup_all, node_id};
use upload::upload;
use volumes::*;
