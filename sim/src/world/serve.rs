//! The providers' side of the simulated fleet: admission, flows, what arrives, departures.

use voltool_protocol::swarm::{Admit, Ask, Event, Outcome, PieceSet, ReqId};

use super::{Carry, Ev, Pending, Role, World, at};

impl World {
    /// Answers request `p` with `outcome` and nothing more.
    fn answer(&mut self, prov: usize, p: &Pending, outcome: Outcome) {
        self.pending.remove(&(p.from, p.req));
        let req = p.req;
        self.tell(prov, p.from, Event::Answer { req, outcome });
    }

    /// A request arrives at `prov`.
    pub(super) fn serve(&mut self, prov: usize, mut p: Pending, ask: Ask) {
        if self.nodes[prov].gone {
            return self.answer(prov, &p, Outcome::Unreachable);
        }
        if !self.pending.contains_key(&(p.from, p.req)) {
            return; // cancelled on the way
        }
        if !self.nodes[prov]
            .adm
            .would_admit(&super::node_id(p.from), p.rank)
        {
            return self.answer(prov, &p, Outcome::Busy);
        }
        let unit = match self.choose(prov, &p, &ask) {
            Ok(u) => u,
            Err(outcome) => return self.answer(prov, &p, outcome),
        };
        p.unit = unit;
        if matches!(ask, Ask::Pick { .. }) {
            self.tell(prov, p.from, Event::Picked { req: p.req, unit });
        }
        let token = self.next_token;
        self.next_token += 1;
        match self.nodes[prov]
            .adm
            .admit(token, super::node_id(p.from), p.rank)
        {
            Admit::Now => self.start_flow(prov, p),
            Admit::Queued { evicted } => {
                self.pending.insert((p.from, p.req), (prov, Some(token)));
                self.nodes[prov].waiting.insert(token, p);
                if let Some(out) = evicted.and_then(|t| self.nodes[prov].waiting.remove(&t)) {
                    self.unchoose(prov, &out);
                    self.answer(prov, &out, Outcome::Busy);
                }
            }
            Admit::Busy => self.answer(prov, &p, Outcome::Busy),
        }
    }

    /// The unit `prov` sends for a request, or how it answers instead: `Ok` with nothing
    /// when it lacks the unit asked for, busy when the origin will not send a second copy
    /// while contested.
    fn choose(&mut self, prov: usize, p: &Pending, ask: &Ask) -> Result<u32, Outcome> {
        let (blob, units) = (p.blob, self.units[p.blob]);
        let hash = self.hashes[blob];
        let is_origin = self.nodes[prov].spec.role == Role::Origin;
        let node = &mut self.nodes[prov];
        match ask {
            Ask::Units(us) => {
                let u = us[0];
                if !node.held[blob].contains(u) {
                    return Err(Outcome::Ok);
                }
                let among = PieceSet::from_iter(units, [u]);
                if is_origin && node.adm.choose(hash, units, &among).is_none() {
                    return Err(Outcome::Busy);
                }
                Ok(u)
            }
            Ask::Pick { among } => {
                let among = among.and(&node.held[blob]);
                node.adm.choose(hash, units, &among).ok_or(Outcome::Busy)
            }
        }
    }

    /// A request the origin chose a piece for goes unserved: the piece counts as sent no
    /// more.
    fn unchoose(&mut self, prov: usize, p: &Pending) {
        if self.nodes[prov].spec.role == Role::Origin {
            let hash = self.hashes[p.blob];
            self.nodes[prov].adm.unchoose(hash, p.unit);
        }
    }

    pub(super) fn start_flow(&mut self, prov: usize, p: Pending) {
        let from = p.from;
        if self.nodes[from].gone {
            // Its requester left while it waited: the piece was never sent.
            self.pending.remove(&(from, p.req));
            self.unchoose(prov, &p);
            self.next_turn(prov, from, p.rank);
            return;
        }
        let size = self.unit_bytes(p.blob, p.unit);
        let corrupt = self.nodes[prov].spec.liar;
        // A liar's piece costs its whole size on the links: the agent reads a piece whole
        // before it verifies it, as an honest one.
        let bytes = size as f64;
        self.pending.remove(&(from, p.req));
        let f = self.links.start(self.now, prov, from, bytes.max(1.0));
        self.flowing.insert((from, p.req), f);
        self.carry.insert(
            f,
            Carry {
                prov,
                p,
                bytes,
                corrupt,
            },
        );
    }

    /// A slot `prov` gave to a request of `from` and `rank` is free: the requests waiting
    /// that get the free slots start.
    pub(super) fn next_turn(&mut self, prov: usize, from: usize, rank: u16) {
        for (token, _, _) in self.nodes[prov].adm.finished(&super::node_id(from), rank) {
            if let Some(p) = self.nodes[prov].waiting.remove(&token) {
                self.start_flow(prov, p);
            }
        }
    }

