//! Manifests as trees of pages: what a head names, and what a one-file change moves.
//!
//! A manifest (the sorted map `path -> entry`, see [`crate::manifest`]) is stored as a tree
//! of *pages*, each a blob named by its BLAKE3 hash. A head names the root page
//! ([`crate::Commit::manifest`], with its size). Pages are small (tens of KiB), so an agent
//! that already holds one version fetches, decodes and compares only the pages on the paths
//! from the root to what changed: a one-file change in a million-file volume moves about
//! one page per level.
//!
//! # Encoding (version 2)
//! A page is `version: u8 = 2`, `level: u8`, a varint count, then the items in strictly
//! increasing path order, each in postcard:
//! - level 0 (a *leaf*): entries `(path, Entry)`;
//! - level `n > 0` (a *branch*): children [`Child`] `{ first, page, size, entries }`: the
//!   first path of the child page (at level `n - 1`), its hash, its encoded size, and the
//!   number of entries below it.
//!
//! Every key of a child lies in `[first, next child's first)`. The root is the one page of
//! the top level; an empty manifest is an empty leaf (the only page that may be empty).
//!
//! # Canonical splitting
//! The same entries always give the same pages, whatever edits led to them (heads compare
//! manifests by root hash). Boundaries are chosen by content: a page ends after an item
//! whose key `k` (the path, or a child's `first`) at level `l` has
//! `u32_le(blake3("voltool/page/v2\0" || l || k)[0..4]) mod 256 == 0` (for a branch: once
//! it has two children or more), or once its items take [`PAGE_FILL`] bytes or more (long
//! paths). Both depend only on the page's own items,
//! so an edit changes the pages it touches and, rarely, the next one, never the rest: one
//! flat directory of a million files is thousands of leaves, and edits anywhere keep the
//! others. Pages are at most [`MAX_PAGE_BYTES`].
//!
//! # Trust
//! Pages are verified blobs below a coordinator-signed head. Decoding still refuses what
//! no honest coordinator writes: unknown versions, items out of order, hostile paths and
//! symlinks, children at the wrong level or with the wrong first key, trailing bytes.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::manifest::{Change, Entry, ManifestError, apply_changes, validate_entries};
use crate::path::{VolPath, check_symlink_target};

/// Encoding version, the first byte of every page.
pub const PAGE_VERSION: u8 = 2;
/// Largest encoded page accepted.
pub const MAX_PAGE_BYTES: usize = 1 << 20;
/// A page ends once its items take this many bytes.
pub const PAGE_FILL: usize = 256 << 10;
/// Deepest tree accepted. Branches have two children or more but the last of a level, so
/// even keys chosen to end pages everywhere make at most 23 levels of
/// [`crate::manifest::MAX_ENTRIES`]; a million entries make 3 or 4 in practice.
pub const MAX_LEVEL: u8 = 32;
const DOMAIN: &[u8] = b"voltool/page/v2\0";

/// Where a tree's pages are cut. [`Shape::CANONICAL`] is the only one heads use; others
/// make deep trees of few entries in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// A key ends a page when the low `bits` bits of its boundary hash are zero.
    pub bits: u8,
    /// A page ends once its items take this many bytes.
    pub fill: usize,
}

impl Shape {
    /// 256 items per page on average, [`PAGE_FILL`] at most (plus one item).
    pub const CANONICAL: Shape = Shape {
        bits: 8,
        fill: PAGE_FILL,
    };

    fn boundary(&self, level: u8, key: &str) -> bool {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&[level]);
        h.update(key.as_bytes());
        let b = h.finalize();
        let v = u32::from_le_bytes(b.as_bytes()[..4].try_into().expect("4 bytes"));
        v & ((1u32 << self.bits) - 1) == 0
    }
}

/// A page named by hash and encoded size (enough to fetch and verify it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageRef {
    /// BLAKE3 of the encoded page.
    pub hash: Hash,
    /// Its encoded size.
    pub size: u64,
}

