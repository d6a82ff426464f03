//! A full local disk during a reload: a clear error that names it, the old snapshot intact,
//! no space kept by the failed download, and the agent working again once the volume needs
//! less. Needs the right to mount a tmpfs (root): fails without it.

use std::process::Command;

use voltool_agent::control::{ErrorCode, ReloadMode};
use voltool_protocol::Hash;
use voltool_tests::{TestFleet, bytes, tree};

/// Puts agent `i`'s data directory on a tmpfs of `mib` MiB (the agent is stopped and
/// started again around the move). `false` if a tmpfs cannot be mounted here.
async fn on_small_disk(f: &mut TestFleet, i: usize, mib: u32) -> bool {
    let agent = f.agents.remove(i);
    agent.shutdown().await;
    let dir = f.agent_dir(i);
    // As after a reboot: nothing of the agent's stays mounted (its data directory is a
    // mount point of its own).
    voltool_agent::overlay::unmount_all_under(&dir);
    let saved = f.dir.path().join("saved");
    std::fs::rename(&dir, &saved).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0711"),
            "tmpfs",
        ])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !voltool_tests::need("the right to mount a tmpfs (root)", mounted) {
        return false;
    }
    let copied = Command::new("cp")
        .arg("-a")
        .arg(saved.join("."))
        .arg(&dir)
        .status()
        .unwrap();
    assert!(copied.success());
    let agent = f.start_agent(i).await;
    f.agents.insert(i, agent);
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_a_reload_clearly_and_frees_what_it_took() {
    let mut f = TestFleet::start(2).await;
    if !on_small_disk(&mut f, 1, 24).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::write(a.join("small"), bytes(1, 2 << 20)).unwrap();
    f.commit(0, "vol").await.unwrap();
    let b = f.mount(1, "vol").await;
    let before = tree(&b);

    // A version that does not fit: 32 MiB more, in one large file and many small ones.
    let big = bytes(2, 32 << 20);
    std::fs::write(a.join("big"), &big).unwrap();
    std::fs::create_dir(a.join("many")).unwrap();
    for k in 0..200u32 {
        std::fs::write(
            a.join(format!("many/{k}")),
            bytes(k as u8, 8000 + k as usize),
        )
        .unwrap();
    }
    f.commit(0, "vol").await.unwrap();
    let e = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap_err();
    eprintln!("the reload said: {}", e.message);
    assert_eq!(e.code, ErrorCode::Failed, "{}", e.message);
    assert!(e.message.contains("local disk is full"), "{}", e.message);
    assert!(
        !e.message.contains("verification"),
        "no provider blamed: {}",
        e.message
    );
    assert_eq!(tree(&b), before, "the old snapshot stays whole");
    assert!(
        f.agents[1].store().meta(&Hash::of(&big)).unwrap().is_none(),
        "the failed download's partial blob is freed"
    );

    // The volume shrinks again: the next reload works.
    std::fs::remove_file(a.join("big")).unwrap();
    std::fs::remove_dir_all(a.join("many")).unwrap();
    std::fs::write(a.join("after"), b"fits").unwrap();
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&b), tree(&a));
}

/// Fills the file system of `path`'s directory until it has no room left.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 256 << 10];
    while f.write_all(&chunk).is_ok() {}
    let small = [0u8; 4096];
    while f.write_all(&small).is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_a_commit_clearly_and_it_lands_once_space_returns() {
    let mut f = TestFleet::start(2).await;
    if !on_small_disk(&mut f, 0, 24).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::write(a.join("first"), bytes(1, 1 << 20)).unwrap();
    f.commit(0, "vol").await.unwrap();
    let committed = tree(&a);

    // Written through the mount while there was room (on the small disk too: an upper
    // layer, or copies), then the disk fills up.
    std::fs::write(a.join("big"), bytes(2, 4 << 20)).unwrap();
    std::fs::create_dir(a.join("many")).unwrap();
    for k in 0..300u32 {
        std::fs::write(
            a.join(format!("many/{k}")),
            bytes(k as u8, 3000 + k as usize),
        )
        .unwrap();
    }
    let written = tree(&a);
    let filler = f.agent_dir(0).join("filler");
    fill(&filler);

    let e = f.commit(0, "vol").await.unwrap_err();
    eprintln!("the commit said: {}", e.message);
    assert_eq!(e.code, ErrorCode::Failed, "{}", e.message);
    assert!(e.message.contains("local disk is full"), "{}", e.message);
    assert_eq!(tree(&a), written, "the mount keeps every written file");
    let b = f.mount(1, "vol").await;
    assert_eq!(
        tree(&b),
        committed,
        "the head is the last commit that landed"
    );

    // Space returns: the commit lands whole, and the other agent sees it.
    std::fs::remove_file(&filler).unwrap();
    f.commit(0, "vol").await.unwrap();
    assert_eq!(tree(&a), written);
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&b), written);
}

/// The disk filled by another program while the agent is idle: a reload meets it before
/// the agent's databases do (a database whose write met a full disk refuses every write
/// after it until it is opened again), says so, and works once the space returns (found by
/// the chaos trials: the agent stayed stuck on "previous I/O error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_another_program_leaves_the_agent_working_once_space_returns() {
    let mut f = TestFleet::start(2).await;
    if !on_small_disk(&mut f, 1, 24).await {
        return;
    }
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    for round in 0..3u8 {
        std::fs::write(a.join(format!("f{round}")), bytes(round, 300_000)).unwrap();
        f.commit(0, "vol").await.unwrap();
        let before = tree(&b);
        let filler = f.agent_dir(1).join("filler");
        fill(&filler);
        let e = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap_err();
        assert!(e.message.contains("local disk is full"), "{}", e.message);
        assert_eq!(tree(&b), before, "the old snapshot stays whole");
        std::fs::remove_file(&filler).unwrap();
        f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
        assert_eq!(tree(&b), tree(&a), "round {round}");
    }
}
