//! Choosing providers: the endgame's second provider, bans across blobs, busy answers,
//! a provider that dies, the origin's share.

use super::*;

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
    assert!(out.contains(&Action::Report {
        provider: id(1),
        hash: blob(1),
    }));
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
