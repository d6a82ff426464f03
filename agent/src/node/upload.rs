//! `volume put` of files the client reads itself: the agent takes their bytes from the
//! control socket into its store, and never opens a local path for anyone.

use std::io::Read;

use voltool_protocol::control::{UploadChunk, UploadEntry, UploadKind};
use voltool_protocol::manifest::MODE_MASK;
use voltool_protocol::path::check_symlink_target;

use super::volume::put_changes;
use super::*;

/// Reads a file's bytes from the chunks the connection passes to the blocking importer.
struct Chunks {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Inner {
    /// Takes the entries of an upload, each file's bytes read from `input` into the store,
    /// and commits them as a put does.
    pub(super) async fn upload(
        &self,
        name: &str,
        entries: Vec<UploadEntry>,
        force: bool,
        mut input: Input,
        events: &Events,
    ) -> OpResult<Reply> {
        if entries.is_empty() {
            return Err(err(ErrorCode::Invalid, "nothing to upload"));
        }
        let to = format!("{name}:/{}", entries[0].path.trim_start_matches('/'));
        let info = self.verified_head(name).await?;
        let current = self.manifest_of(&info.head.commit).await?;
        let bad = |m: String| err(ErrorCode::Invalid, m);
        let mut batch = Some(self.store.batch());
        let mut out: BTreeMap<VolPath, Option<Entry>> = BTreeMap::new();
        for e in entries {
            let path = super::volume::user_path(Some(&e.path))?;
            let entry = match (e.kind, &path) {
                (UploadKind::Dir { .. }, None) => continue,
                (_, None) => return Err(bad("the volume root is a directory".into())),
                (UploadKind::Dir { mode }, Some(_)) => Entry::Dir {
                    mode: mode & MODE_MASK,
                },
                (UploadKind::Symlink { target }, Some(p)) => {
                    check_symlink_target(p, &target).map_err(|e| bad(e.to_string()))?;
                    Entry::Symlink { target }
                }
                (UploadKind::File { mode, mtime_ns }, Some(p)) => {
                    let (tx, rx) = mpsc::channel(4);
                    let b = batch.take().expect("the batch comes back after each file");
                    let what = PathBuf::from(p.as_str());
                    let import = tokio::task::spawn_blocking(move || {
                        let r = b.import_reader(
                            Chunks {
                                rx,
                                buf: Vec::new(),
                                at: 0,
                            },
                            &what,
                        );
                        (b, r)
                    });
                    // Chunks until an empty one; a connection that ends first is a
                    // truncated upload, and nothing of it is committed.
                    let fed: OpResult<()> = async {
                        loop {
                            let c: UploadChunk = control::read_msg(&mut input)
                                .await
                                .map_err(|e| bad(format!("the upload's bytes: {e}")))?
                                .ok_or_else(|| {
                                    bad(format!("the upload ended inside {}", p.as_str()))
                                })?;
                            if c.0.is_empty() {
                                return Ok(());
                            }
                            if tx.send(c.0).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    .await;
                    drop(tx);
                    let (b, imported) = import.await.map_err(failed)?;
                    batch = Some(b);
                    fed?;
                    let (hash, size) = imported.map_err(failed)?;
                    Entry::File {
                        size,
                        mode: mode & MODE_MASK,
                        mtime_ns,
                        hash,
                    }
                }
            };
            let p = path.expect("checked above");
            out.insert(p, Some(entry));
        }
        let b = batch.take().expect("the batch is back");
        tokio::task::spawn_blocking(move || b.finish())
            .await
            .map_err(failed)?
            .map_err(failed)?;
        let changes = put_changes(out);
        self.commit_put(name, &info, &current, changes, force, &to, events)
            .await
    }
}
