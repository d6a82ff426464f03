//! The engine's choices: which groups run, which unit to ask for, of whom; the endgame;
//! when a group is stuck.

use std::time::Instant;

use super::engine::{Action, Ask, Blobs, Engine, Failure, GroupId, ReqId};
use super::state::Req;

impl Engine {
    /// Turns the current state into requests, lookups and announcements.
    pub(super) fn schedule(&mut self, now: Instant) {
        self.start_groups(now);
        self.reading = self
            .active
            .iter()
            .any(|g| !self.groups[g.0 as usize].urgent.is_empty());
        let active = self.active.clone();
        for gid in active {
            let gi = gid.0 as usize;
            if self.groups[gi].finished {
                continue;
            }
            let g = &mut self.groups[gi];
            if !g.lookup_in_flight && g.lookup_due.is_some_and(|t| t <= now) {
                g.lookup_in_flight = true;
                g.lookup_due = None;
                self.actions.push_back(Action::Lookup { group: gid });
            }
            if self.groups[gi].lookups == 0 {
                continue;
            }
            if self.groups[gi].is_pieces() && !self.groups[gi].urgent.is_empty() {
                // What readers wait for goes first, paused or not.
                self.fill_urgent(now, gid);
                self.urgent_endgame(now, gid);
            }
            if self.paused {
                continue;
            }
            if self.groups[gi].is_pieces() {
                self.fill_pieces(now, gid);
                self.endgame(now, gid);
            } else {
                self.fill_small(now, gid);
            }
            self.check_stuck(now, gid);
        }
        if self.announce_due.is_some_and(|t| t <= now) {
            self.flush_announcements();
        }
    }

    /// Starts queued groups while there is room: large blobs while fewer than
    /// [`super::Config::blobs_in_flight`] still have pieces to hand out, batches of small
    /// blobs one more than there are lanes (so the next lookup is ready).
    fn start_groups(&mut self, now: Instant) {
        let mut k = 0;
        while k < self.queued.len() {
            let gid = self.queued[k];
            let pieces = self.groups[gid.0 as usize].is_pieces();
            let running = self
                .active
                .iter()
                .filter(|a| {
                    let g = &self.groups[a.0 as usize];
                    g.is_pieces() == pieces && (!pieces || !g.wantable.is_empty())
                })
                .count();
            let room = if pieces {
                self.cfg.blobs_in_flight
            } else {
                self.cfg.small_lanes + 1
            };
            if running >= room {
                k += 1;
                continue;
            }
            self.queued.remove(k);
            self.start(now, gid);
        }
    }

    pub(super) fn start(&mut self, now: Instant, gid: GroupId) {
        let g = &mut self.groups[gid.0 as usize];
        if g.done.is_full() {
            // Held whole already: nothing to fetch.
            self.active.push(gid);
            self.complete(now, gid);
            return;
        }
        g.lookup_in_flight = true;
        self.active.push(gid);
        self.actions.push_back(Action::Lookup { group: gid });
        if let Blobs::Pieces { hash, .. } = self.groups[gid.0 as usize].spec {
            // Announced as partial at once: peers starting at the same moment find us and
            // subscribe to what we get.
            self.queue_announce(now, hash, false);
        }
    }

