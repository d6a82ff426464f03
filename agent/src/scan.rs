//! Scanning a mounted directory into a manifest, and building snapshots from one.
//!
//! Both are blocking file-system work and run on the blocking pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use voltool_protocol::manifest::MODE_MASK;
use voltool_protocol::path::check_symlink_target;
use voltool_protocol::tree::{self, PageRef, PageSource, TreeError};
use voltool_protocol::{Entry, Hash, Manifest, ManifestError, PathError, VolPath};

use crate::store::{ImportBatch, Store, StoreError, sync_fs_of};

/// A scan or build failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// File-system failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A name that is not UTF-8 or not a valid volume path.
    #[error("{path}: {source}")]
    BadPath {
        /// The file.
        path: String,
        /// Why.
        source: PathError,
    },
    /// A file name that is not UTF-8.
    #[error("{0}: file names must be UTF-8")]
    NotUtf8(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The scanned tree is not a valid manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A manifest's pages cannot be read.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A file kept changing while it was read: committing it would record torn content.
    #[error("{0} changed while it was read (twice); try again once it is written")]
    Unstable(String),
}

impl ScanError {
    /// Whether the tree read is at fault (a bad name or link, a file that kept changing),
    /// rather than the local disk or store.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            ScanError::BadPath { .. }
                | ScanError::NotUtf8(_)
                | ScanError::Manifest(_)
                | ScanError::Unstable(_)
        )
    }
}

/// Read access to a manifest: the whole one in memory, or a tree of pages.
pub trait Lookup {
    /// The entry at `path`.
    fn get(&self, path: &VolPath) -> Result<Option<Entry>, ScanError>;
    /// The entries strictly below `dir`, in order.
    fn under(&self, dir: &VolPath) -> Result<Vec<(VolPath, Entry)>, ScanError>;
}

impl Lookup for Manifest {
    fn get(&self, path: &VolPath) -> Result<Option<Entry>, ScanError> {
        Ok(Manifest::get(self, path).cloned())
    }
    fn under(&self, dir: &VolPath) -> Result<Vec<(VolPath, Entry)>, ScanError> {
        Ok(Manifest::under(self, Some(dir))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect())
    }
}

/// A tree of pages seen as a manifest.
#[derive(Debug, Clone)]
pub struct TreeView<S> {
    /// Where its pages are.
    pub src: S,
    /// Its root.
    pub root: PageRef,
}

impl<S: PageSource> Lookup for TreeView<S> {
    fn get(&self, path: &VolPath) -> Result<Option<Entry>, ScanError> {
        Ok(tree::get(&self.src, &self.root, path)?)
    }
    fn under(&self, dir: &VolPath) -> Result<Vec<(VolPath, Entry)>, ScanError> {
        Ok(tree::under(&self.src, &self.root, Some(dir))?)
    }
}

/// The content (hash, size) `base` names for the file at `vp`, if its stat still matches
/// the one `cache` recorded when it was hashed: such a file is not read again.
pub fn known_content(
    cache: &StatCache,
    base: &dyn Lookup,
    vp: &VolPath,
    st: &Stat,
) -> Result<Option<(Hash, u64)>, ScanError> {
    if cache.get(vp) != Some(st) {
        return Ok(None);
    }
    Ok(match base.get(vp)? {
        Some(Entry::File { hash, size, .. }) => Some((hash, size)),
        _ => None,
    })
}

/// A directory entry's full path, name and volume path (below `rel`, the directory's own
/// volume path, or the root): names must be UTF-8 and valid volume path components.
pub fn entry_path(
    de: &std::fs::DirEntry,
    rel: Option<&VolPath>,
) -> Result<(PathBuf, String, VolPath), ScanError> {
    let full = de.path();
    let name = de
        .file_name()
        .into_string()
        .map_err(|_| ScanError::NotUtf8(full.display().to_string()))?;
    let vp = match rel {
        Some(r) => format!("{r}/{name}"),
        None => name.clone(),
    };
    let vp = VolPath::new(&vp).map_err(|source| ScanError::BadPath {
        path: full.display().to_string(),
        source,
    })?;
    Ok((full, name, vp))
}

/// The target of the symlink at `full` (volume path `vp`), if it stays in the volume.
pub fn read_symlink(full: &Path, vp: &VolPath) -> Result<String, ScanError> {
    let target = std::fs::read_link(full).map_err(io_err(full))?;
    let target = target
        .into_os_string()
        .into_string()
        .map_err(|_| ScanError::NotUtf8(full.display().to_string()))?;
    check_symlink_target(vp, &target).map_err(|source| ScanError::BadPath {
        path: full.display().to_string(),
        source,
    })?;
    Ok(target)
}

