//! The simulated fleet: an origin (which is also the tracker's host), seeds, downloaders;
//! each downloader runs voltool's own swarm engine, each provider its own admission and
//! subscribers, and the tracker is the coordinator's own bookkeeping. Messages take the
//! latency of their two ends; data takes the links' time ([`crate::links`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap as HashMap;
use std::time::{Duration, Instant};

use voltool_protocol::Hash;
use voltool_protocol::swarm::{
    Admission, Blobs, Config, Engine, Event, GroupId, PieceSet, ProviderInfo, ReqId, Subscribers,
    Tracker,
};

use crate::links::Links;

mod act;
mod events;
mod node;
mod read;
mod scenario;
mod serve;

use events::{Ev, FLOW_DONE, Item};
pub(crate) use node::{Carry, Pending};
use node::{Node, blob_hash, engine_reads, index_of, node_id};
pub(crate) use scenario::{NodeResult, Role, Run, Scenario, Spec};

pub(crate) struct World {
    sc: Scenario,
    base: Instant,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<Item>>,
    slab: Vec<Option<Ev>>,
    free: Vec<u32>,
    nodes: Vec<Node>,
    links: Links,
    carry: HashMap<usize, Carry>,
    /// Requests flowing, by (requester, request): the flow.
    flowing: HashMap<(usize, ReqId), usize>,
    /// Requests on their way to a provider or waiting there: (requester, request) →
    /// (provider, admission token if waiting).
    pending: HashMap<(usize, ReqId), (usize, Option<u64>)>,
    tracker: Tracker<()>,
    hashes: Vec<Hash>,
    units: Vec<u32>,
    next_token: u64,
    origin_bytes: f64,
    events: u64,
    downloading: usize,
    per_second: Vec<f64>,
    /// Nodes below this index have their progress traced (the origin, the seeds, then
    /// `traced` downloaders).
    traced_below: usize,
    /// `VOLTOOL_SIM_DEBUG` is set.
    debug: bool,
    /// Events processed, by [`Ev::kind`].
    kinds: [u64; Ev::KINDS.len()],
    /// Per node and blob (`node * blobs + blob`): whether its engine has a use for pushes
    /// now ([`Engine::wants_news`]), as last asked since the engine last ran; kept apart
    /// from the nodes, so that a push fanned out to dozens of subscribers touches a few
    /// dense bytes of each rather than its engine.
    news: Vec<(u32, News)>,
    /// Per node: how many times its engine ran; an entry of `news` from an earlier run is
    /// unknown (so a run costs nothing however many blobs there are).
    runs: Vec<u32>,
    /// Per node: the pushes held back while its engine has no use for them, one unit each
    /// as (provider, blob, unit); handed over, merged by provider and blob, before its next
    /// event or timeout.
    held_back: Vec<Vec<(u32, u32, u32)>>,
    /// Per blob: an empty set to build a merged push in.
    scratch: Vec<PieceSet>,
}

/// What a push to a node's engine does: see [`World::news`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum News {
    /// Handed over at once: the engine may act on it.
    Now,
    /// Held back until the engine's next event or timeout.
    Later,
    /// Dropped: the node left, or downloads nothing.
    Never,
}

const HEARTBEAT: u64 = 30_000_000_000;

