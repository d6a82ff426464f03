//! The swarm driver: one actor per download runs the sans-IO [`Engine`] and does its I/O.
//!
//! The actor owns the engine, an inbox of fetches, a `JoinSet` of I/O tasks (lookups,
//! requests, subscriptions, announcements, records) and one `select!` over them and the
//! engine's timeout. It turns the engine's actions into I/O and what the I/O brings into
//! events; every choice of what to ask of whom, and when, is the engine's. Verification
//! is the driver's: a piece is verified against the blob's bao tree as it is written, a
//! small blob against its hash, and the engine hears only "verified" or "not".
//!
//! One download serves one operation (a reload, a mount, a `get`), a fetch at a time or
//! several: bans last for the whole download, across blobs and fetches.
//!
//! The actor's loop is in `actor`, its actions become I/O tasks in `act` and `request`,
//! and `record` makes what arrives durable and ends groups and fetches.

use std::collections::HashSet;
use std::time::Instant;

use bao_tree::ChunkRanges;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinSet};
use tracing::debug;
use voltool_protocol::blobs::{piece_ranges, pieces_held};
use voltool_protocol::coord::{CoordRequest, MAX_LOOKUP_ALL};
use voltool_protocol::swarm::{
    Action, Ask, Blobs, Config, Engine, Event, Failure, GroupId, NodeId, Outcome, ProviderInfo,
    ReqId,
};

use super::tracker::TrackerClient;
use super::*;

mod act;
mod actor;
mod priority;
mod record;
mod request;
use priority::Standing;
pub use priority::{Arbiter, Rank};
use record::{Record, Writer};
use request::{Ask2, RequestTask};

/// Verified bytes of a large blob written before their ranges are synced and recorded.
pub const RECORD_BATCH_BYTES: u64 = 64 << 20;
/// Longest time verified bytes wait to be synced and recorded: a crash loses at most this
/// much of a download.
pub const RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// What a download needs of its node.
#[derive(Clone, Debug)]
pub struct SwarmCtx {
    /// Connections to providers.
    pub pool: ConnPool,
    /// Where fetched blobs go.
    pub store: Store,
    /// The tracker.
    pub tracker: Arc<TrackerClient>,
    /// The origin, always a provider of last resort.
    pub origin: NodeAddr,
    /// This node.
    pub me: EndpointId,
    /// The swarm's knobs.
    pub cfg: Config,
    /// Fetch from the origin only (the baseline of the fan-out bench).
    pub origin_only: bool,
    /// This node's provider side: told of each piece verified, for its subscribers.
    pub serving: Arc<Serving>,
    /// Where bytes received and bans are counted.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The node's downloads by priority (see [`Rank`]).
    pub arbiter: Arbiter,
}

/// A download: fetches blobs into the store from the swarm. See the [module docs](self).
#[derive(Debug)]
pub struct Download {
    ctx: SwarmCtx,
    inbox: mpsc::UnboundedSender<Msg>,
    rank: Rank,
}

/// What the actor's inbox brings.
enum Msg {
    Fetch(Job),
    /// A reader waits for these pieces of a large blob being fetched; the answer says
    /// whether a fetch of this download wants the blob now.
    Want {
        hash: Hash,
        units: PieceSet,
        found: oneshot::Sender<bool>,
    },
}

/// One fetch handed to the actor.
struct Job {
    groups: Vec<Blobs>,
    /// Large blobs begun (freed when the local disk fills up).
    large: Vec<Hash>,
    has_small: bool,
    counter: OnBytes,
    reply: oneshot::Sender<Result<FetchStats, FetchError>>,
}

impl Download {
    /// Starts a download's actor; it ends when the download is dropped and its fetches
    /// are through.
    pub fn start(ctx: SwarmCtx) -> Self {
        Self::ranked(ctx, Rank::foreground())
    }

    /// Starts a download of the priority `rank` says (see [`Rank`]).
    pub fn ranked(ctx: SwarmCtx, rank: Rank) -> Self {
        let (inbox, rx) = mpsc::unbounded_channel();
        let actor = Actor::new(ctx.clone(), &rank);
        tokio::spawn(actor.run(rx));
        Download { ctx, inbox, rank }
    }