/// Hashes a file, or imports it into the store, as `how` says, checking its stat before
/// and after: a file that changed meanwhile is read again, and refused if it changes again,
/// so torn content is never recorded. Returns hash, size, the stat it had, and its mode.
pub fn read_stable(full: &Path, how: ScanMode<'_>) -> Result<(Hash, u64, Stat, u32), ScanError> {
    for _ in 0..2 {
        let before = std::fs::symlink_metadata(full).map_err(io_err(full))?;
        let (hash, size) = match how {
            ScanMode::HashOnly => hash_file(full)?,
            ScanMode::Import(batch) => batch.import_file(full)?,
            ScanMode::Link(batch) => batch.link_file(full)?,
        };
        let after = std::fs::symlink_metadata(full).map_err(io_err(full))?;
        let st = Stat::of(&after);
        // A hard link into the store changes the file's change time, and nothing else.
        let same = match how {
            ScanMode::Link(_) => {
                Stat {
                    ctime_ns: st.ctime_ns,
                    ..Stat::of(&before)
                } == st
            }
            _ => Stat::of(&before) == st,
        };
        if same && size == st.size {
            return Ok((hash, size, st, after.permissions().mode() & MODE_MASK));
        }
    }
    Err(ScanError::Unstable(full.display().to_string()))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ScanError + '_ {
    move |source| ScanError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a file looked like when last hashed; a file whose stat still matches is not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    /// Size.
    pub size: u64,
    /// Modification time (ns).
    pub mtime_ns: i64,
    /// Change time (ns): catches writes that restore the mtime.
    pub ctime_ns: i64,
    /// Inode.
    pub ino: u64,
}

impl Stat {
    /// The stat of a file's metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        Stat {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
        }
    }
}

/// Stats of the files of a mount, by path.
pub type StatCache = HashMap<VolPath, Stat>;

/// How a scan treats files whose stat changed.
#[derive(Clone, Copy, Debug)]
pub enum ScanMode<'a> {
    /// Hash them only (to find uncommitted changes).
    HashOnly,
    /// Copy them into the store while hashing (to commit them); durable once the batch
    /// is finished.
    Import(&'a ImportBatch),
    /// Hard-link them into the store (files that can no longer change: a frozen upper
    /// layer); durable once the batch is finished.
    Link(&'a ImportBatch),
}

/// The result of a scan.
#[derive(Debug)]
pub struct Scan {
    /// The tree as found.
    pub manifest: Manifest,
    /// Stats of its files.
    pub stats: StatCache,
    /// Bytes read and hashed (files whose stat changed).
    pub hashed_bytes: u64,
}

/// Scans `root` against `base` (the manifest the directory was built from or last committed
/// as) and its stat cache. Files whose stat matches are taken from `base` unread.
pub fn scan(
    root: &Path,
    base: &Manifest,
    cache: &StatCache,
    how: ScanMode<'_>,
) -> Result<Scan, ScanError> {
    let mut entries = BTreeMap::new();
    let mut stats = StatCache::new();
    let mut to_hash: Vec<(VolPath, PathBuf, Stat, u32)> = Vec::new();
    let mut stack: Vec<(PathBuf, Option<VolPath>)> = vec![(root.to_path_buf(), None)];
    while let Some((dir, rel)) = stack.pop() {
        for de in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let de = de.map_err(io_err(&dir))?;
            let (full, _, vp) = entry_path(&de, rel.as_ref())?;
            let meta = std::fs::symlink_metadata(&full).map_err(io_err(&full))?;
            let ft = meta.file_type();
            let mode = meta.permissions().mode() & MODE_MASK;
            if ft.is_dir() {
                entries.insert(vp.clone(), Entry::Dir { mode });
                stack.push((full, Some(vp)));
            } else if ft.is_symlink() {
                let target = read_symlink(&full, &vp)?;
                entries.insert(vp, Entry::Symlink { target });
            } else if ft.is_file() {
                let st = Stat::of(&meta);
                match known_content(cache, base, &vp, &st)? {
                    Some((hash, size)) => {
                        entries.insert(
                            vp.clone(),
                            Entry::File {
                                size,
                                mode,
                                mtime_ns: st.mtime_ns,
                                hash,
                            },
                        );
                        stats.insert(vp, st);
                    }
                    None => to_hash.push((vp, full, st, mode)),
                }
            } else {
                tracing::warn!(path = %full.display(), "skipping a special file (not a file, directory or symlink)");
            }
        }
    }
    let hashed: Vec<(VolPath, Entry, Stat, u64)> = to_hash
        .into_par_iter()
        .map(|(vp, full, _, _)| {
            let (hash, size, st, mode) = read_stable(&full, how)?;
            let e = Entry::File {
                size,
                mode,
                mtime_ns: st.mtime_ns,
                hash,
            };
            Ok((vp, e, st, size))
        })
        .collect::<Result<_, ScanError>>()?;
    let mut hashed_bytes = 0;
    for (vp, e, st, size) in hashed {
        hashed_bytes += size;
        entries.insert(vp.clone(), e);
        stats.insert(vp, st);
    }
    Ok(Scan {
        manifest: Manifest::from_entries(entries)?,
        stats,
        hashed_bytes,
    })
}

