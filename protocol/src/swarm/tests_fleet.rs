//! Several engines at once: simultaneous downloaders sharing one origin.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::*;
use crate::hash::Hash;

fn id(n: u8) -> NodeId {
    NodeId([n; 32])
}

fn blob(n: u8) -> Hash {
    Hash([n; 32])
}

/// A piece being served: (when done, seq, provider, requester, request, unit).
type Serving = (Instant, u64, u8, u8, u64, u32);

/// Simultaneous downloaders and one origin, with a fixed time per piece at each provider
/// (one at a time per sending slot) and instant pushes of what each newly holds.
#[test]
fn among_simultaneous_downloaders_the_origin_sends_each_piece_about_once() {
    let f = fleet(None);
    assert!(
        f.origin_sent <= f.units + f.units / 4,
        "the origin sent {} pieces of {}",
        f.origin_sent,
        f.units
    );
}

/// Every downloader also has a reader that reads the blob in order, waiting for the next
/// `window` pieces from where it stands ([`Engine::want_now`]): all of them start at the
/// same place at the same moment, as a fleet loading one model does. The origin still
/// sends each piece not much more than once (the readers get different pieces of the
/// window from it and the rest from each other), and every reader holds the start of the
/// blob long before the whole.
#[test]
fn readers_waiting_at_the_same_place_do_not_collapse_onto_the_origin() {
    let window = 4;
    let f = fleet(Some(window));
    // The fill keeps only its share while readers wait (`fill_while_reading`), so the front
    // comes from the sources a little more often than with no reader (B8 measures 1.08 F
    // of origin egress with 7 readers); a collapse would be one copy per reader.
    assert!(
        f.origin_sent <= f.units + f.units / 2,
        "the origin sent {} pieces of {}",
        f.origin_sent,
        f.units
    );
    let mut first = f.first_window.clone();
    first.sort();
    let median = first[first.len() / 2];
    assert!(
        median * 8 <= f.total,
        "readers held the first {window} pieces after {median:?} of {:?}",
        f.total
    );
    // Without readers, the start of the blob comes at no particular time.
    let plain = fleet(None);
    let mut plain_first = plain.first_window.clone();
    plain_first.sort();
    assert!(
        median < plain_first[plain_first.len() / 2],
        "with readers {median:?}, without {:?}",
        plain_first[plain_first.len() / 2]
    );
}

/// What [`fleet`] measured.
struct Fleet {
    units: u32,
    origin_sent: u32,
    /// When each downloader held the blob's first 4 pieces, from the start.
    first_window: Vec<Duration>,
    /// When the last downloader held the whole blob.
    total: Duration,
}

