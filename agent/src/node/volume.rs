//! The volume commands that act on the coordinator's head: ls, put, get, rm, cp.

use super::*;

impl Inner {
    /// Lists `path` of the volume's head: what lies directly in a directory (everything
    /// below it when `recursive`), or a file alone.
    pub(super) async fn ls(
        &self,
        name: &str,
        path: Option<&str>,
        recursive: bool,
    ) -> OpResult<Vec<LsEntry>> {
        let info = self.verified_head(name).await?;
        let root = info.head.commit.root();
        let dir = user_path(path)?;
        // Only the pages on the way to the path and those of what lies in it.
        let prefix = dir.as_ref().map(VolPath::to_string).unwrap_or_default();
        self.fetch_prefix(root, prefix).await?;
        let (pages, d) = (self.pages.clone(), dir.clone());
        let listing = self
            .blocking(move || {
                if let Some(d) = &d {
                    match tree::get(&pages, &root, d)? {
                        None => return Ok(None),
                        Some(e) if !e.is_dir() => return Ok(Some(vec![(d.clone(), e)])),
                        _ => {}
                    }
                }
                if recursive {
                    tree::under(&pages, &root, d.as_ref()).map(Some)
                } else {
                    tree::children(&pages, &root, d.as_ref()).map(Some)
                }
            })
            .await?;
        match listing {
            None => Err(err(
                ErrorCode::NotFound,
                format!(
                    "no such path: {name}:{}",
                    dir.map(|d| d.to_string()).unwrap_or_default()
                ),
            )),
            Some(entries) => Ok(entries.iter().map(|(p, e)| ls_entry(p, e)).collect()),
        }
    }
}

