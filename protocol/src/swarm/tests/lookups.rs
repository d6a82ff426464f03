//! Lookups: groups nobody can serve, lookups that keep failing, the bound on sources.

use super::*;

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