/// Copies one file into the store (durable once the batch is finished) and describes it
/// as a manifest entry.
pub fn import_file_entry(batch: &ImportBatch, path: &Path) -> Result<Entry, ScanError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let st = Stat::of(&meta);
    let (hash, size) = batch.import_file(path)?;
    Ok(Entry::File {
        size,
        mode: meta.permissions().mode() & MODE_MASK,
        mtime_ns: st.mtime_ns,
        hash,
    })
}

/// Hashes a file by reading it (not mapping it: mapped pages would count against the
/// agent's memory while large files are checked).
fn hash_file(path: &Path) -> Result<(Hash, u64), ScanError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(std::io::BufReader::with_capacity(1 << 20, f))
        .map_err(io_err(path))?;
    Ok((Hash::from(h.finalize()), h.count()))
}

/// Stats of `paths` under `root` as they are now (after something changed their inodes'
/// change times, such as removing other hard links to them).
pub fn restat(root: &Path, paths: &HashSet<VolPath>) -> Result<StatCache, ScanError> {
    paths
        .iter()
        .map(|p| {
            let full = root.join(p.as_str());
            let m = std::fs::symlink_metadata(&full).map_err(io_err(&full))?;
            Ok((p.clone(), Stat::of(&m)))
        })
        .collect()
}

/// Builds a snapshot of `manifest` in `dir` (which must not exist): directories, symlinks,
/// and files copied out of the store (the snapshot never shares an inode with the store, so
/// writes into a mount cannot reach what the agent serves). Files in `reuse` are hard-linked
/// from `old` instead (unchanged, clean files of the previous snapshot). The snapshot is
/// durable before this returns (one `syncfs` of its file system, not a sync per file).
/// Returns the stats of the files built.
pub fn build_snapshot(
    dir: &Path,
    manifest: &Manifest,
    store: &Store,
    old: Option<&Path>,
    reuse: &HashSet<VolPath>,
) -> Result<StatCache, ScanError> {
    std::fs::create_dir(dir).map_err(io_err(dir))?;
    let files: Vec<(&VolPath, &Entry)> = manifest
        .entries()
        .iter()
        .filter(|(_, e)| matches!(e, Entry::File { .. }))
        .collect();
    for (p, e) in manifest.entries() {
        let full = dir.join(p.as_str());
        match e {
            Entry::Dir { .. } => std::fs::create_dir(&full).map_err(io_err(&full))?,
            Entry::Symlink { target } => {
                std::os::unix::fs::symlink(target, &full).map_err(io_err(&full))?
            }
            Entry::File { .. } => {}
        }
    }
    let stats: Vec<(VolPath, Stat)> = files
        .into_par_iter()
        .map(|(p, e)| {
            let Entry::File {
                mode,
                mtime_ns,
                hash,
                ..
            } = e
            else {
                unreachable!("filtered to files")
            };
            let full = dir.join(p.as_str());
            match old {
                Some(old) if reuse.contains(p) => {
                    let src = old.join(p.as_str());
                    std::fs::hard_link(&src, &full).map_err(io_err(&full))?;
                }
                _ if *hash == Hash::EMPTY => {
                    std::fs::File::create(&full).map_err(io_err(&full))?;
                }
                _ => {
                    let src = store.data_path(hash);
                    std::fs::copy(&src, &full).map_err(io_err(&full))?;
                }
            }
            // Read-only is enough to set times (we own it).
            let f = std::fs::File::open(&full).map_err(io_err(&full))?;
            f.set_permissions(std::fs::Permissions::from_mode(*mode))
                .map_err(io_err(&full))?;
            let t = if *mtime_ns >= 0 {
                UNIX_EPOCH + Duration::from_nanos(*mtime_ns as u64)
            } else {
                UNIX_EPOCH - Duration::from_nanos(mtime_ns.unsigned_abs())
            };
            f.set_modified(t).map_err(io_err(&full))?;
            let m = f.metadata().map_err(io_err(&full))?;
            Ok((p.clone(), Stat::of(&m)))
        })
        .collect::<Result<_, ScanError>>()?;
    // Directory modes last, deepest first, so a read-only directory can still be filled.
    for (p, e) in manifest.entries().iter().rev() {
        if let Entry::Dir { mode } = e {
            let full = dir.join(p.as_str());
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode))
                .map_err(io_err(&full))?;
        }
    }
    sync_fs_of(dir).map_err(io_err(dir))?;
    Ok(stats.into_iter().collect())
}

/// Removes a directory tree, first making read-only directories writable.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let mut stack = vec![dir.to_path_buf()];
            while let Some(d) = stack.pop() {
                let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
                if let Ok(rd) = std::fs::read_dir(&d) {
                    for de in rd.flatten() {
                        if de.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(de.path());
                        }
                    }
                }
            }
            std::fs::remove_dir_all(dir)
        }
    }
}