impl Inner {
    /// Uploads local files and directories as one commit. Without `force` an existing file
    /// is never replaced; a directory is never replaced by a file, `force` or not (its
    /// whole subtree would go).
    pub(super) async fn put(
        &self,
        name: &str,
        items: &[PutItem],
        force: bool,
        events: &Events,
    ) -> OpResult<Reply> {
        if items.is_empty() {
            return Err(err(ErrorCode::Invalid, "nothing to upload"));
        }
        let info = self.verified_head(name).await?;
        let current = self.manifest_of(&info.head.commit).await?;
        let mut plan = Vec::with_capacity(items.len());
        for it in items {
            let meta = std::fs::symlink_metadata(&it.local)
                .map_err(|e| err(ErrorCode::NotFound, format!("{}: {e}", it.local.display())))?;
            let to = user_path(Some(&it.remote))?;
            if to.is_none() && !meta.is_dir() {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{}: the volume root is not a file", it.local.display()),
                ));
            }
            let dir_mode = meta.is_dir().then(|| {
                std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
                    & voltool_protocol::manifest::MODE_MASK
            });
            plan.push(Import {
                local: it.local.clone(),
                to,
                dir_mode,
                mode: it.mode,
            });
        }
        let store = self.store.clone();
        let changes = tokio::task::spawn_blocking(move || import_local(&store, &plan))
            .await
            .map_err(failed)?
            .map_err(|e| scan_err(e, ""))?;
        let to = match items {
            [one] => format!("{name}:/{}", one.remote.trim_start_matches('/')),
            _ => name.to_string(),
        };
        self.commit_put(name, &info, &current, changes, force, &to, events)
            .await
    }

    /// Commits the changes of a put (their blobs in the store): refused where they replace
    /// what they may not, their blobs uploaded where the origin lacks them.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn commit_put(
        &self,
        name: &str,
        info: &VolumeInfo,
        current: &Manifest,
        changes: Vec<Change>,
        force: bool,
        to: &str,
        events: &Events,
    ) -> OpResult<Reply> {
        check_overwrites(name, current, &changes, force)?;
        let blobs: Vec<(Hash, u64)> = changes
            .iter()
            .filter_map(|c| c.entry.as_ref().and_then(|e| e.blob()))
            .collect();
        let bytes: u64 = blobs.iter().map(|(_, s)| s).sum();
        let files = blobs.len();
        let (grow, done) = events.growing_counter("upload");
        self.upload_missing(&blobs, &grow, &done).await?;
        let version = self.commit_changes(info, current, changes).await?;
        Ok(Reply::Done(format!(
            "uploaded {files} file(s), {bytes} bytes, to {to} (version {version})"
        )))
    }

    pub(super) async fn get(
        &self,
        name: &str,
        remote: &str,
        local: Option<&Path>,
        force: bool,
        events: &Events,
    ) -> OpResult<Reply> {
        let (src, entry, below) = self.entries_at(name, remote).await?;
        let Some(local) = local else {
            // To stdout: the file, or every file below the directory in path order.
            let files: Vec<(Hash, u64)> = match &entry {
                Some(e @ Entry::File { .. }) => e.blob().into_iter().collect(),
                Some(Entry::Symlink { .. }) => {
                    return Err(err(
                        ErrorCode::Invalid,
                        format!("{name}:{remote} is a symlink; only files go to stdout"),
                    ));
                }
                _ => below.iter().filter_map(|(_, e)| e.blob()).collect(),
            };
            self.stream_blobs(&files, events).await?;
            return Ok(Reply::Done(String::new()));
        };
        self.get_into(src, entry, below, local, force, events).await
    }

    /// What lies at `remote` of volume `name` in its verified head: the path, its entry
    /// (`None` for the root) and the entries below it (for a directory).
    pub(super) async fn entries_at(
        &self,
        name: &str,
        remote: &str,
    ) -> OpResult<(Option<VolPath>, Option<Entry>, Vec<(VolPath, Entry)>)> {
        let info = self.verified_head(name).await?;
        let root = info.head.commit.root();
        let src = user_path(Some(remote))?;
        // Only the pages on the way to the path and those of what lies below it.
        let prefix = src.as_ref().map(VolPath::to_string).unwrap_or_default();
        self.fetch_prefix(root, prefix).await?;
        let (pages, s2) = (self.pages.clone(), src.clone());
        let found = self
            .blocking(move || {
                let entry = match &s2 {
                    Some(p) => match tree::get(&pages, &root, p)? {
                        Some(e) => Some(e),
                        None => return Ok(None),
                    },
                    None => None,
                };
                let below = match &entry {
                    None | Some(Entry::Dir { .. }) => tree::under(&pages, &root, s2.as_ref())?,
                    Some(_) => Vec::new(),
                };
                Ok(Some((entry, below)))
            })
            .await?;
        let Some((entry, below)) = found else {
            let p = src.map(|p| p.to_string()).unwrap_or_default();
            return Err(err(
                ErrorCode::NotFound,
                format!("no such path: {name}:{p}"),
            ));
        };
        Ok((src, entry, below))
    }

    /// `get` into local files written by the agent (root's API; the CLI writes them itself
    /// from a [`Request::VolumeExport`]).
    async fn get_into(
        &self,
        src: Option<VolPath>,
        entry: Option<Entry>,
        below: Vec<(VolPath, Entry)>,
        local: &Path,
        force: bool,
        events: &Events,
    ) -> OpResult<Reply> {
        // The set of entries to write, relative to the destination.
        let base_name = src.as_ref().map(|p| p.file_name().to_string());
        let dest = match std::fs::metadata(local) {
            Ok(md) if md.is_dir() => match &base_name {
                Some(b) => local.join(b),
                None => local.to_path_buf(),
            },
            _ => local.to_path_buf(),
        };
        let mut items: Vec<(PathBuf, Entry)> = Vec::new();
        match &entry {
            Some(e @ (Entry::File { .. } | Entry::Symlink { .. })) => {
                items.push((dest.clone(), e.clone()))
            }
            _ => {
                items.push((dest.clone(), Entry::Dir { mode: 0o755 }));
                for (p, e) in &below {
                    let rel = match &src {
                        Some(s) => &p.as_str()[s.as_str().len() + 1..],
                        None => p.as_str(),
                    };
                    items.push((dest.join(rel), e.clone()));
                }
            }
        }
        if !force
            && let Some((p, _)) = items
                .iter()
                .find(|(p, e)| !e.is_dir() && std::fs::symlink_metadata(p).is_ok())
        {
            return Err(err(
                ErrorCode::Exists,
                format!("{} already exists (use --force to overwrite)", p.display()),
            ));
        }
        let blobs: Vec<(Hash, u64)> = items.iter().filter_map(|(_, e)| e.blob()).collect();
        let total: u64 = blobs.iter().map(|(_, s)| s).sum();
        self.fetch_blobs(&blobs, events).await?;
        // The destination's parents are made as needed.
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| failed(format!("{}: {e}", parent.display())))?;
        }
        let store = self.store.clone();
        let n = items.len();
        tokio::task::spawn_blocking(move || write_out(&store, &items, force))
            .await
            .map_err(failed)??;
        Ok(Reply::Done(format!(
            "downloaded {n} entr{} ({total} bytes) to {}",
            if n == 1 { "y" } else { "ies" },
            dest.display()
        )))
    }

    /// The bytes of one file as data events (the Python package's `read_file`).
    pub(super) async fn read(&self, name: &str, path: &str, events: &Events) -> OpResult<Reply> {
        let info = self.verified_head(name).await?;
        let root = info.head.commit.root();
        let p = user_path(Some(path))?
            .ok_or_else(|| err(ErrorCode::Invalid, "the volume root is a directory"))?;
        self.fetch_prefix(root, p.to_string()).await?;
        let (pages, p2) = (self.pages.clone(), p.clone());
        let entry = self.blocking(move || tree::get(&pages, &root, &p2)).await?;
        match entry {
            None => Err(err(
                ErrorCode::NotFound,
                format!("no such file: {name}:{p}"),
            )),
            Some(e @ Entry::File { .. }) => {
                self.stream_blobs(&e.blob().into_iter().collect::<Vec<_>>(), events)
                    .await?;
                Ok(Reply::Done(String::new()))
            }
            Some(_) => Err(err(ErrorCode::Invalid, format!("{name}:{p} is not a file"))),
        }
    }

    /// Fetches `blobs` (verified) and sends their bytes, one after the other, as data
    /// events. A blob is fetched just before it is sent, so a long listing starts at once.
    pub(super) async fn stream_blobs(
        &self,
        blobs: &[(Hash, u64)],
        events: &Events,
    ) -> OpResult<()> {
        const PIECE: usize = 256 * 1024;
        for &(hash, size) in blobs {
            if size == 0 {
                continue;
            }
            self.fetch_blobs(&[(hash, size)], &Events::none()).await?;
            let mut f = tokio::fs::File::open(self.store.data_path(&hash))
                .await
                .map_err(failed)?;
            let mut left = size;
            while left > 0 {
                let mut buf = vec![0u8; PIECE.min(left as usize)];
                tokio::io::AsyncReadExt::read_exact(&mut f, &mut buf)
                    .await
                    .map_err(failed)?;
                left -= buf.len() as u64;
                events.data(buf).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn rm(&self, name: &str, path: &str, recursive: bool) -> OpResult<Reply> {
        let info = self.verified_head(name).await?;
        let m = self.manifest_of(&info.head.commit).await?;
        let p = user_path(Some(path))?.ok_or_else(|| {
            err(
                ErrorCode::Invalid,
                "refusing to remove the volume root; delete the volume instead",
            )
        })?;
        match m.get(&p) {
            None => {
                return Err(err(
                    ErrorCode::NotFound,
                    format!("no such path: {name}:{p}"),
                ));
            }
            Some(e) if e.is_dir() && !recursive && m.under(Some(&p)).next().is_some() => {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{name}:{p} is a non-empty directory (use -r)"),
                ));
            }
            _ => {}
        }
        let version = self
            .commit_changes(
                &info,
                &m,
                vec![Change {
                    path: p.clone(),
                    entry: None,
                }],
            )
            .await?;
        Ok(Reply::Done(format!(
            "removed {name}:{p} (version {version})"
        )))
    }

    pub(super) async fn cp(
        &self,
        name: &str,
        srcs: &[String],
        dst: &str,
        recursive: bool,
    ) -> OpResult<Reply> {
        if srcs.is_empty() {
            return Err(err(ErrorCode::Invalid, "nothing to copy"));
        }
        let info = self.verified_head(name).await?;
        let m = self.manifest_of(&info.head.commit).await?;
        let dst_path = user_path(Some(dst))?;
        let dst_is_dir = match &dst_path {
            None => true,
            Some(d) => m.get(d).is_some_and(|e| e.is_dir()) || dst.ends_with('/') || srcs.len() > 1,
        };
        let mut changes = Vec::new();
        for s in srcs {
            let sp = user_path(Some(s))?
                .ok_or_else(|| err(ErrorCode::Invalid, "cannot copy the volume root"))?;
            let e = m
                .get(&sp)
                .ok_or_else(|| err(ErrorCode::NotFound, format!("no such path: {name}:{sp}")))?;
            let leaf = VolPath::new(sp.file_name()).map_err(failed)?;
            let to = match (&dst_path, dst_is_dir) {
                (Some(d), true) => d.join(&leaf),
                (None, _) => leaf,
                (Some(d), false) => d.clone(),
            };
            if to == sp || to.is_under(&sp) {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("cannot copy {sp} into itself"),
                ));
            }
            if e.is_dir() && !recursive {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{name}:{sp} is a directory (use -r)"),
                ));
            }
            changes.push(Change {
                path: to.clone(),
                entry: Some(e.clone()),
            });
            for (p, e) in m.under(Some(&sp)) {
                let np = p.rebase(&sp, &to).expect("under the source");
                changes.push(Change {
                    path: np,
                    entry: Some(e.clone()),
                });
            }
        }
        let n = changes.len();
        let version = self.commit_changes(&info, &m, changes).await?;
        Ok(Reply::Done(format!(
            "copied {n} entr{} (version {version})",
            if n == 1 { "y" } else { "ies" }
        )))
    }
}

