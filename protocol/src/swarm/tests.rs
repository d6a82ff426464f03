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

fn requests(actions: &[Action]) -> Vec<(ReqId, NodeId, GroupId, Ask)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request {
                req,
                provider,
                group,
                ask,
                ..
            } => Some((*req, *provider, *group, ask.clone())),
            _ => None,
        })
        .collect()
}

fn units(ask: &Ask) -> Vec<u32> {
    match ask {
        Ask::Units(u) => u.clone(),
        Ask::Pick { .. } => panic!("a pick"),
    }
}

#[test]
fn endgame_asks_a_second_provider_never_the_one_sending() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 2);
    assert!(matches!(h.drain()[..], [Action::Lookup { .. }, ..]));
    let reqs = requests(&h.providers(g, &[(1, true), (2, true)]));
    assert_eq!(reqs.len(), 2, "one piece to each peer: {reqs:?}");
    let (a, b) = (&reqs[0], &reqs[1]);
    assert_ne!(a.1, b.1);
    // The first peer delivers; the second is slow with the last piece.
    h.event(Event::Unit {
        req: a.0,
        unit: units(&a.3)[0],
        verified: true,
    });
    h.event(Event::Answer {
        req: a.0,
        outcome: Outcome::Ok,
    });
    let later = h.advance(h.e.config().endgame_after);
    let twins = requests(&later);
    assert_eq!(twins.len(), 1, "{later:?}");
    assert_eq!(twins[0].1, a.1, "the second copy comes from the other peer");
    assert_eq!(units(&twins[0].3), units(&b.3));
    // The twin wins: the slow request is cancelled and the blob is done.
    let end = h.event(Event::Unit {
        req: twins[0].0,
        unit: units(&b.3)[0],
        verified: true,
    });
    assert!(end.contains(&Action::Cancel { req: b.0 }), "{end:?}");
    assert!(end.contains(&Action::Done { group: g }), "{end:?}");
    assert!(h.e.is_idle());
}

#[test]
fn endgame_with_the_only_holder_already_sending_waits() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 1);
    h.drain();
    let reqs = requests(&h.providers(g, &[(1, true)]));
    assert_eq!(reqs.len(), 1);
    let later = h.advance(h.e.config().endgame_after * 2);
    assert!(
        requests(&later).is_empty(),
        "no twin from the same peer: {later:?}"
    );
}

#[test]
fn a_ban_lasts_the_whole_download_across_blobs_and_is_reported_once() {
    let mut h = H::new(Config {
        blobs_in_flight: 1,
        ..cfg()
    });
    let g1 = h.pieces(1, 4);
    let g2 = h.pieces(2, 4);
    h.drain();
    let reqs = requests(&h.providers(g1, &[(1, true), (2, true)]));
    let liar = reqs
        .iter()
        .find(|r| r.1 == id(1))
        .expect("asked the liar")
        .clone();
    let out = h.event(Event::Unit {
        req: liar.0,
        unit: units(&liar.3)[0],
        verified: false,
    });
    assert_eq!(
        out.iter()
            .filter(|a| matches!(a, Action::Report { .. }))
            .count(),
        1
    );
    assert!(out.contains(&Action::Report { provider: id(1) }));
    // Whatever the liar still sends is not taken, and it is never asked again.
    let before = h.e.stats().by_provider.get(&id(1)).copied();
    for r in reqs.iter().filter(|r| r.1 == id(1)) {
        for u in units(&r.3) {
            h.event(Event::Unit {
                req: r.0,
                unit: u,
                verified: true,
            });
        }
    }
    assert_eq!(h.e.stats().by_provider.get(&id(1)).copied(), before);
    assert_eq!(before, None);
    // Finish the first blob from the honest peer.
    finish_from(&mut h, id(2));
    assert!(h.log.contains(&Action::Done { group: g1 }));
    // The second blob: the liar is offered again by the tracker and never asked.
    h.providers(g2, &[(1, true), (2, true)]);
    finish_from(&mut h, id(2));
    assert!(h.log.contains(&Action::Done { group: g2 }));
    assert!(
        requests(&h.log)
            .iter()
            .filter(|r| r.1 == id(1))
            .all(|r| r.0 <= liar.0.max(reqs.iter().map(|r| r.0).max().unwrap()))
    );
    assert_eq!(h.e.stats().banned, vec![id(1)]);
    assert_eq!(
        h.log
            .iter()
            .filter(|a| matches!(a, Action::Report { .. }))
            .count(),
        1
    );
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

#[test]
fn busy_answers_move_demand_elsewhere() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 16);
    h.drain();
    let reqs = requests(&h.providers(g, &[(1, true), (2, true)]));
    for r in reqs.iter().filter(|r| r.1 == id(1)) {
        h.event(Event::Answer {
            req: r.0,
            outcome: Outcome::Busy,
        });
    }
    // Freed slots go to the other peer while the busy one rests.
    let next = requests(&h.drain());
    let mut asked: Vec<NodeId> = h.e.reqs.values().map(|r| h.e.provs[r.prov].id).collect();
    asked.dedup();
    assert!(next.iter().all(|r| r.1 == id(2)), "{next:?}");
    assert!(asked.iter().all(|p| *p == id(2)));
    // The other peer alone finishes the blob.
    finish_from(&mut h, id(2));
    let _ = h.advance(h.e.config().busy_backoff_max);
    assert!(h.log.contains(&Action::Done { group: g }));
}