/// A branch's item: one child page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    /// The first path in the child page.
    pub first: VolPath,
    /// The child page.
    pub page: Hash,
    /// Its encoded size.
    pub size: u32,
    /// Entries below it.
    pub entries: u64,
}

impl Child {
    fn page_ref(&self) -> PageRef {
        PageRef {
            hash: self.page,
            size: u64::from(self.size),
        }
    }
}

/// One decoded page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Page {
    /// Level 0: entries.
    Leaf(Vec<(VolPath, Entry)>),
    /// Level `level > 0`: child pages.
    Branch {
        /// Its level.
        level: u8,
        /// The children, by first path.
        children: Vec<Child>,
    },
}

/// Why a tree operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// A page the operation needs is not held; fetch it and try again.
    #[error("manifest page {} is not held", .0.hash.short())]
    Missing(PageRef),
    /// A page that is not a valid page, or not where it stands.
    #[error("bad manifest page {page}: {reason}")]
    Bad {
        /// The page.
        page: String,
        /// What is wrong.
        reason: String,
    },
    /// Entries that make no valid manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The page source failed.
    #[error("cannot read manifest page: {0}")]
    Source(String),
}

fn bad(page: &Hash, reason: impl Into<String>) -> TreeError {
    TreeError::Bad {
        page: page.short(),
        reason: reason.into(),
    }
}

impl Page {
    /// Its level (0 for a leaf).
    pub fn level(&self) -> u8 {
        match self {
            Page::Leaf(_) => 0,
            Page::Branch { level, .. } => *level,
        }
    }

    /// Its first key, `None` for an empty leaf.
    pub fn first(&self) -> Option<&VolPath> {
        match self {
            Page::Leaf(e) => e.first().map(|(p, _)| p),
            Page::Branch { children, .. } => children.first().map(|c| &c.first),
        }
    }

    /// Entries at or below it.
    pub fn entries(&self) -> u64 {
        match self {
            Page::Leaf(e) => e.len() as u64,
            Page::Branch { children, .. } => children.iter().map(|c| c.entries).sum(),
        }
    }

    /// Decodes and checks one page (its place in a tree is checked by the walks).
    pub fn decode(bytes: &[u8]) -> Result<Page, ManifestError> {
        if bytes.len() > MAX_PAGE_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let (&version, rest) = bytes.split_first().ok_or(ManifestError::Malformed(
            postcard::Error::DeserializeUnexpectedEnd,
        ))?;
        if version != PAGE_VERSION {
            return Err(ManifestError::Version(version));
        }
        let (&level, rest) = rest.split_first().ok_or(ManifestError::Malformed(
            postcard::Error::DeserializeUnexpectedEnd,
        ))?;
        let (page, rest) = if level == 0 {
            let (e, rest): (Vec<(VolPath, Entry)>, _) = postcard::take_from_bytes(rest)?;
            check_order(e.iter().map(|(p, _)| p))?;
            for (p, e) in &e {
                if let Entry::Symlink { target } = e {
                    check_symlink_target(p, target)?;
                }
            }
            (Page::Leaf(e), rest)
        } else if level > MAX_LEVEL {
            return Err(ManifestError::Version(level));
        } else {
            let (children, rest): (Vec<Child>, _) = postcard::take_from_bytes(rest)?;
            if children.is_empty() {
                return Err(ManifestError::Order("an empty branch page".into()));
            }
            check_order(children.iter().map(|c| &c.first))?;
            (Page::Branch { level, children }, rest)
        };
        if !rest.is_empty() {
            return Err(ManifestError::Trailing(rest.len()));
        }
        Ok(page)
    }

    /// The one encoding of a page.
    pub fn encode(&self) -> Vec<u8> {
        let out = vec![PAGE_VERSION, self.level()];
        match self {
            Page::Leaf(e) => postcard::to_extend(e, out),
            Page::Branch { children, .. } => postcard::to_extend(children, out),
        }
        .expect("encoding to a Vec cannot fail")
    }
}

