//! A provider's side: sending slots, a short queue and busy answers; the origin's choice
//! of piece; subscribers to what this node newly holds. Sans-IO like the engine.

use std::collections::HashMap;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::{Config, NodeId, PieceSet};
use crate::hash::Hash;

/// Whether a request may be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Send now (a slot is taken: call [`Admission::finished`] when done).
    Now,
    /// Wait: [`Admission::finished`] names it when its turn comes. To make room, a waiting
    /// request further along than this one may have been pushed out: answer it busy.
    Queued {
        /// The request pushed out, if any.
        evicted: Option<u64>,
    },
    /// Answer busy.
    Busy,
}

/// Whether a request of this rank is a background download's (see
/// [`super::BACKGROUND_RANK`]).
fn background(rank: u16) -> bool {
    rank >= super::BACKGROUND_RANK
}

/// How many times each piece of a blob has been sent (the origin's super-seeding).
#[derive(Debug)]
struct Sent {
    never: PieceSet,
    counts: Vec<u32>,
}

/// A provider's admission of requests: [`Config::serve_slots`] served at once, up to
/// [`Config::serve_queue`] waiting, the rest answered busy so their senders go elsewhere.
/// One peer holds at most [`Config::serve_slots_per_peer`] of the slots and
/// [`Config::serve_queue_per_peer`] of the places in the queue, whatever rank it claims: a
/// peer that never reads what it asked for cannot starve the others.
///
/// Foreground requests go strictly first: a background one (its rank past
/// [`super::BACKGROUND_RANK`]: a follow's, a preheat's) gets a slot only while no
/// foreground request is served or waiting, so a slot stays free rather than split a link
/// between a reload and a follow.
///
/// For the origin ([`Admission::choose`]) a request names the pieces it may take and the
/// origin chooses the one it has sent least; while its slots are full it sends only pieces it
/// has never sent, so the fleet gets each piece from it about once and trades the rest.
#[derive(Debug)]
pub struct Admission {
    cfg: Config,
    rng: SmallRng,
    sending: usize,
    /// Of those, foreground requests.
    sending_fg: usize,
    /// Waiting requests: (rank, arrival, token, peer), served lowest rank first.
    queue: Vec<(u16, u64, u64, NodeId)>,
    arrivals: u64,
    /// Slots and queue places each peer holds.
    per_peer: HashMap<NodeId, (usize, usize)>,
    sent: HashMap<Hash, Sent>,
}

impl Admission {
    /// Admission with the given knobs; random choices from `seed`.
    pub fn new(cfg: Config, seed: u64) -> Self {
        Admission {
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            sending: 0,
            sending_fg: 0,
            queue: Vec::new(),
            arrivals: 0,
            per_peer: HashMap::new(),
            sent: HashMap::new(),
        }
    }

