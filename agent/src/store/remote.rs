//! Blob bytes kept in an S3-compatible bucket: the coordinator's origin with
//! `--origin s3://bucket/prefix`.
//!
//! The store's metadata (what is held, its size) stays in its local redb; each blob's data
//! and outboard become two objects, `PREFIX/blobs/<hex[..2]>/<hex>.data` and `….obao`.
//! Uploads are staged and verified in the store's `tmp` folder as before, put as objects,
//! and recorded only once the bucket holds them. Ranges are served by ranged GETs through a
//! bounded read-ahead window, checked against the outboard as they are encoded: no blob's
//! data is ever staged on local disk. Outboards (1/256 of their blobs) are also kept in
//! the store's folder, where encoding reads the few hashes it needs, and fetched back from
//! the bucket when missing there.
//!
//! Object I/O runs on a small runtime of its own, so the store's blocking methods may be
//! called from any thread (the blocking pool, or a test's).

use std::future::Future;
use std::ops::Range;
use std::sync::Mutex;

use bao_tree::io::sync::ReadAt;
use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncWriteExt;

use super::*;

/// Bytes read from the bucket at once while a range is encoded.
const WINDOW: u64 = 4 << 20;
/// Objects put or deleted at once.
const PARALLEL: usize = 16;

/// Where an S3-compatible origin lives. Its `Debug` shows whether a secret key is set,
/// never the key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside it (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// The endpoint (`http://host:port` for a local server); `None`: AWS's for the region,
    /// or `AWS_ENDPOINT_URL`/`AWS_ENDPOINT`.
    pub endpoint: Option<String>,
    /// The region; `None`: `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Access key id; `None`: `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// Secret access key; `None`: `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Options {
    /// Parses `s3://bucket[/prefix]`; the rest comes from the usual AWS environment
    /// variables when the store is opened.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::Remote {
            what: format!("origin {url:?}"),
            message: why.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("an S3 origin is written s3://bucket/prefix"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("names no bucket"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(bad("a prefix may not hold . or .. parts"));
        }
        Ok(S3Options {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            ..Default::default()
        })
    }

    /// The origin's address as users write it.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The object key of a blob's data (`ext` "data") or outboard ("obao").
    pub fn blob_key(&self, hash: &Hash, ext: &str) -> ObjPath {
        let hex = hash.to_hex();
        let blobs = format!("blobs/{}/{hex}.{ext}", &hex[..2]);
        if self.prefix.is_empty() {
            ObjPath::from(blobs)
        } else {
            ObjPath::from(format!("{}/{blobs}", self.prefix))
        }
    }

    /// A client of the bucket.
    pub fn client(&self) -> Result<AmazonS3, StoreError> {
        self.build().map_err(|e| StoreError::Remote {
            what: format!("origin {}", self.url()),
            message: e.to_string(),
        })
    }

    fn build(&self) -> Result<AmazonS3, object_store::Error> {
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
        if let Ok(e) = std::env::var("AWS_ENDPOINT_URL") {
            b = b.with_endpoint(e);
        }
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT").ok());
        // A plain-HTTP endpoint was asked for by name: allow it.
        if endpoint.is_some_and(|e| e.starts_with("http://")) {
            b = b.with_allow_http(true);
        }
        if let Some(r) = &self.region {
            b = b.with_region(r);
        } else if std::env::var_os("AWS_REGION").is_none()
            && let Ok(r) = std::env::var("AWS_DEFAULT_REGION")
        {
            b = b.with_region(r);
        }
        if let Some(k) = &self.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &self.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        b.build()
    }
}

