//! Uploads into the origin store, verified before they are kept.
//!
//! One upload names many blobs; their bytes follow one another on the stream. The receiving
//! task reads each blob (small ones into memory, large ones into a temporary file) and hands
//! it to a blocking worker that hashes, checks and places it, so the network and the disk
//! overlap. The batch becomes durable and recorded once, after the last blob.

use voltool_protocol::coord::MAX_UPLOAD_BLOBS;

use voltool_agent::store::IN_MEMORY_MAX;

use super::*;

/// A received blob on its way to the worker.
enum Received {
    Bytes(Hash, Vec<u8>),
    File(Hash, u64, PathBuf),
}

/// Blobs received but not yet checked, at most (each at most [`IN_MEMORY_MAX`] in memory).
const RECEIVED_QUEUE: usize = 16;

/// Receives the blobs an upload names, checks every one against its hash, and answers
/// `Ok` once all are durable in the origin store.
pub(super) async fn upload(
    state: &Arc<State>,
    recv: &mut RecvStream,
    blobs: Vec<(Hash, u64)>,
) -> CoordResponse {
    if blobs.len() > MAX_UPLOAD_BLOBS {
        return fail(
            ErrorKind::Invalid,
            format!(
                "{} blobs in one upload; at most {MAX_UPLOAD_BLOBS}",
                blobs.len()
            ),
        )
        .into();
    }
    // Kept a while from now for the commit that will name them, even before they land.
    state
        .recent
        .lock()
        .expect("not poisoned")
        .touch(blobs.iter().map(|(h, _)| *h));
    // A blob a collection condemned is written again only once no collection can still
    // delete its object (see `condemned`): with the write lock, no collection of this lead
    // runs.
    let hashes: Vec<Hash> = blobs.iter().map(|(h, _)| *h).collect();
    if !state.marked(&hashes).is_empty() {
        let _guard = state.write_lock.lock().await;
        let st = state.clone();
        match tokio::task::spawn_blocking(move || st.unmark_for_write(&hashes)).await {
            Ok(Ok(())) => {}
            Ok(Err(f)) => return f.into(),
            Err(e) => return fail(ErrorKind::Internal, e.to_string()).into(),
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Received>(RECEIVED_QUEUE);
    let batch = state.origin.batch();
    let worker = tokio::task::spawn_blocking(move || {
        let mut failed = None;
        while let Some(item) = rx.blocking_recv() {
            // After a bad blob the rest is only drained (their files removed), so the
            // sender never blocks and nothing is left behind.
            let r = match (item, &failed) {
                (Received::File(_, _, tmp), Some(_)) => {
                    let _ = std::fs::remove_file(tmp);
                    continue;
                }
                (Received::Bytes(..), Some(_)) => continue,
                (Received::Bytes(hash, bytes), None) => {
                    batch.import_bytes_checked(&bytes, Some(hash)).map(drop)
                }
                (Received::File(hash, size, tmp), None) => {
                    batch.adopt_tmp(&tmp, size, Some(hash)).map(drop)
                }
            };
            if let Err(e) = r {
                failed = Some(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => batch.finish().map(drop),
        }
    });
    let received = receive_all(state, recv, &blobs, &tx).await;
    drop(tx);
    let checked = worker.await;
    if let Err(e) = received {
        return fail(ErrorKind::Corrupt, e).into();
    }
    match checked {
        Ok(Ok(())) => {
            // Durable at the origin: recorded as the fleet's too before the answer.
            let st = state.clone();
            let recorded = tokio::task::spawn_blocking(move || st.record_held(&blobs)).await;
            match recorded {
                Ok(Ok(())) => CoordResponse::Ok,
                Ok(Err(f)) => f.into(),
                Err(e) => fail(ErrorKind::Internal, e.to_string()).into(),
            }
        }
        Ok(Err(StoreError::Corrupt { hash, message })) => fail(
            ErrorKind::Corrupt,
            format!("upload of blob {} refused: {message}", hash.short()),
        )
        .into(),
        Ok(Err(e)) => fail(ErrorKind::Internal, e.to_string()).into(),
        Err(e) => fail(ErrorKind::Internal, e.to_string()).into(),
    }
}

/// Reads every blob's bytes off the stream in order and passes them on; then checks that
/// nothing follows the last one. Stops at the first problem (or when the worker fails).
async fn receive_all(
    state: &State,
    recv: &mut RecvStream,
    blobs: &[(Hash, u64)],
    tx: &tokio::sync::mpsc::Sender<Received>,
) -> Result<(), String> {
    for &(hash, size) in blobs {
        let item = if size <= IN_MEMORY_MAX {
            let mut bytes = vec![0u8; size as usize];
            recv.read_exact(&mut bytes).await.map_err(|e| {
                format!(
                    "truncated upload: blob {} ({size} bytes): {e}",
                    hash.short()
                )
            })?;
            Received::Bytes(hash, bytes)
        } else {
            let tmp = state.origin.tmp_path("upload");
            if let Err(e) = receive_file(recv, &tmp, size).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(format!("blob {}: {e}", hash.short()));
            }
            Received::File(hash, size, tmp)
        };
        if let Err(unsent) = tx.send(item).await {
            if let Received::File(_, _, tmp) = unsent.0 {
                let _ = tokio::fs::remove_file(tmp).await;
            }
            return Ok(());
        }
    }
    let mut extra = [0u8; 1];
    match recv.read(&mut extra).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err("upload longer than the blobs it names".to_string()),
        Err(e) => Err(format!("upload stream failed: {e}")),
    }
}

/// Receives exactly `size` bytes into a new file at `tmp`.
async fn receive_file(recv: &mut RecvStream, tmp: &Path, size: u64) -> std::io::Result<()> {
    let mut f = tokio::fs::File::create(tmp).await?;
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while got < size {
        let want = buf.len().min((size - got) as usize);
        let n = match recv.read(&mut buf[..want]).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                return Err(std::io::Error::other(format!(
                    "truncated upload: got {got} of {size} bytes"
                )));
            }
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        f.write_all(&buf[..n]).await?;
        got += n as u64;
    }
    f.flush().await
}
