//! Metadata layers: a directory tree that describes entries of a manifest for an overlay,
//! with no file data in it.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use rayon::prelude::*;
use rustix::fs::{CWD, FileType, Mode, XattrFlags, fsetxattr, mknodat};
use voltool_protocol::{Entry, Hash, VolPath};

use super::{XATTR_METACOPY, XATTR_REDIRECT};

/// Where a blob lies in the data-only layer (the store's directory; see
/// [`crate::store::BLOBS_DIR`] for why its first name is that one).
pub fn data_redirect(hash: &Hash) -> String {
    let hex = hash.to_hex();
    format!("/{}/{}/{hex}.data", crate::store::BLOBS_DIR, &hex[..2])
}

/// The blob a data-only redirect ([`data_redirect`]) names; `None` for any other redirect
/// (a renamed directory's).
pub fn redirect_hash(r: &[u8]) -> Option<Hash> {
    let s = std::str::from_utf8(r).ok()?;
    let rest = s.strip_prefix('/')?.strip_prefix(crate::store::BLOBS_DIR)?;
    let (_, name) = rest.rsplit_once('/')?;
    name.strip_suffix(".data")?.parse().ok()
}

fn ctx(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Creates a file whose data is the data-only layer's file at `redirect`: empty and sparse
/// here, with the size, mode and mtime it shows through the overlay.
pub fn metacopy_file(
    path: &Path,
    size: u64,
    mode: u32,
    mtime_ns: i64,
    redirect: &str,
) -> io::Result<()> {
    let f = std::fs::File::create(path).map_err(ctx(path))?;
    f.set_len(size).map_err(ctx(path))?;
    let x = |e: rustix::io::Errno| ctx(path)(io::Error::from(e));
    fsetxattr(&f, XATTR_METACOPY, b"", XattrFlags::empty()).map_err(x)?;
    fsetxattr(&f, XATTR_REDIRECT, redirect.as_bytes(), XattrFlags::empty()).map_err(x)?;
    set_meta(&f, path, mode, mtime_ns)
}

fn set_meta(f: &std::fs::File, path: &Path, mode: u32, mtime_ns: i64) -> io::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(ctx(path))?;
    let t = if mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(mtime_ns.unsigned_abs())
    };
    f.set_modified(t).map_err(ctx(path))
}

/// Writes a layer in parts, so a layer of a million entries never sits in memory whole.
#[derive(Debug)]
pub struct LayerWriter {
    dir: std::path::PathBuf,
    /// Directories written, with their modes (set last).
    dirs: Vec<(VolPath, u32)>,
    /// The user its entries belong to (root's if `None`): a mount of a user other than
    /// root shows its files as that user's, so it can write them (the manifest records no
    /// owners).
    owner: Option<u32>,
}

/// Gives `path` (not following a link) to `owner`, if there is one.
fn own(path: &Path, owner: Option<u32>) -> io::Result<()> {
    match owner {
        Some(uid) => std::os::unix::fs::lchown(path, Some(uid), None).map_err(ctx(path)),
        None => Ok(()),
    }
}

impl LayerWriter {
    /// Creates the layer's directory (which must not exist), its entries `owner`'s.
    pub fn create(dir: &Path, owner: Option<u32>) -> io::Result<Self> {
        std::fs::create_dir(dir).map_err(ctx(dir))?;
        own(dir, owner)?;
        Ok(LayerWriter {
            dir: dir.to_path_buf(),
            dirs: Vec::new(),
            owner,
        })
    }

    /// Writes entries, in path order and after every earlier part (parents first): `None`
    /// is a whiteout.
    pub fn add(&mut self, entries: &[(VolPath, Option<Entry>)]) -> io::Result<()> {
        let dir = &self.dir;
        for (p, e) in entries {
            let full = dir.join(p.as_str());
            match e {
                Some(Entry::Dir { mode }) => {
                    std::fs::create_dir(&full).map_err(ctx(&full))?;
                    own(&full, self.owner)?;
                    self.dirs.push((p.clone(), *mode));
                }
                Some(Entry::Symlink { target }) => {
                    std::os::unix::fs::symlink(target, &full).map_err(ctx(&full))?;
                    own(&full, self.owner)?;
                }
                Some(Entry::File { .. }) => {}
                None => mknodat(CWD, &full, FileType::CharacterDevice, Mode::empty(), 0)
                    .map_err(|e| ctx(&full)(io::Error::from(e)))?,
            }
        }
        entries
            .par_iter()
            .filter_map(|(p, e)| match e {
                Some(Entry::File {
                    size,
                    mode,
                    mtime_ns,
                    hash,
                }) => Some((p, *size, *mode, *mtime_ns, hash)),
                _ => None,
            })
            .try_for_each(|(p, size, mode, mtime_ns, hash)| {
                let full = dir.join(p.as_str());
                if size == 0 {
                    let f = std::fs::File::create(&full).map_err(ctx(&full))?;
                    set_meta(&f, &full, mode, mtime_ns)?;
                } else {
                    metacopy_file(&full, size, mode, mtime_ns, &data_redirect(hash))?;
                }
                own(&full, self.owner)
            })
    }

    /// Sets directory modes last, deepest first, so a read-only directory could be filled.
    pub fn finish(self) -> io::Result<()> {
        for (p, mode) in self.dirs.iter().rev() {
            let full = self.dir.join(p.as_str());
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode))
                .map_err(ctx(&full))?;
        }
        Ok(())
    }
}