#[test]
fn a_provider_that_dies_mid_piece_loses_its_pieces_to_others() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 8);
    h.drain();
    let reqs = requests(&h.providers(g, &[(1, true), (2, true)]));
    let dead: Vec<u32> = reqs
        .iter()
        .filter(|r| r.1 == id(1))
        .flat_map(|r| units(&r.3))
        .collect();
    assert!(!dead.is_empty());
    // The other peer sends what it was asked for at once.
    for r in reqs.iter().filter(|r| r.1 == id(2)) {
        for u in units(&r.3) {
            h.event(Event::Unit {
                req: r.0,
                unit: u,
                verified: true,
            });
        }
        h.event(Event::Answer {
            req: r.0,
            outcome: Outcome::Ok,
        });
    }
    // The silent one's requests time out...
    let out =
        h.advance(h.e.config().deadline_for(h.e.config().piece_bytes) + Duration::from_millis(1));
    for r in reqs.iter().filter(|r| r.1 == id(1)) {
        assert!(out.contains(&Action::Cancel { req: r.0 }));
    }
    // ...and its pieces are asked of the other peer.
    finish_from(&mut h, id(2));
    assert!(h.log.contains(&Action::Done { group: g }), "{:#?}", h.log);
    assert_eq!(
        h.e.stats().by_provider.get(&id(2)).copied(),
        Some(8 * h.e.config().piece_bytes)
    );
    // An unreachable provider is never asked again.
    let g2 = h.pieces(2, 4);
    h.drain();
    let reqs = requests(&h.providers(g2, &[(3, true), (2, true)]));
    for r in reqs.iter().filter(|r| r.1 == id(3)) {
        h.event(Event::Answer {
            req: r.0,
            outcome: Outcome::Unreachable,
        });
    }
    let n = h.log.len();
    finish_from(&mut h, id(2));
    assert!(requests(&h.log[n..]).iter().all(|r| r.1 == id(2)));
    assert!(h.log.contains(&Action::Done { group: g2 }));
}

#[test]
fn the_origin_is_asked_to_pick_and_only_for_what_no_peer_holds() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 4);
    h.drain();
    // A partial peer holding piece 2 only, and the origin.
    let out = h.providers(g, &[(1, false), (ORIGIN, true)]);
    assert!(out.contains(&Action::Subscribe {
        provider: id(1),
        group: g
    }));
    let out = h.event(Event::Have {
        provider: id(1),
        group: g,
        units: PieceSet::from_iter(4, [2]),
    });
    let reqs = requests(&h.log);
    let peer: Vec<_> = reqs.iter().filter(|r| r.1 == id(1)).collect();
    assert_eq!(peer.len(), 1, "{out:?}");
    assert_eq!(units(&peer[0].3), vec![2]);
    let picks: Vec<_> = reqs.iter().filter(|r| r.1 == id(ORIGIN)).collect();
    assert_eq!(picks.len(), h.e.config().origin_in_flight);
    assert!(picks.iter().all(|r| matches!(r.3, Ask::Pick { .. })));
    // The origin picks piece 0 and sends it: the next pick excludes it, and piece 2 (in
    // flight from the peer).
    let first = picks[0].0;
    h.event(Event::Picked {
        req: first,
        unit: 0,
    });
    h.event(Event::Unit {
        req: first,
        unit: 0,
        verified: true,
    });
    let out = h.event(Event::Answer {
        req: first,
        outcome: Outcome::Ok,
    });
    let next = requests(&out);
    assert_eq!(next.len(), 1, "{out:?}");
    match &next[0].3 {
        Ask::Pick { among } => {
            assert_eq!(next[0].1, id(ORIGIN));
            assert!(!among.contains(0) && !among.contains(2));
            assert!(among.contains(1) && among.contains(3));
        }
        other => panic!("the origin gets picks: {other:?}"),
    }
}

