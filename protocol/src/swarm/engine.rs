//! The downloader: what to ask of whom, and when. See the [module docs](super).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::state::{Group, Prov, Req, remove_have};
pub use super::types::*;
use super::{Config, NodeId, PieceSet};
use crate::hash::Hash;

/// The swarm downloader of one node: sans-IO. See the [module docs](super).
#[derive(Debug)]
pub struct Engine {
    pub(super) cfg: Config,
    pub(super) me: NodeId,
    pub(super) rng: SmallRng,
    pub(super) provs: Vec<Prov>,
    pub(super) prov_index: HashMap<NodeId, usize>,
    pub(super) groups: Vec<Group>,
    pub(super) queued: VecDeque<GroupId>,
    pub(super) active: Vec<GroupId>,
    pub(super) reqs: HashMap<ReqId, Req>,
    pub(super) next_req: u64,
    pub(super) pieces_flying: usize,
    /// Of those, requests for units readers wait for.
    pub(super) urgent_flying: usize,
    /// Whether a reader waits for units now (set at each scheduling).
    pub(super) reading: bool,
    pub(super) small_flying: usize,
    pub(super) actions: VecDeque<Action>,
    pub(super) announce: [Vec<Hash>; 2],
    pub(super) announce_due: Option<Instant>,
    pub(super) announced: bool,
    pub(super) stats: Stats,
    /// Units of every group wanted, and of those verified: how far along the download is.
    pub(super) units_all: u64,
    pub(super) units_done: u64,
    pub(super) dirty: bool,
    /// The next timeout, while the state it derives from is unchanged.
    pub(super) timeout: Option<Option<Instant>>,
    /// Holding back new requests (see [`Engine::set_paused`]).
    pub(super) paused: bool,
    /// A background download (see [`Engine::set_background`]).
    pub(super) background: bool,
}

impl Engine {
    /// An engine for node `me`; all its random choices come from `seed`.
    pub fn new(cfg: Config, me: NodeId, seed: u64) -> Self {
        Engine {
            cfg,
            me,
            rng: SmallRng::seed_from_u64(seed),
            provs: Vec::new(),
            prov_index: HashMap::new(),
            groups: Vec::new(),
            queued: VecDeque::new(),
            active: Vec::new(),
            reqs: HashMap::new(),
            next_req: 0,
            pieces_flying: 0,
            urgent_flying: 0,
            reading: false,
            small_flying: 0,
            actions: VecDeque::new(),
            announce: [Vec::new(), Vec::new()],
            announce_due: None,
            announced: false,
            stats: Stats::default(),
            units_all: 0,
            units_done: 0,
            dirty: false,
            timeout: None,
            paused: false,
            background: false,
        }
    }

    /// Holds back new requests (`true`), or lets them go again: a background download
    /// (a follow, a prefetch) waits so while a foreground one (a reload, a mount, a get)
    /// runs on the same node. Requests in flight finish and what they bring counts;
    /// lookups and subscriptions go on, so the download resumes with fresh news; no
    /// group counts as stuck and nothing goes to a second provider meanwhile.
    pub fn set_paused(&mut self, paused: bool) {
        if self.paused != paused {
            self.paused = paused;
            self.dirty = true;
            self.timeout = None;
        }
    }

    /// Makes this a background download (`true`: a follow, a preheat) or a foreground one:
    /// a background download's requests rank past every foreground one's
    /// ([`super::BACKGROUND_RANK`]), so providers serve those first and push background
    /// ones out of a full queue.
    pub fn set_background(&mut self, background: bool) {
        self.background = background;
    }

