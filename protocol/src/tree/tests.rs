//! Trees of pages against the whole manifest in memory.

use std::cell::Cell;

use proptest::prelude::*;

use super::*;
use crate::manifest::tests::{file, p};
use crate::manifest::{Change, Entry, Manifest};

/// A shape that makes deep trees of few entries.
const SMALL: Shape = Shape { bits: 1, fill: 96 };

fn tree_of(m: &Manifest, shape: Shape, pages: &mut MemPages) -> Built {
    m.build(shape, &mut |r, b| pages.insert(r, &b).unwrap())
}

/// A source that counts the pages read from it.
struct Counting<'a>(&'a MemPages, Cell<usize>);

impl PageSource for Counting<'_> {
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError> {
        self.1.set(self.1.get() + 1);
        self.0.page(r)
    }
}

fn arb_path() -> impl Strategy<Value = VolPath> {
    proptest::collection::vec("[a-e]{1,3}", 1..4)
        .prop_filter_map("valid", |parts| VolPath::new(&parts.join("/")).ok())
}

fn arb_change() -> impl Strategy<Value = Change> {
    (
        arb_path(),
        prop_oneof![
            3 => (0u8..4).prop_map(|h| Some(file(h))),
            1 => (0u32..3).prop_map(|m| Some(Entry::Dir { mode: 0o700 + m })),
            1 => Just(None),
        ],
    )
        .prop_map(|(path, entry)| Change { path, entry })
}

fn manifest_of(changes: &[Change]) -> Manifest {
    let mut m = Manifest::new();
    m.apply(changes).unwrap();
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Applying changes to a tree gives the very tree (same root hash) that building the
    /// changed manifest from scratch gives: trees are canonical, whatever the edits.
    #[test]
    fn apply_is_canonical(
        start in proptest::collection::vec(arb_change(), 0..60),
        edits in proptest::collection::vec(arb_change(), 0..12),
    ) {
        for shape in [SMALL, Shape::CANONICAL] {
            let before = manifest_of(&start);
            let mut pages = MemPages::default();
            let old = tree_of(&before, shape, &mut pages);
            let mut new_pages = MemPages::default();
            let applied = apply(&pages, &old.root, &edits, shape, &mut |r, b| new_pages.insert(r, &b).unwrap()).unwrap();
            let mut after = before.clone();
            after.apply(&edits).unwrap();
            let mut fresh = MemPages::default();
            let expected = tree_of(&after, shape, &mut fresh);
            prop_assert_eq!(applied.root, expected.root);
            prop_assert_eq!(applied.entries, after.len() as u64);
            let all = Layered(&new_pages, &pages);
            prop_assert_eq!(Manifest::from_tree(&all, &applied.root).unwrap(), after);
        }
    }

    /// Marking two versions of a tree finds exactly the pages that built them and the
    /// blobs their entries name, and reads no page twice.
    #[test]
    fn mark_finds_every_page_and_blob_of_several_versions(
        start in proptest::collection::vec(arb_change(), 0..60),
        edits in proptest::collection::vec(arb_change(), 0..12),
    ) {
        let before = manifest_of(&start);
        let mut after = before.clone();
        after.apply(&edits).unwrap();
        let mut pages = MemPages::default();
        let old = tree_of(&before, SMALL, &mut pages);
        let new = tree_of(&after, SMALL, &mut pages);
        let counting = Counting(&pages, Cell::new(0));
        let (mut marked, mut blobs) = (Default::default(), Default::default());
        mark(&counting, &old.root, &mut marked, &mut blobs).unwrap();
        mark(&counting, &new.root, &mut marked, &mut blobs).unwrap();
        let all: std::collections::HashSet<Hash> = pages.0.keys().copied().collect();
        prop_assert_eq!(&marked, &all);
        prop_assert_eq!(counting.1.get(), all.len());
        let named: std::collections::HashSet<Hash> = before
            .entries()
            .values()
            .chain(after.entries().values())
            .filter_map(|e| e.blob())
            .map(|(h, _)| h)
            .collect();
        prop_assert_eq!(blobs, named);
    }

    /// A diff of two trees, applied to the first, gives the second; lookups and listings
    /// agree with the manifest in memory.
    #[test]
    fn diff_get_and_under_agree(
        a in proptest::collection::vec(arb_change(), 0..60),
        b in proptest::collection::vec(arb_change(), 0..60),
    ) {
        let (ma, mb) = (manifest_of(&a), manifest_of(&b));
        let mut pages = MemPages::default();
        let ta = tree_of(&ma, SMALL, &mut pages);
        let tb = tree_of(&mb, SMALL, &mut pages);
        let d: Vec<Change> = diff(&pages, &ta.root, &tb.root).unwrap().into_iter().map(Delta::into_change).collect();
        let mut expected = ma.diff(&mb);
        expected.sort_by(|x, y| x.path.cmp(&y.path));
        prop_assert_eq!(&d, &expected);
        let mut m = ma.clone();
        m.apply(&d).unwrap();
        prop_assert_eq!(&m, &mb);
        for (path, e) in ma.entries() {
            prop_assert_eq!(get(&pages, &ta.root, path).unwrap(), Some(e.clone()));
            let below: Vec<_> = ma.under(Some(path)).map(|(p, e)| (p.clone(), e.clone())).collect();
            prop_assert_eq!(under(&pages, &ta.root, Some(path)).unwrap(), below);
        }
        for dir in std::iter::once(None).chain(ma.entries().iter().filter(|(_, e)| e.is_dir()).map(|(p, _)| Some(p))) {
            let direct: Vec<_> = ma.under(dir).filter(|(p, _)| p.parent().as_ref() == dir).map(|(p, e)| (p.clone(), e.clone())).collect();
            prop_assert_eq!(children(&pages, &ta.root, dir).unwrap(), direct);
        }
        for path in mb.entries().keys().filter(|p| ma.get(p).is_none()) {
            prop_assert_eq!(get(&pages, &ta.root, path).unwrap(), None);
        }
    }
}

