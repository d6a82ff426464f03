//! The manifest: the sorted map `path -> entry` that describes one version of a volume.
//!
//! Paths are ordered by their bytes. Every entry's parent is a directory entry, and no
//! symlink leaves the volume. A manifest is stored and sent as a tree of pages
//! ([`crate::tree`]); [`Manifest`] is the whole map in memory, for small volumes, tests and
//! the copy fallback.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::path::{PathError, VolPath, check_symlink_target};
use crate::tree::{Built, PageRef, PageSource, Shape, TreeError};

/// Largest number of entries accepted.
pub const MAX_ENTRIES: usize = 4_000_000;
/// Permission bits kept in a mode.
pub const MODE_MASK: u32 = 0o7777;
/// The setuid and setgid bits: kept in a manifest (what the writer committed), never made
/// on a host (see [`host_mode`]).
pub const PRIVILEGE_BITS: u32 = 0o6000;

/// The mode a file of a volume gets on a host: its committed mode without the setuid and
/// setgid bits. A writer is trusted with a volume's contents, never with the hosts that read
/// it, so no file a volume puts on a host runs with its owner's rights.
pub fn host_mode(mode: u32) -> u32 {
    mode & MODE_MASK & !PRIVILEGE_BITS
}

/// The mode to commit for a file found with mode `found` on a host whose committed mode was
/// `committed`: the committed one when the two differ only in the bits [`host_mode`] strips
/// (the file was made without them), else what was found.
pub fn found_mode(found: u32, committed: Option<u32>) -> u32 {
    match committed {
        Some(c) if host_mode(c) == found & MODE_MASK => c & MODE_MASK,
        _ => found & MODE_MASK,
    }
}

/// One entry of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A regular file: its bytes are the blob `hash` of `size` bytes.
    File {
        /// Size in bytes.
        size: u64,
        /// Permission bits (`& 0o7777`).
        mode: u32,
        /// Modification time, nanoseconds since the Unix epoch.
        mtime_ns: i64,
        /// BLAKE3 of the content.
        hash: Hash,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link; the target never leaves the volume.
    Symlink {
        /// The link's target, relative.
        target: String,
    },
}

impl Entry {
    /// The blob this entry needs, if any.
    pub fn blob(&self) -> Option<(Hash, u64)> {
        match self {
            Entry::File { hash, size, .. } => Some((*hash, *size)),
            _ => None,
        }
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self, Entry::Dir { .. })
    }

    /// Whether two entries have the same content and kind (mtime aside).
    pub fn same_content(&self, other: &Entry) -> bool {
        match (self, other) {
            (
                Entry::File {
                    size: s1,
                    mode: m1,
                    hash: h1,
                    ..
                },
                Entry::File {
                    size: s2,
                    mode: m2,
                    hash: h2,
                    ..
                },
            ) => s1 == s2 && m1 == m2 && h1 == h2,
            (a, b) => a == b,
        }
    }
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Not a valid encoding.
    #[error("malformed manifest: {0}")]
    Malformed(#[from] postcard::Error),
    /// Unknown encoding version.
    #[error("unsupported manifest version {0}")]
    Version(u8),
    /// Bigger than [`crate::tree::MAX_PAGE_BYTES`] (a page) or [`MAX_ENTRIES`].
    #[error("manifest too large ({0} bytes or entries)")]
    TooLarge(usize),
    /// Entries are not in strictly increasing order.
    #[error("manifest entries out of order or duplicated at {0:?}")]
    Order(String),
    /// An invalid path or symlink.
    #[error("manifest has a hostile path: {0}")]
    Path(#[from] PathError),
    /// An entry whose parent is missing or not a directory.
    #[error("manifest entry {0:?} has no parent directory entry")]
    Orphan(String),
    /// Bytes after the last entry.
    #[error("manifest has {0} trailing bytes")]
    Trailing(usize),
}

/// A validated manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: BTreeMap<VolPath, Entry>,
}

