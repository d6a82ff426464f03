//! Reading an overlay's upper layer as changes to the manifest its lower layers show: what
//! a mount changed, found without looking at anything it did not change.
//!
//! What the kernel leaves in an upper layer (metacopy and redirect_dir on):
//! - a whiteout (character device 0/0) where a lower entry was removed;
//! - a directory marked opaque (`trusted.overlay.opaque=y`) where a directory was removed
//!   and made again (`rm -r d; mkdir d`): nothing below it comes from the lower layers;
//! - a directory with `trusted.overlay.redirect` where a directory was renamed: its lower
//!   contents are those of the redirect's path (relative to the parent's origin, or
//!   absolute from the volume root);
//! - a file with `trusted.overlay.metacopy` where only metadata changed (mode, times) or a
//!   file was renamed without being written: its data is still the lower file's at its
//!   origin (its redirect, or the same path);
//! - any other file whole, as written.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::lgetxattr;
use voltool_protocol::manifest::MODE_MASK;
use voltool_protocol::{Change, Entry, VolPath};

use super::{XATTR_METACOPY, XATTR_OPAQUE, XATTR_REDIRECT};
use crate::scan::{
    Lookup, ScanError, ScanMode, Stat, StatCache, entry_path, known_content, read_stable,
    read_symlink,
};

/// Where the lower contents of an upper directory come from.
#[derive(Clone, Debug)]
enum Origin {
    /// The volume root.
    Root,
    /// This path of the lower manifest.
    At(VolPath),
    /// Nothing: a new or opaque directory.
    Nothing,
}

impl Origin {
    fn join(&self, name: &str) -> Origin {
        match self {
            Origin::Root => VolPath::new(name).map_or(Origin::Nothing, Origin::At),
            Origin::At(p) => VolPath::new(name).map_or(Origin::Nothing, |n| Origin::At(p.join(&n))),
            Origin::Nothing => Origin::Nothing,
        }
    }

    /// The origin a redirect names, relative to this (the parent's) origin or absolute.
    fn redirect(&self, r: &str) -> Origin {
        match r.strip_prefix('/') {
            Some("") => Origin::Root,
            Some(abs) => VolPath::new(abs).map_or(Origin::Nothing, Origin::At),
            None => self.join(r),
        }
    }

    fn path(&self) -> Option<&VolPath> {
        match self {
            Origin::At(p) => Some(p),
            _ => None,
        }
    }
}

/// An overlay xattr of an upper-layer entry: `None` only when it is absent. Any other
/// failure is an error, since reading a lost opaque flag or redirect as "absent" would
/// bring back removed files or empty a renamed directory.
fn xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>, ScanError> {
    let mut buf = vec![0u8; 4096];
    match lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(ScanError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("reading {name}: {e}"),
            ),
        }),
    }
}

fn xattr_str(path: &Path, name: &str) -> Result<Option<String>, ScanError> {
    xattr(path, name)?
        .map(|v| String::from_utf8(v).map_err(|_| ScanError::NotUtf8(path.display().to_string())))
        .transpose()
}

/// Changes [`read_upper`] hands on at once at most (more when a renamed directory brings
/// its lower contents along).
pub const UPPER_PART: usize = 16_384;

/// What an upper layer changed, besides the changes themselves.
#[derive(Debug, Default)]
pub struct UpperChanges {
    /// Changes to the lower manifest not handed on yet.
    changes: Vec<Change>,
    /// Stats of the files written through the mount, as hashed.
    pub stats: StatCache,
    /// Bytes read and hashed (files written through the mount).
    pub hashed_bytes: u64,
    /// Entries in the upper layer.
    pub entries: usize,
}

/// Reads `upper` as changes to `lowers` (the manifest its lower layers show), and hands
/// them to `part` in order, about [`UPPER_PART`] at a time (applied in that order, one
/// part after another, they give the mount's tree). Files written through the mount are
/// hashed, or imported into the store, as `how` says, unless their stat matches `cache`
/// and `base` (the last synced state) names their content.
pub fn read_upper(
    upper: &Path,
    lowers: &dyn Lookup,
    base: &dyn Lookup,
    cache: &StatCache,
    how: ScanMode<'_>,
    part: &mut dyn FnMut(Vec<Change>) -> Result<(), ScanError>,
) -> Result<UpperChanges, ScanError> {
    let mut out = UpperChanges::default();
    // Volume paths only: a file's path in the upper layer is `upper` joined with it.
    let mut written: Vec<VolPath> = Vec::new();
    let mut stack: Vec<(PathBuf, Option<VolPath>, Origin)> =
        vec![(upper.to_path_buf(), None, Origin::Root)];
    while let Some((dir, rel, origin)) = stack.pop() {
        for de in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let de = de.map_err(io_err(&dir))?;
            let (full, name, vp) = entry_path(&de, rel.as_ref())?;
            out.entries += 1;
            let md = std::fs::symlink_metadata(&full).map_err(io_err(&full))?;
            let ft = md.file_type();
            let mode = md.permissions().mode() & MODE_MASK;
            if ft.is_char_device() && md.rdev() == 0 {
                out.changes.push(Change {
                    path: vp,
                    entry: None,
                });
            } else if ft.is_dir() {
                let child = dir_change(&full, &vp, &origin, &name, mode, lowers, &mut out)?;
                stack.push((full, Some(vp), child));
            } else if ft.is_symlink() {
                let target = read_symlink(&full, &vp)?;
                out.changes.push(Change {
                    path: vp,
                    entry: Some(Entry::Symlink { target }),
                });
            } else if ft.is_file() && xattr(&full, XATTR_METACOPY)?.is_some() {
                let entry = metacopy_entry(&full, &md, &origin, &name, lowers)?;
                out.changes.push(Change {
                    path: vp,
                    entry: Some(entry),
                });
            } else if ft.is_file() {
                let st = Stat::of(&md);
                match known_content(cache, base, &vp, &st)? {
                    Some((hash, size)) => {
                        out.stats.insert(vp.clone(), st);
                        out.changes.push(Change {
                            path: vp,
                            entry: Some(Entry::File {
                                size,
                                mode,
                                mtime_ns: st.mtime_ns,
                                hash,
                            }),
                        });
                    }
                    None => written.push(vp),
                }
            } else {
                // A volume holds no special files; whatever stood here below is hidden.
                tracing::warn!(path = %full.display(), "skipping a special file (not a file, directory or symlink)");
                out.changes.push(Change {
                    path: vp,
                    entry: None,
                });
            }
            // A file's ancestors were read before it, and nothing read later lies above
            // it: the files waiting to be hashed may follow what was read after them.
            if written.len() >= UPPER_PART {
                part(std::mem::take(&mut out.changes))?;
                hash_written(upper, std::mem::take(&mut written), how, &mut out)?;
            }
            if out.changes.len() >= UPPER_PART {
                part(std::mem::take(&mut out.changes))?;
            }
        }
    }
    hash_written(upper, written, how, &mut out)?;
    if !out.changes.is_empty() {
        part(std::mem::take(&mut out.changes))?;
    }
    Ok(out)
}

