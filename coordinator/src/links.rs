//! The index of every volume's symbolic links, so a commit checks exactly the links it
//! affects against the whole merged tree ([`voltool_protocol::links::check_link`]): those
//! it adds or replaces, and those whose resolution looked up a path it changes (found or
//! not), or lay below a path it replaced. A commit that leaves a link leading outside the
//! volume is refused, naming the link; the head does not move.
//!
//! For each volume: its links with the paths each one's resolution looked up (`links-0`),
//! those paths the other way round (`link-deps-0`), and the head version the index
//! describes (`links-indexed-0`). The index moves with the head, in the head's write
//! transaction. A volume whose index is missing or stale (made before the index existed)
//! is indexed whole, from its head, by its next commit.

use std::collections::BTreeSet;

use redb::MultimapTableDefinition;
use voltool_protocol::links::{LinkError, check_link};
use voltool_protocol::tree::PageRef;
use voltool_protocol::{Change, Entry, VolPath};

use super::volumes::internal;
use super::*;

/// A volume's links, with the paths each one's resolution looked up (postcard `Vec<String>`).
const LINKS: TableDefinition<([u8; 16], &str), &[u8]> = TableDefinition::new("links-0");
/// For each path a link's resolution looked up, the links that did.
const LINK_DEPS: MultimapTableDefinition<([u8; 16], &str), &str> =
    MultimapTableDefinition::new("link-deps-0");
/// The head version each volume's index describes.
const INDEXED: TableDefinition<[u8; 16], u64> = TableDefinition::new("links-indexed-0");

/// Creates the tables (at start).
pub(super) fn create_tables(w: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    w.open_table(LINKS)?;
    w.open_multimap_table(LINK_DEPS)?;
    w.open_table(INDEXED)?;
    Ok(())
}

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
        let r = state.db.begin_read().map_err(internal)?;
        let indexed = r
            .open_table(INDEXED)
            .map_err(internal)?
            .get(id.0)
            .map_err(internal)?
            .map(|v| v.value());
        let links = r.open_table(LINKS).map_err(internal)?;
        let has_links = links
            .range((id.0, "")..)
            .map_err(internal)?
            .next()
            .transpose()
            .map_err(internal)?
            .is_some_and(|(k, _)| k.value().0 == id.0);
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
            for e in links.range((id.0, "")..).map_err(internal)? {
                let (k, _) = e.map_err(internal)?;
                let (vol, path) = k.value();
                if vol != id.0 {
                    break;
                }
                if let Ok(p) = VolPath::new(path) {
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
        let id = self.id.0;
        let r = state.db.begin_read().map_err(internal)?;
        let links = r.open_table(LINKS).map_err(internal)?;
        let deps = r.open_multimap_table(LINK_DEPS).map_err(internal)?;
        let path_of = |s: &str| VolPath::new(s).map_err(internal);
        for c in changes {
            let p = c.path.as_str();
            // The link itself, replaced or removed.
            if links.get((id, p)).map_err(internal)?.is_some() {
                self.candidates.insert(c.path.clone());
            }
            // Links whose resolution looked this path up.
            for l in deps.get((id, p)).map_err(internal)? {
                self.candidates
                    .insert(path_of(l.map_err(internal)?.value())?);
            }
            // Links below it, gone if it is no directory any more.
            if !matches!(c.entry, Some(Entry::Dir { .. })) {
                let (lo, hi) = (format!("{p}/"), format!("{p}0"));
                for e in links
                    .range((id, lo.as_str())..(id, hi.as_str()))
                    .map_err(internal)?
                {
                    let (k, _) = e.map_err(internal)?;
                    self.candidates.insert(path_of(k.value().1)?);
                }
            }
        }
        Ok(())
    }

    /// Checks the candidates against the merged tree `root` and updates the index in `w`
    /// (the write transaction that moves the head to `version`). A link that leads out of
    /// the volume refuses the commit.
    pub(super) fn finish(
        &mut self,
        state: &State,
        root: &PageRef,
        version: u64,
        w: &redb::WriteTransaction,
    ) -> Result<(), Fail> {
        let id = self.id.0;
        let mut links = w.open_table(LINKS).map_err(internal)?;
        let mut deps = w.open_multimap_table(LINK_DEPS).map_err(internal)?;
        let mut look = |q: &VolPath| tree::get(&state.pages, root, q);
        for link in &self.candidates {
            self.checked += 1;
            let old: Option<Vec<String>> = match links.remove((id, link.as_str())) {
                Ok(Some(v)) => Some(postcard::from_bytes(v.value()).map_err(internal)?),
                Ok(None) => None,
                Err(e) => return Err(internal(e)),
            };
            for d in old.iter().flatten() {
                deps.remove((id, d.as_str()), link.as_str())
                    .map_err(internal)?;
            }
            let Some(Entry::Symlink { target }) = look(link).map_err(internal)? else {
                continue;
            };
            let looked = check_link(link, &target, &mut look).map_err(|e| match e {
                LinkError::Tree(e) => internal(e),
                e => fail(ErrorKind::Invalid, e.to_string()),
            })?;
            let looked: Vec<String> = looked.into_iter().map(|p| p.to_string()).collect();
            for d in &looked {
                deps.insert((id, d.as_str()), link.as_str())
                    .map_err(internal)?;
            }
            let enc = postcard::to_stdvec(&looked).map_err(internal)?;
            links
                .insert((id, link.as_str()), enc.as_slice())
                .map_err(internal)?;
        }
        w.open_table(INDEXED)
            .map_err(internal)?
            .insert(id, version)
            .map_err(internal)?;
        Ok(())
    }
}

/// Removes a deleted volume's index (in the write transaction that deletes it).
pub(super) fn forget(w: &redb::WriteTransaction, id: VolumeId) -> Result<(), Fail> {
    let id = id.0;
    let mut links = w.open_table(LINKS).map_err(internal)?;
    let mut deps = w.open_multimap_table(LINK_DEPS).map_err(internal)?;
    let all: Vec<(String, Vec<String>)> = links
        .range((id, "")..)
        .map_err(internal)?
        .map_while(|e| {
            let (k, v) = e.ok()?;
            let (vol, path) = k.value();
            (vol == id).then(|| {
                let looked: Vec<String> = postcard::from_bytes(v.value()).unwrap_or_default();
                (path.to_string(), looked)
            })
        })
        .collect();
    for (link, looked) in &all {
        for d in looked {
            deps.remove((id, d.as_str()), link.as_str())
                .map_err(internal)?;
        }
        links.remove((id, link.as_str())).map_err(internal)?;
    }
    w.open_table(INDEXED)
        .map_err(internal)?
        .remove(id)
        .map_err(internal)?;
    Ok(())
}