impl Manifest {
    /// An empty manifest (a new volume).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a manifest from entries, validating them as a decoded one would be.
    pub fn from_entries(entries: BTreeMap<VolPath, Entry>) -> Result<Self, ManifestError> {
        let m = Manifest { entries };
        m.validate()?;
        Ok(m)
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> &BTreeMap<VolPath, Entry> {
        &self.entries
    }

    /// Consumes the manifest.
    pub fn into_entries(self) -> BTreeMap<VolPath, Entry> {
        self.entries
    }

    /// The entry at `path`.
    pub fn get(&self, path: &VolPath) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter_map(|e| e.blob())
            .map(|(_, s)| s)
            .sum()
    }

    /// Entries strictly below `dir` (all of them for `None`).
    pub fn under<'a>(
        &'a self,
        dir: Option<&'a VolPath>,
    ) -> impl Iterator<Item = (&'a VolPath, &'a Entry)> + 'a {
        self.entries
            .iter()
            .filter(move |(p, _)| dir.is_none_or(|d| p.is_under(d)))
    }

    fn validate(&self) -> Result<(), ManifestError> {
        validate_entries(&self.entries)
    }

    /// Writes the manifest as a tree of pages, giving each to `sink`.
    pub fn build(&self, shape: Shape, sink: &mut dyn FnMut(PageRef, Vec<u8>)) -> Built {
        crate::tree::build(&self.entries, shape, sink)
    }

    /// The root page of the canonical tree of this manifest.
    pub fn root(&self) -> PageRef {
        self.build(Shape::CANONICAL, &mut |_, _| {}).root
    }

    /// Reads a whole tree of pages into memory, validating it.
    pub fn from_tree(src: &dyn PageSource, root: &PageRef) -> Result<Self, TreeError> {
        let mut entries = BTreeMap::new();
        crate::tree::range(src, root, "", &mut |p, e| {
            entries.insert(p.clone(), e.clone());
            true
        })?;
        Ok(Manifest::from_entries(entries)?)
    }

    /// The changes that turn `self` into `new`.
    pub fn diff(&self, new: &Manifest) -> Vec<Change> {
        let mut out = Vec::new();
        for (p, e) in &new.entries {
            if self.entries.get(p) != Some(e) {
                out.push(Change {
                    path: p.clone(),
                    entry: Some(e.clone()),
                });
            }
        }
        for p in self.entries.keys() {
            if !new.entries.contains_key(p) {
                out.push(Change {
                    path: p.clone(),
                    entry: None,
                });
            }
        }
        out
    }

    /// Applies a change set per path, in order, keeping the tree consistent: setting a path
    /// removes what lies below it unless it is a directory, and creates missing parent
    /// directories (replacing a file or link that stood where a directory must be); removing a
    /// path removes what lies below it.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), ManifestError> {
        apply_changes(&mut self.entries, changes)?;
        self.validate()
    }
}

/// Checks a map of entries: not too many, every parent a directory entry, no symlink out.
pub(crate) fn validate_entries(entries: &BTreeMap<VolPath, Entry>) -> Result<(), ManifestError> {
    if entries.len() > MAX_ENTRIES {
        return Err(ManifestError::TooLarge(entries.len()));
    }
    for (path, entry) in entries {
        if let Some(parent) = path.parent() {
            match entries.get(&parent) {
                Some(Entry::Dir { .. }) => {}
                _ => return Err(ManifestError::Orphan(path.to_string())),
            }
        }
        if let Entry::Symlink { target } = entry {
            check_symlink_target(path, target)?;
        }
    }
    Ok(())
}

/// Applies a change set to a map of entries (see [`Manifest::apply`]), without the final
/// validation.
pub(crate) fn apply_changes(
    entries: &mut BTreeMap<VolPath, Entry>,
    changes: &[Change],
) -> Result<(), ManifestError> {
    for c in changes {
        match &c.entry {
            Some(entry) => {
                if let Entry::Symlink { target } = entry {
                    check_symlink_target(&c.path, target)?;
                }
                for a in c.path.ancestors() {
                    match entries.get(&a) {
                        Some(Entry::Dir { .. }) => {}
                        _ => {
                            entries.insert(a, Entry::Dir { mode: 0o755 });
                        }
                    }
                }
                if !entry.is_dir() {
                    remove_below(entries, &c.path);
                }
                entries.insert(c.path.clone(), entry.clone());
            }
            None => {
                entries.remove(&c.path);
                remove_below(entries, &c.path);
            }
        }
    }
    Ok(())
}