#[test]
fn a_group_nobody_can_serve_fails_after_a_few_lookups() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 2);
    h.drain();
    h.providers(g, &[]);
    let mut lookups = 0;
    for _ in 0..100 {
        let out = h.advance(Duration::from_millis(100));
        for a in &out {
            if let Action::Lookup { group } = a {
                lookups += 1;
                h.providers(*group, &[]);
            }
        }
        if h.log.iter().any(|a| matches!(a, Action::Failed { .. })) {
            break;
        }
    }
    assert!(h.log.contains(&Action::Failed {
        group: g,
        reason: Failure::NoProvider {
            lacking: 2,
            units: 2
        }
    }));
    assert!(lookups >= h.e.config().stuck_rounds as usize);
    assert!(h.e.is_idle());
}

#[test]
fn lookups_that_keep_failing_end_the_group_after_growing_rests_but_not_one_that_had_an_answer() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 2);
    h.drain();
    let mut gaps = Vec::new();
    let mut last = h.now;
    for _ in 0..1000 {
        h.e.handle(h.now, Event::LookupFailed { group: g });
        h.drain();
        if h.log.iter().any(|a| matches!(a, Action::Failed { .. })) {
            break;
        }
        // The next lookup comes by the clock alone.
        loop {
            let due = h.e.poll_timeout().expect("a lookup is due later");
            let out = h.advance(due - h.now);
            if out.iter().any(|a| matches!(a, Action::Lookup { .. })) {
                break;
            }
        }
        gaps.push(h.now - last);
        last = h.now;
    }
    let tries = h.e.config().stuck_rounds + 1;
    assert!(h.log.contains(&Action::Failed {
        group: g,
        reason: Failure::Tracker { tries }
    }));
    assert_eq!(gaps.len() as u32, tries - 1, "{gaps:?}");
    assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
    assert!(gaps.last() > gaps.first(), "{gaps:?}");
    assert!(h.e.is_idle());

    // A group that had an answer goes on with what it knows while the tracker is away.
    let mut h = H::new(cfg());
    let g = h.pieces(1, 64);
    h.drain();
    let asked = requests(&h.providers(g, &[(1, true)]));
    assert!(!asked.is_empty());
    for _ in 0..(tries * 3) {
        h.e.handle(h.now, Event::LookupFailed { group: g });
        h.drain();
    }
    assert!(!h.log.iter().any(|a| matches!(a, Action::Failed { .. })));
}

#[test]
fn small_blobs_go_many_to_a_request_and_what_a_provider_lacks_goes_elsewhere() {
    let mut h = H::new(cfg());
    let blobs: Vec<(Hash, u64)> = (1..=10).map(|n| (blob(n), 100)).collect();
    let g = h.e.want(Blobs::Whole {
        blobs: blobs.clone(),
    });
    h.drain();
    let reqs = requests(&h.providers(g, &[(1, true), (ORIGIN, true)]));
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].1, id(1), "peers before the origin");
    assert_eq!(units(&reqs[0].3).len(), 10);
    // The peer sends 7 of them: the other 3 go to the origin.
    for u in 0..7 {
        h.event(Event::Unit {
            req: reqs[0].0,
            unit: u,
            verified: true,
        });
    }
    let out = h.event(Event::Answer {
        req: reqs[0].0,
        outcome: Outcome::Ok,
    });
    let next = requests(&out);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1, id(ORIGIN));
    assert_eq!(units(&next[0].3), vec![7, 8, 9]);
    for u in 7..10 {
        h.event(Event::Unit {
            req: next[0].0,
            unit: u,
            verified: true,
        });
    }
    assert!(h.log.contains(&Action::Done { group: g }));
    let announced: Vec<Hash> = h
        .advance(Duration::from_secs(1))
        .into_iter()
        .chain(h.log.clone())
        .filter_map(|a| match a {
            Action::Announce {
                blobs,
                complete: true,
            } => Some(blobs),
            _ => None,
        })
        .flatten()
        .collect();
    let want: HashSet<Hash> = blobs.iter().map(|b| b.0).collect();
    assert_eq!(announced.into_iter().collect::<HashSet<_>>(), want);
}