impl World {
    pub(crate) fn new(sc: Scenario) -> Self {
        let base = Instant::now();
        let cfg = sc.cfg.clone();
        let hashes: Vec<Hash> = (0..sc.blobs.len()).map(blob_hash).collect();
        let units: Vec<u32> = sc
            .blobs
            .iter()
            .map(|s| s.div_ceil(cfg.piece_bytes).max(1) as u32)
            .collect();
        let mut links = Links::default();
        let mut tracker = Tracker::new(cfg.clone(), sc.seed ^ 0x7472);
        let mut nodes = Vec::new();
        let mut initial = Vec::new();
        let mut downloading = 0;
        for (i, spec) in sc.nodes.iter().enumerate() {
            links.add_node(spec.up, spec.down);
            let node = Node::new(&sc, i, &hashes, &units);
            downloading += node.engine.is_some() as usize;
            if spec.role == Role::Seed {
                tracker.announce(
                    at(base, 0),
                    node_id(i),
                    (),
                    Some(spec.zone.to_string()),
                    &hashes,
                    true,
                );
            }
            if let Some(t) = spec.leaves_at {
                initial.push((t, Ev::Leave(i)));
            }
            if let Some(t) = spec.paused_until {
                initial.push((t, Ev::Resume(i)));
            }
            if engine_reads(spec) {
                initial.push((0, Ev::Read(i)));
            }
            nodes.push(node);
        }
        initial.push((HEARTBEAT, Ev::Heartbeat));
        let seeds = sc.nodes.iter().filter(|s| s.role == Role::Seed).count();
        let sc_traced = sc.traced;
        let mut w = World {
            sc,
            base,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            nodes,
            links,
            carry: HashMap::default(),
            flowing: HashMap::default(),
            pending: HashMap::default(),
            tracker,
            hashes,
            units,
            next_token: 0,
            origin_bytes: 0.0,
            events: 0,
            downloading,
            per_second: Vec::new(),
            traced_below: 1 + seeds + sc_traced,
            debug: std::env::var_os("VOLTOOL_SIM_DEBUG").is_some(),
            kinds: [0; Ev::KINDS.len()],
            news: Vec::new(),
            runs: Vec::new(),
            held_back: Vec::new(),
            scratch: Vec::new(),
        };
        // Run 0 is never current: every entry starts unknown.
        w.news = vec![(0, News::Never); w.nodes.len() * w.units.len()];
        w.runs = vec![1; w.nodes.len()];
        w.held_back = vec![Vec::new(); w.nodes.len()];
        w.scratch = w.units.iter().map(|&u| PieceSet::empty(u)).collect();
        for (t, ev) in initial {
            w.push(t, ev);
        }
        for i in 0..w.nodes.len() {
            if w.nodes[i].engine.is_some() {
                w.run_node(i);
            }
        }
        w
    }