/// Builds the tree of `n` files in one flat directory (canonical shape).
fn flat(n: usize) -> (Manifest, MemPages, Built) {
    let mut m = Manifest::new();
    let changes: Vec<Change> = (0..n)
        .map(|i| Change {
            path: p(&format!("data/file-{i:07}.bin")),
            entry: Some(file((i % 251) as u8)),
        })
        .collect();
    m.apply(&changes).unwrap();
    let mut pages = MemPages::default();
    let t = tree_of(&m, Shape::CANONICAL, &mut pages);
    (m, pages, t)
}

/// One changed file in a flat directory of 100,000: the new tree shares all but a few pages
/// with the old one, and a diff that starts from the old tree's pages fetches only those.
#[test]
fn one_change_moves_a_few_pages() {
    let (_, pages, old) = flat(100_000);
    assert!(pages.0.len() > 300, "{} pages", pages.0.len());
    let mut new_pages = MemPages::default();
    let change = [Change {
        path: p("data/file-0050000.bin"),
        entry: Some(file(7)),
    }];
    let new = apply(&pages, &old.root, &change, Shape::CANONICAL, &mut |r, b| {
        new_pages.insert(r, &b).unwrap()
    })
    .unwrap();
    // Pages the old tree lacks: one per level (the rightmost ones are written again, alike).
    let fresh = new_pages
        .0
        .keys()
        .filter(|h| !pages.0.contains_key(h))
        .count();
    assert!(fresh <= 4, "{fresh} new pages for one change");
    // An agent holding the old pages fetches what the diff asks for, level by level.
    let mut held = pages.clone();
    let mut rounds = 0;
    loop {
        let want = missing_for_diff(&held, &old.root, &new.root).unwrap();
        if want.is_empty() {
            break;
        }
        for r in want {
            held.0.insert(r.hash, new_pages.0[&r.hash].clone());
        }
        rounds += 1;
        assert!(rounds <= 4, "too many rounds");
    }
    let counting = Counting(&held, Cell::new(0));
    let d = diff(&counting, &old.root, &new.root).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].old, Some(file((50_000 % 251) as u8)));
    assert_eq!(d[0].clone().into_change(), change[0]);
    assert!(counting.1.get() <= 12, "{} pages read", counting.1.get());
}

