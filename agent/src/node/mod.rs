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
use voltool_protocol::coord::{CoordRequest, CoordResponse, ErrorKind, MAX_HAS, VolumeInfo};
use voltool_protocol::volume::check_volume_name;
use voltool_protocol::{
    Change, Commit, Entry, Hash, Manifest, SignedHead, VolPath, VolumeId, blobs,
};

use crate::blobs::{ConnPool, FetchError, FetchStats, TrackerClient};
use crate::control::{
    self, CommitReport, ErrorCode, ErrorReply, Event, LsEntry, MountStatus, ReloadMode,
    ReloadReport, Reply, Request, Sources, StatusReport, VolumeView,
};
use crate::coord_client::{ClientError, CoordClient};
use crate::metrics::{Metrics, observe};
use crate::net::{self, NodeAddr};
use crate::rate::{Rate, TokenBucket};
use crate::scan::{self, ScanMode, StatCache};
use crate::store::Store;
use voltool_protocol::tree::{self, Delta, PageRef, Shape};

mod access;
mod background;
mod commit;
mod compact;
mod error;
mod events;
mod evict;
mod export;
mod fetch;
mod follow;
mod lazy;
mod local;
mod mount;
mod mount_point;
mod mounts;
mod peers;
mod prepare;
mod registry;
mod reload;
mod remote;
mod seal;
mod snapshot;
mod socket;
mod status;
mod trash;
mod unmount;
mod upload;
mod volume;

pub use access::{ADMIN_SOCKET, Caller};
use background::{background_commits, budget_loop, tracked_loop};
pub use compact::COMPACT_AT;
pub use error::OpError;
use error::{OpResult, db_err, err, failed, scan_err};
pub use events::Events;
pub use evict::StoreBudget;
use fetch::local_root;
use local::{Local, Take};
use mount_point::{MountPoint, ParentId};
use mounts::{MAX_OWN, MOUNTS, MountRecord, STATS};
use peers::peer_loop;
use remote::SEEN;
use socket::{bind_socket, control_loop};

/// What a client sends after its request (an upload's bytes).
pub(super) type Input = tokio::net::unix::OwnedReadHalf;
pub use mount_point::NOT_MOUNTED;
pub use snapshot::{MAX_LAYERS, SnapshotMode};

/// Agent options.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Data directory: key, store, database, snapshots, control socket.
    pub data: PathBuf,
    /// The fleet's coordinators, tried in turn (one leads at a time; a fleet of one
    /// coordinator lists it alone). Never empty.
    pub coordinators: Vec<NodeAddr>,
    /// The id of the key that signs the fleet's heads, which the agent trusts (the fleet
    /// key of coordinators in failover); `None`: the first coordinator's own id.
    pub fleet_key: Option<iroh::PublicKey>,
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
    /// How snapshots are made: overlays where possible (the default), or copies.
    pub snapshots: SnapshotMode,
    /// Fault injection for crash tests: the agent kills itself (SIGKILL) when an operation
    /// reaches the point of this name (see [`CRASH_POINTS`]).
    pub crash_at: Option<String>,
    /// The QUIC congestion controller.
    pub congestion: crate::net::Congestion,
    /// The swarm's knobs (a downloader's and a provider's).
    pub swarm: voltool_protocol::swarm::Config,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
    /// How much the store may hold; `None`: no limit (nothing is evicted).
    pub store_max: Option<StoreBudget>,
    /// The group whose members may open the control socket (`agent.sock`, mode 0660);
    /// `None`: root alone (0600).
    pub socket_group: Option<u32>,
    /// The group whose members may open the admin socket (`admin.sock`): they may also
    /// create, delete and rename volumes, rm and cp; `None`: root alone.
    pub admin_group: Option<u32>,
    /// Where the control sockets live (e.g. `/run/voltool`), made 0755 if missing: the
    /// users who may talk to the agent reach them there without entering the data
    /// directory. One agent a directory (`agent.lock`).
    pub run_dir: PathBuf,
    /// Volumes the host follows from the start (as `voltool follow` would make it).
    pub follow: Vec<String>,
}

impl AgentOptions {
    /// The id whose signature on heads the agent trusts.
    pub fn signer(&self) -> iroh::PublicKey {
        self.fleet_key.unwrap_or_else(|| self.coordinators[0].id)
    }

    /// Whether `id` is one of the fleet's coordinators.
    pub fn is_coordinator(&self, id: &iroh::PublicKey) -> bool {
        self.coordinators.iter().any(|c| c.id == *id)
    }
}

