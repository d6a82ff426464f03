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

    /// The bytes of a file, or of every file below a directory in path order (`volume get
    /// … -`).
    pub(super) async fn get(&self, name: &str, remote: &str, events: &Events) -> OpResult<Reply> {
        let (_, entry, below) = self.entries_at(name, remote).await?;
        // The file, or every file below the directory in path order.
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
        Ok(Reply::Done(String::new()))
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
