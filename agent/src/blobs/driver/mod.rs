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

mod request;
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
}

/// A download: fetches blobs into the store from the swarm. See the [module docs](self).
#[derive(Debug)]
pub struct Download {
    ctx: SwarmCtx,
    inbox: mpsc::UnboundedSender<Job>,
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
        let (inbox, rx) = mpsc::unbounded_channel();
        let actor = Actor::new(ctx.clone());
        tokio::spawn(actor.run(rx));
        Download { ctx, inbox }
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
        self.inbox.send(job).map_err(|_| gone())?;
        stats.merge(&answer.await.map_err(|_| gone())??);
        Ok(stats)
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
        result: Result<(), StoreError>,
    },
    /// A fetch is through; its answer went out.
    Replied,
    Quiet,
}

/// The recording of a large blob's verified ranges.
#[derive(Default)]
struct Record {
    pending: ChunkRanges,
    bytes: u64,
    in_flight: usize,
    /// Every piece arrived: the group is through once the last record is.
    done: bool,
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

/// Small blobs of a fetch go into one store batch, written on the blocking pool and made
/// durable together when the fetch is through.
struct Writer {
    tx: mpsc::Sender<(Hash, Vec<u8>)>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

impl Writer {
    fn start(store: &Store) -> Self {
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
}

impl Actor {
    fn new(ctx: SwarmCtx) -> Self {
        let (io_tx, io_rx) = mpsc::unbounded_channel();
        let me = NodeId(*ctx.me.as_bytes());
        let mut addrs = HashMap::new();
        addrs.insert(
            NodeId(*ctx.origin.id.as_bytes()),
            (ctx.origin.clone(), true),
        );
        Actor {
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

    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Job>) {
        let mut open = true;
        loop {
            while let Some(a) = self.engine.poll_action(Instant::now()) {
                self.act(a);
            }
            if !open && self.jobs.is_empty() {
                break;
            }
            let wake = match (self.engine.poll_timeout(), self.record_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                biased;
                Some(io) = self.io_rx.recv() => self.on_io(io),
                Some(done) = self.tasks.join_next() => match done {
                    Ok(done) => self.on_done(done),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => warn!("a download task failed: {e}"),
                },
                job = inbox.recv(), if open => match job {
                    Some(job) => self.want(job),
                    None => open = false,
                },
                _ = sleep_until(wake), if wake.is_some() => self.on_wake(),
            }
        }
        // What waits to be announced goes now; requests and subscriptions end with the
        // download; announcements and records on the way are let finish (bounded).
        let s = self.engine.stats();
        debug!(
            from_origin = s.from_origin,
            from_peers = s.from_peers,
            duplicate_bytes = s.duplicate_bytes,
            requests = s.requests,
            busy = s.busy,
            timeouts = s.timeouts,
            lookups = s.lookups,
            bans = s.banned.len(),
            "download over"
        );
        self.engine.announce_now();
        while let Some(a) = self.engine.poll_action(Instant::now()) {
            self.act(a);
        }
        let reqs = self.reqs.drain().map(|(_, t)| t);
        for task in reqs.chain(self.subs.drain().map(|(_, t)| t)) {
            task.abort();
        }
        let rest = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), rest)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }

    fn want(&mut self, job: Job) {
        let id = self.next_job;
        self.next_job += 1;
        for spec in job.groups {
            let (pieces, first, count) = match &spec {
                Blobs::Pieces { hash, .. } => (true, *hash, 1),
                Blobs::Whole { blobs } => (false, blobs[0].0, blobs.len()),
            };
            let gid = self.engine.want(spec);
            debug_assert_eq!(gid.0 as usize, self.groups.len());
            self.groups.push(GroupState {
                job: id,
                record: pieces.then(Record::default),
                finished: false,
                first,
                count,
                why: None,
            });
        }
        let open = self.groups.iter().filter(|g| g.job == id).count();
        self.jobs.insert(
            id,
            JobState {
                open,
                counter: job.counter,
                stats: FetchStats::default(),
                failure: None,
                large: job.large,
                writer: job.has_small.then(|| Writer::start(&self.ctx.store)),
                reply: job.reply,
            },
        );
    }

