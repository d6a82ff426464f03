//! Overlay snapshots: what a mount's upper layer holds becomes the commit, writes never
//! reach the store, and a restart mounts the snapshots again. They run in the overlay pass of
//! the suite (and fail there if overlays cannot be mounted), not in the copy pass.

use std::os::unix::fs::PermissionsExt;

use voltool_agent::control::{ErrorCode, ReloadMode};
use voltool_protocol::Hash;
use voltool_tests::{TestFleet, bytes, overlay_pass, tree, until_mount_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_upper_layer_change_is_committed_exactly() {
    let f = TestFleet::start(2).await;
    if !overlay_pass(&f).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::create_dir_all(a.join("d/sub")).unwrap();
    std::fs::create_dir_all(a.join("e")).unwrap();
    std::fs::write(a.join("d/a"), bytes(1, 40_000)).unwrap();
    std::fs::write(a.join("d/sub/b"), bytes(2, 5_000)).unwrap();
    std::fs::write(a.join("e/c"), bytes(3, 5_000)).unwrap();
    std::fs::write(a.join("top"), bytes(4, 5_000)).unwrap();
    std::fs::write(a.join("gone"), bytes(5, 5_000)).unwrap();
    f.commit(0, "vol").await.unwrap();

    // Agent 1's layers hold version 1; it changes it in every way an overlay records.
    let b = f.mount(1, "vol").await;
    std::fs::set_permissions(b.join("top"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::rename(b.join("d"), b.join("d2")).unwrap();
    std::fs::rename(b.join("d2/a"), b.join("d2/a-renamed")).unwrap();
    std::fs::remove_dir_all(b.join("e")).unwrap();
    std::fs::create_dir(b.join("e")).unwrap();
    std::fs::write(b.join("e/n"), b"new\n").unwrap();
    std::fs::remove_file(b.join("gone")).unwrap();
    std::fs::write(b.join("newfile"), b"x\n").unwrap();
    let c = f.commit(1, "vol").await.unwrap();
    // Only the two files written through the mount were read: the renamed and re-moded
    // ones kept their data below.
    assert_eq!(c.hashed_bytes, 4 + 2, "{c:?}");

    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    let want = tree(&b);
    assert_eq!(tree(&a), want);
    assert!(!a.join("d").exists() && !a.join("gone").exists());
    assert!(!a.join("e/c").exists());
    assert_eq!(
        std::fs::read(a.join("d2/a-renamed")).unwrap(),
        bytes(1, 40_000)
    );
    assert_eq!(std::fs::read(a.join("d2/sub/b")).unwrap(), bytes(2, 5_000));
    assert_eq!(std::fs::read(a.join("e/n")).unwrap(), b"new\n");
    let mode = std::fs::metadata(a.join("top"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o700);

    // Nothing left to commit on either side.
    assert_eq!(f.commit(0, "vol").await.unwrap().changed, 0);
    assert_eq!(f.commit(1, "vol").await.unwrap().changed, 0);
}

fn store_bytes_hash(f: &TestFleet, i: usize, hash: &Hash) -> Hash {
    Hash::of(&std::fs::read(f.agents[i].store().data_path(hash)).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_mount_never_reach_the_store_and_open_writers_block_a_switch() {
    let f = TestFleet::start(2).await;
    if !overlay_pass(&f).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let data = bytes(9, 100_000);
    let hash = Hash::of(&data);
    std::fs::write(a.join("model"), &data).unwrap();
    f.commit(0, "vol").await.unwrap();
    let b = f.mount(1, "vol").await;
    assert_eq!(store_bytes_hash(&f, 1, &hash), hash);

    // Root writes into the mounted file through a descriptor it keeps open.
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(b.join("model"))
        .unwrap();
    std::io::Write::write_all(&mut w, b"overwritten").unwrap();
    assert_eq!(
        store_bytes_hash(&f, 1, &hash),
        hash,
        "the store is untouched"
    );

    // A new version elsewhere: the reload refuses while the file is open for writing.
    std::fs::write(a.join("other"), b"v2").unwrap();
    f.commit(0, "vol").await.unwrap();
    let e = f.reload(1, "vol", ReloadMode::Discard).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Dirty, "{}", e.message);
    assert!(e.message.contains("model"), "{}", e.message);
    assert!(e.message.contains("open for writing"), "{}", e.message);
    drop(w);

    f.reload(1, "vol", ReloadMode::Discard).await.unwrap();
    assert_eq!(std::fs::read(b.join("model")).unwrap(), data);
    assert_eq!(std::fs::read(b.join("other")).unwrap(), b"v2");
    assert_eq!(store_bytes_hash(&f, 1, &hash), hash);
    // What agent 1 serves is the committed content: a third agent-side check through
    // agent 0, which reloads nothing new but reads its own copy.
    assert_eq!(store_bytes_hash(&f, 0, &hash), hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_reboot_mounts_the_snapshot_again_with_its_uncommitted_changes() {
    let mut f = TestFleet::start(1).await;
    if !overlay_pass(&f).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::write(a.join("committed"), b"c").unwrap();
    f.commit(0, "vol").await.unwrap();
    std::fs::write(a.join("uncommitted"), b"u").unwrap();
    let before = tree(&a);

    let agent = f.agents.remove(0);
    agent.shutdown().await;
    // A reboot: the overlays are gone, the directories stay.
    voltool_agent::overlay::unmount_all_under(f.dir.path());
    assert!(!a.join("committed").exists());
    // Never an empty directory: until the agent is back the path says why.
    assert!(a.join(voltool_agent::node::NOT_MOUNTED).exists());
    let agent = f.start_agent(0).await;
    f.agents.push(agent);
    assert_eq!(tree(&a), before);
    assert!(!a.join(voltool_agent::node::NOT_MOUNTED).exists());
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.changed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_switches_to_a_fresh_upper_unless_a_file_is_open_for_writing() {
    let f = TestFleet::start(1).await;
    if !overlay_pass(&f).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let target = voltool_tests::shown(&a);
    for k in 0..50u8 {
        std::fs::write(a.join(format!("f{k}")), bytes(k, 10_000)).unwrap();
    }
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.hashed_bytes, 50 * 10_000);
    let switched = voltool_tests::shown(&a);
    assert_ne!(switched, target, "the mount moved to a fresh upper layer");
    // The files joined the store by hard links to the sealed upper layer, not by copies.
    let blob = f.agents[0].store().data_path(&Hash::of(&bytes(0, 10_000)));
    let links = std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(&blob).unwrap());
    assert!(links >= 2, "the store copied a sealed file ({links} link)");
    // The next commit reads only what was written since.
    std::fs::write(a.join("g"), b"later").unwrap();
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!((c.changed, c.hashed_bytes), (1, 5));

    // With a file open for writing the commit copies what it needs and the mount stays.
    let here = voltool_tests::shown(&a);
    let mut w = std::fs::File::create(a.join("open")).unwrap();
    std::io::Write::write_all(&mut w, b"part one").unwrap();
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.changed, 1);
    assert_eq!(voltool_tests::shown(&a), here);
    std::io::Write::write_all(&mut w, b", part two").unwrap();
    drop(w);
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.changed, 1);
    assert_ne!(voltool_tests::shown(&a), here);
    assert_eq!(
        std::fs::read(a.join("open")).unwrap(),
        b"part one, part two"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piled_up_layers_are_compacted_in_the_background_without_stopping_a_writer() {
    use std::io::Write;
    use voltool_agent::node::COMPACT_AT;
    let f = TestFleet::start(2).await;
    if !overlay_pass(&f).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    // Agent 1 reloads one change at a time: a thin layer on its full one each, until the
    // last reload reaches COMPACT_AT layers and starts a compaction. A writer opens a file
    // in the mount at once and holds it.
    for i in 0..COMPACT_AT - 1 {
        std::fs::write(a.join(format!("f{i}")), format!("{i}")).unwrap();
        f.commit(0, "vol").await.unwrap();
        f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    }
    let mut w = std::fs::File::create(b.join("log")).unwrap();
    w.write_all(b"before\n").unwrap();
    // The compaction writes its layer while the file stays open and written: nothing
    // freezes, nothing switches.
    let before = until_mount_status(&f, 1, "a compacted layer", |m| m.compacted).await;
    assert!(before.layers >= COMPACT_AT, "{before:?}");
    w.write_all(b"after the compaction\n").unwrap();
    w.sync_all().unwrap();
    drop(w);
    let still = until_mount_status(&f, 1, "status", |_| true).await;
    assert_eq!(still.layers, before.layers, "nothing switched");
    // The next switch stacks on the one compacted layer.
    let c = f.commit(1, "vol").await.unwrap();
    assert_eq!(c.changed, 1);
    let after = until_mount_status(&f, 1, "the switch", |m| !m.compacted).await;
    assert_eq!(
        after.layers, 2,
        "the sealed upper on the compacted layer: {after:?}"
    );
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&b));
    assert_eq!(
        std::fs::read_to_string(a.join("log")).unwrap(),
        "before\nafter the compaction\n"
    );
}

/// A layer's file redirects into the data-only layer by a path whose first name no volume
/// uses: the kernel follows the redirect through the layers below first, and a volume
/// directory of that first name there (before: a blob's two-hex-digit folder, such as a
/// dataset's shard `d2/`) made the file read as an I/O error (found by the chaos trials).
/// Runs in both snapshot modes: with copies it checks the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_folders_named_like_blob_folders_do_not_hide_files() {
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    // Every two-hex-digit folder, in the first version.
    for i in 0..256u32 {
        let d = a.join(format!("{i:02x}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("shard"), bytes(i as u8, 100)).unwrap();
    }
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    // Files of the next version land in a layer above it, whatever their blobs' folders.
    for i in 0..16u8 {
        std::fs::write(a.join(format!("next-{i}")), bytes(i, 3000 + i as usize)).unwrap();
    }
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(
        tree(&b),
        tree(&a),
        "every file reads on the reloading agent"
    );
}
