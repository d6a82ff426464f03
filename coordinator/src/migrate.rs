//! From one coordinator to several: a coordinator's state on redb moved into etcd, and its
//! origin's blobs into the fleet's bucket when they were kept in its folder.

use super::*;
use crate::meta::{EtcdMeta, EtcdTls, EtcdUrl, Imported};

/// What [`migrate_to_etcd`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    /// What went into etcd.
    pub imported: Imported,
    /// Blobs copied from the origin's folder into the bucket (none when the origin was
    /// the bucket already).
    pub copied_blobs: usize,
    /// Their bytes.
    pub copied_bytes: u64,
}

/// Blobs copied into the bucket per batch (each batch's uploads are durable at its end).
const COPY_BATCH: usize = 64;

/// Moves the state of the coordinator whose data directory is `data` (stopped) into etcd
/// at `url`, under a prefix that holds no volume yet, with the records of its origin's
/// blobs; an origin kept in the folder is copied into the bucket `s3` first (each blob read
/// back and checked against its hash on the way), one kept in `s3` stays. The data
/// directory is left as it was: its node key may serve as the fleet key, so that agents
/// keep trusting the heads it signed. `progress` hears the bytes copied and the total.
/// Blocking.
pub fn migrate_to_etcd(
    data: &Path,
    url: &EtcdUrl,
    tls: Option<&EtcdTls>,
    s3: &voltool_agent::store::S3Options,
    progress: &dyn Fn(u64, u64),
) -> Result<Migrated, CoordinatorError> {
    let file = data.join("coordinator.redb");
    if !file.exists() {
        return Err(CoordinatorError::Config(format!(
            "{} holds no coordinator's state (no coordinator.redb)",
            data.display()
        )));
    }
    let from = RedbMeta::open(&file).map_err(|e| {
        CoordinatorError::Config(format!(
            "{}: {e} (a coordinator still running on it holds it: stop it first)",
            file.display()
        ))
    })?;
    let origin_dir = data.join("origin");
    let was = std::fs::read_to_string(origin_dir.join(ORIGIN_FILE))
        .map(|w| w.trim().to_string())
        .unwrap_or_else(|_| "dir".into());
    let mut done = Migrated::default();
    let blobs = if was == "dir" {
        let old = Store::open_with(&origin_dir, None)?;
        // The bucket's store keeps its records beside the folder's while copying; the
        // coordinators make their own from etcd's when they take the lead.
        let index = data.join("migrate-index");
        let _ = std::fs::remove_dir_all(&index);
        std::fs::create_dir_all(&index).map_err(|source| CoordinatorError::Io {
            path: index.display().to_string(),
            source,
        })?;
        let new = Store::open_with(&index, Some(s3))?;
        // Complete blobs only: an upload cut short left a part nothing names.
        let all: Vec<(Hash, u64)> = old
            .all_metas()?
            .into_iter()
            .filter(|(h, m)| m.is_complete() && *h != Hash::EMPTY)
            .map(|(h, m)| (h, m.size))
            .collect();
        let total: u64 = all.iter().map(|(_, s)| s).sum();
        for part in all.chunks(COPY_BATCH) {
            let batch = new.batch();
            for (hash, size) in part {
                let (got, _) = batch.import_file(&old.data_path(hash))?;
                if got != *hash {
                    return Err(StoreError::Corrupt {
                        hash: *hash,
                        message: format!("the origin's folder holds bytes hashing to {got}"),
                    }
                    .into());
                }
                done.copied_blobs += 1;
                done.copied_bytes += size;
            }
            batch.finish()?;
            progress(done.copied_bytes, total);
        }
        let _ = std::fs::remove_dir_all(&index);
        all
    } else if was == s3.url() {
        Store::open_with(&origin_dir, Some(s3))?.all_blobs()?
    } else {
        return Err(CoordinatorError::Config(format!(
            "this coordinator's origin keeps its blobs in {was}, not {}: migrate with --origin {was}",
            s3.url()
        )));
    };
    let to = EtcdMeta::connect(url, tls)?;
    done.imported = to.import(&from, &blobs)?;
    Ok(done)
}