    fn on_wake(&mut self) {
        let now = Instant::now();
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        if self.record_due.is_some_and(|t| t <= now) {
            self.record_due = None;
            for g in 0..self.groups.len() {
                self.record(GroupId(g as u32));
            }
        }
    }

    /// Carries out one action of the engine.
    fn act(&mut self, a: Action) {
        match a {
            Action::Lookup { group } => {
                let req = match self.engine.spec(group) {
                    Blobs::Pieces { hash, .. } => CoordRequest::Lookup { hash: *hash },
                    Blobs::Whole { .. } => CoordRequest::LookupAll {
                        hashes: self
                            .engine
                            .lacking(group)
                            .into_iter()
                            .map(|(h, _)| h)
                            .collect(),
                    },
                };
                let tracker = self.ctx.tracker.clone();
                self.tasks.spawn(async move {
                    let found = tracker.providers(&req).await;
                    Done::Lookup { group, found }
                });
            }
            Action::Request {
                req,
                provider,
                group,
                ask,
                rank,
            } => self.request(req, provider, group, ask, rank),
            Action::Cancel { req } => {
                if let Some(task) = self.reqs.remove(&req) {
                    task.abort();
                }
            }
            Action::Subscribe { provider, group } => {
                let Some((addr, _)) = self.addrs.get(&provider).cloned() else {
                    return;
                };
                let Blobs::Pieces { hash, size, .. } = *self.engine.spec(group) else {
                    return;
                };
                let (pool, io) = (self.ctx.pool.clone(), self.io_tx.clone());
                let piece_bytes = self.ctx.cfg.piece_bytes;
                let task = self.tasks.spawn(async move {
                    let Ok(conn) = pool.get(&addr).await else {
                        return Done::Quiet;
                    };
                    let pushed = |units| {
                        let _ = io.send(Io::Have {
                            provider,
                            group,
                            units,
                        });
                    };
                    if let Err(e) = subscribe(&conn, hash, size, piece_bytes, pushed).await {
                        debug!(provider = ?provider, "subscription ended: {e}");
                    }
                    Done::Quiet
                });
                self.subs.insert((provider, group), task);
            }
            Action::Unsubscribe { provider, group } => {
                if let Some(task) = self.subs.remove(&(provider, group)) {
                    task.abort();
                }
            }
            Action::Announce { blobs, complete } => {
                let tracker = self.ctx.tracker.clone();
                self.tasks.spawn(async move {
                    tracker.announce(blobs, complete).await;
                    Done::Quiet
                });
            }
            Action::Report { provider } => {
                warn!(provider = ?provider, "banned for this download: it sent bytes that fail verification");
                let tracker = self.ctx.tracker.clone();
                self.tasks.spawn(async move {
                    tracker.report(provider).await;
                    Done::Quiet
                });
            }
            Action::Done { group } => self.through(group, true),
            Action::Failed { group, reason } => {
                // What was verified stays (a retry resumes), but for a full local disk.
                let keep = !matches!(reason, Failure::LocalStore);
                let e = self.failure(group, reason);
                // The engine ends no subscription of a failed group: its pushes stop here.
                self.subs.retain(|&(_, g), task| {
                    if g == group {
                        task.abort();
                    }
                    g != group
                });
                let job = self.groups[group.0 as usize].job;
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.failure.get_or_insert(e);
                }
                self.through(group, keep);
            }
        }
    }

