//! A paused engine (a background download while a foreground one runs): nothing new goes
//! out, what is in flight finishes and counts, nothing fails for waiting, and it resumes
//! where it stood.

use super::*;

#[test]
fn a_paused_engine_sends_nothing_new_and_resumes_where_it_stood() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 256);
    h.drain();
    let first = requests(&h.providers(g, &[(1, true), (2, true), (ORIGIN, true)]));
    assert!(!first.is_empty(), "requests go out before the pause");
    let flying: usize = first.iter().map(|r| units(&r.3).len()).sum();
    h.e.set_paused(true);
    assert!(h.e.is_paused());
    assert!(requests(&h.drain()).is_empty(), "pausing sends nothing new");
    // What was in flight comes back and counts; nothing new is asked for the room it
    // leaves.
    for (req, _, _, ask) in &first {
        for u in units(ask) {
            let out = h.event(Event::Unit {
                req: *req,
                unit: u,
                verified: true,
            });
            assert!(requests(&out).is_empty(), "{out:?}");
        }
        let out = h.event(Event::Answer {
            req: *req,
            outcome: Outcome::Ok,
        });
        assert!(requests(&out).is_empty(), "{out:?}");
    }
    assert_eq!(h.e.done_units(g).count() as usize, flying);
    assert!(flying < 256, "some of the blob is left for after the pause");
    // A long wait fails nothing and asks nothing: no endgame, no stuck rounds.
    for _ in 0..100 {
        let out = h.advance(Duration::from_secs(10));
        assert!(requests(&out).is_empty(), "{out:?}");
        assert!(
            !out.iter().any(|a| matches!(a, Action::Failed { .. })),
            "{out:?}"
        );
    }
    assert!(
        h.e.poll_timeout().is_none_or(|t| t > h.now),
        "no timer is due while paused"
    );
    // Resumed: the rest goes out, and the download completes.
    h.e.set_paused(false);
    let next = requests(&h.drain());
    assert!(!next.is_empty(), "resuming sends the rest");
    let asked: HashSet<u32> = next.iter().flat_map(|r| units(&r.3)).collect();
    assert!(
        asked.iter().all(|u| !h.e.done_units(g).contains(*u)),
        "nothing verified is asked for again: {asked:?}"
    );
    for who in [1, 2, ORIGIN] {
        finish_from(&mut h, id(who));
    }
    assert!(h.log.contains(&Action::Done { group: g }), "{:?}", h.log);
}

#[test]
fn news_waits_while_paused_and_is_used_on_resuming() {
    let mut h = H::new(cfg());
    let g = h.pieces(1, 4);
    h.drain();
    h.e.set_paused(true);
    // Providers arrive while paused: none is asked.
    let out = h.providers(g, &[(1, true), (ORIGIN, true)]);
    assert!(requests(&out).is_empty(), "{out:?}");
    assert!(!h.e.wants_news(g), "a paused engine needs no push now");
    h.e.set_paused(false);
    let reqs = requests(&h.drain());
    assert!(
        reqs.iter().any(|r| r.1 == id(1)),
        "the peer heard of while paused is asked first: {reqs:?}"
    );
}

#[test]
fn a_background_downloads_requests_rank_after_every_foreground_one() {
    let ranks = |background: bool| {
        let mut h = H::new(cfg());
        h.e.set_background(background);
        let g = h.pieces(1, 64);
        h.drain();
        let out = h.providers(g, &[(1, true), (ORIGIN, true)]);
        out.into_iter()
            .filter_map(|a| match a {
                Action::Request { rank, .. } => Some(rank),
                _ => None,
            })
            .collect::<Vec<u16>>()
    };
    let (fg, bg) = (ranks(false), ranks(true));
    assert!(!fg.is_empty() && !bg.is_empty());
    assert!(fg.iter().all(|r| *r <= 1000), "{fg:?}");
    assert!(bg.iter().all(|r| *r >= BACKGROUND_RANK), "{bg:?}");
    // A provider with one slot and one place in its queue serves the foreground request
    // first and pushes the background one out.
    let mut adm = Admission::new(
        Config {
            serve_slots: 1,
            serve_queue: 1,
            ..cfg()
        },
        1,
    );
    assert_eq!(adm.admit(1, id(1), fg[0]), Admit::Now);
    assert_eq!(adm.admit(2, id(2), bg[0]), Admit::Queued { evicted: None });
    assert_eq!(
        adm.admit(3, id(3), fg[0]),
        Admit::Queued { evicted: Some(2) },
        "the background request makes room"
    );
}
