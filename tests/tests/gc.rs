//! Origin retention: old versions and deleted volumes are freed; a blob uploaded for a
//! commit in flight is not.

use std::time::Duration;

use voltool_agent::control::{ReloadMode, Request};
use voltool_coordinator::Retention;
use voltool_protocol::Hash;
use voltool_tests::{Limits, TestFleet, bytes, tree};

fn fleet_limits(keep_versions: u64, grace: Duration) -> Limits {
    Limits {
        retention: Retention {
            keep_versions,
            grace,
            // Collections in these tests are started by hand.
            interval: Duration::from_secs(3600),
        },
        ..Limits::default()
    }
}

fn origin_has(f: &TestFleet, h: &Hash) -> bool {
    let c = f.coord.as_ref().unwrap();
    c.origin().has_complete(h).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_and_deleted_volumes_are_freed_at_the_origin() {
    let f = TestFleet::start_with(2, fleet_limits(2, Duration::ZERO)).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::write(a.join("kept.bin"), bytes(9, 200_000)).unwrap();
    let mut versions = Vec::new();
    for v in 1..=4u8 {
        let content = bytes(v, 300_000 + usize::from(v));
        std::fs::write(a.join("model.bin"), &content).unwrap();
        let c = f.commit(0, "vol").await.unwrap();
        assert_eq!(c.version, u64::from(v));
        versions.push(Hash::of(&content));
    }
    assert!(versions.iter().all(|h| origin_has(&f, h)));
    let coord = f.coord.as_ref().unwrap();
    let s = coord.collect_garbage().await.unwrap();
    // Versions 0, 1 and 2 go; 3 and 4 stay, with what they reference.
    assert_eq!(s.versions_dropped, 3, "{s:?}");
    // Two blobs, and the one-page manifests of versions 0, 1 and 2.
    assert_eq!(s.freed, 5, "{s:?}");
    assert!(s.freed_bytes >= 600_000, "{s:?}");
    assert!(!origin_has(&f, &versions[0]) && !origin_has(&f, &versions[1]));
    assert!(origin_has(&f, &versions[2]) && origin_has(&f, &versions[3]));
    assert!(origin_has(&f, &Hash::of(&bytes(9, 200_000))));
    // A second collection finds nothing more.
    let again = coord.collect_garbage().await.unwrap();
    assert_eq!((again.freed, again.versions_dropped), (0, 0), "{again:?}");
    // The head is whole: a fresh agent reloads it from the origin.
    let b = f.mount(1, "vol").await;
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&b));

    // Deleting the volume frees everything it referenced.
    f.req(
        0,
        Request::VolumeDelete {
            name: "vol".into(),
            allow_missing: false,
        },
    )
    .await
    .unwrap();
    let s = coord.collect_garbage().await.unwrap();
    assert_eq!(s.volumes, 0, "{s:?}");
    assert!(!origin_has(&f, &versions[2]) && !origin_has(&f, &versions[3]));
    assert!(!origin_has(&f, &Hash::of(&bytes(9, 200_000))));
    assert!(coord.origin().all_blobs().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_uploaded_for_a_commit_in_flight_survives_a_collection() {
    let grace = Duration::from_secs(4);
    let mut f = TestFleet::start_with(2, fleet_limits(1, grace)).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    // A blob referenced by version 1 only.
    let old = bytes(1, 100_000);
    std::fs::write(a.join("old.bin"), &old).unwrap();
    f.commit(0, "vol").await.unwrap();
    std::fs::remove_file(a.join("old.bin")).unwrap();
    f.commit(0, "vol").await.unwrap();
    // Once its grace is over, a collection frees it (waited for as an event, bounded).
    let deadline = tokio::time::Instant::now() + grace * 5;
    while origin_has(&f, &Hash::of(&old)) {
        assert!(tokio::time::Instant::now() < deadline, "never freed");
        f.coord.as_ref().unwrap().collect_garbage().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A member uploads a blob on its own, as a commit does before it names it.
    let client = f.member_client().await;
    let new = bytes(2, 150_000);
    let file = f.dir.path().join("new.bin");
    std::fs::write(&file, &new).unwrap();
    let h = Hash::of(&new);
    client
        .upload(&[(h, new.len() as u64, file)], &|_| {})
        .await
        .unwrap();
    // A collection between the upload and the commit keeps it: nothing names it yet.
    let s = f.coord.as_ref().unwrap().collect_garbage().await.unwrap();
    assert!(s.in_grace >= 1, "{s:?}");
    assert!(origin_has(&f, &h));
    // The commit that names it (the agent finds it held and uploads nothing) lands.
    std::fs::write(a.join("new.bin"), &new).unwrap();
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.version, 3);
    f.coord.as_ref().unwrap().collect_garbage().await.unwrap();
    assert!(origin_has(&f, &h));
}