    /// Hands out pieces of a large blob: to the peer holding a wanted piece with the fewest
    /// requests in flight (the tracker's rank breaks ties), else to the origin, which picks.
    /// While a reader waits, the fill keeps only [`super::Config::fill_while_reading`] in
    /// flight: the link goes to what is read, and the fill still keeps pieces diverse.
    fn fill_pieces(&mut self, now: Instant, gid: GroupId) {
        let gi = gid.0 as usize;
        while self.pieces_flying < self.cfg.pieces_in_flight
            && (!self.reading
                || self.pieces_flying - self.urgent_flying < self.cfg.fill_while_reading)
        {
            let g = &self.groups[gi];
            if g.wantable.is_empty() {
                return;
            }
            let mut best: Option<(usize, usize)> = None;
            for (si, s) in g.srcs.iter().enumerate() {
                let p = &self.provs[s.prov];
                if p.origin
                    || !p.can_take(&self.cfg, now, self.cfg.pieces_per_provider)
                    || best.is_some_and(|(n, _)| p.in_flight >= n)
                {
                    continue;
                }
                if s.have.intersects(&g.wantable) {
                    best = Some((p.in_flight, si));
                    if p.in_flight == 0 {
                        // None can do better, and the first in rank wins a tie.
                        break;
                    }
                }
            }
            if let Some((_, si)) = best {
                let unit = self.choose_unit(gi, si);
                self.send(now, gid, si, Ask::Units(vec![unit]));
                continue;
            }
            let limit = self.origin_limit(gi);
            let origin = g.srcs.iter().position(|s| {
                let p = &self.provs[s.prov];
                p.origin && p.can_take(&self.cfg, now, limit) && s.have.intersects(&g.wantable)
            });
            let Some(si) = origin else {
                return;
            };
            let among = g.wantable.and(&g.srcs[si].have);
            self.send(now, gid, si, Ask::Pick { among });
        }
    }