pub(super) fn user_path(p: Option<&str>) -> OpResult<Option<VolPath>> {
    match p {
        None => Ok(None),
        Some(s) if s.trim_matches('/').is_empty() || s == "." => Ok(None),
        Some(s) => VolPath::parse_user(s)
            .map(Some)
            .map_err(|e| err(ErrorCode::Invalid, e.to_string())),
    }
}

pub(super) fn ls_entry(p: &impl std::fmt::Display, e: &Entry) -> LsEntry {
    let (kind, size, mode, mtime_ns, target) = match e {
        Entry::File {
            size,
            mode,
            mtime_ns,
            ..
        } => ("file", *size, *mode, *mtime_ns, None),
        Entry::Dir { mode } => ("dir", 0, *mode, 0, None),
        Entry::Symlink { target } => ("symlink", 0, 0o777, 0, Some(target.clone())),
    };
    LsEntry {
        path: p.to_string(),
        kind: kind.to_string(),
        size,
        mode,
        mtime_ns,
        target,
    }
}

/// Writes fetched entries to local paths (for `get`): files through a temporary name and a
/// rename; never through an existing symlink. With `force`, what stands where an entry goes
/// is replaced, a directory in the way of a file included; without it, only directories
/// are merged into.
pub(super) fn write_out(store: &Store, items: &[(PathBuf, Entry)], force: bool) -> OpResult<()> {
    use std::os::unix::fs::PermissionsExt;
    for (p, e) in items {
        let io = |e: std::io::Error| failed(format!("{}: {e}", p.display()));
        let there = std::fs::symlink_metadata(p).ok();
        let in_the_way = there.as_ref().is_some_and(|md| {
            md.is_dir() != e.is_dir() || !md.is_dir() && matches!(e, Entry::Symlink { .. })
        });
        if in_the_way {
            if !force {
                return Err(err(
                    ErrorCode::Exists,
                    format!("{} already exists (use --force to replace it)", p.display()),
                ));
            }
            if there.as_ref().is_some_and(|md| md.is_dir()) {
                std::fs::remove_dir_all(p).map_err(io)?;
            } else {
                std::fs::remove_file(p).map_err(io)?;
            }
        }
        match e {
            Entry::Dir { .. } => {
                if there.is_none() || in_the_way {
                    std::fs::create_dir(p).map_err(io)?;
                }
            }
            Entry::Symlink { target } => {
                std::os::unix::fs::symlink(target, p).map_err(io)?;
            }
            Entry::File { hash, mode, .. } => {
                let tmp = p.with_file_name(format!(
                    ".{}.voltool-{:08x}",
                    p.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
                    rand::random::<u32>()
                ));
                if *hash == Hash::EMPTY {
                    std::fs::File::create(&tmp).map_err(io)?;
                } else {
                    std::fs::copy(store.data_path(hash), &tmp).map_err(io)?;
                }
                // Never a setuid/setgid file on the host (see `host_mode`).
                let mode = voltool_protocol::manifest::host_mode(*mode);
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                    .map_err(io)?;
                std::fs::rename(&tmp, p).map_err(io)?;
            }
        }
    }
    Ok(())
}

