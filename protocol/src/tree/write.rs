//! Writing trees: building one from sorted entries, and applying a change set to one,
//! both cutting pages where the canonical rule says.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use super::page::{load, load_child};
use super::read::{get, under};
use super::*;
use crate::manifest::{Change, Entry, apply_changes, validate_entries};

/// A tree written by [`apply`] or [`build`].
#[derive(Debug, Clone)]
pub struct Built {
    /// Its root page.
    pub root: PageRef,
    /// Entries in it.
    pub entries: u64,
}

/// Cuts a stream of entries (and reused subtrees) into pages.
struct Builder<'a> {
    shape: Shape,
    levels: Vec<Level>,
    sink: &'a mut dyn FnMut(PageRef, Vec<u8>),
}

#[derive(Default)]
struct Level {
    first: Option<VolPath>,
    body: Vec<u8>,
    count: u64,
    entries: u64,
    /// Pages made at this level so far (2 means "more than one").
    pages: u8,
    /// The last page made (or kept) at this level.
    last: Option<Child>,
}

impl<'a> Builder<'a> {
    fn new(shape: Shape, sink: &'a mut dyn FnMut(PageRef, Vec<u8>)) -> Self {
        Builder {
            shape,
            levels: vec![Level::default()],
            sink,
        }
    }

    fn level(&mut self, l: usize) -> &mut Level {
        while self.levels.len() <= l {
            self.levels.push(Level::default());
        }
        &mut self.levels[l]
    }

    fn push_entry(&mut self, path: &VolPath, entry: &Entry) {
        let lv = self.level(0);
        lv.first.get_or_insert_with(|| path.clone());
        lv.body = postcard::to_extend(&(path, entry), std::mem::take(&mut lv.body))
            .expect("encoding to a Vec cannot fail");
        lv.count += 1;
        lv.entries += 1;
        if self.shape.boundary(0, path.as_str()) || self.levels[0].body.len() >= self.shape.fill {
            self.cut(0);
        }
    }

    fn push_child(&mut self, l: usize, c: Child) {
        let lv = self.level(l);
        lv.first.get_or_insert_with(|| c.first.clone());
        lv.entries += c.entries;
        lv.count += 1;
        lv.body = postcard::to_extend(&c, std::mem::take(&mut lv.body))
            .expect("encoding to a Vec cannot fail");
        let level = u8::try_from(l).unwrap_or(u8::MAX);
        // A branch ends on a boundary only with two children or more: a tree grows a level
        // only where a level has two pages.
        let lv = &self.levels[l];
        if (lv.count >= 2 && self.shape.boundary(level, c.first.as_str()))
            || lv.body.len() >= self.shape.fill
        {
            self.cut(l);
        }
    }

    /// Ends the page being filled at level `l`.
    fn cut(&mut self, l: usize) {
        let lv = std::mem::take(&mut self.levels[l]);
        self.levels[l].pages = lv.pages.saturating_add(1).min(2);
        let mut bytes = vec![PAGE_VERSION, u8::try_from(l).unwrap_or(u8::MAX)];
        bytes = postcard::to_extend(&lv.count, bytes).expect("encoding to a Vec cannot fail");
        bytes.extend_from_slice(&lv.body);
        let r = PageRef {
            hash: Hash::of(&bytes),
            size: bytes.len() as u64,
        };
        (self.sink)(r, bytes);
        let c = Child {
            first: lv.first.expect("a page being cut has items"),
            page: r.hash,
            size: r.size as u32,
            entries: lv.entries,
        };
        self.levels[l].last = Some(c.clone());
        self.push_child(l + 1, c);
    }

    /// Whether nothing is being filled at levels `0..=l`.
    fn empty_upto(&self, l: usize) -> bool {
        self.levels.iter().take(l + 1).all(|lv| lv.count == 0)
    }

    /// Takes a page of level `l` from an old tree as it is (nothing is being filled at
    /// levels `0..=l`, and the page is not the last of its level).
    fn reuse(&mut self, l: usize, c: Child) {
        for j in 0..l {
            self.level(j).pages = 2;
        }
        let lv = self.level(l);
        lv.pages = lv.pages.saturating_add(1).min(2);
        lv.last = Some(c.clone());
        self.push_child(l + 1, c);
    }

    fn finish(mut self) -> Built {
        let mut l = 0;
        loop {
            let lv = self.level(l);
            if lv.count == 0 && lv.pages == 0 {
                // Nothing at all: the empty tree.
                let bytes = Page::Leaf(Vec::new()).encode();
                let r = PageRef {
                    hash: Hash::of(&bytes),
                    size: bytes.len() as u64,
                };
                (self.sink)(r, bytes);
                return Built {
                    root: r,
                    entries: 0,
                };
            }
            if lv.count > 0 {
                self.cut(l);
            }
            if self.levels[l].pages == 1 {
                // One page at this level: it is the root. (Its child entry went up a level,
                // and may have made a page there that nothing names.)
                let c = self.levels[l].last.clone().expect("a level with a page");
                return Built {
                    root: c.page_ref(),
                    entries: c.entries,
                };
            }
            l += 1;
        }
    }
}

