//! The engine's actions turned into I/O tasks: lookups, requests, subscriptions,
//! announcements, reports, and the ends of groups.

use super::*;

impl Actor {
    /// Carries out one action of the engine.
    pub(super) fn act(&mut self, a: Action) {
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
            Action::Report { provider, hash } => {
                warn!(provider = ?provider, blob = %hash.short(), "banned for this download: it sent bytes that fail verification");
                let tracker = self.ctx.tracker.clone();
                self.tasks.spawn(async move {
                    tracker.report(provider, hash).await;
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
                let (job, first) = {
                    let g = &self.groups[group.0 as usize];
                    (g.job, g.first)
                };
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.failure.get_or_insert(e);
                }
                // Readers waiting on its pieces give up now.
                self.ctx.serving.landed.failed(first, keep);
                self.through(group, keep);
            }
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
        let why = g
            .why
            .take()
            .or_else(|| g.lookup_failed.take().map(|w| (false, w)));
        match (reason, why) {
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
}
