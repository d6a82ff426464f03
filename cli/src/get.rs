//! `voltool volume get NAME REMOTE LOCAL`: the files are written here, by the user who runs
//! the command, from what the agent sends (`VolumeExport`): they belong to that user, and the
//! agent never opens a local path for anyone.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use voltool_agent::control::{self, ErrorCode, ErrorReply, Event, LsEntry, Reply, Request};
use voltool_protocol::manifest::host_mode;

use crate::output::{Refused, ok};

/// Writes what the agent sends of `name:remote` at `local` (into it, if it is a directory):
/// directories merged into, files written beside and renamed into place, never through a
/// symbolic link; what stands in the way is refused, or replaced with `force`.
pub(crate) async fn get(
    agent: &Path,
    name: String,
    remote: String,
    local: &Path,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let base = remote
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty())
        .map(str::to_string);
    let dest = match std::fs::metadata(local) {
        Ok(md) if md.is_dir() => match &base {
            Some(b) => local.join(b),
            None => local.to_path_buf(),
        },
        _ => local.to_path_buf(),
    };
    let mut w = Writer {
        dest: dest.clone(),
        force,
        open: None,
        dirs: Vec::new(),
        failed: None,
        entries: 0,
    };
    let r = control::call(
        agent,
        &Request::VolumeExport {
            name,
            remote: remote.clone(),
        },
        |ev| w.on(ev),
    )
    .await?;
    if let Some(e) = w.failed.take() {
        return Err(e);
    }
    let answer = match r {
        Ok(Reply::Done(msg)) => msg,
        Ok(other) => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        Err(e) => return Err(Refused(e).into()),
    };
    w.finish()?;
    println!("downloaded {answer} to {}", dest.display());
    ok()
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
    failed: Option<anyhow::Error>,
    entries: usize,
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

    fn item(&mut self, e: LsEntry) -> anyhow::Result<()> {
        anyhow::ensure!(self.open.is_none(), "the agent sent an entry inside a file");
        // The agent's paths are volume paths: relative, normalised, no `..`.
        let rel = voltool_protocol::VolPath::new(&e.path).ok();
        anyhow::ensure!(
            e.path.is_empty() || rel.is_some(),
            "the agent sent a bad path {:?}",
            e.path
        );
        let p = match &rel {
            Some(r) => self.dest.join(r.as_str()),
            None => self.dest.clone(),
        };
        self.entries += 1;
        let there = std::fs::symlink_metadata(&p).ok();
        let is_dir = e.kind == "dir";
        let in_the_way = there
            .as_ref()
            .is_some_and(|md| md.is_dir() != is_dir || !md.is_dir() && e.kind == "symlink");
        if !self.force && (in_the_way || there.is_some() && !is_dir) {
            return Err(Refused(ErrorReply {
                code: ErrorCode::Exists,
                message: format!("{} already exists (use --force to replace it)", p.display()),
            })
            .into());
        }
        // A file over a file is renamed into place; anything else in the way goes first.
        if in_the_way {
            if there.as_ref().is_some_and(|md| md.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .with_context(|| p.display().to_string())?;
        }
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
        }
        match e.kind.as_str() {
            "dir" => {
                if !std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                    std::fs::create_dir(&p).with_context(|| p.display().to_string())?;
                }
                self.dirs.push((p, e.mode));
            }
            "symlink" => {
                let target = e.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &p).with_context(|| p.display().to_string())?;
            }
            _ => {
                let dir = p.parent().unwrap_or(Path::new("."));
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("file");
                let f = tempfile::Builder::new()
                    .prefix(&format!(".{name}.voltool-"))
                    .tempfile_in(dir)
                    .with_context(|| dir.display().to_string())?;
                let left = e.size;
                self.open = Some((p, f, e, left));
                if left == 0 {
                    self.close()?;
                }
            }
        }
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let Some((p, f, _, left)) = &mut self.open else {
            anyhow::bail!("the agent sent bytes outside a file");
        };
        anyhow::ensure!(
            bytes.len() as u64 <= *left,
            "the agent sent more bytes than the file holds"
        );
        f.write_all(bytes)
            .with_context(|| p.display().to_string())?;
        *left -= bytes.len() as u64;
        if *left == 0 {
            self.close()?;
        }
        Ok(())
    }

    /// The file is whole: its mode (never setuid or setgid) and time, then its name.
    fn close(&mut self) -> anyhow::Result<()> {
        let Some((p, f, e, _)) = self.open.take() else {
            return Ok(());
        };
        let ctx = || p.display().to_string();
        f.as_file()
            .set_permissions(std::fs::Permissions::from_mode(host_mode(e.mode)))
            .with_context(ctx)?;
        let t = if e.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(e.mtime_ns as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(e.mtime_ns.unsigned_abs())
        };
        f.as_file().set_modified(t).with_context(ctx)?;
        f.persist(&p).map_err(|e| e.error).with_context(ctx)?;
        Ok(())
    }

    /// Directory modes last, deepest first, so a read-only directory could be filled.
    fn finish(mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.open.is_none(), "the agent ended inside a file");
        self.dirs
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, mode) in &self.dirs {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(*mode))
                .with_context(|| p.display().to_string())?;
        }
        Ok(())
    }
}