/// A bucket holding a store's blob bytes.
pub(crate) struct Remote {
    bucket: Arc<AmazonS3>,
    opts: S3Options,
    prefix: ObjPath,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("origin", &self.opts.url())
            .finish()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // The store may be dropped inside an async context, where a runtime may not wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Remote {
    /// Connects to the bucket and checks that it answers.
    pub(crate) fn open(opts: &S3Options) -> Result<Self, StoreError> {
        // The HTTP client's TLS needs a process-wide crypto provider: ring, as iroh uses.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let err = |e: &dyn std::fmt::Display| StoreError::Remote {
            what: format!("origin {}", opts.url()),
            message: e.to_string(),
        };
        let bucket = opts.client()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("voltool-s3")
            .enable_all()
            .build()
            .map_err(|e| err(&e))?;
        let prefix = ObjPath::from(opts.prefix.as_str());
        let r = Remote {
            bucket: Arc::new(bucket),
            opts: opts.clone(),
            prefix,
            rt: Some(rt),
        };
        let (b, p) = (r.bucket.clone(), r.prefix.clone());
        r.run(async move { b.list_with_delimiter(Some(&p)).await })?
            .map_err(|e| err(&format!("the bucket does not answer as expected: {e}")))?;
        Ok(r)
    }

    /// Runs `f` on the remote's runtime and waits for it (from any thread).
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if let Some(rt) = &self.rt {
            rt.spawn(async move {
                let _ = tx.send(f.await);
            });
        }
        // A task that panicked dropped its sender.
        rx.recv().map_err(|_| StoreError::Remote {
            what: self.opts.url(),
            message: "an object store request failed inside its client".into(),
        })
    }

    fn key(&self, hash: &Hash, ext: &str) -> ObjPath {
        self.opts.blob_key(hash, ext)
    }

    fn fail(&self, key: &ObjPath, e: impl std::fmt::Display) -> StoreError {
        StoreError::Remote {
            what: format!("{}/{key}", self.opts.url_base()),
            message: e.to_string(),
        }
    }

    /// Puts blobs' staged files (data, and outboard where the blob has one) as objects,
    /// [`PARALLEL`] at a time; large files go in parts, streamed from disk.
    pub(crate) fn put_files(&self, files: Vec<(Hash, PathBuf, bool)>) -> Result<(), StoreError> {
        let mut jobs = Vec::new();
        for (hash, data, with_outboard) in files {
            if with_outboard {
                jobs.push((self.key(&hash, "obao"), data.with_extension("obao")));
            }
            jobs.push((self.key(&hash, "data"), data));
        }
        let bucket = self.bucket.clone();
        let r = self.run(each_bounded(jobs, move |(key, file)| {
            let b = bucket.clone();
            async move { put_file(b, &key, &file).await.map_err(|e| (key, e)) }
        }))?;
        r.map_err(|(key, e)| self.fail(&key, e))
    }

    /// Deletes blobs' objects (an object already gone is no error).
    pub(crate) fn delete(&self, hashes: &[Hash]) -> Result<(), StoreError> {
        let keys: Vec<ObjPath> = hashes
            .iter()
            .flat_map(|h| [self.key(h, "data"), self.key(h, "obao")])
            .collect();
        let bucket = self.bucket.clone();
        let r = self.run(each_bounded(keys, move |key| {
            let b = bucket.clone();
            async move {
                match b.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err((key, e.to_string())),
                }
            }
        }))?;
        r.map_err(|(key, e)| self.fail(&key, e))
    }

    /// Claims the bucket's prefix for the coordinator `owner` (an object naming it), or
    /// refuses a prefix another coordinator claimed: blobs are named by their content, so
    /// two coordinators sharing one prefix would free each other's.
    pub(crate) fn claim(&self, owner: &str) -> Result<(), StoreError> {
        let key = if self.opts.prefix.is_empty() {
            ObjPath::from("voltool-origin")
        } else {
            ObjPath::from(format!("{}/voltool-origin", self.opts.prefix))
        };
        let (b, k, me) = (self.bucket.clone(), key.clone(), owner.to_string());
        let held = self.run(async move {
            let read = |got: object_store::GetResult| async move {
                let got = got.bytes().await?;
                Ok::<_, object_store::Error>(String::from_utf8_lossy(&got).trim().to_string())
            };
            match b.get(&k).await {
                Ok(got) => return read(got).await,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            // Absent: created only if still absent (`If-None-Match: *`), so that of two
            // coordinators starting at once on a store that honours it one gets the
            // prefix; then read back, which also catches a store that ignores the
            // condition unless both wrote before either read (README: start them one at a
            // time on such a store).
            let create = object_store::PutOptions {
                mode: object_store::PutMode::Create,
                ..Default::default()
            };
            match b
                .put_opts(&k, PutPayload::from(format!("{me}\n")), create)
                .await
            {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
            read(b.get(&k).await?).await
        })?;
        let held = held.map_err(|e| self.fail(&key, e))?;
        if held != owner {
            return Err(StoreError::Remote {
                what: self.opts.url(),
                message: format!(
                    "this prefix belongs to the coordinator {held} (its {key} says so), not to {owner}: give each coordinator a prefix of its own"
                ),
            });
        }
        Ok(())
    }

    /// A whole object.
    pub(crate) fn get_all(&self, hash: &Hash) -> Result<Vec<u8>, StoreError> {
        let key = self.key(hash, "data");
        let (b, k) = (self.bucket.clone(), key.clone());
        self.run(async move { b.get(&k).await?.bytes().await })?
            .map(|b| b.to_vec())
            .map_err(|e| self.fail(&key, e))
    }

    fn get_range(&self, key: &ObjPath, range: Range<u64>) -> Result<Bytes, StoreError> {
        let (b, k) = (self.bucket.clone(), key.clone());
        self.run(async move { b.get_range(&k, range).await })?
            .map_err(|e| self.fail(key, e))
    }

    /// Copies a blob's outboard from the bucket into the file `dest`, a window at a time.
    pub(crate) fn fetch_outboard(
        &self,
        hash: &Hash,
        size: u64,
        dest: &Path,
    ) -> Result<(), StoreError> {
        let want = blob::tree(size).outboard_size();
        let key = self.key(hash, "obao");
        let mut f = File::create(dest).ctx(dest)?;
        let mut at = 0;
        while at < want {
            let end = (at + WINDOW).min(want);
            let bytes = self.get_range(&key, at..end)?;
            if bytes.len() as u64 != end - at {
                return Err(StoreError::Corrupt {
                    hash: *hash,
                    message: format!("its outboard in the bucket is shorter than {want} bytes"),
                });
            }
            f.write_all(&bytes).ctx(dest)?;
            at = end;
        }
        Ok(())
    }

    /// Writes the bao encoding of `want` to `out`: data read from the bucket a window at a
    /// time, every byte checked against the outboard before it is written.
    pub(crate) fn encode(
        &self,
        hash: &Hash,
        size: u64,
        ranges: &RangeList,
        outboard: super::ranges::ObFile,
        out: impl Write,
    ) -> Result<(), StoreError> {
        let want = ranges.to_chunk_ranges();
        let ob = PreOrderOutboard {
            root: hash.as_blake3(),
            tree: blob::tree(size),
            data: outboard,
        };
        let data = Window {
            remote: self,
            key: self.key(hash, "data"),
            size,
            spans: byte_spans(ranges, size),
            held: Mutex::new((0, Bytes::new())),
            failed: Mutex::new(None),
        };
        let r = bao_tree::io::sync::encode_ranges_validated(&data, ob, &want, out);
        if let Some(e) = data.failed.lock().expect("not poisoned").take() {
            return Err(e);
        }
        let key = std::path::PathBuf::from(data.key.to_string());
        r.map_err(|e| super::ranges::encode_error(e, hash, &key))
    }
}

impl S3Options {
    fn url_base(&self) -> String {
        format!("s3://{}", self.bucket)
    }
}

/// Runs `job` on every item, [`PARALLEL`] at a time; the first failure ends it (with the
/// object it names).
async fn each_bounded<T, F, Fut>(items: Vec<T>, job: F) -> Result<(), (ObjPath, String)>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<(), (ObjPath, String)>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut items = items.into_iter();
    loop {
        while set.len() < PARALLEL {
            let Some(item) = items.next() else { break };
            set.spawn(job(item));
        }
        match set.join_next().await {
            None => return Ok(()),
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => return Err((ObjPath::default(), e.to_string())),
        }
    }
}