/// One local file or directory of a put, resolved.
struct Import {
    local: PathBuf,
    /// Where it goes (`None`: the root, for a directory).
    to: Option<VolPath>,
    /// Set for a directory: its permission bits.
    dir_mode: Option<u32>,
    /// Permission bits for a file, instead of the local file's.
    mode: Option<u32>,
}

/// Imports local files and directory trees into the store as one durable batch, and
/// describes them as changes that place each where it goes; a later item's change of a
/// path wins.
fn import_local(store: &Store, plan: &[Import]) -> Result<Vec<Change>, scan::ScanError> {
    let batch = store.batch();
    let mut out: BTreeMap<VolPath, Option<Entry>> = BTreeMap::new();
    for it in plan {
        match (it.dir_mode, &it.to) {
            (None, Some(to)) => {
                let mut entry = scan::import_file_entry(&batch, &it.local)?;
                if let (Entry::File { mode, .. }, Some(m)) = (&mut entry, it.mode) {
                    *mode = m & voltool_protocol::manifest::MODE_MASK;
                }
                out.insert(to.clone(), Some(entry));
            }
            (None, None) => unreachable!("a file always has a path (checked before)"),
            (Some(mode), to) => {
                let s = scan::scan(
                    &it.local,
                    &Manifest::new(),
                    &StatCache::new(),
                    ScanMode::Import(&batch),
                )?;
                if let Some(to) = to {
                    out.insert(to.clone(), Some(Entry::Dir { mode }));
                }
                for (p, e) in s.manifest.into_entries() {
                    let path = match to {
                        Some(to) => to.join(&p),
                        None => p,
                    };
                    out.insert(path, Some(e));
                }
            }
        }
    }
    batch.finish()?;
    Ok(put_changes(out))
}

