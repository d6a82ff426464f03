//! Groups: batches of small blobs, resumed blobs, and a property test that every piece is
//! eventually requested.

use super::*;

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
