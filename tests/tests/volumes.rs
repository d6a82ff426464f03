//! Commit and reload between real agents.

use std::os::unix::fs::PermissionsExt;

use voltool_agent::control::{ErrorCode, ReloadMode, Reply, Request};
use voltool_tests::{TestFleet, bytes, tree};

fn write_sample(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("a/b/c/big.bin"), bytes(1, 5 * 1024 * 1024 + 123)).unwrap();
    std::fs::write(root.join("a/zero"), b"").unwrap();
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("a/secret"), b"s3cret").unwrap();
    std::fs::set_permissions(
        root.join("a/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("empty-dir"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::symlink("b/c/big.bin", root.join("a/link")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_on_a_reload_on_b_gives_the_same_tree() {
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    write_sample(&a);
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.version, 1);
    assert!(c.overwritten.is_empty());

    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert!(r.changed);
    assert_eq!(r.version, 1);
    assert_eq!(tree(&a), tree(&b));
    assert!(r.sources.origin_bytes + r.sources.peer_bytes >= 5 * 1024 * 1024);

    // A second reload is a no-op.
    let r2 = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert!(!r2.changed);
    assert_eq!(r2.sources.origin_bytes + r2.sources.peer_bytes, 0);

    // A small change moves only that change.
    std::fs::write(a.join("a/secret"), b"rotated").unwrap();
    std::fs::remove_file(a.join("a/zero")).unwrap();
    let c2 = f.commit(0, "vol").await.unwrap();
    assert_eq!((c2.version, c2.changed), (2, 2));
    assert!(c2.hashed_bytes < 100, "only the changed file is rehashed");
    let r3 = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&b));
    assert!(
        r3.sources.origin_bytes + r3.sources.peer_bytes < 1024,
        "{:?}",
        r3.sources
    );
    // Files the new snapshot shares with the old one are not read again by the next scan.
    let idle = f.commit(1, "vol").await.unwrap();
    assert_eq!((idle.changed, idle.hashed_bytes), (0, 0));

    // Nothing to commit is not a new version.
    let c3 = f.commit(0, "vol").await.unwrap();
    assert_eq!((c3.version, c3.changed), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_merge_per_path_last_writer_wins() {
    let f = TestFleet::start(3).await;
    f.create("vol").await;
    let mounts: Vec<_> = [0, 1, 2]
        .into_iter()
        .map(|i| (i, f.mount_path(i)))
        .collect();
    for (i, _) in &mounts {
        f.mount(*i, "vol").await;
    }
    for (i, m) in &mounts {
        std::fs::create_dir_all(m.join(format!("w{i}"))).unwrap();
        std::fs::write(m.join(format!("w{i}/data")), bytes(*i as u8, 70_000)).unwrap();
    }
    let (r0, r1, r2) = tokio::join!(f.commit(0, "vol"), f.commit(1, "vol"), f.commit(2, "vol"));
    for r in [&r0, &r1, &r2] {
        assert!(r.as_ref().unwrap().overwritten.is_empty());
    }
    let mut versions = vec![
        r0.unwrap().version,
        r1.unwrap().version,
        r2.unwrap().version,
    ];
    versions.sort();
    assert_eq!(versions, vec![1, 2, 3]);
    for (i, _) in &mounts {
        f.reload(*i, "vol", ReloadMode::Refuse).await.unwrap();
    }
    for (_, m) in &mounts {
        for j in 0..3 {
            assert_eq!(
                std::fs::read(m.join(format!("w{j}/data"))).unwrap(),
                bytes(j as u8, 70_000)
            );
        }
    }
    let t0 = tree(&mounts[0].1);
    assert_eq!(t0, tree(&mounts[1].1));
    assert_eq!(t0, tree(&mounts[2].1));

    // Two writers, one path: the later commit wins and is told it overwrote a newer change;
    // the earlier committer is told on its next reload.
    std::fs::write(mounts[0].1.join("shared"), b"from 0").unwrap();
    std::fs::write(mounts[1].1.join("shared"), b"from 1").unwrap();
    let early = f.commit(0, "vol").await.unwrap();
    assert!(early.overwritten.is_empty());
    let late = f.commit(1, "vol").await.unwrap();
    assert_eq!(late.overwritten, vec!["shared".to_string()]);
    let r = f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(r.overwritten_by_others, vec!["shared".to_string()]);
    assert_eq!(
        std::fs::read(mounts[0].1.join("shared")).unwrap(),
        b"from 1"
    );
    f.reload(2, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(
        std::fs::read(mounts[2].1.join("shared")).unwrap(),
        b"from 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_uncommitted_changes_refuses_discards_or_commits_first() {
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    std::fs::write(a.join("x"), b"1").unwrap();
    f.commit(0, "vol").await.unwrap();

    std::fs::write(b.join("local"), b"uncommitted").unwrap();
    let e = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Dirty);
    assert!(e.message.contains("local"), "{}", e.message);
    assert!(b.join("local").exists(), "refusal keeps local changes");
    assert!(!b.join("x").exists(), "and the old snapshot");

    let r = f.reload(1, "vol", ReloadMode::Discard).await.unwrap();
    assert_eq!(r.version, 1);
    assert!(!b.join("local").exists());
    assert_eq!(std::fs::read(b.join("x")).unwrap(), b"1");

    std::fs::write(a.join("y"), b"2").unwrap();
    f.commit(0, "vol").await.unwrap();
    std::fs::write(b.join("mine"), b"keep me").unwrap();
    let r = f.reload(1, "vol", ReloadMode::CommitFirst).await.unwrap();
    assert!(r.committed.as_ref().is_some_and(|c| c.changed == 1));
    assert_eq!(r.version, 3);
    assert_eq!(std::fs::read(b.join("mine")).unwrap(), b"keep me");
    assert_eq!(std::fs::read(b.join("y")).unwrap(), b"2");
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&b));

    // On the head already, --discard still throws changes away and --commit-first still
    // commits them (found by the chaos trials: both used to return at once).
    let head = tree(&b);
    std::fs::write(b.join("mine"), b"scratch").unwrap();
    std::fs::write(b.join("new"), b"scratch").unwrap();
    std::fs::remove_file(b.join("x")).unwrap();
    let r = f.reload(1, "vol", ReloadMode::Discard).await.unwrap();
    assert_eq!(r.version, 3);
    assert_eq!(tree(&b), head, "the mount is the head again");
    std::fs::write(b.join("new"), b"commit me").unwrap();
    let r = f.reload(1, "vol", ReloadMode::CommitFirst).await.unwrap();
    assert!(
        r.committed.as_ref().is_some_and(|c| c.changed == 1),
        "{r:?}"
    );
    assert_eq!(r.version, 4);
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(std::fs::read(a.join("new")).unwrap(), b"commit me");
    let r = f.reload(1, "vol", ReloadMode::Discard).await.unwrap();
    assert!(!r.changed, "nothing to discard, nothing done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_a_mount_never_reach_the_store() {
    let f = TestFleet::start(1).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let data = bytes(9, 300_000);
    std::fs::write(a.join("f"), &data).unwrap();
    f.commit(0, "vol").await.unwrap();
    let hash = voltool_protocol::Hash::of(&data);
    let stored = f.agents[0].store().data_path(&hash);
    // Copies never share an inode with the store. An overlay shows a lower layer's inode
    // (the store's blob, linked in by the commit) until the first write copies it up.
    if voltool_tests::snapshot_mode() == voltool_agent::node::SnapshotMode::Copy {
        assert_ne!(
            voltool_tests::ino(&a.join("f")),
            voltool_tests::ino(&stored)
        );
    }
    // Overwrite in place: the store's copy, and what the agent serves, stay intact.
    std::fs::write(a.join("f"), b"scribble").unwrap();
    assert_eq!(std::fs::read(&stored).unwrap(), data);
    let mut enc = Vec::new();
    f.agents[0]
        .store()
        .encode(
            &hash,
            data.len() as u64,
            &voltool_protocol::RangeList::all(data.len() as u64),
            &mut enc,
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_commands_work_on_the_head() {
    let f = TestFleet::start(1).await;
    f.create("vol").await;
    let src = f.dir.path().join("src.txt");
    std::fs::write(&src, b"hello").unwrap();
    let put = |remote: &'static str, force: bool| f.put(0, "vol", &src, remote, force);
    put("docs/hello.txt", false).await.unwrap();
    let e = put("docs/hello.txt", false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Exists);
    put("docs/hello.txt", true).await.unwrap();
    let Reply::Ls(ls) = f
        .req(
            0,
            Request::VolumeLs {
                name: "vol".into(),
                path: Some("docs".into()),
                recursive: false,
            },
        )
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(ls.len(), 1);
    assert_eq!((ls[0].path.as_str(), ls[0].size), ("docs/hello.txt", 5));
    let e = f
        .req(
            0,
            Request::VolumeLs {
                name: "nope".into(),
                path: None,
                recursive: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
}

async fn head_version(f: &TestFleet, i: usize) -> u64 {
    match f.req(i, Request::VolumeList).await.unwrap() {
        Reply::Volumes(v) => v[0].version,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_commits_run_and_a_clean_stop_commits_last_changes() {
    let mut f = TestFleet::start(1).await;
    f.create("vol").await;
    let path = f.mount_path(0);
    f.req(
        0,
        Request::Mount {
            name: "vol".into(),
            path: path.clone(),
            background_commit_secs: Some(1),
            read_only: false,
            follow: voltool_agent::control::Follow::No,
            lazy: false,
        },
    )
    .await
    .unwrap();
    std::fs::write(path.join("auto"), b"committed by the agent").unwrap();
    // Wait (bounded) for the background loop to commit.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while head_version(&f, 0).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no background commit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A change made just before a clean stop is committed by the stop.
    std::fs::write(path.join("last"), b"at shutdown").unwrap();
    let agent = f.agents.pop().unwrap();
    agent.shutdown().await;
    let a = f.start_agent(0).await;
    f.agents.push(a);
    let Reply::Ls(ls) = f
        .req(
            0,
            Request::VolumeLs {
                name: "vol".into(),
                path: None,
                recursive: false,
            },
        )
        .await
        .unwrap()
    else {
        panic!()
    };
    let names: Vec<_> = ls.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, vec!["auto", "last"]);
}

/// A reader inside a mount when it switches (its working directory there, a file open)
/// keeps reading the whole old tree, in either snapshot mode: nothing of it is taken from
/// under it; the mount path shows the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_inside_the_old_view_keeps_reading_it_through_a_switch() {
    use std::io::{BufRead, Write};
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    std::fs::write(a.join("f"), b"old f").unwrap();
    std::fs::write(a.join("g"), b"old g").unwrap();
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    // A reader whose working directory is the mount, reading by relative names on demand.
    let mut reader = std::process::Command::new("sh")
        .args([
            "-c",
            "cd \"$0\" && echo ready && while read -r x; do cat f; echo; cat g; echo; done",
        ])
        .arg(&b)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(reader.stdout.take().unwrap());
    let mut input = reader.stdin.take().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let mut read = || {
        writeln!(input).unwrap();
        let mut f = String::new();
        let mut g = String::new();
        out.read_line(&mut f).unwrap();
        out.read_line(&mut g).unwrap();
        (f.trim().to_string(), g.trim().to_string())
    };
    assert_eq!(read(), ("old f".into(), "old g".into()));
    // A new version: f changed, g gone.
    std::fs::write(a.join("f"), b"new f").unwrap();
    std::fs::remove_file(a.join("g")).unwrap();
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(std::fs::read(b.join("f")).unwrap(), b"new f");
    assert!(!b.join("g").exists());
    // The reader still sees the whole old tree.
    assert_eq!(read(), ("old f".into(), "old g".into()));
    drop(input);
    reader.wait().unwrap();
}
