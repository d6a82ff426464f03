//! The origin in an S3-compatible bucket (a real Garage server started by the test): blobs
//! and outboards as objects, nothing staged on the coordinator's disk, verified ranges
//! served by ranged reads, damage in the bucket never served, GC deleting objects.

use std::time::Duration;

use object_store::{ObjectStoreExt, PutPayload};
use voltool_agent::control::ReloadMode;
use voltool_agent::store::{S3Options, StoreError};
use voltool_coordinator::{Coordinator, CoordinatorOptions, Retention};
use voltool_protocol::{Hash, RangeList};
use voltool_tests::garage::Garage;
use voltool_tests::{Limits, TestFleet, bytes, tree};

/// Blob data files in a store folder.
fn data_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "data") {
                out.push(p);
            }
        }
    }
    out
}

/// A coordinator's options with nothing but its data directory and origin.
fn bare(data: std::path::PathBuf, s3: Option<S3Options>) -> CoordinatorOptions {
    CoordinatorOptions {
        s3,
        ..CoordinatorOptions::new(data)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_in_a_bucket_serves_verified_ranges_and_frees_what_gc_drops() {
    let garage = Garage::start();
    let origin = garage.origin("fleet-1");
    let limits = Limits {
        retention: Retention {
            keep_versions: 1,
            grace: Duration::ZERO,
            interval: Duration::from_secs(3600),
        },
        ..Limits::default()
    };
    let mut f = TestFleet::start_on(3, limits, Some(origin.clone())).await;
    f.create("vol").await;
    // The writer is the last agent, so that stopping it leaves the others' indices.
    let a = f.mount(2, "vol").await;
    // Larger than one multipart part (10 MiB), several read windows (4 MiB), and an odd
    // size; a mid-sized blob; small ones sent whole; an empty one.
    let big = bytes(1, 12 * 1024 * 1024 + 4321);
    let mid = bytes(2, 300_000);
    std::fs::write(a.join("model.bin"), &big).unwrap();
    std::fs::write(a.join("mid.bin"), &mid).unwrap();
    std::fs::create_dir(a.join("cfg")).unwrap();
    for i in 0..5u8 {
        std::fs::write(a.join(format!("cfg/{i}.json")), bytes(10 + i, 100)).unwrap();
    }
    std::fs::write(a.join("empty"), b"").unwrap();
    f.commit(2, "vol").await.unwrap();

    // The bucket holds the blobs; the coordinator's disk holds none of their bytes (only
    // outboards, 1/256 of them).
    let bucket = origin.client().unwrap();
    let big_hash = Hash::of(&big);
    for ext in ["data", "obao"] {
        let meta = bucket.head(&origin.blob_key(&big_hash, ext)).await.unwrap();
        assert!(meta.size > 0);
    }
    let staged = data_files(&f.coord_dir().join("origin"));
    assert!(
        staged.is_empty(),
        "blob files on the coordinator: {staged:?}"
    );

    // Only the origin has it now: a fresh agent reloads it all from the bucket (the
    // outboard, gone from the coordinator's disk, fetched back from there too).
    let local_ob = f
        .coord
        .as_ref()
        .unwrap()
        .origin()
        .data_path(&big_hash)
        .with_extension("obao");
    std::fs::remove_file(&local_ob).unwrap();
    let writer = f.agents.pop().unwrap();
    writer.shutdown().await;
    let c = f.mount(0, "vol").await;
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&c));
    assert!(local_ob.exists());

    // Damage in the bucket is never served: one flipped byte in the third window.
    let key = origin.blob_key(&big_hash, "data");
    let mut bad = big.clone();
    bad[9 * 1024 * 1024 + 5] ^= 1;
    bucket.put(&key, PutPayload::from(bad)).await.unwrap();
    let store = f.coord.as_ref().unwrap().origin().clone();
    let size = big.len() as u64;
    let r = tokio::task::spawn_blocking(move || {
        let first_part = RangeList(vec![(0, 4096)]);
        store.encode(&big_hash, size, &first_part, Vec::new())?;
        store.encode(&big_hash, size, &RangeList::all(size), Vec::new())
    })
    .await
    .unwrap();
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
    bucket
        .put(&key, PutPayload::from(big.clone()))
        .await
        .unwrap();

    // A put the bucket refuses fails the commit, and leaves nothing recorded; the next
    // collection sweeps what that put began.
    garage.allow_writes(false);
    std::fs::write(c.join("refused.bin"), bytes(4, 50_000)).unwrap();
    let e = f.commit(0, "vol").await.unwrap_err().message;
    assert!(e.contains("s3://voltool-test"), "{e}");
    garage.allow_writes(true);
    std::fs::remove_file(c.join("refused.bin")).unwrap();

    // A new version; the old one's blobs leave the bucket at the next collection.
    let new_big = bytes(3, 2 * 1024 * 1024);
    std::fs::write(c.join("model.bin"), &new_big).unwrap();
    f.commit(0, "vol").await.unwrap();
    let s = f.coord.as_ref().unwrap().collect_garbage().await.unwrap();
    assert!(s.freed_bytes >= big.len() as u64, "{s:?}");
    assert_eq!(s.unrecorded, 1, "{s:?}");
    let again = f.coord.as_ref().unwrap().collect_garbage().await.unwrap();
    assert_eq!(again.unrecorded, 0, "{again:?}");
    assert!(!local_ob.exists());
    for ext in ["data", "obao"] {
        let gone = bucket.head(&origin.blob_key(&big_hash, ext)).await;
        assert!(
            matches!(gone, Err(object_store::Error::NotFound { .. })),
            "{gone:?}"
        );
    }
    let d = f.mount(1, "vol").await;
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&c), tree(&d));

    // The data directory remembers where its blobs are: started without the bucket, the
    // coordinator refuses, naming both places.
    f.stop_coordinator().await;
    let e = Coordinator::start(bare(f.coord_dir(), None))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("s3://voltool-test/fleet-1") && e.contains("blobs"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_does_not_answer_is_refused_at_start_by_name() {
    let garage = Garage::start();
    let mut wrong = garage.origin("x");
    wrong.secret_access_key = Some("f".repeat(64));
    let dir = voltool_tests::test_dir();
    let e = Coordinator::start(bare(dir.path().join("c"), Some(wrong)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("s3://voltool-test/x"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_may_not_share_a_prefix() {
    let garage = Garage::start();
    let shared = garage.origin("shared");
    let first = TestFleet::start_on(0, Limits::default(), Some(shared.clone())).await;
    let dir = voltool_tests::test_dir();
    voltool_tests::seed_key(&dir.path().join("c"), 0xAB);
    let e = Coordinator::start(bare(dir.path().join("c"), Some(shared)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to the coordinator"), "{e}");
    drop(first);
}