    /// Whether new requests are held back ([`Engine::set_paused`]).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The knobs.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Adds a blob or batch to fetch; groups start in the order they are added.
    pub fn want(&mut self, spec: Blobs) -> GroupId {
        let id = GroupId(self.groups.len() as u32);
        let units = match &spec {
            Blobs::Pieces { size, .. } => size.div_ceil(self.cfg.piece_bytes).max(1) as u32,
            Blobs::Whole { blobs } => blobs.len() as u32,
        };
        let done = match &spec {
            Blobs::Pieces { held, .. } => held.clone().fitted(units),
            Blobs::Whole { .. } => PieceSet::empty(units),
        };
        let mut wantable = PieceSet::full(units);
        wantable.subtract(&done);
        self.units_all += units as u64;
        self.units_done += done.count() as u64;
        self.groups.push(Group {
            spec,
            units,
            done,
            wantable,
            urgent: PieceSet::empty(units),
            srcs: Vec::new(),
            src_pos: Vec::new(),
            counts: vec![0; units as usize],
            flights: HashMap::new(),
            flying: 0,
            finished: false,
            lookup_in_flight: false,
            lookup_due: None,
            lookup_gap: self.cfg.lookup_refresh,
            lookups: 0,
            lookup_failures: 0,
            stuck_rounds: 0,
            stuck_look: false,
            endgame_at: None,
        });
        self.queued.push_back(id);
        self.dirty = true;
        id
    }

    /// A reader waits for these units of a group of pieces (a lazy mount's read, with its
    /// readahead): they go before every other unit, at the foreground's rank, also while
    /// the download is paused and beyond [`Config::pieces_in_flight`] by
    /// [`Config::urgent_in_flight`]. Each goes to the peer holding it with the fewest
    /// requests in flight; those no peer holds go to the origin as a pick among them, so
    /// that readers waiting at the same place at once get different pieces from it and
    /// the rest from each other. One in flight for [`Config::endgame_after`] is asked of
    /// a second provider. A group still queued starts at once; units held already, and
    /// groups of small blobs, are left as they are.
    pub fn want_now(&mut self, now: Instant, group: GroupId, units: &PieceSet) {
        let g = &mut self.groups[group.0 as usize];
        if g.finished || !g.is_pieces() {
            return;
        }
        let mut waited = units.clone().fitted(g.units);
        waited.subtract(&g.done);
        if waited.is_empty() {
            return;
        }
        g.urgent.union_with(&waited);
        if let Some(k) = self.queued.iter().position(|q| *q == group) {
            self.queued.remove(k);
            self.start(now, group);
        }
        self.dirty = true;
        self.timeout = None;
    }

    /// What a group fetches (a finished batch of small blobs: an empty list).
    pub fn spec(&self, group: GroupId) -> &Blobs {
        &self.groups[group.0 as usize].spec
    }

    /// Units of a group.
    pub fn units(&self, group: GroupId) -> u32 {
        self.groups[group.0 as usize].units
    }

    /// The byte range `[start, end)` of a unit: of the blob for a piece, of the small blob
    /// itself for a batch.
    pub fn unit_range(&self, group: GroupId, unit: u32) -> (u64, u64) {
        match &self.groups[group.0 as usize].spec {
            Blobs::Pieces { size, .. } => {
                let start = unit as u64 * self.cfg.piece_bytes;
                (start.min(*size), (start + self.cfg.piece_bytes).min(*size))
            }
            // A finished batch has let its list go (see `release`).
            Blobs::Whole { blobs } => (0, blobs.get(unit as usize).map_or(0, |b| b.1)),
        }
    }

    /// Bytes of a unit.
    pub fn unit_bytes(&self, group: GroupId, unit: u32) -> u64 {
        let (s, e) = self.unit_range(group, unit);
        e - s
    }

    /// The small blobs of a batch not fetched yet (what a lookup asks about).
    pub fn lacking(&self, group: GroupId) -> Vec<(Hash, u64)> {
        let g = &self.groups[group.0 as usize];
        match &g.spec {
            Blobs::Pieces { hash, size, .. } => vec![(*hash, *size)],
            Blobs::Whole { blobs } => (0..g.units)
                .filter(|u| !g.done.contains(*u))
                .map(|u| blobs[u as usize])
                .collect(),
        }
    }

    /// Units of a group verified so far.
    pub fn done_units(&self, group: GroupId) -> &PieceSet {
        &self.groups[group.0 as usize].done
    }