fn check_order<'a>(keys: impl Iterator<Item = &'a VolPath>) -> Result<(), ManifestError> {
    let mut last: Option<&VolPath> = None;
    for k in keys {
        if last.is_some_and(|l| l >= k) {
            return Err(ManifestError::Order(k.to_string()));
        }
        last = Some(k);
    }
    Ok(())
}

/// Where pages come from: the local store (agents and the origin), or memory.
pub trait PageSource {
    /// The page, decoded, or `None` when it is not held.
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError>;
}

/// Pages in memory: new pages not stored yet, and tests.
#[derive(Default, Debug, Clone)]
pub struct MemPages(pub HashMap<Hash, Arc<Page>>);

impl MemPages {
    /// Adds an encoded page.
    pub fn insert(&mut self, r: PageRef, bytes: &[u8]) -> Result<(), TreeError> {
        let p = Page::decode(bytes).map_err(|e| bad(&r.hash, e.to_string()))?;
        self.0.insert(r.hash, Arc::new(p));
        Ok(())
    }
}

impl PageSource for MemPages {
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError> {
        Ok(self.0.get(&r.hash).cloned())
    }
}

/// The pages of the first source, then those of the second.
#[allow(missing_debug_implementations)]
pub struct Layered<'a>(pub &'a dyn PageSource, pub &'a dyn PageSource);

impl PageSource for Layered<'_> {
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError> {
        match self.0.page(r)? {
            Some(p) => Ok(Some(p)),
            None => self.1.page(r),
        }
    }
}

fn load(src: &dyn PageSource, r: &PageRef) -> Result<Arc<Page>, TreeError> {
    src.page(r)?.ok_or(TreeError::Missing(*r))
}

/// Loads the child `c` of a page at `level` and checks that it stands where it should.
fn load_child(src: &dyn PageSource, c: &Child, level: u8) -> Result<Arc<Page>, TreeError> {
    let p = load(src, &c.page_ref())?;
    check_child(&p, c, level)?;
    Ok(p)
}

fn check_child(p: &Page, c: &Child, parent_level: u8) -> Result<(), TreeError> {
    if p.level() + 1 != parent_level {
        return Err(bad(&c.page, "a child page at the wrong level"));
    }
    if p.first() != Some(&c.first) {
        return Err(bad(
            &c.page,
            "a child page whose first path is not its parent's",
        ));
    }
    Ok(())
}

/// The index of the child whose range holds `key`.
fn child_for(children: &[Child], key: &str) -> usize {
    children
        .partition_point(|c| c.first.as_str() <= key)
        .saturating_sub(1)
}

/// The entry at `path`.
pub fn get(
    src: &dyn PageSource,
    root: &PageRef,
    path: &VolPath,
) -> Result<Option<Entry>, TreeError> {
    let mut page = load(src, root)?;
    loop {
        let next = match &*page {
            Page::Leaf(e) => {
                return Ok(e
                    .binary_search_by(|(p, _)| p.cmp(path))
                    .ok()
                    .map(|i| e[i].1.clone()));
            }
            Page::Branch { level, children } => {
                let c = &children[child_for(children, path.as_str())];
                load_child(src, c, *level)?
            }
        };
        page = next;
    }
}