    /// Requests being served now.
    pub fn sending(&self) -> usize {
        self.sending
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Whether every slot is taken.
    pub fn contested(&self) -> bool {
        self.sending >= self.cfg.serve_slots
    }

    fn held_by(&self, peer: &NodeId) -> (usize, usize) {
        self.per_peer.get(peer).copied().unwrap_or_default()
    }

    fn count(&mut self, peer: NodeId, slots: isize, queued: isize) {
        let e = self.per_peer.entry(peer).or_default();
        e.0 = e.0.saturating_add_signed(slots);
        e.1 = e.1.saturating_add_signed(queued);
        if *e == (0, 0) {
            self.per_peer.remove(&peer);
        }
    }

    /// A request of `peer`, named by the caller's `token`, wants to be served. `rank` is
    /// how far along its requester is (permille of its download): while requests wait, the
    /// one furthest behind goes first, so that a fleet finishes together rather than
    /// leaving a tail of unlucky laggards.
    pub fn admit(&mut self, token: u64, peer: NodeId, rank: u16) -> Admit {
        let (slots, queued) = self.held_by(&peer);
        let yields = background(rank) && self.foreground_ahead();
        if self.sending < self.cfg.serve_slots && slots < self.cfg.serve_slots_per_peer && !yields {
            self.take_slot(peer, rank);
            return Admit::Now;
        }
        if queued >= self.cfg.serve_queue_per_peer {
            return Admit::Busy;
        }
        self.arrivals += 1;
        if self.queue.len() < self.cfg.serve_queue {
            self.queue.push((rank, self.arrivals, token, peer));
            self.count(peer, 0, 1);
            return Admit::Queued { evicted: None };
        }
        // Full: push out the waiting request furthest along, if this one is behind it.
        let (k, worst) = self
            .queue
            .iter()
            .enumerate()
            .max_by_key(|(_, (r, a, _, _))| (*r, *a))
            .map(|(k, e)| (k, *e))
            .expect("a full queue has an entry");
        if self.cfg.serve_queue > 0 && rank < worst.0 {
            self.queue[k] = (rank, self.arrivals, token, peer);
            self.count(worst.3, 0, -1);
            self.count(peer, 0, 1);
            Admit::Queued {
                evicted: Some(worst.2),
            }
        } else {
            Admit::Busy
        }
    }

    /// Whether a request of `peer` and `rank` would be admitted now (served or queued).
    pub fn would_admit(&self, peer: &NodeId, rank: u16) -> bool {
        let (slots, queued) = self.held_by(peer);
        (self.sending < self.cfg.serve_slots && slots < self.cfg.serve_slots_per_peer)
            || (queued < self.cfg.serve_queue_per_peer
                && (self.queue.len() < self.cfg.serve_queue
                    || self.queue.iter().any(|(r, _, _, _)| *r > rank)))
    }

    /// A request of `peer` and `rank` served now is done: free slots go to the waiting
    /// requests furthest behind whose peers may take one more (a foreground one first; a
    /// background one only while no foreground request is served or waiting). Their
    /// tokens, peers and ranks are returned (the slots are taken for them: one that went
    /// meanwhile is given back with [`Admission::finished`] too).
    pub fn finished(&mut self, peer: &NodeId, rank: u16) -> Vec<(u64, NodeId, u16)> {
        self.sending = self.sending.saturating_sub(1);
        if !background(rank) {
            self.sending_fg = self.sending_fg.saturating_sub(1);
        }
        self.count(*peer, -1, 0);
        let mut turns = Vec::new();
        while let Some(t) = self.next_turn() {
            turns.push(t);
        }
        turns
    }

    /// Whether a foreground request is served or waiting.
    fn foreground_ahead(&self) -> bool {
        self.sending_fg > 0 || self.queue.iter().any(|(r, _, _, _)| !background(*r))
    }

    fn take_slot(&mut self, peer: NodeId, rank: u16) {
        self.sending += 1;
        if !background(rank) {
            self.sending_fg += 1;
        }
        self.count(peer, 1, 0);
    }

    /// Gives a free slot to the waiting request furthest behind whose peer may take one.
    fn next_turn(&mut self) -> Option<(u64, NodeId, u16)> {
        if self.sending >= self.cfg.serve_slots {
            return None;
        }
        let cap = self.cfg.serve_slots_per_peer;
        let (k, &(rank, ..)) = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, (_, _, _, p))| self.held_by(p).0 < cap)
            .min_by_key(|(_, (r, a, _, _))| (*r, *a))?;
        if background(rank) && self.foreground_ahead() {
            return None;
        }
        let (_, _, token, p) = self.queue.swap_remove(k);
        self.count(p, 0, -1);
        self.take_slot(p, rank);
        Some((token, p, rank))
    }

    /// A waiting request went away (its requester cancelled it).
    pub fn forget(&mut self, token: u64) {
        if let Some(k) = self.queue.iter().position(|(_, _, t, _)| *t == token) {
            let (_, _, _, p) = self.queue.swap_remove(k);
            self.count(p, 0, -1);
        }
    }

    /// The origin's choice for a request that may take any of `among` (pieces of a blob of
    /// `units` pieces): the piece sent least so far, at random among equals. `None` when
    /// the slots are full and every such piece has been sent before: the requester should
    /// get it from a peer (answer busy). The choice counts as sent.
    pub fn choose(&mut self, hash: Hash, units: u32, among: &PieceSet) -> Option<u32> {
        let among = among.clone().fitted(units);
        let contested = self.contested();
        let sent = self.sent.entry(hash).or_insert_with(|| Sent {
            never: PieceSet::full(units),
            counts: vec![0; units as usize],
        });
        if sent.counts.len() != units as usize {
            return None;
        }
        let unit = match sent.never.random_common(&among, &mut self.rng) {
            Some(u) => u,
            None if contested => return None,
            None => {
                let least = among.iter().map(|u| sent.counts[u as usize]).min()?;
                let ties: Vec<u32> = among
                    .iter()
                    .filter(|u| sent.counts[*u as usize] == least)
                    .collect();
                ties[rand::Rng::random_range(&mut self.rng, 0..ties.len())]
            }
        };
        sent.never.remove(unit);
        sent.counts[unit as usize] += 1;
        Some(unit)
    }

    /// A piece [`Admission::choose`] chose was not sent after all (the request was pushed
    /// out of the queue, or cancelled): it counts as sent no more.
    pub fn unchoose(&mut self, hash: Hash, unit: u32) {
        if let Some(sent) = self.sent.get_mut(&hash)
            && let Some(c) = sent.counts.get_mut(unit as usize)
            && *c > 0
        {
            *c -= 1;
            if *c == 0 {
                sent.never.insert(unit);
            }
        }
    }

    /// Pieces of a blob sent so far (all copies), for reports.
    pub fn pieces_sent(&self, hash: &Hash) -> u64 {
        self.sent
            .get(hash)
            .map_or(0, |s| s.counts.iter().map(|c| *c as u64).sum())
    }
}

