//! The engine driven directly: no I/O, no clock, seeded.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::hash::Hash;

fn id(n: u8) -> NodeId {
    NodeId([n; 32])
}

const ME: u8 = 200;
const ORIGIN: u8 = 0;

fn blob(n: u8) -> Hash {
    Hash([n; 32])
}

fn cfg() -> Config {
    Config {
        piece_bytes: 16 << 10,
        ..Config::default()
    }
}

/// One engine and the actions it took.
struct H {
    e: Engine,
    now: Instant,
    log: Vec<Action>,
}

impl H {
    fn new(cfg: Config) -> Self {
        H {
            e: Engine::new(cfg, id(ME), 1),
            now: Instant::now(),
            log: Vec::new(),
        }
    }

    fn pieces(&mut self, n: u8, pieces: u64) -> GroupId {
        let size = pieces * self.e.config().piece_bytes;
        self.e.want(Blobs::Pieces {
            hash: blob(n),
            size,
            held: PieceSet::empty(pieces as u32),
        })
    }

    /// Actions until the engine has none.
    fn drain(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.e.poll_action(self.now) {
            out.push(a);
        }
        self.log.extend(out.iter().cloned());
        out
    }

    fn event(&mut self, ev: Event) -> Vec<Action> {
        self.e.handle(self.now, ev);
        self.drain()
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.e.handle_timeout(self.now);
        self.drain()
    }

    fn providers(&mut self, g: GroupId, list: &[(u8, bool)]) -> Vec<Action> {
        let providers = list
            .iter()
            .map(|&(n, complete)| ProviderInfo {
                id: id(n),
                complete,
                origin: n == ORIGIN,
            })
            .collect();
        self.event(Event::Providers {
            group: g,
            providers,
        })
    }
}

/// The requests among `actions`, with their group and rank.
fn requests_ranked(actions: &[Action]) -> Vec<(ReqId, NodeId, GroupId, Ask, u16)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request {
                req,
                provider,
                group,
                ask,
                rank,
            } => Some((*req, *provider, *group, ask.clone(), *rank)),
            _ => None,
        })
        .collect()
}

fn requests(actions: &[Action]) -> Vec<(ReqId, NodeId, GroupId, Ask)> {
    requests_ranked(actions)
        .into_iter()
        .map(|(r, p, g, a, _)| (r, p, g, a))
        .collect()
}

fn units(ask: &Ask) -> Vec<u32> {
    match ask {
        Ask::Units(u) => u.clone(),
        Ask::Pick { .. } => panic!("a pick"),
    }
}

/// Answers every outstanding request to `who` with its units, until nothing is asked.
fn finish_from(h: &mut H, who: NodeId) {
    for _ in 0..1000 {
        let open: Vec<(ReqId, Vec<u32>)> =
            h.e.reqs
                .iter()
                .filter(|(_, r)| h.e.provs[r.prov].id == who)
                .map(|(id, r)| (*id, r.units.clone()))
                .collect();
        if open.is_empty() {
            let a = h.advance(Duration::from_millis(100));
            if requests(&a).is_empty() && h.e.reqs.is_empty() {
                return;
            }
            continue;
        }
        for (req, us) in open {
            for u in us {
                h.event(Event::Unit {
                    req,
                    unit: u,
                    verified: true,
                });
            }
            h.event(Event::Answer {
                req,
                outcome: Outcome::Ok,
            });
        }
    }
    panic!("did not finish");
}

mod groups;
mod lookups;
mod paused;
mod providers;
mod urgent;