/// Writes the tree of `entries` (sorted by path, validated by the caller), giving every
/// page to `sink`.
pub fn build<'e>(
    entries: impl IntoIterator<Item = (&'e VolPath, &'e Entry)>,
    shape: Shape,
    sink: &mut dyn FnMut(PageRef, Vec<u8>),
) -> Built {
    let mut b = Builder::new(shape, sink);
    for (p, e) in entries {
        b.push_entry(p, e);
    }
    b.finish()
}

/// Applies a change set to the tree at `root` as [`crate::Manifest::apply`] would to the
/// whole manifest, reading only the pages the changes touch. New pages go to `sink`;
/// unchanged subtrees are kept by hash.
pub fn apply(
    src: &dyn PageSource,
    root: &PageRef,
    changes: &[Change],
    shape: Shape,
    sink: &mut dyn FnMut(PageRef, Vec<u8>),
) -> Result<Built, TreeError> {
    let edits = edits_of(src, root, changes)?;
    let page = load(src, root)?;
    let mut b = Builder::new(shape, sink);
    rebuild(src, &mut b, &page, None, None, true, &edits)?;
    let built = b.finish();
    if built.entries > crate::manifest::MAX_ENTRIES as u64 {
        return Err(ManifestError::TooLarge(built.entries as usize).into());
    }
    Ok(built)
}

/// The per-path result of `changes` on the tree: every path whose entry changes, with its
/// new entry (`None`: removed).
fn edits_of(
    src: &dyn PageSource,
    root: &PageRef,
    changes: &[Change],
) -> Result<BTreeMap<VolPath, Option<Entry>>, TreeError> {
    // Everything the changes can touch: their paths, their ancestors, and what lies below
    // a path removed or replaced by a non-directory.
    let mut before: BTreeMap<VolPath, Entry> = BTreeMap::new();
    // Ancestors read so far (directories: few), and directories whose contents were read.
    let mut ancestors: HashSet<VolPath> = HashSet::new();
    let mut below_done: HashSet<VolPath> = HashSet::new();
    for c in changes {
        if !before.contains_key(&c.path)
            && let Some(e) = get(src, root, &c.path)?
        {
            before.insert(c.path.clone(), e);
        }
        for a in c.path.ancestors() {
            // Nearest first: one read before means all above it were read too.
            if !ancestors.insert(a.clone()) {
                break;
            }
            if let Some(e) = get(src, root, &a)? {
                before.insert(a, e);
            }
        }
        // Only a directory has entries below it.
        let replaced = c.entry.as_ref().is_none_or(|e| !e.is_dir());
        if replaced
            && matches!(before.get(&c.path), Some(Entry::Dir { .. }))
            && below_done.insert(c.path.clone())
        {
            for (p, e) in under(src, root, Some(&c.path))? {
                before.insert(p, e);
            }
        }
    }
    let mut after = before.clone();
    apply_changes(&mut after, changes)?;
    validate_entries(&after)?;
    let mut edits = BTreeMap::new();
    for (p, e) in &after {
        if before.get(p) != Some(e) {
            edits.insert(p.clone(), Some(e.clone()));
        }
    }
    for p in before.keys() {
        if !after.contains_key(p) {
            edits.insert(p.clone(), None);
        }
    }
    Ok(edits)
}

fn bounds<'k>(lo: Option<&'k str>, hi: Option<&'k str>) -> (Bound<&'k str>, Bound<&'k str>) {
    (
        lo.map_or(Bound::Unbounded, Bound::Included),
        hi.map_or(Bound::Unbounded, Bound::Excluded),
    )
}

/// Feeds the tree below `page` (keys in `[lo, hi)`) with `edits` merged in to the builder,
/// keeping unedited subtrees whole where the builder is at a page boundary.
fn rebuild(
    src: &dyn PageSource,
    b: &mut Builder<'_>,
    page: &Page,
    lo: Option<&str>,
    hi: Option<&str>,
    rightmost: bool,
    edits: &BTreeMap<VolPath, Option<Entry>>,
) -> Result<(), TreeError> {
    match page {
        Page::Leaf(old) => {
            let mut ed = edits.range::<str, _>(bounds(lo, hi)).peekable();
            let mut it = old.iter().peekable();
            loop {
                let take_edit = match (it.peek(), ed.peek()) {
                    (None, None) => break,
                    (Some(_), None) => false,
                    (None, Some(_)) => true,
                    (Some((p, _)), Some((q, _))) => *q <= p,
                };
                if take_edit {
                    let (q, e) = ed.next().expect("peeked");
                    if it.peek().is_some_and(|(p, _)| p == q) {
                        it.next();
                    }
                    if let Some(e) = e {
                        b.push_entry(q, e);
                    }
                } else {
                    let (p, e) = it.next().expect("peeked");
                    b.push_entry(p, e);
                }
            }
            Ok(())
        }
        Page::Branch { level, children } => {
            let below = usize::from(level - 1);
            for (i, c) in children.iter().enumerate() {
                let clo = if i == 0 { lo } else { Some(c.first.as_str()) };
                let chi = children.get(i + 1).map(|n| n.first.as_str()).or(hi);
                let last = rightmost && i + 1 == children.len();
                let edited = edits.range::<str, _>(bounds(clo, chi)).next().is_some();
                if !edited && !last && b.empty_upto(below) {
                    b.reuse(below, c.clone());
                } else {
                    let p = load_child(src, c, *level, chi)?;
                    rebuild(src, b, &p, clo, chi, last, edits)?;
                }
            }
            Ok(())
        }
    }
}
