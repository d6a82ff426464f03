//! What the engine keeps of providers, groups and requests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::engine::{Blobs, GroupId, ReqId};
use super::{Config, NodeId, PieceSet};

/// What the engine knows of one provider for the whole download (across groups).
#[derive(Debug)]
pub(super) struct Prov {
    pub(super) id: NodeId,
    pub(super) origin: bool,
    pub(super) in_flight: usize,
    pub(super) busy_until: Option<Instant>,
    pub(super) busy_streak: u32,
    pub(super) failures: u32,
    pub(super) last_failure: Option<Instant>,
    pub(super) banned: bool,
    pub(super) dead: bool,
}

impl Prov {
    /// A request to it failed: it rests a little, and failures close together (several
    /// requests to a provider that went away) count once.
    pub(super) fn failed(&mut self, cfg: &Config, now: Instant) {
        if self
            .last_failure
            .is_none_or(|t| now >= t + cfg.busy_backoff)
        {
            self.failures += 1;
            self.last_failure = Some(now);
        }
        self.busy_until = Some(now + cfg.busy_backoff);
    }

    pub(super) fn usable(&self, cfg: &Config) -> bool {
        !self.banned && !self.dead && self.failures < cfg.max_failures
    }

    pub(super) fn can_take(&self, cfg: &Config, now: Instant, limit: usize) -> bool {
        self.usable(cfg) && self.in_flight < limit && self.busy_until.is_none_or(|t| t <= now)
    }
}

/// A provider of one group, and what it holds of it.
#[derive(Debug)]
pub(super) struct Src {
    pub(super) prov: usize,
    pub(super) have: PieceSet,
    pub(super) subscribed: bool,
}

/// One blob or batch being fetched.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) spec: Blobs,
    pub(super) units: u32,
    pub(super) done: PieceSet,
    /// Not done and not in flight: what may be asked for.
    pub(super) wantable: PieceSet,
    /// Not done, and a reader waits for them ([`super::Engine::want_now`]).
    pub(super) urgent: PieceSet,
    pub(super) srcs: Vec<Src>,
    /// Position + 1 in `srcs` by provider index (0: not a source).
    pub(super) src_pos: Vec<u32>,
    /// Known holders of each unit (peers only), for rarest-first.
    pub(super) counts: Vec<u16>,
    /// Requests in flight for each unit in flight (two in the endgame).
    pub(super) flights: HashMap<u32, Vec<ReqId>>,
    /// Requests of this group in flight (picks included).
    pub(super) flying: usize,
    pub(super) finished: bool,
    pub(super) lookup_in_flight: bool,
    pub(super) lookup_due: Option<Instant>,
    pub(super) lookup_gap: Duration,
    pub(super) lookups: u32,
    /// Lookups that failed since the last answer.
    pub(super) lookup_failures: u32,
    pub(super) stuck_rounds: u32,
    /// A look at the tracker for a stuck round is due.
    pub(super) stuck_look: bool,
    /// When the endgame last looked for second providers.
    pub(super) endgame_at: Option<Instant>,
}

impl Group {
    pub(super) fn is_pieces(&self) -> bool {
        matches!(self.spec, Blobs::Pieces { .. })
    }

    pub(super) fn src_of(&self, prov: usize) -> Option<usize> {
        match self.src_pos.get(prov) {
            Some(&k) if k > 0 => Some(k as usize - 1),
            _ => None,
        }
    }

    /// Takes on a provider; returns its index among the group's sources.
    pub(super) fn add_src(&mut self, prov: usize, subscribed: bool) -> usize {
        self.srcs.push(Src {
            prov,
            have: PieceSet::empty(self.units),
            subscribed,
        });
        if self.src_pos.len() <= prov {
            self.src_pos.resize(prov + 1, 0);
        }
        self.src_pos[prov] = self.srcs.len() as u32;
        self.srcs.len() - 1
    }
}

/// A request in flight.
#[derive(Debug)]
pub(super) struct Req {
    pub(super) prov: usize,
    pub(super) group: GroupId,
    /// The units asked for (for a pick: empty until the provider names its choice).
    pub(super) units: Vec<u32>,
    pub(super) got: Vec<u32>,
    pub(super) pick: bool,
    /// For units a reader waits for ([`super::Engine::want_now`]).
    pub(super) urgent: bool,
    pub(super) sent: Instant,
    pub(super) deadline: Instant,
}

/// Records that source `si` holds `units`, keeping the availability counts. Units already
/// done are left out: they are never asked for again, so neither who holds them nor how
/// many do matters any more.
pub(super) fn add_have(g: &mut Group, si: usize, units: &PieceSet, origin: bool) {
    let (have, counts) = (&mut g.srcs[si].have, &mut g.counts);
    have.absorb(units, &g.done, |u| {
        if !origin {
            counts[u as usize] = counts[u as usize].saturating_add(1);
        }
    });
}

pub(super) fn remove_have(g: &mut Group, si: usize, unit: u32, origin: bool) {
    if g.srcs[si].have.remove(unit) && !origin {
        g.counts[unit as usize] = g.counts[unit as usize].saturating_sub(1);
    }
}
