//! A provider's admission and subscribers, and the tracker's bookkeeping, driven directly.

use std::time::{Duration, Instant};

use super::*;
use crate::hash::Hash;

fn id(n: u16) -> NodeId {
    let mut b = [0u8; 32];
    b[..2].copy_from_slice(&n.to_le_bytes());
    NodeId(b)
}

fn cfg() -> Config {
    Config {
        serve_slots: 2,
        serve_queue: 2,
        ..Config::default()
    }
}

#[test]
fn admission_serves_slots_then_queues_then_answers_busy() {
    let mut a = Admission::new(cfg(), 1);
    assert_eq!(a.admit(1, id(1), 500), Admit::Now);
    assert_eq!(a.admit(2, id(2), 500), Admit::Now);
    assert!(a.contested());
    assert_eq!(a.admit(3, id(3), 500), Admit::Queued { evicted: None });
    assert_eq!(a.admit(4, id(4), 500), Admit::Queued { evicted: None });
    // Full, and nobody waiting is further along than 500: busy.
    assert!(!a.would_admit(&id(5), 500));
    assert_eq!(a.admit(5, id(5), 500), Admit::Busy);
    // A slot frees: the first of equals waiting gets it.
    assert_eq!(a.finished(&id(1), 500), vec![(3, id(3), 500)]);
    assert_eq!(a.finished(&id(2), 500), vec![(4, id(4), 500)]);
    assert_eq!(a.finished(&id(3), 500), vec![]);
    assert_eq!(a.sending(), 1);
}

#[test]
fn the_requester_furthest_behind_goes_first_and_pushes_out_the_furthest_along() {
    let mut a = Admission::new(cfg(), 1);
    a.admit(1, id(1), 0);
    a.admit(2, id(2), 0);
    assert_eq!(a.admit(10, id(10), 900), Admit::Queued { evicted: None });
    assert_eq!(a.admit(11, id(11), 400), Admit::Queued { evicted: None });
    // A laggard arrives at a full queue: the one furthest along (900) is pushed out.
    assert!(a.would_admit(&id(12), 100));
    assert_eq!(
        a.admit(12, id(12), 100),
        Admit::Queued { evicted: Some(10) }
    );
    assert_eq!(a.finished(&id(1), 0), vec![(12, id(12), 100)]);
    assert_eq!(a.finished(&id(2), 0), vec![(11, id(11), 400)]);
    // A cancelled waiter never gets a turn.
    a.admit(13, id(13), 5);
    a.forget(13);
    assert_eq!(a.finished(&id(12), 100), vec![]);
}

#[test]
fn one_peer_holds_at_most_its_share_whatever_rank_it_claims() {
    let c = Config {
        serve_slots: 3,
        serve_queue: 6,
        ..Config::default()
    };
    let mut a = Admission::new(c, 1);
    let hog = id(66);
    assert_eq!(a.admit(1, hog, 0), Admit::Now);
    assert_eq!(a.admit(2, hog, 0), Admit::Now);
    // Its third request waits although a slot is free: the slot is for others.
    assert_eq!(a.admit(3, hog, 0), Admit::Queued { evicted: None });
    assert_eq!(a.admit(4, hog, 0), Admit::Queued { evicted: None });
    assert!(!a.would_admit(&hog, 0));
    assert_eq!(a.admit(5, hog, 0), Admit::Busy);
    // Another peer, far along, is served at once, and queues behind nobody of the hog's.
    assert_eq!(a.admit(6, id(1), 999), Admit::Now);
    for t in 7..10 {
        assert_eq!(
            a.admit(t, id(t as u16), 999),
            Admit::Queued { evicted: None }
        );
    }
    // The hog's slot frees: the hog's own waiter takes it (it holds one slot now).
    assert_eq!(a.finished(&hog, 0), vec![(3, hog, 0)]);
    // Another peer's slot frees: not to the hog (two slots), to the next other waiter.
    assert_eq!(a.finished(&id(1), 999), vec![(7, id(7), 999)]);
}