    /// Hands out the units readers wait for, lowest first (a reader reads on from there):
    /// each to the peer holding it with the fewest requests in flight (past its share of
    /// the fill by [`super::Config::urgent_in_flight`]); those no peer can take to the
    /// origin, as a pick among them.
    fn fill_urgent(&mut self, now: Instant, gid: GroupId) {
        let gi = gid.0 as usize;
        let cap = self.cfg.pieces_in_flight + self.cfg.urgent_in_flight;
        while self.pieces_flying < cap {
            let g = &self.groups[gi];
            let waited = g.urgent.and(&g.wantable);
            if waited.is_empty() {
                return;
            }
            // A peer busy with the fill takes a reader's request too: it ranks first in
            // the peer's queue.
            let per_peer = self.cfg.pieces_per_provider + self.cfg.urgent_in_flight;
            let mut peer: Option<(u32, usize)> = None;
            'units: for u in waited.iter() {
                let mut best: Option<(usize, usize)> = None;
                for (si, s) in g.srcs.iter().enumerate() {
                    let p = &self.provs[s.prov];
                    if p.origin
                        || !s.have.contains(u)
                        || !p.can_take(&self.cfg, now, per_peer)
                        || best.is_some_and(|(n, _)| p.in_flight >= n)
                    {
                        continue;
                    }
                    best = Some((p.in_flight, si));
                }
                if let Some((_, si)) = best {
                    peer = Some((u, si));
                    break 'units;
                }
            }
            if let Some((u, si)) = peer {
                self.send_ranked(now, gid, si, Ask::Units(vec![u]), true);
                continue;
            }
            let limit = self.origin_limit(gi);
            let origin = g.srcs.iter().position(|s| {
                let p = &self.provs[s.prov];
                p.origin && p.can_take(&self.cfg, now, limit) && s.have.intersects(&waited)
            });
            let Some(si) = origin else {
                return;
            };
            let among = waited.and(&g.srcs[si].have);
            self.send_ranked(now, gid, si, Ask::Pick { among }, true);
        }
    }

    /// The endgame of the units readers wait for: one in flight alone for
    /// [`super::Config::endgame_after`] is asked of a second provider, whatever else is
    /// left to hand out.
    fn urgent_endgame(&mut self, now: Instant, gid: GroupId) {
        let gi = gid.0 as usize;
        let g = &self.groups[gi];
        let slow: Vec<(u32, usize)> = g
            .urgent
            .iter()
            .filter_map(|u| match g.flights.get(&u).map(Vec::as_slice) {
                Some([only]) => {
                    let r = self.reqs.get(only)?;
                    (r.sent + self.cfg.endgame_after <= now).then_some((u, r.prov))
                }
                _ => None,
            })
            .collect();
        if slow.is_empty() {
            return;
        }
        self.groups[gi].endgame_at = Some(now);
        let cap = self.cfg.pieces_in_flight + self.cfg.urgent_in_flight;
        let per_peer = self.cfg.pieces_per_provider + self.cfg.urgent_in_flight;
        for (unit, first) in slow {
            if self.pieces_flying >= cap {
                return;
            }
            if let Some(si) = self.second_provider(now, gi, unit, first, per_peer) {
                self.send_ranked(now, gid, si, Ask::Units(vec![unit]), true);
            }
        }
    }

    /// A source of group `gi` other than `first` that holds `unit` and can take a request
    /// (a peer with fewer than `per_peer` in flight): peers before the origin, the least
    /// busy first.
    fn second_provider(
        &self,
        now: Instant,
        gi: usize,
        unit: u32,
        first: usize,
        per_peer: usize,
    ) -> Option<usize> {
        let origin_limit = self.origin_limit(gi);
        self.groups[gi]
            .srcs
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let p = &self.provs[s.prov];
                let limit = if p.origin { origin_limit } else { per_peer };
                s.prov != first && s.have.contains(unit) && p.can_take(&self.cfg, now, limit)
            })
            .min_by_key(|(si, s)| (self.provs[s.prov].origin, self.provs[s.prov].in_flight, *si))
            .map(|(si, _)| si)
    }

    /// Requests the origin may have in flight for a group: a few while others may share it,
    /// all of them once two lookups found no peer at all.
    fn origin_limit(&self, gi: usize) -> usize {
        let g = &self.groups[gi];
        let alone = g.lookups >= 2 && g.srcs.iter().all(|s| self.provs[s.prov].origin);
        if alone {
            self.cfg.pieces_in_flight
        } else {
            self.cfg.origin_in_flight
        }
    }

    /// A wanted piece the source holds: the rarest of a few drawn at random.
    fn choose_unit(&mut self, gi: usize, si: usize) -> u32 {
        let g = &self.groups[gi];
        let cand = g.srcs[si].have.and(&g.wantable);
        let mut best: Option<u32> = None;
        for _ in 0..self.cfg.rarest_of.max(1) {
            let u = cand.random(&mut self.rng).expect("intersects");
            if best.is_none_or(|b| g.counts[u as usize] < g.counts[b as usize]) {
                best = Some(u);
            }
        }
        best.expect("drawn at least once")
    }

    /// Endgame: nothing is left to hand out, so a piece in flight for long is asked of a
    /// second provider (never the one already sending it); the first copy wins.
    fn endgame(&mut self, now: Instant, gid: GroupId) {
        let gi = gid.0 as usize;
        if !self.groups[gi].wantable.is_empty() {
            return;
        }
        self.groups[gi].endgame_at = Some(now);
        let mut slow: Vec<(Instant, u32, usize)> = self.groups[gi]
            .flights
            .iter()
            .filter_map(|(u, reqs)| match reqs.as_slice() {
                [only] => {
                    let r = self.reqs.get(only)?;
                    (r.sent + self.cfg.endgame_after <= now).then_some((r.sent, *u, r.prov))
                }
                _ => None,
            })
            .collect();
        slow.sort();
        for (_, unit, first) in slow {
            if self.pieces_flying >= self.cfg.pieces_in_flight {
                return;
            }
            let per_peer = self.cfg.pieces_per_provider;
            if let Some(si) = self.second_provider(now, gi, unit, first, per_peer) {
                self.send(now, gid, si, Ask::Units(vec![unit]));
            }
        }
    }

    /// Hands out small blobs: a batch to the first provider (in the tracker's rank, peers
    /// before the origin) that holds wanted blobs and can take a request.
    fn fill_small(&mut self, now: Instant, gid: GroupId) {
        let gi = gid.0 as usize;
        while self.small_flying < self.cfg.small_lanes {
            let g = &self.groups[gi];
            if g.wantable.is_empty() {
                return;
            }
            let usable = |origin: bool| {
                g.srcs.iter().position(|s| {
                    let p = &self.provs[s.prov];
                    p.origin == origin
                        && p.can_take(&self.cfg, now, self.cfg.pieces_per_provider)
                        && s.have.intersects(&g.wantable)
                })
            };
            let Some(si) = usable(false).or_else(|| usable(true)) else {
                return;
            };
            let Blobs::Whole { blobs } = &g.spec else {
                return;
            };
            let (mut units, mut bytes) = (Vec::new(), 0u64);
            for u in g.srcs[si].have.and(&g.wantable).iter() {
                let size = blobs[u as usize].1;
                if !units.is_empty()
                    && (units.len() >= self.cfg.small_batch_count
                        || bytes + size > self.cfg.small_batch_bytes)
                {
                    break;
                }
                units.push(u);
                bytes += size;
            }
            self.send(now, gid, si, Ask::Units(units));
        }
    }

    /// Sends a request to source `si` of a group.
    fn send(&mut self, now: Instant, gid: GroupId, si: usize, ask: Ask) {
        self.send_ranked(now, gid, si, ask, false);
    }

    /// Sends a request to source `si` of a group; one for units a reader waits for
    /// (`urgent`) ranks first at every provider.
    fn send_ranked(&mut self, now: Instant, gid: GroupId, si: usize, ask: Ask, urgent: bool) {
        let req = ReqId(self.next_req);
        self.next_req += 1;
        let gi = gid.0 as usize;
        let bytes = match &ask {
            Ask::Units(us) => us.iter().map(|u| self.unit_bytes(gid, *u)).sum(),
            Ask::Pick { .. } => self.cfg.piece_bytes,
        };
        let g = &mut self.groups[gi];
        let prov = g.srcs[si].prov;
        let units = match &ask {
            Ask::Units(us) => {
                for &u in us {
                    g.wantable.remove(u);
                    g.flights.entry(u).or_default().push(req);
                }
                us.clone()
            }
            Ask::Pick { .. } => Vec::new(),
        };
        g.flying += 1;
        if g.is_pieces() {
            self.pieces_flying += 1;
            self.urgent_flying += usize::from(urgent);
        } else {
            self.small_flying += 1;
        }
        let p = &mut self.provs[prov];
        p.in_flight += 1;
        self.stats.requests += 1;
        self.reqs.insert(
            req,
            Req {
                prov,
                group: gid,
                pick: matches!(ask, Ask::Pick { .. }),
                urgent,
                units,
                got: Vec::new(),
                sent: now,
                deadline: now + self.cfg.deadline_for(bytes),
            },
        );
        let rank = if urgent { 0 } else { self.rank() };
        self.actions.push_back(Action::Request {
            req,
            provider: self.provs[prov].id,
            group: gid,
            ask,
            rank,
        });
    }

    /// How far along the whole download is, permille of its units; past
    /// [`super::BACKGROUND_RANK`] for a background download, so that providers serve every
    /// foreground request first.
    pub(super) fn rank(&self) -> u16 {
        let permille = (self.units_done * 1000 / self.units_all.max(1)) as u16;
        if self.background {
            super::BACKGROUND_RANK + permille
        } else {
            permille
        }
    }

    /// A group that nothing is coming in for and that no known provider can serve: look
    /// again (after a growing rest); after [`super::Config::stuck_rounds`] such looks, fail.
    fn check_stuck(&mut self, now: Instant, gid: GroupId) {
        let gi = gid.0 as usize;
        let g = &self.groups[gi];
        if g.finished || g.flying > 0 || g.wantable.is_empty() || g.lookup_in_flight {
            return;
        }
        let hope = g
            .srcs
            .iter()
            .any(|s| self.provs[s.prov].usable(&self.cfg) && s.have.intersects(&g.wantable));
        if hope {
            return;
        }
        let g = &mut self.groups[gi];
        if g.stuck_look {
            // A look for this round is due already.
            return;
        }
        g.stuck_rounds += 1;
        g.stuck_look = true;
        if g.stuck_rounds > self.cfg.stuck_rounds {
            let lacking = g.units - g.done.count();
            let units = g.units;
            self.fail(gid, Failure::NoProvider { lacking, units });
            return;
        }
        let rest = self.cfg.busy_backoff * 2u32.pow((g.stuck_rounds - 1).min(16));
        let at = now + rest;
        g.lookup_due = Some(g.lookup_due.map_or(at, |t| t.min(at)));
    }
}