    /// Whether every group added so far has finished (done or failed).
    pub fn is_idle(&self) -> bool {
        self.queued.is_empty() && self.active.is_empty()
    }

    /// What the download took so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Announces what waits to be announced at once, without waiting for the batch to
    /// fill (the download ends).
    pub fn announce_now(&mut self) {
        if self.announce.iter().any(|a| !a.is_empty()) {
            self.flush_announcements();
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if self.dirty {
            self.dirty = false;
            self.timeout = None;
            self.schedule(now);
        }
        self.actions.pop_front()
    }

    /// When [`Engine::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if let Some(t) = self.timeout {
            return t;
        }
        let t = self.next_timeout();
        self.timeout = Some(t);
        t
    }

    fn next_timeout(&self) -> Option<Instant> {
        let mut t = self.announce_due;
        let free_pieces = self.pieces_flying < self.cfg.pieces_in_flight;
        let free_small = self.small_flying < self.cfg.small_lanes;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        };
        for r in self.reqs.values() {
            at(Some(r.deadline));
        }
        for g in &self.active {
            let group = &self.groups[g.0 as usize];
            if !group.lookup_in_flight {
                at(group.lookup_due);
            }
            if group.is_pieces() && !group.urgent.is_empty() {
                // A unit a reader waits for goes to a second provider after the endgame's
                // wait, paused or not.
                for u in group.urgent.iter() {
                    if let Some([only]) = group.flights.get(&u).map(Vec::as_slice)
                        && let Some(r) = self.reqs.get(only)
                    {
                        let due = r.sent + self.cfg.endgame_after;
                        if group.endgame_at.is_none_or(|t| due > t) {
                            at(Some(due));
                        }
                    }
                }
            }
            if self.paused {
                // Nothing else goes out until it resumes: no endgame, no provider to wake
                // for.
                continue;
            }
            if group.is_pieces() && group.wantable.is_empty() {
                for reqs in group.flights.values() {
                    if let [only] = reqs.as_slice()
                        && let Some(r) = self.reqs.get(only)
                    {
                        // Only a piece not yet considered: one for which no second provider
                        // was found waits for news (a push, an answer), not for the clock.
                        let due = r.sent + self.cfg.endgame_after;
                        if group.endgame_at.is_none_or(|t| due > t) {
                            at(Some(due));
                        }
                    }
                }
            }
            // A provider resting after a busy answer that the group could use again.
            let free = if group.is_pieces() {
                free_pieces
            } else {
                free_small
            };
            if free && !group.wantable.is_empty() {
                for s in &group.srcs {
                    let p = &self.provs[s.prov];
                    if p.usable(&self.cfg) && p.busy_until.is_some() {
                        at(p.busy_until);
                    }
                }
            }
        }
        t
    }

    /// Time has passed: deadlines, lookups, endgame, announcements.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<ReqId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.stats.timeouts += 1;
            self.actions.push_back(Action::Cancel { req: id });
            self.end_request(now, id, Some(Outcome::Failed));
        }
        for p in &mut self.provs {
            if p.busy_until.is_some_and(|t| t <= now) {
                p.busy_until = None;
            }
        }
        if self.announce_due.is_some_and(|t| t <= now) {
            self.flush_announcements();
        }
        self.dirty = true;
        self.timeout = None;
    }

    /// Something happened.
    pub fn handle(&mut self, now: Instant, event: Event) {
        if let Event::Have {
            provider,
            group,
            units,
        } = &event
        {
            self.handle_have(*provider, *group, units);
            return;
        }
        self.dirty = true;
        self.timeout = None;
        match event {
            Event::Providers { group, providers } => self.on_providers(now, group, providers),
            Event::LookupFailed { group } => self.on_lookup_failed(now, group),
            Event::Have { .. } => {}
            Event::Picked { req, unit } => self.on_picked(req, unit),
            Event::Unit {
                req,
                unit,
                verified: true,
            } => self.on_unit(now, req, unit),
            Event::Unit {
                req,
                verified: false,
                ..
            } => self.on_corrupt(now, req),
            Event::Answer { req, outcome } => self.end_request(now, req, Some(outcome)),
        }
    }

    /// [`Event::Have`] by reference: what a holder holds (a driver fanning one push out to
    /// many engines need not copy it).
    pub fn handle_have(&mut self, provider: NodeId, group: GroupId, units: &PieceSet) {
        // Only news the engine can use now wakes the scheduler: a wanted unit while a
        // request could go out (else the next answer schedules), or any in the endgame.
        let room = self.wants_news(group);
        if self.on_have(provider, group, units) && room {
            self.dirty = true;
            self.timeout = None;
        }
    }

    /// Whether news of what a provider holds of `group` could lead to a request now: a
    /// request could go out, or the group is in its endgame. While it is false, a push
    /// changes nothing the engine does until its next event or timeout, so a driver may hold
    /// pushes back and hand them over, merged and in any order, before that next call (the
    /// simulator does, to spare the work of engines that have no use for them yet).
    pub fn wants_news(&self, group: GroupId) -> bool {
        // A paused engine takes news at its next event (resuming is one).
        !self.paused
            && (self.pieces_flying < self.cfg.pieces_in_flight
                || self
                    .groups
                    .get(group.0 as usize)
                    .is_some_and(|g| g.wantable.is_empty()))
    }

    pub(super) fn intern(&mut self, id: NodeId, origin: bool) -> usize {
        if let Some(&i) = self.prov_index.get(&id) {
            self.provs[i].origin |= origin;
            return i;
        }
        self.provs.push(Prov {
            id,
            origin,
            in_flight: 0,
            busy_until: None,
            busy_streak: 0,
            failures: 0,
            last_failure: None,
            banned: false,
            dead: false,
        });
        self.prov_index.insert(id, self.provs.len() - 1);
        self.provs.len() - 1
    }

    /// A request is over (answered, timed out, or cancelled by us: `None`): its units not
    /// received go back.
    pub(super) fn end_request(&mut self, now: Instant, req: ReqId, outcome: Option<Outcome>) {
        let Some(r) = self.reqs.remove(&req) else {
            return;
        };
        let gi = r.group.0 as usize;
        let p = &mut self.provs[r.prov];
        p.in_flight -= 1;
        let pieces = self.groups[gi].is_pieces();
        if pieces {
            self.pieces_flying -= 1;
            self.urgent_flying -= usize::from(r.urgent);
        } else {
            self.small_flying -= 1;
        }
        let g = &mut self.groups[gi];
        g.flying -= 1;
        let lost: Vec<u32> = r
            .units
            .iter()
            .copied()
            .filter(|u| !r.got.contains(u))
            .collect();
        for &u in &lost {
            if let Some(f) = g.flights.get_mut(&u) {
                f.retain(|t| *t != req);
                if f.is_empty() {
                    g.flights.remove(&u);
                }
            }
            if !g.done.contains(u) && !g.flights.contains_key(&u) {
                g.wantable.insert(u);
            }
        }
        let si = g.src_of(r.prov);
        let Some(outcome) = outcome else {
            return;
        };
        match outcome {
            Outcome::Ok => {
                p.busy_streak = 0;
                // What it did not send, it lacks (it announced more than it holds).
                if let Some(si) = si
                    && !p.banned
                {
                    for &u in &lost {
                        remove_have(g, si, u, p.origin);
                    }
                }
            }
            Outcome::Busy => {
                self.stats.busy += 1;
                let rest = self.cfg.busy_backoff * 2u32.saturating_pow(p.busy_streak.min(16));
                p.busy_until = Some(now + rest.min(self.cfg.busy_backoff_max));
                p.busy_streak += 1;
            }
            Outcome::NotFound => {
                p.failed(&self.cfg, now);
                if let Some(si) = si {
                    let all: Vec<u32> = g.srcs[si].have.iter().collect();
                    for u in all {
                        remove_have(g, si, u, p.origin);
                    }
                }
            }
            Outcome::Unreachable => p.dead = true,
            Outcome::Failed => p.failed(&self.cfg, now),
            Outcome::LocalStore => {
                let gid = r.group;
                self.fail(gid, Failure::LocalStore);
            }
        }
    }

    /// Every unit arrived.
    pub(super) fn complete(&mut self, now: Instant, gid: GroupId) {
        let g = &mut self.groups[gid.0 as usize];
        g.finished = true;
        let left = self.requests_of(gid);
        self.active.retain(|a| *a != gid);
        match &self.groups[gid.0 as usize].spec {
            Blobs::Pieces { hash, .. } => self.queue_announce(now, *hash, true),
            Blobs::Whole { blobs } => {
                let hashes: Vec<Hash> = blobs.iter().map(|(h, _)| *h).collect();
                for h in hashes {
                    self.queue_announce(now, h, true);
                }
            }
        }
        for t in left {
            self.actions.push_back(Action::Cancel { req: t });
            self.drop_request(t);
        }
        let g = &self.groups[gid.0 as usize];
        for s in g.srcs.iter().filter(|s| s.subscribed) {
            self.actions.push_back(Action::Unsubscribe {
                provider: self.provs[s.prov].id,
                group: gid,
            });
        }
        self.actions.push_back(Action::Done { group: gid });
        self.release(gid);
    }

    /// A finished group lets its bulk go (a batch's blob list, its holders and counts), so
    /// a download of a million small blobs keeps a few bytes per finished batch. Its id,
    /// unit count and done set stay.
    fn release(&mut self, gid: GroupId) {
        let g = &mut self.groups[gid.0 as usize];
        g.srcs = Vec::new();
        g.src_pos = Vec::new();
        g.counts = Vec::new();
        g.flights = HashMap::new();
        if let Blobs::Whole { blobs } = &mut g.spec {
            *blobs = Vec::new();
        }
    }

    pub(super) fn fail(&mut self, gid: GroupId, reason: Failure) {
        let g = &mut self.groups[gid.0 as usize];
        if g.finished {
            return;
        }
        g.finished = true;
        self.active.retain(|a| *a != gid);
        for t in self.requests_of(gid) {
            self.actions.push_back(Action::Cancel { req: t });
            self.drop_request(t);
        }
        self.actions
            .push_back(Action::Failed { group: gid, reason });
        self.release(gid);
    }

    fn requests_of(&self, gid: GroupId) -> Vec<ReqId> {
        let mut v: Vec<ReqId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.group == gid)
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    /// Forgets a request of a finished group (no units go back).
    fn drop_request(&mut self, req: ReqId) {
        let Some(r) = self.reqs.remove(&req) else {
            return;
        };
        self.provs[r.prov].in_flight -= 1;
        let g = &mut self.groups[r.group.0 as usize];
        g.flying -= 1;
        if g.is_pieces() {
            self.pieces_flying -= 1;
            self.urgent_flying -= usize::from(r.urgent);
        } else {
            self.small_flying -= 1;
        }
    }

    pub(super) fn queue_announce(&mut self, now: Instant, hash: Hash, complete: bool) {
        self.announce[complete as usize].push(hash);
        if self
            .announce
            .iter()
            .any(|a| a.len() >= self.cfg.announce_batch)
        {
            self.flush_announcements();
        } else if self.announce_due.is_none() {
            // The first announcement of a download goes out at once, so that peers starting
            // at the same moment find each other; later ones are batched.
            let wait = if self.announced {
                self.cfg.announce_interval
            } else {
                Duration::ZERO
            };
            self.announce_due = Some(now + wait);
        }
    }

    pub(super) fn flush_announcements(&mut self) {
        self.announce_due = None;
        self.announced = true;
        for complete in [false, true] {
            let list = std::mem::take(&mut self.announce[complete as usize]);
            for chunk in list.chunks(self.cfg.announce_batch) {
                self.actions.push_back(Action::Announce {
                    blobs: chunk.to_vec(),
                    complete,
                });
            }
        }
    }
}