    pub(super) fn flow_done(&mut self, f: usize) {
        let c = self.carry.remove(&f).expect("carried");
        self.links.end(self.now, f);
        if self.nodes[c.prov].spec.role == Role::Origin {
            self.origin_bytes += c.bytes;
        }
        let sec = (self.now / 1_000_000_000) as usize;
        if self.per_second.len() <= sec {
            self.per_second.resize(sec + 1, 0.0);
        }
        if self.debug && self.per_second[sec] == 0.0 && sec % 10 == 5 {
            self.debug_links(sec);
        }
        self.per_second[sec] += c.bytes;
        let from = c.p.from;
        self.flowing.remove(&(from, c.p.req));
        let req = c.p.req;
        if !c.corrupt {
            // Held (and pushed to its subscribers) once it has arrived and verified.
            let t = self.now + self.lat(c.prov, from);
            self.push(
                t,
                Ev::ToNode(
                    from,
                    Event::Unit {
                        req,
                        unit: c.p.unit,
                        verified: true,
                    },
                ),
            );
            self.held_at(t, from, c.p.blob, c.p.unit);
        } else {
            self.tell(
                c.prov,
                from,
                Event::Unit {
                    req,
                    unit: c.p.unit,
                    verified: false,
                },
            );
        }
        self.tell(
            c.prov,
            from,
            Event::Answer {
                req,
                outcome: Outcome::Ok,
            },
        );
        self.next_turn(c.prov, from, c.p.rank);
    }

    /// For `VOLTOOL_SIM_DEBUG`: how many flows each uplink carries and how much of it they
    /// use, at second `sec`.
    fn debug_links(&self, sec: usize) {
        let u = self.links.upload_use();
        let mut hist = [0usize; 6];
        let (mut sum, mut k) = (0.0, 0);
        for (n, used) in &u {
            hist[(*n).min(5)] += 1;
            if *n > 0 {
                sum += used;
                k += 1;
            }
        }
        let queued: usize = self.nodes.iter().map(|n| n.waiting.len()).sum();
        eprintln!(
            "t={sec}s out-flow counts {hist:?}, use of busy uplinks {:.2}, queued {queued}",
            sum / k.max(1) as f64
        );
    }

    /// Bytes of piece `unit` of blob `blob`.
    fn unit_bytes(&self, blob: usize, unit: u32) -> u64 {
        let (pb, size) = (self.sc.cfg.piece_bytes, self.sc.blobs[blob]);
        let s = unit as u64 * pb;
        (s + pb).min(size) - s.min(size)
    }

    /// Node `n` will hold a unit at time `t` (when its bytes have arrived).
    pub(super) fn held_at(&mut self, t: u64, n: usize, blob: usize, unit: u32) {
        let traced = n < self.traced_below;
        let bytes = self.unit_bytes(blob, unit);
        let node = &mut self.nodes[n];
        if node.held[blob].insert(unit) {
            node.bytes += bytes;
            if traced {
                node.result.trace.push((t as f64 / 1e9, node.bytes));
            }
            node.subs.held(at(self.base, t), self.hashes[blob], unit);
            self.run_subs_timer(n);
        }
    }

    pub(super) fn run_subs_timer(&mut self, n: usize) {
        let Some(t) = self.nodes[n].subs.poll_timeout() else {
            return;
        };
        let t = (t.saturating_duration_since(self.base).as_nanos() as u64).max(self.now);
        if self.nodes[n].timer.is_none_or(|(x, _)| x > t) {
            let node = &mut self.nodes[n];
            node.timer_gen += 1;
            let epoch = node.timer_gen;
            node.timer = Some((t, epoch));
            self.push(t, Ev::Timer(n, epoch));
        }
    }

    pub(super) fn cancel(&mut self, prov: usize, from: usize, req: ReqId) {
        if let Some(f) = self.flowing.remove(&(from, req)) {
            if self.links.flows[f].live && self.links.flows[f].src == prov {
                let total = self.carry.get(&f).map_or(0.0, |c| c.bytes);
                let rank = self.carry.get(&f).map_or(0, |c| c.p.rank);
                let sent = self.links.sent(f, self.now, total);
                if self.nodes[prov].spec.role == Role::Origin {
                    self.origin_bytes += sent;
                }
                self.carry.remove(&f);
                self.links.end(self.now, f);
                self.next_turn(prov, from, rank);
            }
        } else if let Some((_, token)) = self.pending.remove(&(from, req))
            && let Some(token) = token
        {
            self.nodes[prov].adm.forget(token);
            if let Some(p) = self.nodes[prov].waiting.remove(&token) {
                self.unchoose(prov, &p);
            }
        }
    }

    /// Node `n` leaves: its transfers break, and it answers nobody again.
    pub(super) fn leave(&mut self, n: usize) {
        if self.nodes[n].gone {
            return;
        }
        self.nodes[n].gone = true;
        // Pushes to it are dropped from now on.
        self.held_back[n] = Vec::new();
        self.runs[n] += 1;
        if self.nodes[n].engine.is_some()
            && self.nodes[n].result.done_at.is_none()
            && !self.nodes[n].result.failed
        {
            self.finished(n);
        }
        // What waited in its queue is refused at once: the connection closed.
        let waiting: Vec<Pending> = self.nodes[n].waiting.drain().map(|(_, p)| p).collect();
        for p in waiting {
            self.pending.remove(&(p.from, p.req));
            self.tell(
                n,
                p.from,
                Event::Answer {
                    req: p.req,
                    outcome: Outcome::Unreachable,
                },
            );
        }
        for f in self.links.flows_of(n) {
            let Some(c) = self.carry.remove(&f) else {
                continue;
            };
            self.flowing.remove(&(c.p.from, c.p.req));
            self.links.end(self.now, f);
            if c.prov == n {
                // Its downloaders see the connection close.
                self.tell(
                    n,
                    c.p.from,
                    Event::Answer {
                        req: c.p.req,
                        outcome: Outcome::Unreachable,
                    },
                );
            } else {
                // The requester left mid-piece: the piece did not get through.
                self.unchoose(c.prov, &c.p);
                self.next_turn(c.prov, c.p.from, c.p.rank);
            }
        }
    }
}