    /// A group is done or failed: through once what it verified is recorded (or, with
    /// `keep` false, dropped) and no record of it is on the way.
    fn through(&mut self, group: GroupId, keep: bool) {
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

    /// Why a group failed, naming it.
    fn failure(&mut self, group: GroupId, reason: Failure) -> FetchError {
        let g = &mut self.groups[group.0 as usize];
        let what = if g.count == 1 {
            format!("blob {}", g.first.short())
        } else {
            format!(
                "a batch of {} small blobs, e.g. {}",
                g.count,
                g.first.short()
            )
        };
        match (reason, g.why.take()) {
            (Failure::LocalStore, _) => FetchError::Store(
                self.local
                    .take()
                    .unwrap_or(StoreError::Db("the local store failed".into())),
            ),
            // Every provider left sent bytes that fail verification (or refused to send
            // a copy that fails its own check).
            (other, Some((true, last))) => FetchError::Corrupt(format!("{last}; {other} ({what})")),
            (other, Some((false, last))) => {
                FetchError::NoProvider(format!("{other} ({what}); the last one: {last}"))
            }
            (other, None) => FetchError::NoProvider(format!("{other} ({what})")),
        }
    }

    fn request(&mut self, req: ReqId, provider: NodeId, group: GroupId, ask: Ask, rank: u16) {
        let Some((addr, _)) = self.addrs.get(&provider).cloned() else {
            // A holder known only from a push, never from the tracker: nowhere to send.
            let outcome = Outcome::Unreachable;
            self.engine
                .handle(Instant::now(), Event::Answer { req, outcome });
            return;
        };
        let what = match (self.engine.spec(group), ask) {
            (&Blobs::Pieces { hash, size, .. }, Ask::Units(units)) => Ask2::Piece {
                hash,
                size,
                unit: units[0],
            },
            (&Blobs::Pieces { hash, size, .. }, Ask::Pick { among }) => {
                Ask2::Pick { hash, size, among }
            }
            (Blobs::Whole { blobs }, Ask::Units(units)) => Ask2::Many {
                blobs: units.iter().map(|u| blobs[*u as usize]).collect(),
                units,
            },
            (Blobs::Whole { .. }, Ask::Pick { .. }) => {
                let outcome = Outcome::Failed;
                self.engine
                    .handle(Instant::now(), Event::Answer { req, outcome });
                return;
            }
        };
        let job = self.groups[group.0 as usize].job;
        let writer = self
            .jobs
            .get(&job)
            .and_then(|j| j.writer.as_ref())
            .map(|w| w.tx.clone());
        let r = RequestTask {
            ctx: self.ctx.clone(),
            addr,
            req,
            group,
            provider,
            rank,
            io: self.io_tx.clone(),
            writer,
        };
        let task = self.tasks.spawn(r.run(what));
        self.reqs.insert(req, task);
    }

    fn on_io(&mut self, io: Io) {
        let now = Instant::now();
        match io {
            // A request cancelled meanwhile is the engine's no longer.
            Io::Picked { req, unit } if self.reqs.contains_key(&req) => {
                self.engine.handle(now, Event::Picked { req, unit })
            }
            Io::Picked { .. } => {}
            Io::Have {
                provider,
                group,
                units,
            } => self.engine.handle_have(provider, group, &units),
            Io::Unit {
                req,
                group,
                unit,
                provider,
                verified: true,
            } => {
                self.verified(group, unit);
                // Its size before the engine hears of it: a finished batch lets its list go.
                let bytes = self.engine.unit_bytes(group, unit);
                let before = self.engine.done_units(group).contains(unit);
                if !self.reqs.contains_key(&req) {
                    return;
                }
                self.engine.handle(
                    now,
                    Event::Unit {
                        req,
                        unit,
                        verified: true,
                    },
                );
                if !before && self.engine.done_units(group).contains(unit) {
                    self.count(group, bytes, provider);
                }
            }
            Io::Unit {
                req,
                unit,
                verified: false,
                ..
            } if self.reqs.contains_key(&req) => self.engine.handle(
                now,
                Event::Unit {
                    req,
                    unit,
                    verified: false,
                },
            ),
            Io::Unit { .. } => {}
        }
    }

    /// A piece was verified and written: it is recorded soon, and subscribers hear of it.
    fn verified(&mut self, group: GroupId, unit: u32) {
        let Blobs::Pieces { hash, size, .. } = *self.engine.spec(group) else {
            return;
        };
        let pb = self.ctx.cfg.piece_bytes;
        self.ctx.serving.held(hash, unit);
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

    /// A unit new to the download: progress and figures.
    fn count(&mut self, group: GroupId, bytes: u64, provider: NodeId) {
        let origin = self.addrs.get(&provider).is_some_and(|(_, o)| *o);
        let Some(j) = self.jobs.get_mut(&self.groups[group.0 as usize].job) else {
            return;
        };
        (j.counter)(bytes);
        if origin {
            j.stats.from_origin += bytes;
        } else {
            *j.stats.from_peers.entry(peer_name(provider)).or_default() += bytes;
        }
    }

    /// Syncs and records what is pending of a large blob, on the blocking pool.
    fn record(&mut self, group: GroupId) {
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
        r.bytes = 0;
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
            Done::Recorded { group, result }
        });
    }

