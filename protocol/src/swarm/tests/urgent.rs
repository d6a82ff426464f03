//! Units a reader waits for ([`Engine::want_now`], a lazy mount's read): first, at the
//! foreground's rank, paused or not; from peers, else from the origin as a pick among
//! them; asked of a second provider when slow.

use super::*;

/// The requests among `actions`, with their rank.
fn ranked(actions: &[Action]) -> Vec<(ReqId, NodeId, Ask, u16)> {
    requests_ranked(actions)
        .into_iter()
        .map(|(r, p, _, a, rank)| (r, p, a, rank))
        .collect()
}

fn set(units: u32, of: &[u32]) -> PieceSet {
    PieceSet::from_iter(units, of.iter().copied())
}

#[test]
fn units_a_reader_waits_for_go_first_to_peers_at_the_foregrounds_rank() {
    let mut h = H::new(cfg());
    h.e.set_background(true);
    let g = h.pieces(1, 256);
    h.drain();
    let fill = ranked(&h.providers(g, &[(1, true), (2, true), (ORIGIN, true)]));
    assert!(!fill.is_empty());
    assert!(
        fill.iter().all(|r| r.3 >= BACKGROUND_RANK),
        "the fill ranks as a background download: {fill:?}"
    );
    // The fill has every slot; the reader's units go out beyond it, at once.
    h.e.want_now(h.now, g, &set(256, &[200, 201]));
    let now = ranked(&h.drain());
    let asked: Vec<u32> = now.iter().flat_map(|r| units(&r.2)).collect();
    assert_eq!(asked, vec![200, 201], "{now:?}");
    for r in &now {
        assert_ne!(r.1, id(ORIGIN), "a peer holds it: {now:?}");
        assert_eq!(r.3, 0, "a reader's request ranks first: {now:?}");
    }
    // Units held already are not asked again.
    let (req, _, ask, _) = now[0].clone();
    h.event(Event::Unit {
        req,
        unit: units(&ask)[0],
        verified: true,
    });
    h.event(Event::Answer {
        req,
        outcome: Outcome::Ok,
    });
    h.e.want_now(h.now, g, &set(256, &[200]));
    let again = ranked(&h.drain());
    assert!(
        again
            .iter()
            .all(|r| !matches!(&r.2, Ask::Units(u) if u.contains(&200))),
        "{again:?}"
    );
}

#[test]
fn a_paused_download_still_fetches_what_a_reader_waits_for_and_nothing_else() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 64);
    h.drain();
    h.e.set_paused(true);
    assert!(ranked(&h.providers(g, &[(1, true), (ORIGIN, true)])).is_empty());
    h.e.want_now(h.now, g, &set(64, &[7]));
    let out = ranked(&h.drain());
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(units(&out[0].2), vec![7]);
    let (req, ..) = out[0];
    h.event(Event::Unit {
        req,
        unit: 7,
        verified: true,
    });
    let after = ranked(&h.event(Event::Answer {
        req,
        outcome: Outcome::Ok,
    }));
    assert!(after.is_empty(), "paused: nothing else goes out: {after:?}");
    assert!(h.e.done_units(g).contains(7));
}

#[test]
fn units_no_peer_holds_go_to_the_origin_as_a_pick_among_them() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 64);
    h.drain();
    h.e.set_paused(true);
    // Peer 1 holds only pieces 0..4; the reader waits for 10..14.
    h.providers(g, &[(1, false), (ORIGIN, true)]);
    h.event(Event::Have {
        provider: id(1),
        group: g,
        units: set(64, &[0, 1, 2, 3]),
    });
    h.e.want_now(h.now, g, &set(64, &[10, 11, 12, 13]));
    let out = ranked(&h.drain());
    assert!(!out.is_empty());
    for (_, who, ask, rank) in &out {
        assert_eq!(*who, id(ORIGIN));
        assert_eq!(*rank, 0);
        match ask {
            Ask::Pick { among } => {
                assert!(among.iter().all(|u| (10..14).contains(&u)), "{among:?}")
            }
            other => panic!("not a pick: {other:?}"),
        }
    }
}

#[test]
fn a_waited_unit_slow_to_come_is_asked_of_a_second_provider() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 256);
    h.drain();
    h.providers(g, &[(1, true), (2, true)]);
    h.e.want_now(h.now, g, &set(256, &[99]));
    let first = ranked(&h.drain());
    let (_, who, ..) = first
        .iter()
        .find(|r| units(&r.2) == vec![99])
        .expect("asked")
        .clone();
    // Plenty is left to hand out (no endgame for the fill), but a reader waits.
    let later = ranked(&h.advance(h.e.config().endgame_after + Duration::from_millis(1)));
    let second: Vec<_> = later.iter().filter(|r| units(&r.2) == vec![99]).collect();
    assert_eq!(second.len(), 1, "{later:?}");
    assert_ne!(second[0].1, who, "not of the one already sending it");
}

#[test]
fn a_queued_group_a_reader_waits_for_starts_at_once() {
    let mut h = H::new(Config {
        blobs_in_flight: 1,
        ..cfg()
    });
    let a = h.pieces(1, 16);
    let b = h.pieces(2, 16);
    let first = h.drain();
    assert!(
        !first
            .iter()
            .any(|x| matches!(x, Action::Lookup { group } if *group == b)),
        "{first:?}"
    );
    h.e.want_now(h.now, b, &set(16, &[0]));
    let out = h.drain();
    assert!(
        out.iter()
            .any(|x| matches!(x, Action::Lookup { group } if *group == b)),
        "{out:?}"
    );
    let _ = a;
}

#[test]
fn while_a_reader_waits_the_fill_keeps_only_its_share_of_the_link() {
    let c = cfg();
    let mut h = H::new(c.clone());
    let g = h.pieces(1, 256);
    h.drain();
    h.e.want_now(h.now, g, &set(256, &[200, 201, 202, 203, 204, 205]));
    let out = ranked(&h.providers(g, &[(1, true), (2, true), (ORIGIN, true)]));
    let waited =
        |r: &&(ReqId, NodeId, Ask, u16)| units(&r.2).iter().all(|u| (200..206).contains(u));
    let (urgent, fill): (Vec<_>, Vec<_>) = out.iter().partition(waited);
    assert!(!urgent.is_empty(), "{out:?}");
    assert!(
        !fill.is_empty() && fill.len() <= c.fill_while_reading,
        "the fill goes on, within its share: {out:?}"
    );
    // Once what the reader waited for is here, the fill takes the whole link again.
    let mut more = Vec::new();
    for (req, _, ask, _) in urgent {
        for unit in units(ask) {
            more.extend(ranked(&h.event(Event::Unit {
                req: *req,
                unit,
                verified: true,
            })));
        }
        more.extend(ranked(&h.event(Event::Answer {
            req: *req,
            outcome: Outcome::Ok,
        })));
    }
    assert_eq!(
        fill.len() + more.len(),
        c.pieces_in_flight,
        "the fill has every slot again: {more:?}"
    );
}
