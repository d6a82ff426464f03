//! Reading a tree: lookups, ranges, directory listings, and the pages a read needs.

use super::page::{check_place, child_upper, load, load_child};
use super::*;
use crate::manifest::Entry;

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
    let mut upper: Option<String> = None;
    loop {
        let next = match &*page {
            Page::Leaf(e) => {
                return Ok(e
                    .binary_search_by(|(p, _)| p.cmp(path))
                    .ok()
                    .map(|i| e[i].1.clone()));
            }
            Page::Branch { level, children } => {
                let i = child_for(children, path.as_str());
                let bound = child_upper(children, i, upper.as_deref()).map(str::to_string);
                let p = load_child(src, &children[i], *level, bound.as_deref())?;
                upper = bound;
                p
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
        upper: Option<&str>,
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
                for i in child_for(children, from)..children.len() {
                    let bound = child_upper(children, i, upper);
                    let p = load_child(src, &children[i], *level, bound)?;
                    if !walk(src, &p, bound, from, visit)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }
    let page = load(src, root)?;
    walk(src, &page, None, from, visit).map(|_| ())
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

/// The pages of the tree at `root` that `src` lacks and can name (those below held
/// pages). Fetch them and ask again until none is left to hold the whole tree.
pub fn missing(src: &dyn PageSource, root: &PageRef) -> Result<Vec<PageRef>, TreeError> {
    missing_in(src, root, "")
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
    // A page, where its parent says it stands (level, first path), and its key range.
    type Todo = (
        PageRef,
        Option<(u8, VolPath)>,
        Option<String>,
        Option<String>,
    );
    let mut todo: Vec<Todo> = vec![(*root, None, None, None)];
    while let Some((r, place, lo, hi)) = todo.pop() {
        let Some(p) = src.page(&r)? else {
            out.push(r);
            continue;
        };
        if let Some((level, first)) = &place {
            check_place(&p, &r.hash, *level, first, hi.as_deref())?;
        }
        if let Page::Branch { level, children } = &*p {
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
                    todo.push((c.page_ref(), Some((level - 1, c.first.clone())), clo, chi));
                }
            }
        }
    }
    Ok(out)
}

/// Adds to `pages` every page of the tree at `root`, and to `blobs` every blob its entries
/// name. A page already in `pages` is not read again, nor what is below it: the versions
/// of a volume share most of their pages, so marking several costs about the pages in
/// which they differ.
pub fn mark(
    src: &dyn PageSource,
    root: &PageRef,
    pages: &mut std::collections::HashSet<Hash>,
    blobs: &mut std::collections::HashSet<Hash>,
) -> Result<(), TreeError> {
    if !pages.insert(root.hash) {
        return Ok(());
    }
    let mut todo: Vec<(Arc<Page>, Option<String>)> = vec![(load(src, root)?, None)];
    while let Some((page, upper)) = todo.pop() {
        match &*page {
            Page::Leaf(entries) => {
                blobs.extend(entries.iter().filter_map(|(_, e)| e.blob()).map(|(h, _)| h));
            }
            Page::Branch { level, children } => {
                for (i, c) in children.iter().enumerate() {
                    if pages.insert(c.page) {
                        let bound = child_upper(children, i, upper.as_deref());
                        let p = load_child(src, c, *level, bound)?;
                        todo.push((p, bound.map(str::to_string)));
                    }
                }
            }
        }
    }
    Ok(())
}
