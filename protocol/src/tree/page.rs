//! One page: its encoding, and the checks of where it stands in a tree.

use std::sync::Arc;

use super::*;
use crate::manifest::Entry;
use crate::path::check_symlink_target;

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

impl Page {
    /// Its level (0 for a leaf).
    pub fn level(&self) -> u8 {
        match self {
            Page::Leaf(_) => 0,
            Page::Branch { level, .. } => *level,
        }
    }

    /// Its last key (a branch: its last child's first), `None` for an empty leaf.
    pub fn last(&self) -> Option<&VolPath> {
        match self {
            Page::Leaf(e) => e.last().map(|(p, _)| p),
            Page::Branch { children, .. } => children.last().map(|c| &c.first),
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

/// Checks that page `p` (named `hash`) stands where its parent says: at `level`, with
/// `first` as its first path, and every key of it below `upper` (the first key of the next
/// sibling, or the parent's own bound). Each page's keys thus lie in the range its parent
/// gives it, and no key can stand in two pages of a tree.
pub(super) fn check_place(
    p: &Page,
    hash: &Hash,
    level: u8,
    first: &VolPath,
    upper: Option<&str>,
) -> Result<(), TreeError> {
    if p.level() != level || p.first() != Some(first) {
        return Err(bad(
            hash,
            "a child page that does not stand where it should",
        ));
    }
    if let (Some(u), Some(last)) = (upper, p.last())
        && last.as_str() >= u
    {
        return Err(bad(
            hash,
            "a child page with keys past the range its parent gives it (out of order, or in two pages)",
        ));
    }
    Ok(())
}

/// The bound of child `i` of `children` under a page bounded by `upper`: the next child's
/// first key, or `upper` for the last child.
pub(super) fn child_upper<'a>(
    children: &'a [Child],
    i: usize,
    upper: Option<&'a str>,
) -> Option<&'a str> {
    children.get(i + 1).map(|n| n.first.as_str()).or(upper)
}

/// Reads a page that must be held.
pub(super) fn load(src: &dyn PageSource, r: &PageRef) -> Result<Arc<Page>, TreeError> {
    src.page(r)?.ok_or(TreeError::Missing(*r))
}

/// Reads the child `c` of a page at `level` and checks that it stands where it should,
/// its keys below `upper`.
pub(super) fn load_child(
    src: &dyn PageSource,
    c: &Child,
    level: u8,
    upper: Option<&str>,
) -> Result<Arc<Page>, TreeError> {
    let p = load(src, &c.page_ref())?;
    check_place(&p, &c.page, level - 1, &c.first, upper)?;
    Ok(p)
}