fn remove_below(entries: &mut BTreeMap<VolPath, Entry>, dir: &VolPath) {
    let prefix = format!("{dir}/");
    let below: Vec<VolPath> = entries
        .range::<str, _>((
            std::ops::Bound::Included(prefix.as_str()),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(p, _)| p.as_str().starts_with(&prefix))
        .map(|(p, _)| p.clone())
        .collect();
    for p in below {
        entries.remove(&p);
    }
}

/// One change of a change set: `entry: None` removes the path (and what lies below it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The path changed.
    pub path: VolPath,
    /// The new entry, or `None` for a removal.
    pub entry: Option<Entry>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn p(s: &str) -> VolPath {
        VolPath::new(s).unwrap()
    }

    pub(crate) fn file(h: u8) -> Entry {
        Entry::File {
            size: 3,
            mode: 0o644,
            mtime_ns: 1,
            hash: Hash([h; 32]),
        }
    }

    #[test]
    fn privilege_bits_never_reach_a_host_and_are_not_lost_by_it() {
        assert_eq!(host_mode(0o4755), 0o755);
        assert_eq!(host_mode(0o2750), 0o750);
        assert_eq!(host_mode(0o1777), 0o1777, "the sticky bit is no privilege");
        // A file made without its setuid bit keeps the committed mode ...
        assert_eq!(found_mode(0o755, Some(0o4755)), 0o4755);
        assert_eq!(found_mode(0o755, Some(0o755)), 0o755);
        // ... a real change of mode is one, and a new file has only what it has.
        assert_eq!(found_mode(0o700, Some(0o4755)), 0o700);
        assert_eq!(found_mode(0o644, None), 0o644);
        assert_eq!(found_mode(0o100644, None), 0o644);
    }

    #[test]
    fn tree_round_trip() {
        let mut m = Manifest::new();
        m.apply(&[
            Change {
                path: p("d/x"),
                entry: Some(file(1)),
            },
            Change {
                path: p("l"),
                entry: Some(Entry::Symlink {
                    target: "d/x".into(),
                }),
            },
        ])
        .unwrap();
        assert_eq!(m.len(), 3);
        let mut pages = crate::tree::MemPages::default();
        let built = m.build(Shape::CANONICAL, &mut |r, b| pages.insert(r, &b).unwrap());
        assert_eq!(built.entries, 3);
        assert_eq!(built.root, m.root());
        assert_eq!(Manifest::from_tree(&pages, &built.root).unwrap(), m);
    }

    #[test]
    fn file_replaces_dir_and_dir_replaces_file() {
        let mut m = Manifest::new();
        m.apply(&[Change {
            path: p("a/b"),
            entry: Some(file(1)),
        }])
        .unwrap();
        m.apply(&[Change {
            path: p("a"),
            entry: Some(file(2)),
        }])
        .unwrap();
        assert_eq!(m.len(), 1);
        m.apply(&[Change {
            path: p("a/c"),
            entry: Some(file(3)),
        }])
        .unwrap();
        assert!(m.get(&p("a")).unwrap().is_dir());
        m.apply(&[Change {
            path: p("a"),
            entry: None,
        }])
        .unwrap();
        assert!(m.is_empty());
    }

    #[test]
    fn diff_then_apply_gives_target() {
        let mut a = Manifest::new();
        a.apply(&[Change {
            path: p("x/y"),
            entry: Some(file(1)),
        }])
        .unwrap();
        let mut b = Manifest::new();
        b.apply(&[Change {
            path: p("z"),
            entry: Some(file(2)),
        }])
        .unwrap();
        let mut c = a.clone();
        c.apply(&a.diff(&b)).unwrap();
        assert_eq!(c, b);
    }
}