/// The changes that place `out`'s entries: a later item's file where an earlier one put a
/// directory replaces that directory whole, so what the earlier one put below it goes.
pub(super) fn put_changes(out: BTreeMap<VolPath, Option<Entry>>) -> Vec<Change> {
    let hidden = |p: &VolPath| {
        p.ancestors().any(|a| {
            out.get(&a)
                .is_some_and(|e| e.as_ref().is_some_and(|e| !e.is_dir()))
        })
    };
    out.iter()
        .filter(|(p, _)| !hidden(p))
        .map(|(path, entry)| Change {
            path: path.clone(),
            entry: entry.clone(),
        })
        .collect()
}

/// Refuses a put's changes that would replace what is there: a directory by a file (always:
/// its subtree would go), a file by anything without `force` (also where a file stands in
/// the way of a directory a change needs).
fn check_overwrites(
    name: &str,
    current: &Manifest,
    changes: &[Change],
    force: bool,
) -> OpResult<()> {
    for c in changes {
        let Some(new) = &c.entry else { continue };
        match current.get(&c.path) {
            Some(old) if old.is_dir() && !new.is_dir() => {
                return Err(err(
                    ErrorCode::Exists,
                    format!(
                        "{name}:/{} is a directory; a file cannot replace it (remove it first)",
                        c.path
                    ),
                ));
            }
            Some(old) if !old.is_dir() && !force => {
                return Err(err(
                    ErrorCode::Exists,
                    format!(
                        "{name}:/{} already exists (use --force to overwrite)",
                        c.path
                    ),
                ));
            }
            _ => {}
        }
        if !force
            && let Some(a) = c
                .path
                .ancestors()
                .find(|a| current.get(a).is_some_and(|e| !e.is_dir()))
        {
            return Err(err(
                ErrorCode::Exists,
                format!(
                    "{name}:/{a} is a file where {} needs a directory (use --force to replace it)",
                    c.path
                ),
            ));
        }
    }
    Ok(())
}
