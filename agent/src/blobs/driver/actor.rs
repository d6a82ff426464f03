//! The actor's loop: the engine's timeout, the inbox of fetches and what the I/O tasks
//! bring, turned into events; progress counted as units arrive.

use super::*;

impl Actor {
    pub(super) async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Msg>) {
        let mut open = true;
        loop {
            let hold = self.standing.update(!self.jobs.is_empty());
            self.engine.set_paused(hold);
            self.engine.set_background(self.standing.is_background());
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
                msg = inbox.recv(), if open => match msg {
                    Some(Msg::Fetch(job)) => self.want(job),
                    Some(Msg::Want { hash, units, found }) => {
                        let _ = found.send(self.want_now(hash, &units));
                    }
                    None => open = false,
                },
                _ = sleep_until(wake), if wake.is_some() => self.on_wake(),
                _ = self.standing.changed() => {}
            }
        }
        self.standing.update(false);
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
                lookup_failed: None,
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

    /// A reader waits for pieces of `hash`: the newest group fetching it asks for them
    /// first.
    fn want_now(&mut self, hash: Hash, units: &PieceSet) -> bool {
        let group = self
            .groups
            .iter()
            .rposition(|g| g.first == hash && g.record.is_some() && !g.finished);
        if let Some(g) = group {
            self.engine
                .want_now(Instant::now(), GroupId(g as u32), units);
        }
        group.is_some()
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

    /// A unit new to the download: progress and figures.
    fn count(&mut self, group: GroupId, bytes: u64, provider: NodeId) {
        let origin = self.addrs.get(&provider).is_some_and(|(_, o)| *o);
        let Some(j) = self.jobs.get_mut(&self.groups[group.0 as usize].job) else {
            return;
        };
        (j.counter)(bytes);
        if let Some(m) = &self.ctx.metrics {
            let source = if origin {
                crate::metrics::Source::Origin
            } else {
                crate::metrics::Source::Peer
            };
            m.received(source, bytes);
        }
        if origin {
            j.stats.from_origin += bytes;
        } else {
            *j.stats.from_peers.entry(peer_name(provider)).or_default() += bytes;
        }
    }

    fn on_done(&mut self, done: Done) {
        let now = Instant::now();
        match done {
            Done::Lookup { group, found } => {
                // A failed lookup explains a failure only until the tracker answers again.
                let g = &mut self.groups[group.0 as usize];
                let list = match found {
                    Ok(list) => {
                        g.lookup_failed = None;
                        list
                    }
                    Err(why) => {
                        g.lookup_failed = Some(why);
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
            Done::Recorded {
                group,
                bytes,
                result,
            } => self.recorded(group, bytes, result),
            Done::Replied | Done::Quiet => {}
        }
    }
}
