//! The volume commands that act on the coordinator's head: ls, put, get, rm, cp.

use super::*;

impl Inner {
    pub(super) async fn ls(&self, name: &str, path: Option<&str>) -> OpResult<Vec<LsEntry>> {
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
                tree::children(&pages, &root, d.as_ref()).map(Some)
            })
            .await?;
        match listing {
            None => Err(err(
                ErrorCode::NotFound,
                format!(
                    "no such path: {}",
                    dir.map(|d| d.to_string()).unwrap_or_default()
                ),
            )),
            Some(entries) => Ok(entries.iter().map(|(p, e)| ls_entry(p, e)).collect()),
        }
    }
}

impl Inner {
    pub(super) async fn put(
        &self,
        name: &str,
        local: &Path,
        remote: Option<&str>,
        force: bool,
        events: &Events,
    ) -> OpResult<Reply> {
        let info = self.verified_head(name).await?;
        let current = self.manifest_of(&info.head.commit).await?;
        let meta = std::fs::symlink_metadata(local)
            .map_err(|e| err(ErrorCode::NotFound, format!("{}: {e}", local.display())))?;
        let base_name = local
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                err(
                    ErrorCode::Invalid,
                    format!("{}: no usable file name", local.display()),
                )
            })?
            .to_string();
        let into_dir = remote.is_none_or(|r| r.ends_with('/'));
        let target = match (remote, into_dir) {
            (Some(r), false) => user_path(Some(r))?
                .ok_or_else(|| err(ErrorCode::Invalid, "the volume root is not a file"))?,
            (r, _) => {
                let dir = user_path(r)?;
                let leaf =
                    VolPath::new(&base_name).map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
                match dir {
                    Some(d) => d.join(&leaf),
                    None => leaf,
                }
            }
        };
        let store = self.store.clone();
        let local_owned = local.to_path_buf();
        let is_dir = meta.is_dir();
        let dir_mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
            & voltool_protocol::manifest::MODE_MASK;
        let to = target.clone();
        let changes: Vec<Change> = tokio::task::spawn_blocking(move || {
            import_local(&store, &local_owned, to, is_dir.then_some(dir_mode))
        })
        .await
        .map_err(failed)?
        .map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
        if !force
            && let Some(c) = changes.iter().find(|c| {
                current
                    .get(&c.path)
                    .is_some_and(|e| !e.is_dir() || !c.entry.as_ref().is_some_and(|n| n.is_dir()))
            })
        {
            return Err(err(
                ErrorCode::Exists,
                format!(
                    "{name}:{} already exists (use --force to overwrite)",
                    c.path
                ),
            ));
        }
        let blobs: Vec<(Hash, u64)> = changes
            .iter()
            .filter_map(|c| c.entry.as_ref().and_then(|e| e.blob()))
            .collect();
        let bytes: u64 = blobs.iter().map(|(_, s)| s).sum();
        let files = blobs.len();
        let (grow, done) = events.growing_counter("upload");
        self.upload_missing(&blobs, &grow, &done).await?;
        let version = self.commit_changes(&info, &current, changes).await?;
        Ok(Reply::Done(format!(
            "uploaded {files} file(s), {bytes} bytes, to {name}:{target} (version {version})"
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
        let Some(local) = local else {
            // To stdout: one file only.
            let Some(Entry::File { hash, size, .. }) = entry else {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{remote} is not a file; only files can go to stdout"),
                ));
            };
            self.fetch_blobs(&[(hash, size)], &Events::none()).await?;
            if size > 0 {
                let mut f = tokio::fs::File::open(self.store.data_path(&hash))
                    .await
                    .map_err(failed)?;
                let mut left = size;
                while left > 0 {
                    let mut buf = vec![0u8; (256 * 1024).min(left as usize)];
                    tokio::io::AsyncReadExt::read_exact(&mut f, &mut buf)
                        .await
                        .map_err(failed)?;
                    left -= buf.len() as u64;
                    events.data(buf).await?;
                }
            }
            return Ok(Reply::Done(String::new()));
        };
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
        let store = self.store.clone();
        let n = items.len();
        tokio::task::spawn_blocking(move || write_out(&store, &items))
            .await
            .map_err(failed)??;
        Ok(Reply::Done(format!(
            "downloaded {n} entr{} ({total} bytes) to {}",
            if n == 1 { "y" } else { "ies" },
            dest.display()
        )))
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

pub(super) fn ls_entry(p: &VolPath, e: &Entry) -> LsEntry {
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
/// rename; never through an existing symlink.
pub(super) fn write_out(store: &Store, items: &[(PathBuf, Entry)]) -> OpResult<()> {
    use std::os::unix::fs::PermissionsExt;
    for (p, e) in items {
        let io = |e: std::io::Error| failed(format!("{}: {e}", p.display()));
        match e {
            Entry::Dir { .. } => match std::fs::symlink_metadata(p) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(err(
                        ErrorCode::Exists,
                        format!("{} exists and is not a directory", p.display()),
                    ));
                }
                Err(_) => std::fs::create_dir(p).map_err(io)?,
            },
            Entry::Symlink { target } => {
                let _ = std::fs::remove_file(p);
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
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
                    .map_err(io)?;
                std::fs::rename(&tmp, p).map_err(io)?;
            }
        }
    }
    Ok(())
}

/// Imports a local file or directory tree (`dir_mode` set) into the store as one durable
/// batch, and describes it as changes that place it at `to`.
fn import_local(
    store: &Store,
    local: &Path,
    to: VolPath,
    dir_mode: Option<u32>,
) -> Result<Vec<Change>, scan::ScanError> {
    let batch = store.batch();
    let out = match dir_mode {
        None => vec![Change {
            path: to,
            entry: Some(scan::import_file_entry(&batch, local)?),
        }],
        Some(mode) => {
            let s = scan::scan(
                local,
                &Manifest::new(),
                &StatCache::new(),
                ScanMode::Import(&batch),
            )?;
            let mut out = vec![Change {
                path: to.clone(),
                entry: Some(Entry::Dir { mode }),
            }];
            out.extend(s.manifest.into_entries().into_iter().map(|(p, e)| Change {
                path: to.join(&p),
                entry: Some(e),
            }));
            out
        }
    };
    batch.finish()?;
    Ok(out)
}
