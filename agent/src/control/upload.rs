//! `volume put` from the client's side: the files are read here, by the user who runs the
//! client, and their bytes streamed to the agent ([`Request::VolumeUpload`]); the agent never
//! opens a local path for anyone.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use voltool_protocol::manifest::MODE_MASK;

use super::{
    ControlError, ErrorReply, Event, Reply, Request, UPLOAD_CHUNK, UploadChunk, UploadEntry,
    UploadKind, answer, connect, write_msg,
};

/// Where a file's bytes come from.
#[derive(Debug)]
pub enum Source {
    /// A local file, opened when its turn comes.
    File(PathBuf),
    /// This process's standard input, as it comes.
    Stdin,
    /// Bytes in memory.
    Bytes(Vec<u8>),
}

/// A failure of an upload on the client's side.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A local file or directory cannot be read.
    #[error("{}: {source}", path.display())]
    Local {
        /// The local path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A local name or link target is not UTF-8 (volume paths are).
    #[error("{}: names and link targets must be UTF-8", .0.display())]
    NotUtf8(PathBuf),
    /// The connection to the agent failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// What one upload sends: entries in order, and the source of each file entry's bytes.
#[derive(Debug, Default)]
pub struct Upload {
    entries: Vec<UploadEntry>,
    sources: Vec<Source>,
    skipped: Vec<PathBuf>,
}

fn local_err(path: &Path) -> impl FnOnce(std::io::Error) -> UploadError + '_ {
    move |source| UploadError::Local {
        path: path.to_path_buf(),
        source,
    }
}

/// The modification time of a file, in ns since the epoch.
pub fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

impl Upload {
    /// Nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries so far.
    pub fn entries(&self) -> &[UploadEntry] {
        &self.entries
    }

    /// Local paths left out: neither a regular file, a directory nor a symlink.
    pub fn skipped(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// One file at `remote`, its bytes from `source`.
    pub fn add_file(&mut self, remote: &str, mode: u32, mtime_ns: i64, source: Source) {
        self.entries.push(UploadEntry {
            path: remote.to_string(),
            kind: UploadKind::File {
                mode: mode & MODE_MASK,
                mtime_ns,
            },
        });
        self.sources.push(source);
    }

    /// `local` (a file, a symlink, or a directory and everything below it, in name order)
    /// placed at `remote`; `mode` replaces the permission bits of a file given alone.
    pub fn add_local(
        &mut self,
        local: &Path,
        remote: &str,
        mode: Option<u32>,
    ) -> Result<(), UploadError> {
        let md = std::fs::symlink_metadata(local).map_err(local_err(local))?;
        let own_mode = md.permissions().mode() & MODE_MASK;
        let kind = if md.is_dir() {
            UploadKind::Dir { mode: own_mode }
        } else if md.file_type().is_symlink() {
            let target = std::fs::read_link(local)
                .map_err(local_err(local))?
                .into_os_string()
                .into_string()
                .map_err(|_| UploadError::NotUtf8(local.to_path_buf()))?;
            UploadKind::Symlink { target }
        } else if md.is_file() {
            self.add_file(
                remote,
                mode.unwrap_or(own_mode),
                mtime_ns(&md),
                Source::File(local.to_path_buf()),
            );
            return Ok(());
        } else {
            self.skipped.push(local.to_path_buf());
            return Ok(());
        };
        let is_dir = matches!(kind, UploadKind::Dir { .. });
        self.entries.push(UploadEntry {
            path: remote.to_string(),
            kind,
        });
        if is_dir {
            let mut names: Vec<_> = std::fs::read_dir(local)
                .map_err(local_err(local))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(local_err(local))?;
            names.sort();
            for n in names {
                let child = local.join(&n);
                let name = n
                    .to_str()
                    .ok_or_else(|| UploadError::NotUtf8(child.clone()))?;
                let below = format!("{}/{name}", remote.trim_end_matches('/'));
                self.add_local(&child, &below, None)?;
            }
        }
        Ok(())
    }

    /// Sends the upload to the agent whose run directory is `data` as one commit of
    /// volume `name`; calls `on_event` for every event before the answer. A local file that
    /// cannot be read ends the upload (nothing of it is committed) and is the error
    /// returned; an agent that refuses early is answered with its refusal.
    pub async fn send(
        self,
        data: &Path,
        name: &str,
        force: bool,
        on_event: impl FnMut(Event),
    ) -> Result<Result<Reply, ErrorReply>, UploadError> {
        let mut sock = connect(data).await?;
        let req = Request::VolumeUpload {
            name: name.to_string(),
            entries: self.entries,
            force,
        };
        write_msg(&mut sock, &req).await.map_err(ControlError::Io)?;
        match send_sources(&mut sock, self.sources).await {
            Ok(()) => Ok(answer(sock, on_event).await?),
            Err(Sent::Local(e)) => {
                // The agent sees the stream end inside a file and commits nothing.
                let _ = sock.shutdown().await;
                let _ = answer(sock, on_event).await;
                Err(e)
            }
            Err(Sent::Socket(e)) => match answer(sock, on_event).await {
                Ok(Err(refused)) => Ok(Err(refused)),
                _ => Err(ControlError::Io(e).into()),
            },
        }
    }
}

/// Why sending stopped.
enum Sent {
    Local(UploadError),
    Socket(std::io::Error),
}

/// Each source's bytes as chunks, an empty chunk after each.
async fn send_sources(sock: &mut UnixStream, sources: Vec<Source>) -> Result<(), Sent> {
    let mut buf = vec![0u8; UPLOAD_CHUNK];
    for s in sources {
        match s {
            Source::Bytes(b) => {
                for c in b.chunks(UPLOAD_CHUNK) {
                    write_msg(sock, &UploadChunk(c.to_vec()))
                        .await
                        .map_err(Sent::Socket)?;
                }
            }
            Source::File(p) => {
                let f = tokio::fs::File::open(&p)
                    .await
                    .map_err(|e| Sent::Local(local_err(&p)(e)))?;
                copy_chunks(sock, f, &mut buf, &p).await?;
            }
            Source::Stdin => {
                copy_chunks(sock, tokio::io::stdin(), &mut buf, Path::new("-")).await?;
            }
        }
        write_msg(sock, &UploadChunk(Vec::new()))
            .await
            .map_err(Sent::Socket)?;
    }
    Ok(())
}

async fn copy_chunks(
    sock: &mut UnixStream,
    mut src: impl AsyncRead + Unpin,
    buf: &mut [u8],
    what: &Path,
) -> Result<(), Sent> {
    loop {
        let n = src
            .read(buf)
            .await
            .map_err(|e| Sent::Local(local_err(what)(e)))?;
        if n == 0 {
            return Ok(());
        }
        write_msg(sock, &UploadChunk(buf[..n].to_vec()))
            .await
            .map_err(Sent::Socket)?;
    }
}
