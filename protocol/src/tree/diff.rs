//! Comparing two trees, reading only the pages whose hashes differ.

use std::collections::HashSet;

use super::page::check_place;
use super::*;
use crate::manifest::{Change, Entry};

/// A page met in a walk of two trees: its level and first key once known (from its parent,
/// checked when it is read).
struct Node {
    r: PageRef,
    expect: Option<(u8, VolPath)>,
    /// Its keys' bound (the next sibling's first key, or its parent's bound).
    upper: Option<VolPath>,
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

    /// Whether the path differs in its mtime alone.
    pub fn mtime_only(&self) -> bool {
        match (&self.old, &self.new) {
            (Some(old), Some(new)) => old.same_content(new),
            _ => false,
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
    if let Some((level, first)) = &n.expect {
        check_place(
            &p,
            &n.r.hash,
            *level,
            first,
            n.upper.as_ref().map(VolPath::as_str),
        )?;
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
        upper: None,
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
                            next.extend(children.iter().enumerate().map(|(i, c)| {
                                Node {
                                    r: c.page_ref(),
                                    expect: Some((level - 1, c.first.clone())),
                                    upper: children
                                        .get(i + 1)
                                        .map(|s| s.first.clone())
                                        .or(n.upper.clone()),
                                }
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