#[test]
fn a_finished_batch_lets_its_list_go_and_what_waits_is_announced_now() {
    let mut h = H::new(cfg());
    let finish = |h: &mut H, n: u8| {
        let g = h.e.want(Blobs::Whole {
            blobs: vec![(blob(n), 100)],
        });
        h.drain();
        let reqs = requests(&h.providers(g, &[(ORIGIN, true)]));
        let out = h.event(Event::Unit {
            req: reqs[0].0,
            unit: 0,
            verified: true,
        });
        (g, out)
    };
    let announced = |out: &[Action]| -> Vec<Hash> {
        out.iter()
            .filter_map(|a| match a {
                Action::Announce { blobs, .. } => Some(blobs.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    // The first announcement of a download goes out at once, later ones in batches.
    let (g1, out) = finish(&mut h, 1);
    assert!(out.contains(&Action::Done { group: g1 }));
    assert_eq!(announced(&out), vec![blob(1)]);
    let (_, out) = finish(&mut h, 2);
    assert!(announced(&out).is_empty(), "{out:?}");
    h.e.announce_now();
    assert_eq!(announced(&h.drain()), vec![blob(2)]);
    // The finished batch keeps its id, not its list.
    assert_eq!(h.e.spec(g1), &Blobs::Whole { blobs: Vec::new() });
    assert_eq!(h.e.unit_bytes(g1, 0), 0);
    assert!(h.e.done_units(g1).is_full());
}

#[test]
fn a_resumed_blob_asks_only_for_what_it_lacks() {
    let mut h = H::new(cfg());
    let size = 8 * h.e.config().piece_bytes;
    let g = h.e.want(Blobs::Pieces {
        hash: blob(1),
        size,
        held: PieceSet::from_iter(8, [0, 1, 2, 3, 4, 5]),
    });
    h.drain();
    h.providers(g, &[(1, true)]);
    finish_from(&mut h, id(1));
    let asked: Vec<u32> = requests(&h.log).iter().flat_map(|r| units(&r.3)).collect();
    let mut asked_sorted = asked.clone();
    asked_sorted.sort();
    assert_eq!(asked_sorted, vec![6, 7]);
    assert!(h.log.contains(&Action::Done { group: g }));
}

/// A world of scripted providers for one engine: each holds some units, and answers each
/// request at random: busy, failed, silent (times out), or with what it holds.
#[derive(Debug, Clone)]
struct Script {
    holds: Vec<Vec<bool>>,
    busy: u8,
    fail: u8,
    silent: u8,
}

fn script() -> impl Strategy<Value = (u32, Script, u64)> {
    (1u32..40, 1usize..5, 0u8..30, 0u8..20, 0u8..10, any::<u64>()).prop_flat_map(
        |(units, provs, busy, fail, silent, seed)| {
            (
                Just(units),
                proptest::collection::vec(
                    proptest::collection::vec(any::<bool>(), units as usize),
                    provs,
                ),
                Just((busy, fail, silent, seed)),
            )
                .prop_map(move |(units, mut holds, (busy, fail, silent, seed))| {
                    // The last provider is the origin and holds everything.
                    holds.push(vec![true; units as usize]);
                    (
                        units,
                        Script {
                            holds,
                            busy,
                            fail,
                            silent,
                        },
                        seed,
                    )
                })
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever the providers do (short of lying), every unit is requested and the blob
    /// completes; no byte is taken twice from one request; in-flight counts return to zero.
    #[test]
    fn every_piece_is_eventually_requested_and_the_blob_completes((units, s, seed) in script()) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut h = H::new(Config { max_failures: 1000, ..cfg() });
        let g = h.pieces(1, units as u64);
        h.drain();
        let n = s.holds.len();
        let ids: Vec<u8> = (1..n as u8).chain([ORIGIN]).collect();
        let list: Vec<(u8, bool)> = ids.iter().enumerate().map(|(i, &p)| (p, s.holds[i].iter().all(|x| *x))).collect();
        h.providers(g, &list);
        for (i, &p) in ids.iter().enumerate() {
            if p != ORIGIN {
                let held = PieceSet::from_iter(units, (0..units).filter(|u| s.holds[i][*u as usize]));
                h.event(Event::Have { provider: id(p), group: g, units: held });
            }
        }
        let mut requested = HashSet::new();
        let mut steps = 0;
        while !h.e.is_idle() {
            steps += 1;
            prop_assert!(steps < 20_000, "no progress");
            let open: Vec<ReqId> = h.e.reqs.keys().copied().collect();
            let asked: Vec<(ReqId, usize, Ask)> = requests(&h.log[h.log.len().saturating_sub(64)..]).into_iter()
                .filter(|r| open.contains(&r.0))
                .map(|r| (r.0, ids.iter().position(|p| id(*p) == r.1).unwrap(), r.3)).collect();
            if asked.is_empty() {
                let t = h.e.poll_timeout().map(|t| t.saturating_duration_since(h.now)).unwrap_or(Duration::from_millis(10));
                h.advance(t.max(Duration::from_millis(1)));
                // A timer that has just been handled is never due again at once.
                prop_assert!(h.e.poll_timeout().is_none_or(|t| t > h.now), "a timer stays due");
                continue;
            }
            for (req, who, ask) in asked {
                if !h.e.reqs.contains_key(&req) { continue; }
                let roll: u8 = rng.random_range(0..100);
                if roll < s.silent { continue; }
                if roll < s.silent + s.busy { h.event(Event::Answer { req, outcome: Outcome::Busy }); continue; }
                if roll < s.silent + s.busy + s.fail { h.event(Event::Answer { req, outcome: Outcome::Failed }); continue; }
                let us = match ask {
                    Ask::Units(us) => us,
                    Ask::Pick { among } => {
                        let Some(u) = among.iter().next() else { continue };
                        h.event(Event::Picked { req, unit: u });
                        vec![u]
                    }
                };
                for u in us {
                    requested.insert(u);
                    if s.holds[who][u as usize] {
                        h.event(Event::Unit { req, unit: u, verified: true });
                    }
                }
                h.event(Event::Answer { req, outcome: Outcome::Ok });
            }
            h.advance(Duration::from_millis(5));
        }
        prop_assert!(h.log.contains(&Action::Done { group: g }), "{:?}", h.log.iter().rev().take(5).collect::<Vec<_>>());
        prop_assert!(h.e.done_units(g).is_full());
        prop_assert_eq!(requested.len() as u32, units);
        prop_assert_eq!(h.e.pieces_flying, 0);
        prop_assert!(h.e.provs.iter().all(|p| p.in_flight == 0));
    }
}

#[test]
fn partial_holders_past_max_sources_are_not_remembered_but_complete_ones_are_taken() {
    let mut h = H::new(Config {
        max_sources: 3,
        // Holders that hold nothing yet do not fail the blob meanwhile.
        stuck_rounds: 100,
        ..cfg()
    });
    let g = h.pieces(1, 8);
    h.drain();
    // Lookup after lookup names new partial holders: only the first three are kept.
    for round in 0..5u8 {
        let list: Vec<(u8, bool)> = (0..4).map(|k| (10 + round * 4 + k, false)).collect();
        h.providers(g, &list);
    }
    assert_eq!(h.e.provs.len(), 3, "providers remembered");
    assert_eq!(h.e.groups[g.0 as usize].srcs.len(), 3);
    // A complete holder is taken all the same, and pieces are asked of it.
    let acts = h.providers(g, &[(40, true)]);
    assert_eq!(h.e.groups[g.0 as usize].srcs.len(), 4);
    assert!(requests(&acts).iter().any(|r| r.1 == id(40)), "{acts:?}");
}