/// The changes an upper directory stands for; returns the origin of its lower contents.
fn dir_change(
    full: &Path,
    vp: &VolPath,
    parent: &Origin,
    name: &str,
    mode: u32,
    lowers: &dyn Lookup,
    out: &mut UpperChanges,
) -> Result<Origin, ScanError> {
    let opaque = xattr(full, XATTR_OPAQUE)?.is_some_and(|v| v == b"y");
    let redirect = xattr_str(full, XATTR_REDIRECT)?;
    let origin = match (&redirect, opaque) {
        (_, true) => Origin::Nothing,
        (Some(r), false) => parent.redirect(r),
        (None, false) => parent.join(name),
    };
    let replaced = opaque || origin.path() != Some(vp);
    let dir = Change {
        path: vp.clone(),
        entry: Some(Entry::Dir { mode }),
    };
    if !replaced {
        out.changes.push(dir);
        return Ok(origin);
    }
    // Whatever stood here is gone; the directory holds its origin's lower contents (a
    // rename) or nothing (opaque), then what the upper layer holds below it.
    out.changes.push(Change {
        path: vp.clone(),
        entry: None,
    });
    out.changes.push(dir);
    if let Some(o) = origin.path() {
        for (q, e) in lowers.under(o)? {
            if let Some(np) = q.rebase(o, vp) {
                out.changes.push(Change {
                    path: np,
                    entry: Some(e),
                });
            }
        }
    }
    Ok(origin)
}

/// The entry of a file whose data lies in a lower layer (metacopy).
fn metacopy_entry(
    full: &Path,
    md: &std::fs::Metadata,
    parent: &Origin,
    name: &str,
    lowers: &dyn Lookup,
) -> Result<Entry, ScanError> {
    let redirect = xattr_str(full, XATTR_REDIRECT)?;
    let origin = match &redirect {
        Some(r) => parent.redirect(r),
        None => parent.join(name),
    };
    let st = Stat::of(md);
    let mode = md.permissions().mode() & MODE_MASK;
    let known = match origin.path() {
        Some(o) => lowers.get(o)?,
        None => None,
    };
    let (hash, size) = match (
        known,
        redirect
            .as_deref()
            .and_then(|r| super::layer::redirect_hash(r.as_bytes())),
    ) {
        (Some(Entry::File { hash, size, .. }), _) => (hash, size),
        (_, Some(hash)) => (hash, md.len()),
        _ => {
            return Err(ScanError::Io {
                path: full.display().to_string(),
                source: std::io::Error::other(
                    "an overlay metacopy file whose data cannot be found in the layers below",
                ),
            });
        }
    };
    Ok(Entry::File {
        size,
        mode,
        mtime_ns: st.mtime_ns,
        hash,
    })
}

/// Hashes (or imports) the files written through the mount, on all cores. Their stats
/// are kept unless they are linked into the store (a sealed upper never changes again).
fn hash_written(
    upper: &Path,
    written: Vec<VolPath>,
    how: ScanMode<'_>,
    out: &mut UpperChanges,
) -> Result<(), ScanError> {
    use rayon::prelude::*;
    let keep_stats = !matches!(how, ScanMode::Link(_));
    let hashed: Vec<(Change, Option<Stat>)> = written
        .into_par_iter()
        .map(|vp| {
            let (hash, size, st, mode) = read_stable(&upper.join(vp.as_str()), how)?;
            let e = Entry::File {
                size,
                mode,
                mtime_ns: st.mtime_ns,
                hash,
            };
            let change = Change {
                path: vp,
                entry: Some(e),
            };
            Ok((change, keep_stats.then_some(st)))
        })
        .collect::<Result<_, ScanError>>()?;
    out.changes.reserve(hashed.len());
    for (c, st) in hashed {
        out.hashed_bytes += c.entry.as_ref().and_then(Entry::blob).map_or(0, |(_, s)| s);
        if let Some(st) = st {
            out.stats.insert(c.path.clone(), st);
        }
        out.changes.push(c);
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ScanError + '_ {
    move |source| ScanError::Io {
        path: path.display().to_string(),
        source,
    }
}