/// Insertions and removals at the edges (before the first and after the last entry) and a
/// tree shrinking to nothing.
#[test]
fn edges_and_empty() {
    let (m, pages, t) = flat(2_000);
    let edits = [
        Change {
            path: p("a"),
            entry: Some(file(1)),
        },
        Change {
            path: p("zz/top"),
            entry: Some(file(2)),
        },
    ];
    let mut all = pages.clone();
    let grown = apply(&pages, &t.root, &edits, Shape::CANONICAL, &mut |r, b| {
        all.insert(r, &b).unwrap()
    })
    .unwrap();
    let mut expected = m.clone();
    expected.apply(&edits).unwrap();
    assert_eq!(grown.root, expected.root());
    let gone = apply(
        &all,
        &grown.root,
        &[
            Change {
                path: p("data"),
                entry: None,
            },
            Change {
                path: p("a"),
                entry: None,
            },
            Change {
                path: p("zz"),
                entry: None,
            },
        ],
        Shape::CANONICAL,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(gone.root, Manifest::new().root());
    assert_eq!(gone.entries, 0);
}

/// Pages that stand in the wrong place are refused by the walks.
#[test]
fn misplaced_children_are_refused() {
    let (_, pages, t) = flat(3_000);
    let root = pages.0[&t.root.hash].clone();
    let Page::Branch { level, children } = &*root else {
        panic!("a branch root")
    };
    // A branch whose children are swapped with its own first child's page at a wrong level.
    let mut forged = children.clone();
    forged[1].page = t.root.hash;
    forged[1].size = t.root.size as u32;
    let bytes = Page::Branch {
        level: *level,
        children: forged,
    }
    .encode();
    let r = PageRef {
        hash: Hash::of(&bytes),
        size: bytes.len() as u64,
    };
    let mut bad_pages = pages.clone();
    bad_pages.insert(r, &bytes).unwrap();
    assert!(Manifest::from_tree(&bad_pages, &r).is_err());
    assert!(missing(&bad_pages, &r).is_err());
}

/// Listing one directory of many fetches the pages of that directory, not the tree's.
#[test]
fn a_directory_listing_reads_only_its_pages() {
    let mut m = Manifest::new();
    let changes: Vec<Change> = (0..50_000)
        .map(|i| Change {
            path: p(&format!("d{:03}/f{i:06}", i / 1000)),
            entry: Some(file((i % 251) as u8)),
        })
        .collect();
    m.apply(&changes).unwrap();
    let mut all = MemPages::default();
    let t = tree_of(&m, Shape::CANONICAL, &mut all);
    let dir = p("d017");
    let mut held = MemPages::default();
    loop {
        let want = missing_in(&held, &t.root, "d017/").unwrap();
        if want.is_empty() {
            break;
        }
        for r in want {
            held.0.insert(r.hash, all.0[&r.hash].clone());
        }
    }
    assert!(
        held.0.len() * 20 < all.0.len(),
        "{} of {} pages fetched",
        held.0.len(),
        all.0.len()
    );
    let listed = children(&held, &t.root, Some(&dir)).unwrap();
    assert_eq!(listed.len(), 1000);
    assert_eq!(listed[0].0, p("d017/f017000"));
    // The top level skips every directory's contents.
    let top = children(&all, &t.root, None).unwrap();
    assert_eq!(top.len(), 50);
}

/// Two leaves whose keys overlap (a key in both, or out of order across them) under a
/// branch whose own keys are in order: every walk over the tree refuses it, none merges or
/// skips (a lookup reads one path's pages only, and checks those).
#[test]
fn leaves_whose_ranges_overlap_are_refused() {
    let leaf = |keys: &[&str], pages: &mut MemPages| {
        let p = Page::Leaf(
            keys.iter()
                .map(|k| (VolPath::new(k).unwrap(), Entry::Dir { mode: 0o755 }))
                .collect(),
        );
        let bytes = p.encode();
        let r = PageRef {
            hash: Hash::of(&bytes),
            size: bytes.len() as u64,
        };
        pages.insert(r, &bytes).unwrap();
        Child {
            first: VolPath::new(keys[0]).unwrap(),
            page: r.hash,
            size: r.size as u32,
            entries: keys.len() as u64,
        }
    };
    for (left, right) in [(["a", "b"], ["b", "c"]), (["a", "c"], ["b", "d"])] {
        let mut pages = MemPages::default();
        let children = vec![leaf(&left, &mut pages), leaf(&right, &mut pages)];
        let bytes = Page::Branch { level: 1, children }.encode();
        let root = PageRef {
            hash: Hash::of(&bytes),
            size: bytes.len() as u64,
        };
        pages.insert(root, &bytes).unwrap();
        let what = format!("{left:?} then {right:?}");
        assert!(Manifest::from_tree(&pages, &root).is_err(), "{what}");
        assert!(missing(&pages, &root).is_err(), "{what}");
        assert!(
            range(&pages, &root, "", &mut |_, _| true).is_err(),
            "{what}"
        );
        let empty = Manifest::new();
        let mut none = MemPages::default();
        let e = tree_of(&empty, SMALL, &mut none);
        let both = Layered(&pages, &none);
        assert!(diff(&both, &e.root, &root).is_err(), "{what}");
        let mut p = std::collections::HashSet::new();
        let mut b = std::collections::HashSet::new();
        assert!(mark(&pages, &root, &mut p, &mut b).is_err(), "{what}");
    }
}