/// Calls `visit` with every entry whose path is `>= from`, in order, until it returns false.
pub fn range(
    src: &dyn PageSource,
    root: &PageRef,
    from: &str,
    visit: &mut dyn FnMut(&VolPath, &Entry) -> bool,
) -> Result<(), TreeError> {
    fn walk(
        src: &dyn PageSource,
        page: &Page,
        from: &str,
        visit: &mut dyn FnMut(&VolPath, &Entry) -> bool,
    ) -> Result<bool, TreeError> {
        match page {
            Page::Leaf(e) => {
                let start = e.partition_point(|(p, _)| p.as_str() < from);
                for (p, e) in &e[start..] {
                    if !visit(p, e) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Page::Branch { level, children } => {
                for c in &children[child_for(children, from)..] {
                    let p = load_child(src, c, *level)?;
                    if !walk(src, &p, from, visit)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }
    let page = load(src, root)?;
    walk(src, &page, from, visit).map(|_| ())
}

/// The entries strictly below `dir` (all of them for `None`), in order.
pub fn under(
    src: &dyn PageSource,
    root: &PageRef,
    dir: Option<&VolPath>,
) -> Result<Vec<(VolPath, Entry)>, TreeError> {
    let prefix = dir.map(|d| format!("{d}/")).unwrap_or_default();
    let mut out = Vec::new();
    range(src, root, &prefix, &mut |p, e| {
        let inside = p.as_str().starts_with(&prefix);
        if inside {
            out.push((p.clone(), e.clone()));
        }
        inside
    })?;
    Ok(out)
}

/// Entries in the tree (from the root page's counts).
pub fn entries(src: &dyn PageSource, root: &PageRef) -> Result<u64, TreeError> {
    Ok(load(src, root)?.entries())
}

/// The pages of the tree at `root` that `src` lacks and can name (those below held
/// pages). Fetch them and ask again until none is left to hold the whole tree.
pub fn missing(src: &dyn PageSource, root: &PageRef) -> Result<Vec<PageRef>, TreeError> {
    let mut out = Vec::new();
    let mut todo = vec![(*root, None::<(u8, VolPath)>)];
    while let Some((r, expect)) = todo.pop() {
        let Some(p) = src.page(&r)? else {
            out.push(r);
            continue;
        };
        if let Some((level, first)) = expect
            && (p.level() != level || p.first() != Some(&first))
        {
            return Err(bad(
                &r.hash,
                "a child page that does not stand where it should",
            ));
        }
        if let Page::Branch { level, children } = &*p {
            todo.extend(
                children
                    .iter()
                    .map(|c| (c.page_ref(), Some((level - 1, c.first.clone())))),
            );
        }
    }
    Ok(out)
}

/// The entries directly in `dir` (the top level for `None`), in order. Reads only the
/// pages that hold them: a subdirectory's contents are skipped by key.
pub fn children(
    src: &dyn PageSource,
    root: &PageRef,
    dir: Option<&VolPath>,
) -> Result<Vec<(VolPath, Entry)>, TreeError> {
    let prefix = dir.map(|d| format!("{d}/")).unwrap_or_default();
    let mut from = prefix.clone();
    let mut out = Vec::new();
    loop {
        let mut skip_to = None;
        range(src, root, &from, &mut |p, e| {
            let Some(rest) = p.as_str().strip_prefix(&prefix) else {
                return false;
            };
            match rest.find('/') {
                None => {
                    out.push((p.clone(), e.clone()));
                    true
                }
                Some(i) => {
                    // Past everything below `rest[..i]/` ('0' follows '/').
                    skip_to = Some(format!("{prefix}{}0", &rest[..i]));
                    false
                }
            }
        })?;
        match skip_to {
            Some(k) => from = k,
            None => return Ok(out),
        }
    }
}

/// The pages that may hold paths starting with `prefix` (with the pages above them) that
/// `src` lacks and can name: fetch them and ask again until none is left, then
/// [`children`] or [`under`] of that directory reads only held pages.
pub fn missing_in(
    src: &dyn PageSource,
    root: &PageRef,
    prefix: &str,
) -> Result<Vec<PageRef>, TreeError> {
    let inside = |lo: Option<&str>, hi: Option<&str>| {
        // [lo, hi) meets the keys that start with `prefix`.
        hi.is_none_or(|h| h > prefix) && lo.is_none_or(|l| l <= prefix || l.starts_with(prefix))
    };
    let mut out = Vec::new();
    let mut todo: Vec<(PageRef, Option<String>, Option<String>)> = vec![(*root, None, None)];
    while let Some((r, lo, hi)) = todo.pop() {
        let Some(p) = src.page(&r)? else {
            out.push(r);
            continue;
        };
        if let Page::Branch { children, .. } = &*p {
            for (i, c) in children.iter().enumerate() {
                let clo = if i == 0 {
                    lo.clone()
                } else {
                    Some(c.first.to_string())
                };
                let chi = children
                    .get(i + 1)
                    .map(|n| n.first.to_string())
                    .or(hi.clone());
                if inside(clo.as_deref(), chi.as_deref()) {
                    todo.push((c.page_ref(), clo, chi));
                }
            }
        }
    }
    Ok(out)
}

/// A page met in a walk of two trees: its level and first key once known (from its parent,
/// checked when it is read).
struct Node {
    r: PageRef,
    expect: Option<(u8, VolPath)>,
}

impl Node {
    fn level(&self) -> Option<u8> {
        self.expect.as_ref().map(|(l, _)| *l)
    }
}

/// A path whose entry differs between two trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// The path.
    pub path: VolPath,
    /// Its entry in the old tree.
    pub old: Option<Entry>,
    /// Its entry in the new tree.
    pub new: Option<Entry>,
}

impl Delta {
    /// As a change that sets (or removes) the path.
    pub fn into_change(self) -> Change {
        Change {
            path: self.path,
            entry: self.new,
        }
    }
}

/// The paths whose entries differ between the trees at `old` and `new`, in path order
/// (applied as changes to the old tree, they give the new one). Only pages whose hashes
/// differ are read.
pub fn diff(src: &dyn PageSource, old: &PageRef, new: &PageRef) -> Result<Vec<Delta>, TreeError> {
    let mut out = Vec::new();
    diff_walk(src, old, new, None, &mut |d| out.push(d))?;
    Ok(out)
}

/// Like [`diff`], giving each delta to `visit` as it is found: memory stays at a few pages
/// however many entries differ.
pub fn diff_each(
    src: &dyn PageSource,
    old: &PageRef,
    new: &PageRef,
    visit: &mut dyn FnMut(Delta),
) -> Result<(), TreeError> {
    diff_walk(src, old, new, None, visit)
}

/// The pages [`diff`] of these trees needs that `src` lacks, as far as held pages name
/// them: fetch them and ask again until none is missing (one round per level).
pub fn missing_for_diff(
    src: &dyn PageSource,
    old: &PageRef,
    new: &PageRef,
) -> Result<Vec<PageRef>, TreeError> {
    let mut missing = Vec::new();
    diff_walk(src, old, new, Some(&mut missing), &mut |_| {})?;
    Ok(missing)
}

/// Reads the page of `n`, checking that it stands where its parent says; `None` (and the
/// page noted as missing) when it is not held and `missing` collects such pages.
fn read_node(
    src: &dyn PageSource,
    n: &Node,
    missing: &mut Option<&mut Vec<PageRef>>,
) -> Result<Option<Arc<Page>>, TreeError> {
    let Some(p) = src.page(&n.r)? else {
        return match missing {
            Some(m) => {
                m.push(n.r);
                Ok(None)
            }
            None => Err(TreeError::Missing(n.r)),
        };
    };
    if let Some((level, first)) = &n.expect
        && (p.level() != *level || p.first() != Some(first))
    {
        return Err(bad(
            &n.r.hash,
            "a child page that does not stand where it should",
        ));
    }
    Ok(Some(p))
}

fn diff_walk(
    src: &dyn PageSource,
    old: &PageRef,
    new: &PageRef,
    mut missing: Option<&mut Vec<PageRef>>,
    visit: &mut dyn FnMut(Delta),
) -> Result<(), TreeError> {
    let root = |r: &PageRef| Node {
        r: *r,
        expect: None,
    };
    let mut sides = [vec![root(old)], vec![root(new)]];
    // The roots' levels are known once they are read.
    for side in &mut sides {
        let n = &mut side[0];
        match read_node(src, n, &mut missing)? {
            Some(p) => n.expect = p.first().map(|f| (p.level(), f.clone())),
            None => return Ok(()),
        }
    }
    loop {
        // Equal subtrees hold equal entries: skip them on both sides.
        let hashes: [HashSet<Hash>; 2] =
            [0, 1].map(|i| sides[i].iter().map(|n| n.r.hash).collect());
        sides[0].retain(|n| !hashes[1].contains(&n.r.hash));
        sides[1].retain(|n| !hashes[0].contains(&n.r.hash));
        let top = sides
            .iter()
            .flatten()
            .filter_map(Node::level)
            .max()
            .unwrap_or(0);
        if top == 0 {
            break;
        }
        // Expand the pages of the top level; lower ones wait until the levels meet.
        let mut absent = false;
        for side in &mut sides {
            let mut next = Vec::new();
            for n in side.drain(..) {
                if n.level() != Some(top) {
                    next.push(n);
                    continue;
                }
                match read_node(src, &n, &mut missing)? {
                    Some(p) => {
                        if let Page::Branch { level, children } = &*p {
                            next.extend(children.iter().map(|c| Node {
                                r: c.page_ref(),
                                expect: Some((level - 1, c.first.clone())),
                            }));
                        }
                    }
                    None => absent = true,
                }
            }
            *side = next;
        }
        if absent {
            return Ok(());
        }
    }
    if missing.is_some() {
        for n in sides.iter().flatten() {
            read_node(src, n, &mut missing)?;
        }
        return Ok(());
    }
    merge_leaves(src, &sides[0], &sides[1], visit)
}

/// The entries of a run of leaves, read one page at a time.
struct Cursor<'a> {
    src: &'a dyn PageSource,
    nodes: std::slice::Iter<'a, Node>,
    page: Option<Arc<Page>>,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(src: &'a dyn PageSource, nodes: &'a [Node]) -> Self {
        Cursor {
            src,
            nodes: nodes.iter(),
            page: None,
            at: 0,
        }
    }

    /// The current entry, reading the next page when one is used up.
    fn peek(&mut self) -> Result<Option<(&VolPath, &Entry)>, TreeError> {
        loop {
            let used_up = match self.page.as_deref() {
                Some(Page::Leaf(e)) => self.at >= e.len(),
                _ => true,
            };
            if !used_up {
                break;
            }
            let Some(n) = self.nodes.next() else {
                return Ok(None);
            };
            self.page = read_node(self.src, n, &mut None)?;
            self.at = 0;
        }
        match self.page.as_deref() {
            Some(Page::Leaf(e)) => Ok(e.get(self.at).map(|(p, e)| (p, e))),
            _ => Ok(None),
        }
    }

    fn take(&mut self) -> Result<Option<(VolPath, Entry)>, TreeError> {
        let item = self.peek()?.map(|(p, e)| (p.clone(), e.clone()));
        self.at += 1;
        Ok(item)
    }
}

fn merge_leaves(
    src: &dyn PageSource,
    old: &[Node],
    new: &[Node],
    visit: &mut dyn FnMut(Delta),
) -> Result<(), TreeError> {
    let (mut a, mut b) = (Cursor::new(src, old), Cursor::new(src, new));
    loop {
        let order = match (a.peek()?, b.peek()?) {
            (None, None) => return Ok(()),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((p, _)), Some((q, _))) => p.cmp(q),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (path, e) = a.take()?.expect("peeked");
                visit(Delta {
                    path,
                    old: Some(e),
                    new: None,
                });
            }
            std::cmp::Ordering::Greater => {
                let (path, e) = b.take()?.expect("peeked");
                visit(Delta {
                    path,
                    old: None,
                    new: Some(e),
                });
            }
            std::cmp::Ordering::Equal => {
                let (path, old) = a.take()?.expect("peeked");
                let (_, new) = b.take()?.expect("peeked");
                if old != new {
                    visit(Delta {
                        path,
                        old: Some(old),
                        new: Some(new),
                    });
                }
            }
        }
    }
}

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
                    let p = load_child(src, c, *level)?;
                    rebuild(src, b, &p, clo, chi, last, edits)?;
                }
            }
            Ok(())
        }
    }
}

impl Borrow<str> for VolPath {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

#[cfg(test)]
#[path = "tree_tests.rs"]
mod tests;