    fn on_done(&mut self, done: Done) {
        let now = Instant::now();
        match done {
            Done::Lookup { group, found } => {
                let list = match found {
                    Ok(list) => list,
                    Err(why) => {
                        self.groups[group.0 as usize].why = Some((false, why));
                        self.engine.handle(now, Event::LookupFailed { group });
                        return;
                    }
                };
                let me = self.ctx.me;
                let mut providers = Vec::new();
                for p in list {
                    let Ok(id) = iroh::PublicKey::from_bytes(&p.id) else {
                        continue;
                    };
                    if id == me || (self.ctx.origin_only && !p.origin) {
                        continue;
                    }
                    let nid = NodeId(p.id);
                    self.addrs
                        .insert(nid, (NodeAddr { id, addr: p.addr }, p.origin));
                    providers.push(ProviderInfo {
                        id: nid,
                        complete: p.complete,
                        origin: p.origin,
                    });
                }
                // The origin holds every committed blob: always the last resort.
                if !providers.iter().any(|p| p.origin) {
                    providers.push(ProviderInfo {
                        id: NodeId(*self.ctx.origin.id.as_bytes()),
                        complete: true,
                        origin: true,
                    });
                }
                self.engine
                    .handle(now, Event::Providers { group, providers });
            }
            Done::Answer {
                req,
                group,
                outcome,
                local,
                why,
            } => {
                // What the task reported before it ended comes first (a unit, a pick):
                // it was sent before the task finished, so `try_recv` has it.
                while let Ok(io) = self.io_rx.try_recv() {
                    self.on_io(io);
                }
                if let Some(e) = local {
                    self.local = Some(e);
                }
                if why.is_some() {
                    self.groups[group.0 as usize].why = why;
                }
                // A request cancelled meanwhile is the engine's no longer.
                if self.reqs.remove(&req).is_some() {
                    self.engine.handle(now, Event::Answer { req, outcome });
                }
            }
            Done::Recorded { group, result } => {
                let g = &mut self.groups[group.0 as usize];
                if let Some(r) = &mut g.record {
                    r.in_flight -= 1;
                }
                if let Err(e) = result {
                    let job = g.job;
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.failure.get_or_insert(FetchError::Store(e));
                    }
                }
                self.record(group);
            }
            Done::Replied | Done::Quiet => {}
        }
    }

    /// A group is through (every unit recorded, or failed).
    fn finish_group(&mut self, group: GroupId) {
        let g = &mut self.groups[group.0 as usize];
        if g.finished {
            return;
        }
        g.finished = true;
        let id = g.job;
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

/// A peer's name in reports: its node id.
fn peer_name(id: NodeId) -> String {
    iroh::PublicKey::from_bytes(&id.0).map_or_else(|_| hex::encode(id.0), |k| k.to_string())
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
