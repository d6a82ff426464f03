//! The index of every volume's symbolic links, so a commit checks exactly the links it
//! affects against the whole merged tree ([`voltool_protocol::links::check_link`]): those
//! it adds or replaces, and those whose resolution looked up a path it changes (found or
//! not), or lay below a path it replaced. A commit that leaves a link leading outside the
//! volume is refused, naming the link; the head does not move.
//!
//! For each volume the coordinator's state ([`super::meta::Meta`]) keeps its links with
//! the paths each one's resolution looked up, those paths the other way round, and the head
//! version the index describes. The index moves with the head, in the same write
//! ([`super::meta::Meta::move_head`]). A volume whose index is missing or stale (made before the index existed)
//! is indexed whole, from its head, by its next commit.

use std::collections::BTreeSet;

use voltool_protocol::links::{LinkError, check_link};
use voltool_protocol::tree::PageRef;
use voltool_protocol::{Change, Entry, VolPath};

use super::meta::{LinkEntry, LinkUpdate};
use super::volumes::{internal, meta_fail};
use super::*;

/// The links one commit must check once merged.
#[derive(Debug)]
pub(super) struct LinkCheck {
    id: VolumeId,
    /// Links to check against the merged tree (some may be gone or no link any more).
    candidates: BTreeSet<VolPath>,
    /// Whether the volume's index lists any link (else only new links need checking).
    has_links: bool,
    /// Links checked at the end (for the figures).
    pub(super) checked: usize,
}

impl LinkCheck {
    /// Starts the check of a commit on the head `head` of volume `id` (whose tree is
    /// `root`): a volume not indexed at that head has every link of the head checked.
    pub(super) fn start(
        state: &State,
        id: VolumeId,
        version: u64,
        root: &PageRef,
    ) -> Result<Self, Fail> {
        let indexed = state.meta.links_indexed(id).map_err(meta_fail)?;
        let has_links = state.meta.has_links(id).map_err(meta_fail)?;
        let mut check = LinkCheck {
            id,
            candidates: BTreeSet::new(),
            has_links,
            checked: 0,
        };
        if indexed != Some(version) {
            // Every link of the head, and whatever the stale index named.
            tree::range(&state.pages, root, "", &mut |p, e| {
                if matches!(e, Entry::Symlink { .. }) {
                    check.candidates.insert(p.clone());
                }
                true
            })
            .map_err(internal)?;
            for (path, _) in state.meta.links(id).map_err(meta_fail)? {
                if let Ok(p) = VolPath::new(&path) {
                    check.candidates.insert(p);
                }
            }
            check.has_links = true;
        }
        Ok(check)
    }

    /// Notes the links a part of the change set affects.
    pub(super) fn part(&mut self, state: &State, changes: &[Change]) -> Result<(), Fail> {
        for c in changes {
            if matches!(c.entry, Some(Entry::Symlink { .. })) {
                self.candidates.insert(c.path.clone());
            }
        }
        if !self.has_links {
            return Ok(());
        }
        let id = self.id;
        let path_of = |s: &str| VolPath::new(s).map_err(internal);
        for c in changes {
            let p = c.path.as_str();
            // The link itself, replaced or removed.
            if state.meta.link(id, p).map_err(meta_fail)?.is_some() {
                self.candidates.insert(c.path.clone());
            }
            // Links whose resolution looked this path up.
            for l in state.meta.link_deps(id, p).map_err(meta_fail)? {
                self.candidates.insert(path_of(&l)?);
            }
            // Links below it, gone if it is no directory any more.
            if !matches!(c.entry, Some(Entry::Dir { .. })) {
                for l in state.meta.links_below(id, p).map_err(meta_fail)? {
                    self.candidates.insert(path_of(&l)?);
                }
            }
        }
        Ok(())
    }

    /// Checks the candidates against the merged tree `root`; returns the index's changes
    /// that go with the head's move. A link that leads out of the volume refuses the
    /// commit.
    pub(super) fn finish(&mut self, state: &State, root: &PageRef) -> Result<LinkUpdate, Fail> {
        let mut look = |q: &VolPath| tree::get(&state.pages, root, q);
        let mut update = LinkUpdate::default();
        for link in &self.candidates {
            self.checked += 1;
            let old = state.meta.link(self.id, link.as_str()).map_err(meta_fail)?;
            let new = match look(link).map_err(internal)? {
                Some(Entry::Symlink { target }) => {
                    let looked = check_link(link, &target, &mut look).map_err(|e| match e {
                        LinkError::Tree(e) => internal(e),
                        e => fail(ErrorKind::Invalid, e.to_string()),
                    })?;
                    Some(looked.into_iter().map(|p| p.to_string()).collect())
                }
                _ => None,
            };
            if old.is_some() || new.is_some() {
                update.entries.push(LinkEntry {
                    link: link.to_string(),
                    old,
                    new,
                });
            }
        }
        Ok(update)
    }
}
