//! Scanning a mounted directory into a manifest, and building snapshots from one.
//!
//! Both are blocking file-system work and run on the blocking pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use voltool_protocol::manifest::{MODE_MASK, found_mode, host_mode};
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

/// The committed mode of the file at `vp` of `base`, if it is a file there.
fn base_file_mode(base: &dyn Lookup, vp: &VolPath) -> Result<Option<u32>, ScanError> {
    Ok(match base.get(vp)? {
        Some(Entry::File { mode, .. }) => Some(mode),
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
    let vp = child_path(rel, &name, &full)?;
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
/// The file is opened without following a symbolic link in its place, and must be a
/// regular file.
pub fn read_stable(full: &Path, how: ScanMode<'_>) -> Result<(Hash, u64, Stat, u32), ScanError> {
    read_stable_with(full, &|| open_nofollow(full), how)
}

/// [`read_stable`] of the file `open` opens (`full` names it in messages, and is where
/// [`ScanMode::Link`] links it from: only for trees nobody else can change).
fn read_stable_with(
    full: &Path,
    open: &dyn Fn() -> std::io::Result<std::fs::File>,
    how: ScanMode<'_>,
) -> Result<(Hash, u64, Stat, u32), ScanError> {
    for _ in 0..2 {
        let f = open().map_err(io_err(full))?;
        let before = f.metadata().map_err(io_err(full))?;
        if !before.is_file() {
            return Err(ScanError::Io {
                path: full.display().to_string(),
                source: std::io::Error::other("not a regular file"),
            });
        }
        let (hash, size) = match how {
            ScanMode::HashOnly => hash_file(&f, full)?,
            ScanMode::Import(batch) => {
                batch.import_open(f.try_clone().map_err(io_err(full))?, full)?
            }
            ScanMode::Link(batch) => batch.link_file(full)?,
        };
        // A link is made by path: the file there must still be the one opened.
        let after = match how {
            ScanMode::Link(_) => std::fs::symlink_metadata(full),
            _ => f.metadata(),
        }
        .map_err(io_err(full))?;
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

/// Opens a file for reading, refusing a symbolic link in its place.
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Opens `rel` (`.` for the directory itself) beneath the directory `root` holds, following
/// no symbolic link on the way or at its end and leaving neither `root` nor its mount: a
/// tree that users change while the agent reads it (a copy-mode mount) can never lead the
/// agent's reads elsewhere.
fn open_beneath(root: &OwnedFd, rel: &str, flags: rustix::fs::OFlags) -> std::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    rustix::fs::openat2(
        root,
        rel,
        flags | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
    .map_err(std::io::Error::from)
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

impl Stat {
    /// The stat of a file's raw stat.
    fn of_raw(m: &rustix::fs::Stat) -> Self {
        Stat {
            size: m.st_size as u64,
            mtime_ns: m.st_mtime * 1_000_000_000 + m.st_mtime_nsec as i64,
            ctime_ns: m.st_ctime * 1_000_000_000 + m.st_ctime_nsec as i64,
            ino: m.st_ino,
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
/// as) and its stat cache. Files whose stat matches are taken from `base` unread. `root` is
/// held open, and every directory and file below it is opened beneath it without following
/// a symbolic link: a directory swapped for a link while the scan runs is an error, never a
/// way out of the tree.
pub fn scan(
    root: &Path,
    base: &Manifest,
    cache: &StatCache,
    how: ScanMode<'_>,
) -> Result<Scan, ScanError> {
    use rustix::fs::{AtFlags, FileType, OFlags};
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io_err(root)(e.into()))?;
    let mut entries = BTreeMap::new();
    let mut stats = StatCache::new();
    let mut to_hash: Vec<(VolPath, PathBuf)> = Vec::new();
    let mut stack: Vec<Option<VolPath>> = vec![None];
    while let Some(rel) = stack.pop() {
        let dir = match &rel {
            Some(r) => root.join(r.as_str()),
            None => root.to_path_buf(),
        };
        let dir_fd = open_beneath(
            &root_fd,
            rel.as_ref().map_or(".", |r| r.as_str()),
            OFlags::DIRECTORY,
        )
        .map_err(io_err(&dir))?;
        let listing = rustix::fs::Dir::read_from(&dir_fd).map_err(|e| io_err(&dir)(e.into()))?;
        for de in listing {
            let de = de.map_err(|e| io_err(&dir)(e.into()))?;
            let cname = de.file_name();
            if matches!(cname.to_bytes(), b"." | b"..") {
                continue;
            }
            let full = dir.join(std::ffi::OsStr::from_bytes(cname.to_bytes()));
            let name = cname
                .to_str()
                .map_err(|_| ScanError::NotUtf8(full.display().to_string()))?;
            let vp = child_path(rel.as_ref(), name, &full)?;
            let meta = rustix::fs::statat(&dir_fd, cname, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io_err(&full)(e.into()))?;
            let mode = meta.st_mode & MODE_MASK;
            match FileType::from_raw_mode(meta.st_mode) {
                FileType::Directory => {
                    entries.insert(vp.clone(), Entry::Dir { mode });
                    stack.push(Some(vp));
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&dir_fd, cname, Vec::new())
                        .map_err(|e| io_err(&full)(e.into()))?
                        .into_string()
                        .map_err(|_| ScanError::NotUtf8(full.display().to_string()))?;
                    check_symlink_target(&vp, &target).map_err(|source| ScanError::BadPath {
                        path: full.display().to_string(),
                        source,
                    })?;
                    entries.insert(vp, Entry::Symlink { target });
                }
                FileType::RegularFile => {
                    let st = Stat::of_raw(&meta);
                    // Snapshots are made without setuid/setgid bits: that is no change.
                    let mode = found_mode(mode, base_file_mode(base, &vp)?);
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
                        None => to_hash.push((vp, full)),
                    }
                }
                _ => {
                    tracing::warn!(path = %full.display(), "skipping a special file (not a file, directory or symlink)");
                }
            }
        }
    }
    let hashed: Vec<(VolPath, Entry, Stat, u64)> = to_hash
        .into_par_iter()
        .map(|(vp, full)| {
            let open = || open_beneath(&root_fd, vp.as_str(), OFlags::empty()).map(File::from);
            let (hash, size, st, mode) = read_stable_with(&full, &open, how)?;
            let mode = found_mode(mode, base_file_mode(base, &vp)?);
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

/// The volume path of `name` in the directory at volume path `rel` (the root for `None`);
/// `full` names it in messages.
fn child_path(rel: Option<&VolPath>, name: &str, full: &Path) -> Result<VolPath, ScanError> {
    let vp = match rel {
        Some(r) => format!("{r}/{name}"),
        None => name.to_string(),
    };
    VolPath::new(&vp).map_err(|source| ScanError::BadPath {
        path: full.display().to_string(),
        source,
    })
}

/// Copies one file into the store (durable once the batch is finished) and describes it
/// as a manifest entry.
pub fn import_file_entry(batch: &ImportBatch, path: &Path) -> Result<Entry, ScanError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    let st = Stat::of(&meta);
    let (hash, size) = batch.import_open(f, path)?;
    Ok(Entry::File {
        size,
        mode: meta.permissions().mode() & MODE_MASK,
        mtime_ns: st.mtime_ns,
        hash,
    })
}

/// Hashes a file by reading it (not mapping it: mapped pages would count against the
/// agent's memory while large files are checked).
fn hash_file(f: &std::fs::File, path: &Path) -> Result<(Hash, u64), ScanError> {
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
/// Every entry belongs to `owner` when given (a mount of a user other than root). Returns
/// the stats of the files built.
pub fn build_snapshot(
    dir: &Path,
    manifest: &Manifest,
    store: &Store,
    old: Option<&Path>,
    reuse: &HashSet<VolPath>,
    owner: Option<u32>,
) -> Result<StatCache, ScanError> {
    let own = |p: &Path| match owner {
        Some(uid) => std::os::unix::fs::lchown(p, Some(uid), None).map_err(io_err(p)),
        None => Ok(()),
    };
    std::fs::create_dir(dir).map_err(io_err(dir))?;
    own(dir)?;
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
            Entry::File { .. } => continue,
        }
        own(&full)?;
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
            own(&full)?;
            // Read-only is enough to set times (we own it).
            let f = std::fs::File::open(&full).map_err(io_err(&full))?;
            f.set_permissions(std::fs::Permissions::from_mode(host_mode(*mode)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree `root/d/f` with `root/up -> ..`, `root/ld -> d` and `root/lf -> d/f`, and a
    /// file `secret` beside the root.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"inside").unwrap();
        std::fs::write(t.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink("..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("d", root.join("ld")).unwrap();
        std::os::unix::fs::symlink("d/f", root.join("lf")).unwrap();
        (t, root)
    }

    #[test]
    fn nothing_beneath_a_held_root_is_reached_through_a_link() {
        let (_t, root) = tree();
        let fd = rustix::fs::open(
            &root,
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let open = |rel: &str| open_beneath(&fd, rel, rustix::fs::OFlags::empty());
        assert!(open("d/f").is_ok());
        for rel in ["up/secret", "ld/f", "lf", "../secret", "d/../../secret"] {
            assert!(open(rel).is_err(), "{rel} was opened");
        }
    }

    #[test]
    fn a_file_read_for_a_commit_is_never_a_link() {
        let (_t, root) = tree();
        let e = read_stable(&root.join("lf"), ScanMode::HashOnly).unwrap_err();
        assert!(matches!(e, ScanError::Io { .. }), "{e}");
        assert!(read_stable(&root.join("d/f"), ScanMode::HashOnly).is_ok());
        // A scan records links as links, and reads only what lies beneath (a link that
        // leaves is refused by name).
        let e = scan(
            &root,
            &Manifest::new(),
            &StatCache::new(),
            ScanMode::HashOnly,
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside the volume"), "{e}");
        std::fs::remove_file(root.join("up")).unwrap();
        let s = scan(
            &root,
            &Manifest::new(),
            &StatCache::new(),
            ScanMode::HashOnly,
        )
        .unwrap();
        let kinds: Vec<(String, bool)> = s
            .manifest
            .entries()
            .iter()
            .map(|(p, e)| (p.to_string(), matches!(e, Entry::Symlink { .. })))
            .collect();
        assert_eq!(
            kinds,
            [
                ("d".to_string(), false),
                ("d/f".to_string(), false),
                ("ld".to_string(), true),
                ("lf".to_string(), true),
            ]
        );
        assert_eq!(s.hashed_bytes, 6);
    }
}
