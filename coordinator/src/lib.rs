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
    /// In failover, the address file says this coordinator leads: it goes when it stops.
    addr_file: Option<PathBuf>,
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
        let alpns = vec![coord::ALPN.to_vec(), blobs::ALPN.to_vec()];
        let ep = net::bind(
            node_key.clone(),
            opts.listen,
            alpns.clone(),
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
                // The address file says this coordinator leads: one left by a run that
                // was killed no longer does.
                let _ = std::fs::remove_file(opts.data.join(ADDR_FILE));
                // Until it leads, it answers as a standby: a client learns at the handshake
                // that this one does not lead, and which one does.
                ep.set_alpns(vec![coord::STANDBY_ALPN.to_vec()]);
                let standby = tokio::spawn(answer_standby(
                    ep.clone(),
                    Membership {
                        members: opts.members.clone(),
                        writers: opts.writers.clone(),
                    },
                    m.clone(),
                ));
                let won = leader::campaign(m.clone(), *lease_ttl, addr.to_string()).await;
                standby.abort();
                ep.set_alpns(alpns.clone());
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
            addr_file: leadership.is_some().then_some(addr_file),
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
        if let Some(f) = &self.addr_file {
            let _ = std::fs::remove_file(f);
        }
        self.ep.close().await;
        let _ = self.task.await;
    }
}

mod commit;
mod condemned;
mod follow;
mod gc;
mod leader;
mod links;
mod members;
pub mod meta;
mod migrate;
mod options;
mod serve;
mod tracker;
mod upload;
mod volumes;

pub use gc::{GcStats, Retention};
pub use members::{Membership, read_members};
use meta::{BlobRecords, Meta, MetaError, RedbMeta, VolumeRecord};
pub use migrate::{Migrated, migrate_to_etcd};
pub use options::{ADDR_FILE, COMMIT_DEADLINE, CoordinatorOptions, Hooks, MetaOptions};
use serve::{accept_loop, answer_standby};
use tracker::{Tracker, lookup, lookup_all, node_id};
use upload::upload;
use volumes::*;