#[test]
fn background_requests_wait_while_any_foreground_one_is_served_or_waiting() {
    let bg = |permille: u16| super::BACKGROUND_RANK + permille;
    let c = Config {
        serve_slots: 3,
        serve_queue: 6,
        ..Config::default()
    };
    let mut a = Admission::new(c, 1);
    // A follow takes a slot while nothing else runs.
    assert_eq!(a.admit(1, id(1), bg(0)), Admit::Now);
    // A reload arrives: served; a second background request now waits although slots
    // are free, and so does one of the reload's peer's own follow.
    assert_eq!(a.admit(2, id(2), 900), Admit::Now);
    assert_eq!(a.admit(3, id(3), bg(0)), Admit::Queued { evicted: None });
    assert_eq!(a.admit(4, id(2), bg(10)), Admit::Queued { evicted: None });
    // The first follow's piece is done: its slot stays free for foreground work.
    assert_eq!(a.finished(&id(1), bg(0)), vec![]);
    // Another reload's request takes a free slot at once.
    assert_eq!(a.admit(5, id(5), 100), Admit::Now);
    assert_eq!(a.sending(), 2);
    // The reloads are done: every free slot goes to the waiting follows, the one
    // furthest behind first.
    assert_eq!(a.finished(&id(2), 900), vec![]);
    assert_eq!(
        a.finished(&id(5), 100),
        vec![(3, id(3), bg(0)), (4, id(2), bg(10))]
    );
    assert_eq!(a.sending(), 2);
}

#[test]
fn the_origin_sends_fresh_pieces_first_and_only_fresh_ones_while_contested() {
    let mut a = Admission::new(cfg(), 7);
    let h = Hash([1; 32]);
    let all = PieceSet::full(4);
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(a.choose(h, 4, &all).expect("fresh pieces left"));
    }
    first.sort();
    assert_eq!(first, vec![0, 1, 2, 3], "every piece once before any twice");
    // All sent once; slots full: no second copy.
    a.admit(10, id(10), 0);
    a.admit(11, id(11), 0);
    assert!(a.contested());
    assert_eq!(a.choose(h, 4, &all), None);
    // Uncontested, a second copy of the least sent goes out.
    a.finished(&id(10), 0);
    assert!(a.choose(h, 4, &PieceSet::from_iter(4, [2])) == Some(2));
    assert_eq!(a.pieces_sent(&h), 5);
    // A request naming nothing it can take gets nothing; a wrong length neither.
    assert_eq!(a.choose(h, 4, &PieceSet::empty(4)), None);
    assert_eq!(a.choose(h, 5, &PieceSet::full(5)), None);
}

#[test]
fn a_chosen_piece_that_was_never_sent_is_fresh_again() {
    let mut a = Admission::new(cfg(), 3);
    let h = Hash([1; 32]);
    let one = PieceSet::from_iter(2, [1]);
    assert_eq!(a.choose(h, 2, &one), Some(1));
    a.admit(10, id(10), 0);
    a.admit(11, id(11), 0);
    // Contested: piece 1 counts as sent, so nobody gets it from the origin...
    assert_eq!(a.choose(h, 2, &one), None);
    // ...until the request that took it is pushed out before it was sent.
    a.unchoose(h, 1);
    assert_eq!(a.pieces_sent(&h), 0);
    assert_eq!(a.choose(h, 2, &one), Some(1));
    // Unknown blobs and pieces, and pieces never counted, change nothing.
    a.unchoose(Hash([9; 32]), 0);
    a.unchoose(h, 7);
    a.unchoose(h, 0);
    assert_eq!(a.pieces_sent(&h), 1);
}

#[test]
fn subscribers_get_coalesced_pushes_and_are_bounded() {
    let c = Config {
        max_subscribers: 2,
        ..Config::default()
    };
    let mut s = Subscribers::new(c.clone());
    let h = Hash([2; 32]);
    assert!(s.subscribe(id(1), h));
    assert!(s.subscribe(id(2), h));
    assert!(s.subscribe(id(1), h), "again is fine");
    assert!(!s.subscribe(id(3), h), "bounded");
    let t0 = Instant::now();
    s.held(t0, h, 4);
    s.held(t0 + Duration::from_millis(1), h, 5);
    assert_eq!(s.poll_timeout(), Some(t0 + c.have_interval));
    assert_eq!(s.poll_push(t0), None, "not due yet");
    let p = s.poll_push(t0 + c.have_interval).expect("due");
    assert_eq!(p.units, vec![4, 5]);
    assert_eq!(p.to, vec![id(1), id(2)]);
    assert_eq!(s.poll_push(t0 + c.have_interval), None);
    s.unsubscribe(&id(1), &h);
    s.unsubscribe(&id(2), &h);
    // Nobody listening: nothing is kept.
    s.held(t0, h, 6);
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn a_lookup_answer_is_bounded_ranked_and_spread() {
    let c = Config {
        lookup_answer: 8,
        ..Config::default()
    };
    let mut t: Tracker<u16> = Tracker::new(c.clone(), 3);
    let now = Instant::now();
    let h = Hash([3; 32]);
    let zone = |n: u16| Some(if n.is_multiple_of(2) { "a" } else { "b" }.to_string());
    for n in 1..=200 {
        t.announce(now, id(n), n, zone(n), &[h], n <= 10);
    }
    let asker = id(1000);
    t.announce(now, asker, 1000, Some("a".into()), &[], false);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let ans = t.lookup(now, &asker, &h);
        assert_eq!(ans.len(), 8);
        assert!(ans.iter().all(|p| p.id != asker));
        // Same zone first.
        let zones: Vec<bool> = ans.iter().map(|p| p.zone.as_deref() == Some("a")).collect();
        assert!(zones.windows(2).all(|w| w[0] >= w[1]), "{zones:?}");
        seen.extend(ans.iter().map(|p| p.id));
    }
    assert!(
        seen.len() > 50,
        "answers spread over the holders: {}",
        seen.len()
    );
    // Whole holders of every blob asked, for a batch.
    let h2 = Hash([4; 32]);
    t.announce(now, id(3), 3, zone(3), &[h2], true);
    let all = t.lookup_all(now, &asker, &[h, h2]);
    assert_eq!(all.iter().map(|p| p.id).collect::<Vec<_>>(), vec![id(3)]);
}