/// Six downloaders of one blob of 64 pieces and an origin; with `readers`, each downloader
/// waits for that many pieces from the first it lacks, all the time.
fn fleet(readers: Option<u32>) -> Fleet {
    let c = Config {
        piece_bytes: 16 << 10,
        ..Config::default()
    };
    let (n, units) = (6u8, 64u32);
    let mut first_window: BTreeMap<u8, Duration> = BTreeMap::new();
    let size = units as u64 * c.piece_bytes;
    let piece_time = Duration::from_millis(100);
    let t0 = Instant::now();
    let mut engines: BTreeMap<u8, (Engine, GroupId)> = BTreeMap::new();
    let mut admission: HashMap<u8, Admission> = HashMap::new();
    for p in 0..=n {
        admission.insert(p, Admission::new(c.clone(), p as u64));
    }
    for p in 1..=n {
        let mut e = Engine::new(c.clone(), id(p), p as u64);
        let g = e.want(Blobs::Pieces {
            hash: blob(1),
            size,
            held: PieceSet::empty(units),
        });
        engines.insert(p, (e, g));
    }
    // Pieces being served: (when done, seq, provider, requester, request, unit).
    let mut queue: BinaryHeap<std::cmp::Reverse<Serving>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut now = t0;
    let mut waiting: HashMap<u8, Vec<(u8, u64, u32)>> = HashMap::new();
    let mut holders: HashMap<u8, PieceSet> = HashMap::new();
    let mut origin_sent = 0u32;
    let mut evicted: Vec<(u8, ReqId)> = Vec::new();
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 200_000);
        for (p, (e, g)) in engines.iter_mut() {
            let done = e.done_units(*g);
            let pos = (0..units).find(|u| !done.contains(*u)).unwrap_or(units);
            if pos >= 4 {
                first_window.entry(*p).or_insert(now - t0);
            }
            if let Some(w) = readers
                && pos < units
            {
                let waited = PieceSet::from_iter(units, pos..(pos + w).min(units));
                e.want_now(now, *g, &waited);
            }
        }
        // Run every engine's actions.
        let mut progressed = true;
        while progressed {
            progressed = false;
            let ids: Vec<u8> = engines.keys().copied().collect();
            for p in ids {
                let (e, _) = engines.get_mut(&p).unwrap();
                let Some(a) = e.poll_action(now) else {
                    continue;
                };
                progressed = true;
                match a {
                    Action::Lookup { group } => {
                        let providers = (0..=n)
                            .filter(|q| *q != p)
                            .map(|q| ProviderInfo {
                                id: id(q),
                                complete: q == 0,
                                origin: q == 0,
                            })
                            .collect();
                        e.handle(now, Event::Providers { group, providers });
                    }
                    Action::Subscribe { provider, group } => {
                        let q = provider.0[0];
                        let held = holders.get(&q).cloned().unwrap_or(PieceSet::empty(units));
                        e.handle(
                            now,
                            Event::Have {
                                provider,
                                group,
                                units: held,
                            },
                        );
                    }
                    Action::Request {
                        req,
                        provider,
                        ask,
                        rank,
                        ..
                    } => {
                        let q = provider.0[0];
                        let adm = admission.get_mut(&q).unwrap();
                        let unit = match &ask {
                            Ask::Units(us) => Some(us[0]),
                            Ask::Pick { among } => adm.choose(blob(1), units, among),
                        };
                        let Some(unit) = unit else {
                            e.handle(
                                now,
                                Event::Answer {
                                    req,
                                    outcome: Outcome::Busy,
                                },
                            );
                            continue;
                        };
                        match adm.admit(req.0, id(p), rank) {
                            Admit::Busy => e.handle(
                                now,
                                Event::Answer {
                                    req,
                                    outcome: Outcome::Busy,
                                },
                            ),
                            admit => {
                                if matches!(ask, Ask::Pick { .. }) {
                                    e.handle(now, Event::Picked { req, unit });
                                }
                                if q == 0 {
                                    origin_sent += 1;
                                }
                                if let Admit::Queued { evicted: Some(out) } = admit {
                                    let w = waiting.entry(q).or_default();
                                    if let Some(k) = w.iter().position(|x| x.1 == out) {
                                        evicted.push((w.remove(k).0, ReqId(out)));
                                    }
                                }
                                if admit == Admit::Now {
                                    seq += 1;
                                    queue.push(std::cmp::Reverse((
                                        now + piece_time,
                                        seq,
                                        q,
                                        p,
                                        req.0,
                                        unit,
                                    )));
                                } else {
                                    waiting.entry(q).or_default().push((p, req.0, unit));
                                }
                            }
                        }
                    }
                    Action::Cancel { .. }
                    | Action::Unsubscribe { .. }
                    | Action::Announce { .. }
                    | Action::Report { .. }
                    | Action::Done { .. }
                    | Action::Failed { .. } => {}
                }
            }
        }
        if engines.values().all(|(e, _)| e.is_idle()) {
            break;
        }
        // The next event: a piece served, or an engine's timer.
        for (p, req) in std::mem::take(&mut evicted) {
            let (e, _) = engines.get_mut(&p).unwrap();
            e.handle(
                now,
                Event::Answer {
                    req,
                    outcome: Outcome::Busy,
                },
            );
        }
        let timer = engines
            .values_mut()
            .filter_map(|(e, _)| e.poll_timeout())
            .min();
        let next = queue.peek().map(|r| r.0.0);
        let at = match (timer, next) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).expect("something pending"),
        };
        now = now.max(at);
        if next.is_some_and(|t| t <= now) {
            let std::cmp::Reverse((_, _, q, p, req, unit)) = queue.pop().unwrap();
            let (e, _) = engines.get_mut(&p).unwrap();
            e.handle(
                now,
                Event::Unit {
                    req: ReqId(req),
                    unit,
                    verified: true,
                },
            );
            e.handle(
                now,
                Event::Answer {
                    req: ReqId(req),
                    outcome: Outcome::Ok,
                },
            );
            holders
                .entry(p)
                .or_insert_with(|| PieceSet::empty(units))
                .insert(unit);
            // Pushed to everyone else at once.
            for (o, (oe, og)) in engines.iter_mut() {
                if *o != p {
                    oe.handle(
                        now,
                        Event::Have {
                            provider: id(p),
                            group: *og,
                            units: PieceSet::from_iter(units, [unit]),
                        },
                    );
                }
            }
            let adm = admission.get_mut(&q).unwrap();
            if let Some(&(tok, _, _)) = adm.finished(&id(p), 0).first()
                && let Some(k) = waiting
                    .get(&q)
                    .and_then(|w| w.iter().position(|x| x.1 == tok))
            {
                let (p2, r2, u2) = waiting.get_mut(&q).unwrap().remove(k);
                seq += 1;
                queue.push(std::cmp::Reverse((now + piece_time, seq, q, p2, r2, u2)));
            }
        }
        for (e, _) in engines.values_mut() {
            if e.poll_timeout().is_some_and(|t| t <= now) {
                e.handle_timeout(now);
            }
        }
    }
    for (e, g) in engines.values() {
        assert!(e.done_units(*g).is_full());
    }
    Fleet {
        units,
        origin_sent,
        first_window: first_window.into_values().collect(),
        total: now - t0,
    }
}