/// Puts one file as an object: in parts, streamed, if it is large.
async fn put_file(bucket: Arc<AmazonS3>, key: &ObjPath, file: &Path) -> Result<(), String> {
    let len = tokio::fs::metadata(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    if len <= WINDOW {
        let bytes = tokio::fs::read(file)
            .await
            .map_err(|e| format!("{}: {e}", file.display()))?;
        bucket
            .put(key, PutPayload::from(bytes))
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let mut src = tokio::fs::File::open(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let mut w = object_store::buffered::BufWriter::new(bucket, key.clone());
    if let Err(e) = tokio::io::copy(&mut src, &mut w).await {
        let _ = w.abort().await;
        return Err(e.to_string());
    }
    w.shutdown().await.map_err(|e| e.to_string())
}

/// The byte spans of whole chunk groups that `ranges` (in chunks) touch: what encoding
/// reads of the data.
fn byte_spans(ranges: &RangeList, size: u64) -> Vec<Range<u64>> {
    let group = blob::GROUP_BYTES;
    let mut spans: Vec<Range<u64>> = Vec::new();
    for &(s, e) in &ranges.0 {
        // Chunk numbers come from a peer's request: they may lie far past the blob.
        let start = s.saturating_mul(blob::CHUNK_BYTES).min(size) / group * group;
        let end = e
            .saturating_mul(blob::CHUNK_BYTES)
            .min(size)
            .div_ceil(group)
            .saturating_mul(group);
        let span = start.min(size)..end.min(size);
        match spans.last_mut() {
            Some(last) if last.end >= span.start => last.end = last.end.max(span.end),
            _ => spans.push(span),
        }
    }
    spans
}

/// A blob's data in the bucket, read a window at a time. An I/O failure is kept to be
/// reported as such (not as corruption).
struct Window<'a> {
    remote: &'a Remote,
    key: ObjPath,
    size: u64,
    /// The spans that will be read, ascending: a window never reaches past its span.
    spans: Vec<Range<u64>>,
    held: Mutex<(u64, Bytes)>,
    failed: Mutex<Option<StoreError>>,
}

impl ReadAt for &Window<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut held = self.held.lock().expect("not poisoned");
        let (start, bytes) = &*held;
        let in_window = pos >= *start && pos + buf.len() as u64 <= start + bytes.len() as u64;
        if !in_window {
            let end = self
                .spans
                .iter()
                .find(|s| s.contains(&pos))
                .map(|s| s.end)
                .unwrap_or(self.size)
                .min(pos + WINDOW.max(buf.len() as u64))
                .max((pos + buf.len() as u64).min(self.size));
            match self.remote.get_range(&self.key, pos..end) {
                Ok(b) => *held = (pos, b),
                Err(e) => {
                    let msg = e.to_string();
                    *self.failed.lock().expect("not poisoned") = Some(e);
                    return Err(io::Error::other(msg));
                }
            }
        }
        let (start, bytes) = &*held;
        let off = (pos - start) as usize;
        let n = buf.len().min(bytes.len().saturating_sub(off));
        buf[..n].copy_from_slice(&bytes[off..off + n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_key_never_reaches_debug() {
        let o = S3Options {
            bucket: "b".into(),
            secret_access_key: Some("very-secret-key".into()),
            access_key_id: Some("GKid".into()),
            ..Default::default()
        };
        let shown = format!("{o:?} {o:#?}");
        assert!(!shown.contains("very-secret-key"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("GKid"),
            "{shown}"
        );
    }
}