#[test]
fn members_that_stop_announcing_expire_and_reported_liars_are_left_out() {
    let c = Config::default();
    let mut t: Tracker<()> = Tracker::new(c.clone(), 1);
    let t0 = Instant::now();
    let h = Hash([5; 32]);
    for n in 1..=4 {
        t.announce(t0, id(n), (), None, &[h], true);
    }
    // Member 4 goes quiet; the others send heartbeats.
    let later = t0 + c.holder_ttl + Duration::from_secs(1);
    for n in 1..=3 {
        t.heartbeat(later - Duration::from_secs(2), &id(n));
    }
    let ans = t.lookup(later, &id(1), &h);
    assert!(
        ans.iter().all(|p| p.id != id(4)),
        "expired members are not handed out"
    );
    assert_eq!(t.expire(later), 1);
    assert_eq!(t.entries(), 3);
    // Member 2 was handed nobody yet: its report has no evidence and does not count.
    assert!(!t.report(later, &id(2), &id(3), &h));
    // One report is not enough; two distinct members are.
    assert!(!t.report(later, &id(1), &id(3), &h));
    assert!(
        !t.report(later, &id(1), &id(3), &h),
        "the same reporter twice counts once"
    );
    assert!(
        !t.report(later, &id(3), &id(3), &h),
        "nobody reports itself"
    );
    // Handed member 3 now, member 2 reports it for a blob member 3 never announced.
    let _ = t.lookup(later, &id(2), &h);
    assert!(!t.report(later, &id(2), &id(3), &Hash([6; 32])));
    assert!(t.report(later, &id(2), &id(3), &h));
    assert!(t.distrusted(later, &id(3)));
    let ans = t.lookup(later, &id(1), &h);
    assert_eq!(ans.iter().map(|p| p.id).collect::<Vec<_>>(), vec![id(2)]);
    // A member that leaves takes its holdings along.
    t.forget(&id(2));
    assert!(t.lookup(later, &id(1), &h).is_empty());
    // A reported liar that leaves and comes back stays left out, for a while.
    t.forget(&id(3));
    t.announce(later, id(3), (), None, &[h], true);
    assert!(t.distrusted(later, &id(3)));
    assert!(t.lookup(later, &id(1), &h).is_empty());
    let after = later + c.report_ttl + Duration::from_secs(1);
    t.heartbeat(after, &id(1));
    t.heartbeat(after, &id(3));
    assert!(!t.distrusted(after, &id(3)), "distrust expires");
    assert_eq!(t.lookup(after, &id(1), &h).len(), 1);
}

#[test]
fn a_member_enters_at_most_its_share_of_the_tracker() {
    let c = Config {
        max_held_per_member: 100,
        ..Config::default()
    };
    let mut t: Tracker<()> = Tracker::new(c, 1);
    let t0 = Instant::now();
    let flood: Vec<Hash> = (0..1000u32)
        .map(|i| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_le_bytes());
            Hash(b)
        })
        .collect();
    assert_eq!(t.announce(t0, id(1), (), None, &flood, true), 900);
    assert_eq!(t.entries(), 100);
    // Announcing again enters nothing new; withdrawing makes room.
    assert_eq!(t.announce(t0, id(1), (), None, &flood[..100], true), 0);
    t.withdraw(&id(1), &flood[..50]);
    assert_eq!(t.announce(t0, id(1), (), None, &flood[100..], true), 850);
    assert_eq!(t.entries(), 100);
    // Another member has its own share.
    assert_eq!(t.announce(t0, id(2), (), None, &flood[..10], true), 0);
    assert_eq!(t.entries(), 110);
}