    /// Its priority, which may be raised.
    pub fn rank(&self) -> &Rank {
        &self.rank
    }

    /// Fetches blobs not held completely: small ones whole, many to a request, the others
    /// in pieces from several providers at once, peers first and the origin for what no
    /// peer holds. Everything is durable and recorded when this returns `Ok`; on failure,
    /// what was verified is kept (a retry resumes) unless the local disk is full.
    pub async fn fetch(
        &self,
        blobs: &[(Hash, u64)],
        counter: &OnBytes,
    ) -> Result<FetchStats, FetchError> {
        let mut seen = HashSet::new();
        let wanted: Vec<(Hash, u64)> = blobs
            .iter()
            .filter(|(h, _)| seen.insert(*h))
            .copied()
            .collect();
        let (store, cfg) = (self.ctx.store.clone(), self.ctx.cfg.clone());
        let plan = tokio::task::spawn_blocking(move || plan(&store, &cfg, wanted))
            .await
            .map_err(|e| FetchError::Net(NetError::stream(e)))?
            .map_err(FetchError::Store)?;
        counter(plan.already_held);
        if let Some(m) = &self.ctx.metrics {
            m.received(crate::metrics::Source::Local, plan.already_held);
        }
        let mut stats = FetchStats {
            already_held: plan.already_held,
            ..FetchStats::default()
        };
        if plan.groups.is_empty() {
            return Ok(stats);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            groups: plan.groups,
            large: plan.large,
            has_small: plan.has_small,
            counter: counter.clone(),
            reply,
        };
        let gone = || FetchError::Net(NetError::stream("the download stopped"));
        self.inbox.send(Msg::Fetch(job)).map_err(|_| gone())?;
        stats.merge(&answer.await.map_err(|_| gone())??);
        Ok(stats)
    }
}