/// Where [`AgentOptions::crash_at`] can stop the agent: a batched commit once its files are
/// linked into the store but before the switch to a fresh upper, once its files are in the
/// store, once uploaded, once the coordinator took it; a reload once its blobs are fetched, once the new snapshot is built, once it is
/// recorded but before the mount's link is switched.
pub const CRASH_POINTS: &[&str] = &[
    "commit-sealing",
    "commit-stored",
    "commit-uploaded",
    "commit-sent",
    "reload-fetched",
    "reload-built",
    "reload-recorded",
];

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    inner: Arc<Inner>,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    metrics_addr: Option<SocketAddr>,
    /// Held locked while the agent serves its run directory.
    _run_lock: std::fs::File,
}

struct Inner {
    opts: AgentOptions,
    store: Store,
    /// The store's manifest pages.
    pages: crate::store::Pages,
    db: Database,
    /// The swarm side: this node's endpoint, its connections, what it serves.
    peers: peers::Peers,
    /// The coordinator link.
    remote: remote::Remote,
    /// What the agent keeps of its mounts besides their records.
    mounted: mounts::Mounted,
    /// Where followed volumes' downloads stand.
    following: follow::Following,
    /// Cancelled when the agent stops; background loops end with it.
    cancel: CancellationToken,
    /// The kind of snapshots mounts are made of.
    snapshots: Arc<dyn snapshot::Snapshots>,
    metrics: Arc<Metrics>,
    /// The disk budget.
    budget: evict::Budget,
    /// Lazy mounts' data layer and fills.
    lazies: lazy::Lazies,
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

impl Agent {
    /// Opens the data directory, binds, recovers mounts and starts serving the control
    /// socket and peers.
    pub async fn start(opts: AgentOptions) -> Result<Self, StartError> {
        let other = |e: &dyn std::fmt::Display| StartError::Other(e.to_string());
        if opts.coordinators.is_empty() {
            return Err(other(&"no coordinator given"));
        }
        if let Some(z) = opts.zone.as_deref()
            && z.len() > voltool_protocol::coord::MAX_ZONE
        {
            return Err(other(&format!(
                "a zone label of {} bytes; at most {}",
                z.len(),
                voltool_protocol::coord::MAX_ZONE
            )));
        }
        // The agent's own: nobody else may write it (made 0700; see below for copy mode).
        crate::keys::check_data_dir(&opts.data, 0o700)?;
        crate::keys::check_data_dir(&opts.run_dir, 0o755)?;
        let run_lock = socket::claim_run_dir(&opts.run_dir).map_err(|e| other(&e))?;
        // One spelling of every path under it: mounts are found by comparing paths.
        let mut opts = opts;
        opts.data = std::fs::canonicalize(&opts.data).map_err(|e| other(&e))?;
        let key: SecretKey = crate::keys::load_or_create(&opts.data)?;
        // Layers made before the store's blob folder was renamed redirect into the old one.
        let has_mounts =
            std::fs::read_dir(opts.data.join("mounts")).is_ok_and(|mut d| d.next().is_some());
        if has_mounts
            && opts
                .data
                .join("store")
                .join(crate::store::OLD_BLOBS_DIR)
                .is_dir()
        {
            return Err(other(&format!(
                "{} holds mounts made by an older voltool (their files point into store/{}): unmount them with that version, or move the data directory away to start afresh",
                opts.data.display(),
                crate::store::OLD_BLOBS_DIR
            )));
        }
        let store = Store::open(&opts.data.join("store"))?;
        let db_file = opts.data.join("agent.redb");
        let db = crate::store::open_db(&db_file).map_err(|e| other(&e))?;
        // Mount records of version 1 name manifests of the old, flat encoding; those of
        // version 2 have no read-only flag.
        crate::store::refuse_old_tables(
            &db,
            &db_file,
            &["mounts-1", "stats-1", "mounts-2", "stats-2"],
        )
        .map_err(|e| other(&e))?;
        mounts::migrate_mounts(&db).map_err(|e| other(&e))?;
        {
            let w = db.begin_write().map_err(|e| other(&e))?;
            w.open_table(MOUNTS).map_err(|e| other(&e))?;
            w.open_table(STATS).map_err(|e| other(&e))?;
            w.open_table(SEEN).map_err(|e| other(&e))?;
            w.open_table(follow::FOLLOWS).map_err(|e| other(&e))?;
            w.commit().map_err(|e| other(&e))?;
        }
        let pages = crate::store::Pages::new(store.clone());
        let snapshots = snapshot::resolve(&opts.data, opts.snapshots, &store, &pages)
            .map_err(StartError::Other)?;
        let ep = net::bind(
            key,
            opts.listen,
            vec![blobs::ALPN.to_vec()],
            opts.congestion,
        )
        .await?;
        let coord = Arc::new(CoordClient::with_addrs(
            ep.clone(),
            opts.coordinators.clone(),
        ));
        let pool = ConnPool::new(
            ep.clone(),
            opts.max_ingress.map(|r| Arc::new(TokenBucket::new(r))),
        );
        let tracker = Arc::new(TrackerClient::new(
            coord.clone(),
            pool.clone(),
            net::local_addr(&ep),
            opts.zone.clone(),
        ));
        let metrics = Metrics::new(false);
        let inner = Arc::new(Inner {
            peers: peers::Peers {
                pool,
                serve: crate::blobs::ServeOptions::new(
                    opts.max_egress.map(|r| Arc::new(TokenBucket::new(r))),
                    opts.corrupt_served_bytes,
                    opts.swarm.clone(),
                )
                .with_metrics(metrics.clone()),
                ep,
                arbiter: Default::default(),
            },
            metrics,
            mounted: Default::default(),
            following: Default::default(),
            remote: remote::Remote {
                coord,
                tracker,
                members: Default::default(),
            },
            opts,
            pages,
            store,
            db,
            cancel: CancellationToken::new(),
            snapshots,
            budget: Default::default(),
            lazies: Default::default(),
        });
        let _ = inner.lazies.me.set(Arc::downgrade(&inner));
        inner
            .snapshots
            .start(&inner.opts.data)
            .map_err(StartError::Other)?;
        inner.recover().await.map_err(|e| other(&e))?;
        inner.revive_fills().await.map_err(|e| other(&e))?;
        let mode = inner.snapshots.data_mode();
        std::fs::set_permissions(
            &inner.opts.data,
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .map_err(|e| other(&format!("{}: {e}", inner.opts.data.display())))?;
        let cancel = inner.cancel.clone();
        let mut tasks = tokio::task::JoinSet::new();
        for (file, group, admin) in [
            (control::SOCKET, inner.opts.socket_group, false),
            (ADMIN_SOCKET, inner.opts.admin_group, true),
        ] {
            let listener =
                bind_socket(&inner.opts.run_dir.join(file), group).map_err(|e| other(&e))?;
            tasks.spawn(control_loop(inner.clone(), listener, admin, cancel.clone()));
        }
        tasks.spawn(peer_loop(inner.clone(), cancel.clone()));
        tasks.spawn(remote::watch_members(inner.clone(), cancel.clone()));
        tasks.spawn(budget_loop(inner.clone(), cancel.clone()));
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
        tasks.spawn(tracked_loop(inner.clone(), cancel.clone()));
        tasks.spawn(follow::follow_loop(inner.clone(), cancel.clone()));
        if !inner.opts.follow.is_empty() {
            tasks.spawn(follow::follow_configured(inner.clone(), cancel.clone()));
        }
        tasks.spawn(inner.peers.serve.serving.clone().run_pushes(cancel.clone()));
        let metrics_addr = match inner.opts.metrics {
            Some(addr) => {
                // Weak: the metrics belong to the agent, which must drop when it stops.
                let i = Arc::downgrade(&inner);
                inner.metrics.on_scrape(Box::new(move |m| {
                    let Some(i) = i.upgrade() else {
                        return;
                    };
                    m.read_store(&i.store);
                    if let Some(n) = i.peers.pool.open_count() {
                        m.active_peers.set(n as i64);
                    }
                }));
                let served = crate::metrics::serve(addr, inner.metrics.clone(), cancel.clone())
                    .await
                    .map_err(|e| other(&e))?;
                info!(addr = %served, "metrics at /metrics");
                Some(served)
            }
            None => None,
        };
        info!(
            node = %inner.peers.ep.id(),
            addr = %net::local_addr(&inner.peers.ep),
            coordinator = %inner.remote.coord.addr(),
            "agent running"
        );
        Ok(Agent {
            inner,
            cancel,
            tasks,
            metrics_addr,
            _run_lock: run_lock,
        })
    }

    /// Where Prometheus metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// This node's address.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr {
            id: self.inner.peers.ep.id(),
            addr: net::local_addr(&self.inner.peers.ep),
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

    /// Runs one request as if root sent it over the control socket.
    pub async fn request(&self, req: Request, events: Events) -> Result<Reply, ErrorReply> {
        self.inner
            .clone()
            .run_op(req, Caller::ROOT, events, None)
            .await
    }

    /// Runs one request as if `caller` sent it over the control socket.
    pub async fn request_as(
        &self,
        req: Request,
        caller: Caller,
        events: Events,
    ) -> Result<Reply, ErrorReply> {
        self.inner.clone().run_op(req, caller, events, None).await
    }

    /// Keeps the store within its budget now (it is also kept after every operation and
    /// every minute): waits for operations in progress, evicts if over the high watermark.
    pub async fn enforce_store_budget(&self) -> Result<(), ErrorReply> {
        self.inner.enforce_budget(true).await
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
        self.inner.remote.tracker.withdraw(Vec::new()).await;
        let _ = std::fs::remove_file(self.inner.opts.data.join(control::SOCKET));
        let _ = std::fs::remove_file(self.inner.opts.data.join(ADMIN_SOCKET));
        self.inner.peers.ep.close().await;
    }
}

impl Inner {
    /// Fault injection: dies here, as `kill -9` would, if told to.
    pub(super) fn crash_point(&self, name: &str) {
        if self.opts.crash_at.as_deref() == Some(name) {
            warn!("fault injection: killing the agent at {name}");
            let me = rustix::process::getpid();
            let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
        }
    }
}

impl Inner {
    /// Runs an operation with the operations gate held (see [`evict`]), then lets the
    /// store's budget be checked.
    async fn run_op(
        self: Arc<Self>,
        req: Request,
        caller: Caller,
        events: Events,
        input: Option<Input>,
    ) -> Result<Reply, ErrorReply> {
        self.authorize(&req, &caller)?;
        let r = {
            // Not status: it is answered even while an eviction runs.
            let _op = match req {
                Request::Status => None,
                _ => Some(self.budget.ops.read().await),
            };
            self.clone().handle(req, caller, events, input).await
        };
        self.budget.check.notify_one();
        r
    }