    fn instant(&self) -> Instant {
        at(self.base, self.now)
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(k) => {
                self.slab[k as usize] = Some(ev);
                k
            }
            None => {
                self.slab.push(Some(ev));
                self.slab.len() as u32 - 1
            }
        };
        self.heap.push(Reverse(Item(t, self.seq, slot)));
    }

    /// One-way latency between two nodes.
    fn lat(&self, a: usize, b: usize) -> u64 {
        let (x, y) = (&self.nodes[a].spec, &self.nodes[b].spec);
        x.latency
            + y.latency
            + if x.zone != y.zone {
                self.sc.cross_zone
            } else {
                0
            }
    }

    /// Sends an event to node `to`, from `from`, after their latency.
    fn tell(&mut self, from: usize, to: usize, ev: Event) {
        let t = self.now + self.lat(from, to);
        self.push(t, Ev::ToNode(to, ev));
    }

    /// Runs the simulation until every downloader has finished, failed or left.
    pub(crate) fn run(mut self, limit_s: f64) -> Run {
        let limit = (limit_s * 1e9) as u64;
        while self.downloading > 0 {
            // A flow finishing comes before an event of the same time.
            let next_event = self.heap.peek().map(|Reverse(Item(t, ..))| *t);
            self.links.flush(self.now);
            if let Some((t, f)) = self.links.next_due()
                && next_event.is_none_or(|e| t <= e)
            {
                if t > limit {
                    break;
                }
                self.now = t;
                self.events += 1;
                self.kinds[FLOW_DONE] += 1;
                self.flow_done(f);
                continue;
            }
            let Some(Reverse(Item(t, _, slot))) = self.heap.pop() else {
                break;
            };
            let ev = self.slab[slot as usize]
                .take()
                .expect("an event in its slot");
            self.free.push(slot);
            if t > limit {
                break;
            }
            self.now = t;
            self.events += 1;
            self.kinds[ev.kind()] += 1;
            self.step(ev);
        }
        self.finish_reading();
        let end = self.instant();
        let reported = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| n.spec.liar && self.tracker.distrusted(end, &node_id(*i)))
            .count();
        let sim_s = self.now as f64 / 1e9;
        Run {
            nodes: self.nodes.into_iter().map(|n| n.result).collect(),
            origin_bytes: self.origin_bytes,
            events: self.events,
            sim_s,
            reported_liars_left_out: reported,
            per_second: self.per_second,
            kinds: Ev::KINDS.iter().copied().zip(self.kinds).collect(),
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Timer(n, epoch) => {
                // A node that left does nothing more.
                if !self.nodes[n].gone && self.nodes[n].timer.is_some_and(|(_, g)| g == epoch) {
                    self.nodes[n].timer = None;
                    let now = self.instant();
                    self.hand_over(n);
                    if let Some(e) = &mut self.nodes[n].engine {
                        e.handle_timeout(now);
                    }
                    self.run_node(n);
                }
            }
            Ev::ToNode(n, event) => {
                if self.nodes[n].gone {
                    return;
                }
                let now = self.instant();
                self.hand_over(n);
                if let Some(e) = &mut self.nodes[n].engine {
                    e.handle(now, event);
                }
                self.run_node(n);
            }
            Ev::Haves {
                from,
                to,
                blob,
                units,
            } => {
                let group = GroupId(blob as u32);
                for n in to {
                    match self.news_for(n, blob) {
                        News::Now => {}
                        News::Later => {
                            let held = &mut self.held_back[n];
                            held.extend(units.iter().map(|u| (from as u32, blob as u32, u)));
                            continue;
                        }
                        News::Never => continue,
                    }
                    self.hand_over(n);
                    if let Some(e) = &mut self.nodes[n].engine {
                        e.handle_have(node_id(from), group, &units);
                    }
                    self.run_node(n);
                }
            }
            Ev::Serve { prov, p, ask } => self.serve(prov, p, ask),
            Ev::Cancel { prov, from, req } => self.cancel(prov, from, req),
            Ev::Subscribe { prov, from, blob } => self.subscribe(prov, from, blob),
            Ev::Lookup { from, blob } => self.lookup(from, blob),
            Ev::Announce {
                from,
                blobs,
                complete,
            } => {
                let now = self.instant();
                let zone = Some(self.nodes[from].spec.zone.to_string());
                self.tracker
                    .announce(now, node_id(from), (), zone, &blobs, complete);
            }
            Ev::Report { from, liar, hash } => {
                let now = self.instant();
                self.tracker
                    .report(now, &node_id(from), &node_id(liar), &hash);
            }
            Ev::Leave(n) => self.leave(n),
            Ev::Resume(n) => {
                if self.nodes[n].gone {
                    return;
                }
                // Pushes held back while it was paused go first (see Engine::wants_news).
                self.hand_over(n);
                if let Some(e) = &mut self.nodes[n].engine {
                    e.set_paused(false);
                }
                self.run_node(n);
            }
            Ev::Heartbeat => self.heartbeat(),
            Ev::Read(n) => self.read(n),
        }
    }

    /// Whether a push of `blob` to node `n` goes to its engine now, waits, or is dropped.
    fn news_for(&mut self, n: usize, blob: usize) -> News {
        let k = n * self.units.len() + blob;
        if self.news[k].0 != self.runs[n] {
            let node = &self.nodes[n];
            let news = match &node.engine {
                Some(e) if !node.gone => {
                    if e.wants_news(GroupId(blob as u32)) {
                        News::Now
                    } else {
                        News::Later
                    }
                }
                _ => News::Never,
            };
            self.news[k] = (self.runs[n], news);
        }
        self.news[k].1
    }

    /// Hands node `n`'s engine the pushes held back for it, one call per provider and blob
    /// (the engine takes them merged and in any order: see [`Engine::wants_news`]).
    fn hand_over(&mut self, n: usize) {
        if self.held_back[n].is_empty() {
            return;
        }
        let mut held = std::mem::take(&mut self.held_back[n]);
        held.sort_unstable();
        if let Some(e) = &mut self.nodes[n].engine {
            for run in held.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
                let (from, blob) = (run[0].0 as usize, run[0].1 as usize);
                let set = &mut self.scratch[blob];
                for &(_, _, u) in run {
                    set.insert(u);
                }
                e.handle_have(node_id(from), GroupId(blob as u32), set);
                for &(_, _, u) in run {
                    set.remove(u);
                }
            }
        }
        // The buffer's room is kept for the next pushes.
        held.clear();
        self.held_back[n] = held;
    }

    /// `from` subscribes to what `prov` gets of a blob: it hears what `prov` holds now.
    fn subscribe(&mut self, prov: usize, from: usize, blob: usize) {
        if self.nodes[prov].gone {
            return;
        }
        let hash = self.hashes[blob];
        if self.nodes[prov].subs.subscribe(node_id(from), hash) {
            let units = self.nodes[prov].held[blob].clone();
            self.tell(
                prov,
                from,
                Event::Have {
                    provider: node_id(prov),
                    group: GroupId(blob as u32),
                    units,
                },
            );
        }
    }

    /// Every live member is seen by the tracker; those gone for long expire.
    fn heartbeat(&mut self) {
        let now = self.instant();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].gone {
                self.tracker.heartbeat(now, &node_id(i));
            }
        }
        self.tracker.expire(now);
        let t = self.now + HEARTBEAT;
        self.push(t, Ev::Heartbeat);
    }

    /// Drains node `n`'s engine and subscribers, and sets its next timer.
    fn run_node(&mut self, n: usize) {
        let now = self.instant();
        while let Some(a) = self.nodes[n]
            .engine
            .as_mut()
            .and_then(|e| e.poll_action(now))
        {
            self.act(n, a);
        }
        // The engine ran: whether it has a use for pushes is asked afresh.
        self.runs[n] += 1;
        while let Some(push) = self.nodes[n].subs.poll_push(now) {
            let blob = self
                .hashes
                .iter()
                .position(|h| *h == push.hash)
                .expect("known blob");
            let units = PieceSet::from_iter(self.units[blob], push.units.iter().copied());
            // One event per distinct latency (zones differ), each for all its subscribers.
            let mut by_lat: Vec<(u64, Vec<usize>)> = Vec::new();
            for to in push.to {
                let to = index_of(&to);
                let l = self.lat(n, to);
                match by_lat.iter_mut().find(|(x, _)| *x == l) {
                    Some((_, v)) => v.push(to),
                    None => by_lat.push((l, vec![to])),
                }
            }
            for (l, to) in by_lat {
                let t = self.now + l;
                self.push(
                    t,
                    Ev::Haves {
                        from: n,
                        to,
                        blob,
                        units: units.clone(),
                    },
                );
            }
        }
        let node = &mut self.nodes[n];
        let t = [
            node.engine.as_mut().and_then(|e| e.poll_timeout()),
            node.subs.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|i| (i.saturating_duration_since(self.base).as_nanos() as u64).max(self.now));
        if node.timer.map(|(t, _)| t) != t {
            let node = &mut self.nodes[n];
            node.timer_gen += 1;
            let epoch = node.timer_gen;
            node.timer = t.map(|t| (t, epoch));
            if let Some(t) = t {
                self.push(t, Ev::Timer(n, epoch));
            }
        }
    }

    fn lookup(&mut self, from: usize, blob: usize) {
        let now = self.instant();
        let list = self.tracker.lookup(now, &node_id(from), &self.hashes[blob]);
        let mut providers: Vec<ProviderInfo> = list
            .into_iter()
            .map(|h| ProviderInfo {
                id: h.id,
                complete: h.complete,
                origin: false,
            })
            .collect();
        providers.push(ProviderInfo {
            id: node_id(0),
            complete: true,
            origin: true,
        });
        self.tell(
            0,
            from,
            Event::Providers {
                group: GroupId(blob as u32),
                providers,
            },
        );
    }
}

pub(super) fn at(base: Instant, ns: u64) -> Instant {
    base + Duration::from_nanos(ns)
}
