//! Hostile input: forged and old heads, corrupt origin bytes, hostile paths.

use voltool_agent::control::{ErrorCode, ReloadMode};
use voltool_protocol::{Commit, Hash, SecretKey};
use voltool_tests::{TestFleet, bytes};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_heads_are_refused() {
    let mut f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::write(a.join("x"), b"v1").unwrap();
    f.commit(0, "vol").await.unwrap();

    // Back up the coordinator at version 1.
    f.stop_coordinator().await;
    let backup = f.dir.path().join("coordinator-backup");
    copy_dir(&f.coord_dir(), &backup);
    f.start_coordinator().await;

    std::fs::write(a.join("x"), b"v2").unwrap();
    f.commit(0, "vol").await.unwrap();
    let b = f.mount(1, "vol").await;
    assert_eq!(std::fs::read(b.join("x")).unwrap(), b"v2");

    // A head signed by another key.
    let evil = SecretKey::from_bytes(&[0xEE; 32]);
    let forged = Commit {
        volume: voltool_protocol::VolumeId([1; 16]),
        version: 99,
        parent: None,
        manifest: Hash::EMPTY,
        manifest_size: 0,
        author: [0; 32],
        time_ms: 0,
    }
    .sign(&evil);
    let e = f.agents[1].verify_head(&forged).unwrap_err();
    assert_eq!(e.code, ErrorCode::HeadRefused);
    assert!(e.message.contains("signature"), "{}", e.message);

    // The coordinator restored from the old backup replays version 1: refused.
    f.stop_coordinator().await;
    std::fs::remove_dir_all(f.coord_dir()).unwrap();
    copy_dir(&backup, &f.coord_dir());
    f.start_coordinator().await;
    std::fs::write(a.join("x"), b"v2 again").unwrap();
    let e = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::HeadRefused);
    assert!(e.message.contains("rollback"), "{}", e.message);
    assert_eq!(
        std::fs::read(b.join("x")).unwrap(),
        b"v2",
        "mount untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_origin_byte_is_detected_and_nothing_unverified_lands() {
    let mut f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    let data = bytes(3, 3 * 1024 * 1024);
    std::fs::write(a.join("weights"), &data).unwrap();
    f.commit(0, "vol").await.unwrap();
    let hash = Hash::of(&data);
    let origin_file = f.coord.as_ref().unwrap().origin().data_path(&hash);
    let mut on_disk = std::fs::read(&origin_file).unwrap();
    on_disk[2 * 1024 * 1024 + 7] ^= 0x01;
    std::fs::write(&origin_file, &on_disk).unwrap();

    // The writer leaves, so the origin is the only provider.
    let writer = f.agents.remove(0);
    writer.shutdown().await;
    let e = f.reload(0, "vol", ReloadMode::Refuse).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Verify, "{}", e.message);
    assert!(e.message.contains("verification"), "{}", e.message);
    assert!(
        !b.join("weights").exists(),
        "the mount keeps its old snapshot"
    );
    let held = f.agents[0].store().meta(&hash).unwrap();
    assert!(
        held.as_ref().is_none_or(|m| !m.is_complete()),
        "no unverified blob recorded: {held:?}"
    );
    // The verified ranges before the bad one may be kept; the bad one never is.
    if let Some(m) = held {
        let bad_chunk = (2 * 1024 * 1024 + 7) / 1024;
        assert!(
            !m.ranges()
                .0
                .iter()
                .any(|(s, e)| (*s..*e).contains(&bad_chunk))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_are_refused_and_nothing_is_written_outside() {
    let f = TestFleet::start(1).await;
    f.create("vol").await;
    let outside = f.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let src = f.dir.path().join("src.txt");
    std::fs::write(&src, b"payload").unwrap();
    for remote in ["../x", "a/../../b", "x/..", "..", "a/\0b"] {
        let e = f.put(0, "vol", &src, remote, true).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Invalid, "{remote:?}: {}", e.message);
    }
    // A leading '/' names the volume's root, as in Modal: it lands inside the volume.
    f.put(0, "vol", &src, "/etc/x", false).await.unwrap();
    assert_ne!(
        std::fs::read("/etc/x").ok().as_deref(),
        Some(&b"payload"[..]),
        "never the host's /etc"
    );

    // A directory with a symlink out of it cannot be put.
    let dir = f.dir.path().join("tree");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink("../../outside", dir.join("escape")).unwrap();
    let e = f.put(0, "vol", &dir, "t", false).await.unwrap_err();
    assert!(e.message.contains("outside the volume"), "{}", e.message);

    // Nor committed from a mount; absolute links neither.
    let m = f.mount(0, "vol").await;
    std::os::unix::fs::symlink("/etc/passwd", m.join("abs")).unwrap();
    let e = f.commit(0, "vol").await.unwrap_err();
    assert!(e.message.contains("outside the volume"), "{}", e.message);
    std::fs::remove_file(m.join("abs")).unwrap();
    std::os::unix::fs::symlink("etc/x", m.join("inside")).unwrap();
    f.commit(0, "vol").await.unwrap();

    // get never writes outside its destination.
    let dest = f.dir.path().join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    f.get(0, "vol", "/", &dest, false).await.unwrap();
    assert_eq!(std::fs::read(dest.join("etc/x")).unwrap(), b"payload");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}
