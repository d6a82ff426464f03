//! `volume get` into local files, from the client's side: the files are written here, by
//! the user who runs the client, from what the agent sends ([`Request::VolumeExport`]):
//! they belong to that user, and the agent never opens a local path for anyone.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use voltool_protocol::manifest::host_mode;

use super::{ControlError, ErrorCode, ErrorReply, Event, LsEntry, Reply, Request, call};

/// A failure of a download on the client's side.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A local file or directory cannot be written.
    #[error("{}: {source}", path.display())]
    Local {
        /// The local path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The agent's answer does not follow the protocol.
    #[error("the agent's answer is malformed: {0}")]
    Malformed(String),
    /// The connection to the agent failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Where a download of `remote` to `local` lands: into `local` if it is a directory (under
/// the remote path's last name), else at `local` itself.
pub fn destination(remote: &str, local: &Path) -> PathBuf {
    let base = remote
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty());
    match std::fs::metadata(local) {
        Ok(md) if md.is_dir() => match base {
            Some(b) => local.join(b),
            None => local.to_path_buf(),
        },
        _ => local.to_path_buf(),
    }
}

/// Writes what the agent whose run directory is `data` sends of `name:remote` at `dest`
/// (see [`destination`]): directories merged into, each file written beside its place and
/// renamed into it, modes without setuid or setgid; what stands in the way is refused
/// ([`ErrorCode::Exists`]), or replaced with `force`. Calls `on_event` for progress.
pub async fn get(
    data: &Path,
    name: &str,
    remote: &str,
    dest: &Path,
    force: bool,
    mut on_event: impl FnMut(&Event),
) -> Result<Result<Reply, ErrorReply>, ExportError> {
    let mut w = Writer {
        dest: dest.to_path_buf(),
        force,
        open: None,
        dirs: Vec::new(),
        failed: None,
    };
    let req = Request::VolumeExport {
        name: name.to_string(),
        remote: remote.to_string(),
    };
    let r = call(data, &req, |ev| {
        on_event(&ev);
        w.on(ev)
    })
    .await?;
    match w.failed.take() {
        Some(Failed::Refused(e)) => return Ok(Err(e)),
        Some(Failed::Error(e)) => return Err(e),
        None => {}
    }
    let reply = match r {
        Ok(reply) => reply,
        Err(e) => return Ok(Err(e)),
    };
    w.finish()?;
    Ok(Ok(reply))
}

enum Failed {
    Refused(ErrorReply),
    Error(ExportError),
}

impl From<ExportError> for Failed {
    fn from(e: ExportError) -> Self {
        Failed::Error(e)
    }
}

/// Writes entries as they come.
struct Writer {
    dest: PathBuf,
    force: bool,
    /// The file being written: where it goes, the temporary file beside it, its entry,
    /// bytes left.
    open: Option<(PathBuf, tempfile::NamedTempFile, LsEntry, u64)>,
    /// Directories made, with their modes (set last, deepest first).
    dirs: Vec<(PathBuf, u32)>,
    failed: Option<Failed>,
}

fn local(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Local {
        path: path.to_path_buf(),
        source,
    }
}

fn malformed(what: &str) -> Failed {
    Failed::Error(ExportError::Malformed(what.to_string()))
}

impl Writer {
    fn on(&mut self, ev: Event) {
        if self.failed.is_some() {
            return;
        }
        let r = match ev {
            Event::Item(e) => self.item(e),
            Event::Data(bytes) => self.data(&bytes),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.failed = Some(e);
        }
    }

    fn item(&mut self, e: LsEntry) -> Result<(), Failed> {
        if self.open.is_some() {
            return Err(malformed("an entry inside a file"));
        }
        // The agent's paths are volume paths: relative, normalised, no `..`.
        let rel = voltool_protocol::VolPath::new(&e.path).ok();
        if !e.path.is_empty() && rel.is_none() {
            return Err(malformed(&format!("a bad path {:?}", e.path)));
        }
        let p = match &rel {
            Some(r) => self.dest.join(r.as_str()),
            None => self.dest.clone(),
        };
        let there = std::fs::symlink_metadata(&p).ok();
        let is_dir = e.kind == "dir";
        let in_the_way = there
            .as_ref()
            .is_some_and(|md| md.is_dir() != is_dir || !md.is_dir() && e.kind == "symlink");
        if !self.force && (in_the_way || there.is_some() && !is_dir) {
            return Err(Failed::Refused(ErrorReply {
                code: ErrorCode::Exists,
                message: format!("{} already exists (use --force to replace it)", p.display()),
            }));
        }
        // A file over a file is renamed into place; anything else in the way goes first.
        if in_the_way {
            if there.as_ref().is_some_and(|md| md.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .map_err(local(&p))?;
        }
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(local(parent))?;
        }
        match e.kind.as_str() {
            "dir" => {
                if !std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                    std::fs::create_dir(&p).map_err(local(&p))?;
                }
                self.dirs.push((p, e.mode));
            }
            "symlink" => {
                let target = e.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &p).map_err(local(&p))?;
            }
            _ => {
                let dir = p.parent().unwrap_or(Path::new("."));
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("file");
                let f = tempfile::Builder::new()
                    .prefix(&format!(".{name}.voltool-"))
                    .tempfile_in(dir)
                    .map_err(local(dir))?;
                let left = e.size;
                self.open = Some((p, f, e, left));
                if left == 0 {
                    self.close()?;
                }
            }
        }
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), Failed> {
        let Some((p, f, _, left)) = &mut self.open else {
            return Err(malformed("bytes outside a file"));
        };
        if bytes.len() as u64 > *left {
            return Err(malformed("more bytes than the file holds"));
        }
        f.write_all(bytes).map_err(local(p))?;
        *left -= bytes.len() as u64;
        if *left == 0 {
            self.close()?;
        }
        Ok(())
    }

    /// The file is whole: its mode (never setuid or setgid) and time, then its name.
    fn close(&mut self) -> Result<(), ExportError> {
        let Some((p, f, e, _)) = self.open.take() else {
            return Ok(());
        };
        f.as_file()
            .set_permissions(std::fs::Permissions::from_mode(host_mode(e.mode)))
            .map_err(local(&p))?;
        let t = if e.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(e.mtime_ns as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(e.mtime_ns.unsigned_abs())
        };
        f.as_file().set_modified(t).map_err(local(&p))?;
        f.persist(&p).map_err(|e| local(&p)(e.error))?;
        Ok(())
    }

    /// Directory modes last, deepest first, so a read-only directory could be filled.
    fn finish(mut self) -> Result<(), ExportError> {
        if self.open.is_some() {
            return Err(ExportError::Malformed("it ended inside a file".into()));
        }
        self.dirs
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, mode) in &self.dirs {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(*mode))
                .map_err(local(p))?;
        }
        Ok(())
    }
}
