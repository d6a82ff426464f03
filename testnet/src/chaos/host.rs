//! The host side of a trial: the tmpfs under agent 2, a disk filled by another program,
//! and the stores checked byte by byte once their nodes stopped.

use super::*;

/// Fills the file system holding `path` with a file until it refuses more.
pub(super) fn fill(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let buf = vec![0xa5u8; 1 << 20];
    loop {
        match f.write(&buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The last partial megabyte, byte by byte in small writes, so nothing is left.
    let small = [0xa5u8; 4096];
    while let Ok(n) = f.write(&small) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// Bytes held in `store_dir` that do not verify against their hashes: complete blobs read
/// whole, partial ones encoded range by range against their outboards.
pub(super) fn unverified_bytes(
    store_dir: &Path,
    problems: &mut Vec<String>,
) -> anyhow::Result<u64> {
    if !store_dir.join("store.redb").exists() {
        return Ok(0);
    }
    let store = voltool_agent::store::Store::open(store_dir)
        .with_context(|| format!("opening {}", store_dir.display()))?;
    let mut bad = 0;
    for (hash, meta) in store.all_metas()? {
        let held = if meta.is_complete() {
            store.read_verified(&hash, meta.size).map(|_| ())
        } else {
            store.encode(&hash, meta.size, &meta.ranges(), std::io::sink())
        };
        if let Err(e) = held {
            bad += meta.held_bytes();
            problems.push(format!("{}: blob {hash}: {e}", store_dir.display()));
        }
    }
    Ok(bad)
}

/// Bytes of `blobs` (the fleet's records of what the origin holds) that the bucket of `s3`
/// does not hold whole and verified, with the problems; reads through a store of its own
/// in `scratch`. Blocking.
pub(super) fn unverified_in_bucket(
    scratch: &Path,
    s3: &voltool_agent::store::S3Options,
    blobs: &[(voltool_protocol::Hash, u64)],
) -> anyhow::Result<(u64, Vec<String>)> {
    std::fs::create_dir_all(scratch)?;
    let store = voltool_agent::store::Store::open_with(scratch, Some(s3))?;
    store.sync_records(blobs)?;
    let (mut bad, mut problems) = (0, Vec::new());
    for (hash, size) in blobs {
        match store.read_verified(hash, *size) {
            Ok(Some(_)) => {}
            Ok(None) => {
                bad += size;
                problems.push(format!("the bucket: blob {hash} recorded but not held"));
            }
            Err(e) => {
                bad += size;
                problems.push(format!("the bucket: blob {hash}: {e}"));
            }
        }
    }
    Ok((bad, problems))
}

pub(super) fn mount_tmpfs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let st = std::process::Command::new("mount")
        // The agent refuses a data directory others may write (a tmpfs root is 1777).
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={TMPFS_BYTES},mode=0711"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .context("running mount")?;
    if !st.success() {
        bail!(
            "mounting a tmpfs at {} failed (chaos needs root)",
            dir.display()
        );
    }
    Ok(())
}

/// Copies what agent 2 left on its tmpfs beside it, for a failing trial's post-mortem.
pub(super) fn save_tmpfs(dir: &Path) {
    let mut to = dir.as_os_str().to_owned();
    to.push("-saved");
    let _ = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir)
        .arg(&to)
        .status();
}