    pub(super) async fn handle(
        self: Arc<Self>,
        req: Request,
        caller: Caller,
        events: Events,
        input: Option<Input>,
    ) -> Result<Reply, ErrorReply> {
        match req {
            Request::Status => self.status().await.map(Reply::Status),
            Request::VolumeLs {
                name,
                path,
                recursive,
            } => {
                let all = self.ls(&name, path.as_deref(), recursive).await?;
                events.listing(all).await.map(Reply::Ls)
            }
            Request::VolumeGet { name, remote } => self.get(&name, &remote, &events).await,
            Request::VolumeRead { name, path } => self.read(&name, &path, &events).await,
            Request::VolumeUpload {
                name,
                entries,
                force,
            } => {
                let input = input.ok_or_else(|| {
                    err(
                        ErrorCode::Invalid,
                        "an upload's bytes come over the control socket",
                    )
                })?;
                self.upload(&name, entries, force, input, &events).await
            }
            Request::VolumeExport { name, remote } => self.export(&name, &remote, &events).await,
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
            Request::Mount {
                name,
                path,
                background_commit_secs,
                read_only,
                follow,
                lazy,
            } => {
                let how = mount::How {
                    background_commit_secs,
                    read_only,
                    follow,
                    owner: caller.uid,
                    lazy,
                };
                self.clone().mount_volume(&name, &path, how, &events).await
            }
            Request::Unmount { name, mode } => {
                let name = self.caller_mount(name, &caller, false)?;
                self.unmount(&name, mode, &events).await
            }
            Request::Commit { name } => {
                let name = self.caller_mount(name, &caller, true)?;
                let started = Instant::now();
                let r = self
                    .commit_and_follow(&name, &events)
                    .await
                    .map(Reply::Committed);
                if r.is_ok() {
                    self.metrics.commits.inc();
                    observe(&self.metrics.commit_seconds, started.elapsed());
                }
                self.compact_later(name);
                r
            }
            Request::Reload { name, mode, lazy } => {
                let name = self.caller_mount(name, &caller, true)?;
                let started = Instant::now();
                let r = self
                    .reload(&name, mode, lazy, &events)
                    .await
                    .map(Reply::Reloaded);
                if r.is_ok() {
                    self.metrics.reloads.inc();
                    observe(&self.metrics.reload_seconds, started.elapsed());
                }
                self.compact_later(name);
                r
            }
            Request::Follow { name, on } => self.follow_volume(&name, on).await,
            Request::Prefetch { name, version } => self.prefetch(&name, version, &events).await,
            other => self.registry(other).await,
        }
    }

    pub(super) fn which_mount(&self, name: Option<String>) -> OpResult<String> {
        if let Some(n) = name {
            return Ok(n);
        }
        let mounts = self.mounts()?;
        match mounts.as_slice() {
            [one] => Ok(one.name.clone()),
            [] => Err(err(ErrorCode::NotMounted, "no volume is mounted here")),
            _ => Err(err(
                ErrorCode::Invalid,
                "several volumes are mounted here: name one",
            )),
        }
    }
}