impl Download {
    /// A reader waits for pieces `units` of the large blob `hash`, which a fetch of this
    /// download is fetching: they go before every other piece (see [`Engine::want_now`]).
    /// `false` (and nothing done) when no fetch of this download wants the blob now.
    pub async fn want_now(&self, hash: Hash, units: PieceSet) -> bool {
        let (found, answer) = oneshot::channel();
        if self.inbox.send(Msg::Want { hash, units, found }).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// What a fetch asks of the engine, and what is held already.
struct Plan {
    groups: Vec<Blobs>,
    large: Vec<Hash>,
    has_small: bool,
    already_held: u64,
}

/// Sorts blobs into held, small (in batches) and large (begun in the store, resuming from
/// what is held of them).
fn plan(store: &Store, cfg: &Config, wanted: Vec<(Hash, u64)>) -> Result<Plan, StoreError> {
    let hashes: Vec<Hash> = wanted.iter().map(|(h, _)| *h).collect();
    let held = store.has_complete_many(&hashes)?;
    let mut p = Plan {
        groups: Vec::new(),
        large: Vec::new(),
        has_small: false,
        already_held: 0,
    };
    let small_max = cfg.small_max.min(MAX_GET_MANY_SIZE);
    let mut small = Vec::new();
    for ((hash, size), held) in wanted.into_iter().zip(held) {
        if held {
            p.already_held += size;
        } else if size <= small_max {
            small.push((hash, size));
        } else {
            let meta = store.begin_partial(&hash, size)?;
            if meta.is_complete() {
                p.already_held += size;
                continue;
            }
            let ranges = meta.ranges();
            p.already_held += ranges.bytes(size);
            p.large.push(hash);
            p.groups.push(Blobs::Pieces {
                hash,
                size,
                held: pieces_held(size, cfg.piece_bytes, &ranges),
            });
        }
    }
    let per_batch = cfg
        .small_batch_count
        .clamp(1, MAX_GET_MANY.min(MAX_LOOKUP_ALL));
    for b in batches(&small, per_batch, cfg.small_batch_bytes) {
        p.has_small = true;
        p.groups.push(Blobs::Whole { blobs: b.to_vec() });
    }
    Ok(p)
}

/// What an I/O task reports while it runs.
enum Io {
    /// A provider chose the unit of a pick.
    Picked { req: ReqId, unit: u32 },
    /// A unit arrived, verified (and written) or not.
    Unit {
        req: ReqId,
        group: GroupId,
        unit: u32,
        provider: NodeId,
        verified: bool,
    },
    /// A holder holds these units.
    Have {
        provider: NodeId,
        group: GroupId,
        units: PieceSet,
    },
}

/// How an I/O task ended.
enum Done {
    Lookup {
        group: GroupId,
        found: Result<Vec<voltool_protocol::coord::ProviderInfo>, String>,
    },
    Answer {
        req: ReqId,
        group: GroupId,
        outcome: Outcome,
        /// The local store's failure, for [`Outcome::LocalStore`].
        local: Option<StoreError>,
        /// What went wrong, and whether bytes failed verification.
        why: Option<(bool, String)>,
    },
    Recorded {
        group: GroupId,
        /// The bytes of the verified ranges this record made durable.
        bytes: u64,
        result: Result<(), StoreError>,
    },
    /// A fetch is through; its answer went out.
    Replied,
    Quiet,
}

struct GroupState {
    job: u64,
    record: Option<Record>,
    finished: bool,
    /// For messages: the blob (a batch's first) and the blobs in it.
    first: Hash,
    count: usize,
    /// The last request's failure, for the message if the group fails.
    why: Option<(bool, String)>,
    /// The last lookup's failure, while the tracker has not answered since.
    lookup_failed: Option<String>,
}

struct JobState {
    open: usize,
    counter: OnBytes,
    stats: FetchStats,
    failure: Option<FetchError>,
    large: Vec<Hash>,
    writer: Option<Writer>,
    reply: oneshot::Sender<Result<FetchStats, FetchError>>,
}

struct Actor {
    ctx: SwarmCtx,
    engine: Engine,
    groups: Vec<GroupState>,
    jobs: HashMap<u64, JobState>,
    next_job: u64,
    /// Where providers are, and whether each is the origin.
    addrs: HashMap<NodeId, (NodeAddr, bool)>,
    /// Requests in flight: their tasks and groups.
    reqs: HashMap<ReqId, AbortHandle>,
    subs: HashMap<(NodeId, GroupId), AbortHandle>,
    tasks: JoinSet<Done>,
    io_tx: mpsc::UnboundedSender<Io>,
    io_rx: mpsc::UnboundedReceiver<Io>,
    record_due: Option<Instant>,
    /// Bans already told to a fetch's answer.
    bans_told: usize,
    /// The local store's failure that failed a group.
    local: Option<StoreError>,
    /// Its priority among the node's downloads.
    standing: Standing,
}

impl Actor {
    fn new(ctx: SwarmCtx, rank: &Rank) -> Self {
        let (io_tx, io_rx) = mpsc::unbounded_channel();
        let me = NodeId(*ctx.me.as_bytes());
        let mut addrs = HashMap::new();
        addrs.insert(
            NodeId(*ctx.origin.id.as_bytes()),
            (ctx.origin.clone(), true),
        );
        Actor {
            standing: Standing::new(ctx.arbiter.clone(), rank),
            engine: Engine::new(ctx.cfg.clone(), me, rand::random()),
            ctx,
            groups: Vec::new(),
            jobs: HashMap::new(),
            next_job: 0,
            addrs,
            reqs: HashMap::new(),
            subs: HashMap::new(),
            tasks: JoinSet::new(),
            io_tx,
            io_rx,
            record_due: None,
            bans_told: 0,
            local: None,
        }
    }
}

/// A peer's name in reports: its node id.
fn peer_name(id: NodeId) -> String {
    iroh::PublicKey::from_bytes(&id.0).map_or_else(|_| hex::encode(id.0), |k| k.to_string())
}
