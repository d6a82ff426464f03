//! How the engine takes in what the driver tells it: tracker answers, pushes, units.

use std::time::Instant;

use super::engine::{Action, Blobs, Engine, Failure, GroupId, ProviderInfo, ReqId};
use super::state::add_have;
use super::{NodeId, PieceSet};
use crate::hash::Hash;

impl Engine {
    pub(super) fn on_providers(
        &mut self,
        now: Instant,
        group: GroupId,
        providers: Vec<ProviderInfo>,
    ) {
        self.stats.lookups += 1;
        let gi = group.0 as usize;
        {
            let g = &mut self.groups[gi];
            g.lookup_in_flight = false;
            g.stuck_look = false;
            g.lookups += 1;
            g.lookup_failures = 0;
            if g.finished {
                return;
            }
            g.lookup_due = g.is_pieces().then(|| now + g.lookup_gap);
            g.lookup_gap = (g.lookup_gap * 2).min(self.cfg.lookup_refresh_max);
        }
        for info in providers {
            if info.id == self.me {
                continue;
            }
            let full = info.complete || info.origin;
            // A partial holder that would not be taken is not even remembered: what an
            // engine keeps is bounded by its sources, not by how many lookups it made.
            if !full
                && self.groups[gi].srcs.len() >= self.cfg.max_sources
                && !self.prov_index.contains_key(&info.id)
            {
                continue;
            }
            let p = self.intern(info.id, info.origin);
            let g = &mut self.groups[gi];
            match g.src_of(p) {
                Some(si) if full => {
                    let all = PieceSet::full(g.units);
                    add_have(g, si, &all, self.provs[p].origin);
                }
                Some(_) => {}
                None if !full && g.srcs.len() >= self.cfg.max_sources => {}
                None => {
                    let si = g.add_src(p, false);
                    if full {
                        let all = PieceSet::full(g.units);
                        add_have(g, si, &all, info.origin);
                    } else if g.is_pieces()
                        && g.srcs.iter().filter(|s| s.subscribed).count() < self.cfg.subscriptions
                    {
                        g.srcs[si].subscribed = true;
                        self.actions.push_back(Action::Subscribe {
                            provider: info.id,
                            group,
                        });
                    }
                }
            }
        }
    }

    /// A lookup failed (the tracker is unreachable, or answered nonsense): try again after
    /// a growing rest. A group that never had an answer fails after
    /// [`super::Config::stuck_rounds`] more; one that had goes on with the providers it knows
    /// (and fails as stuck if none of them can serve).
    pub(super) fn on_lookup_failed(&mut self, now: Instant, group: GroupId) {
        let Some(g) = self.groups.get_mut(group.0 as usize) else {
            return;
        };
        g.lookup_in_flight = false;
        if g.finished {
            return;
        }
        g.lookup_failures += 1;
        if g.lookups == 0 && g.lookup_failures > self.cfg.stuck_rounds {
            let tries = g.lookup_failures;
            self.fail(group, Failure::Tracker { tries });
            return;
        }
        g.lookup_due = Some(now + g.lookup_gap);
        g.lookup_gap = (g.lookup_gap * 2).min(self.cfg.lookup_refresh_max);
    }

    /// Records what a holder holds; returns whether it holds something wanted now.
    pub(super) fn on_have(&mut self, provider: NodeId, group: GroupId, units: &PieceSet) -> bool {
        let Some(g) = self.groups.get_mut(group.0 as usize) else {
            return false;
        };
        if g.finished {
            return false;
        }
        // News only of what is done changes nothing (nor costs a provider lookup).
        if units.len() != g.units || units.is_subset(&g.done) {
            return false;
        }
        let p = match self.prov_index.get(&provider) {
            Some(&p) => p,
            None => self.intern(provider, false),
        };
        let g = &mut self.groups[group.0 as usize];
        let si = match g.src_of(p) {
            Some(si) => si,
            None => g.add_src(p, true),
        };
        add_have(g, si, units, self.provs[p].origin);
        units.intersects(&g.wantable)
    }

    pub(super) fn on_picked(&mut self, req: ReqId, unit: u32) {
        let Some(r) = self.reqs.get_mut(&req) else {
            return;
        };
        let g = &mut self.groups[r.group.0 as usize];
        if !r.pick || !r.units.is_empty() || unit >= g.units {
            return;
        }
        r.units.push(unit);
        g.wantable.remove(unit);
        g.flights.entry(unit).or_default().push(req);
    }

    pub(super) fn on_unit(&mut self, now: Instant, req: ReqId, unit: u32) {
        let Some(r) = self.reqs.get_mut(&req) else {
            return;
        };
        if !r.units.contains(&unit) || r.got.contains(&unit) {
            return;
        }
        r.got.push(unit);
        let (gid, prov) = (r.group, r.prov);
        let gi = gid.0 as usize;
        let bytes = self.unit_bytes(gid, unit);
        let g = &mut self.groups[gi];
        if !g.done.insert(unit) {
            self.stats.duplicate_bytes += bytes;
            return;
        }
        self.units_done += 1;
        g.wantable.remove(unit);
        g.urgent.remove(unit);
        g.stuck_rounds = 0;
        let p = &mut self.provs[prov];
        p.failures = 0;
        if p.origin {
            self.stats.from_origin += bytes;
        } else {
            self.stats.from_peers += bytes;
        }
        *self.stats.by_provider.entry(p.id).or_default() += bytes;
        // An endgame twin of this unit is no longer wanted.
        let twins: Vec<ReqId> = g
            .flights
            .remove(&unit)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| *t != req)
            .collect();
        for t in twins {
            self.actions.push_back(Action::Cancel { req: t });
            self.end_request(now, t, None);
        }
        let g = &self.groups[gi];
        if g.done.is_full() {
            self.complete(now, gid);
        }
    }

    pub(super) fn on_corrupt(&mut self, now: Instant, req: ReqId) {
        let Some(r) = self.reqs.get(&req) else {
            return;
        };
        let prov = r.prov;
        // The blob whose bytes failed: the piece's, or the first small blob not yet got.
        let hash = match &self.groups[r.group.0 as usize].spec {
            Blobs::Pieces { hash, .. } => *hash,
            Blobs::Whole { blobs } => {
                let unit = r.units.iter().find(|u| !r.got.contains(u)).copied();
                blobs
                    .get(unit.or(r.units.first().copied()).unwrap_or(0) as usize)
                    .map_or(Hash::EMPTY, |b| b.0)
            }
        };
        let p = &mut self.provs[prov];
        if !p.banned {
            p.banned = true;
            self.stats.banned.push(p.id);
            self.actions.push_back(Action::Report {
                provider: p.id,
                hash,
            });
        }
        // Nothing more is taken from it: every request to it ends now.
        let to_it: Vec<ReqId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.prov == prov)
            .map(|(id, _)| *id)
            .collect();
        for id in to_it {
            self.actions.push_back(Action::Cancel { req: id });
            self.end_request(now, id, None);
        }
    }
}