/// Who asked to hear of this node's new pieces, per blob, and what is waiting to be pushed.
#[derive(Debug)]
pub struct Subscribers {
    cfg: Config,
    subs: HashMap<Hash, Vec<NodeId>>,
    pending: HashMap<Hash, Vec<u32>>,
    due: Option<Instant>,
}

/// Pieces to tell subscribers of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// The blob.
    pub hash: Hash,
    /// Its newly held pieces.
    pub units: Vec<u32>,
    /// Who to tell.
    pub to: Vec<NodeId>,
}

impl Subscribers {
    /// No subscribers yet.
    pub fn new(cfg: Config) -> Self {
        Subscribers {
            cfg,
            subs: HashMap::new(),
            pending: HashMap::new(),
            due: None,
        }
    }

    /// `peer` wants pushes for `hash`; false when the blob has as many subscribers as
    /// [`Config::max_subscribers`] (it may still ask, or look elsewhere).
    pub fn subscribe(&mut self, peer: NodeId, hash: Hash) -> bool {
        let list = self.subs.entry(hash).or_default();
        if list.contains(&peer) {
            return true;
        }
        if list.len() >= self.cfg.max_subscribers {
            return false;
        }
        list.push(peer);
        true
    }

    /// `peer` no longer wants pushes for `hash` (it finished, or went away).
    pub fn unsubscribe(&mut self, peer: &NodeId, hash: &Hash) {
        if let Some(list) = self.subs.get_mut(hash) {
            list.retain(|p| p != peer);
            if list.is_empty() {
                self.subs.remove(hash);
            }
        }
    }

    /// This node now holds piece `unit` of `hash` (verified).
    pub fn held(&mut self, now: Instant, hash: Hash, unit: u32) {
        if !self.subs.contains_key(&hash) {
            return;
        }
        self.pending.entry(hash).or_default().push(unit);
        if self.due.is_none() {
            self.due = Some(now + self.cfg.have_interval);
        }
    }

    /// When [`Subscribers::poll_push`] has something, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }

    /// The next push that is due.
    pub fn poll_push(&mut self, now: Instant) -> Option<Push> {
        if self.due.is_none_or(|t| t > now) {
            return None;
        }
        let Some(hash) = self.pending.keys().next().copied() else {
            self.due = None;
            return None;
        };
        let units = self.pending.remove(&hash).unwrap_or_default();
        if self.pending.is_empty() {
            self.due = None;
        }
        let to = self.subs.get(&hash).cloned().unwrap_or_default();
        Some(Push { hash, units, to })
    }
}
