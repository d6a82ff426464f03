//! Following a volume: each new version is downloaded as soon as it is committed, so a
//! reload only switches; a host may follow without a mount, and preheat one version.

use voltool_agent::control::{Follow, ReloadMode, Reply, Request};
use voltool_agent::rate::Rate;
use voltool_tests::{Limits, TestFleet, bytes, until_mount_status, until_status};

const SIZE: usize = 6 * 1024 * 1024;

/// Waits until agent `i` holds version `v` of followed volume `name` whole.
async fn until_held(f: &TestFleet, i: usize, name: &str, v: u64) {
    until_status(f, i, &format!("agent {i} holds {name} v{v}"), |s| {
        s.follows
            .iter()
            .any(|x| x.volume == name && x.held == Some(v) && x.bytes_to_go == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_hold_each_new_version_before_anyone_reloads() {
    let f = TestFleet::start(3).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    // Agent 1 follows through its mount, agent 2 as a host without one.
    let m = f.mount_path(1);
    f.req(
        1,
        Request::Mount {
            name: "vol".into(),
            path: m.clone(),
            background_commit_secs: None,
            read_only: false,
            follow: Follow::Prefetch,
        },
    )
    .await
    .unwrap();
    f.req(
        2,
        Request::Follow {
            name: "vol".into(),
            on: true,
        },
    )
    .await
    .unwrap();

    std::fs::write(a.join("model.bin"), bytes(1, SIZE)).unwrap();
    let v1 = f.commit(0, "vol").await.unwrap().version;
    until_held(&f, 1, "vol", v1).await;
    until_held(&f, 2, "vol", v1).await;
    // Nobody asked: the mount still shows the version it had.
    assert!(!m.join("model.bin").exists());
    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(r.version, v1);
    assert_eq!(
        (r.sources.origin_bytes, r.sources.peer_bytes),
        (0, 0),
        "the reload only switched: {r:?}"
    );
    // Layered snapshots: the follow wrote the switch's layer already.
    let layered = voltool_tests::snapshot_mode() != voltool_agent::node::SnapshotMode::Copy;
    assert_eq!(r.prepared, layered, "{r:?}");
    assert_eq!(r.fetched_files_bytes, SIZE as u64, "{r:?}");
    assert_eq!(std::fs::read(m.join("model.bin")).unwrap(), bytes(1, SIZE));

    // The next version too, and the host without a mount mounts it fetching nothing.
    std::fs::write(a.join("more.bin"), bytes(2, SIZE)).unwrap();
    let v2 = f.commit(0, "vol").await.unwrap().version;
    until_held(&f, 1, "vol", v2).await;
    until_held(&f, 2, "vol", v2).await;
    let mount = Request::Mount {
        name: "vol".into(),
        path: f.mount_path(2),
        background_commit_secs: None,
        read_only: false,
        follow: Follow::No,
    };
    let Reply::Done(msg) = f.req(2, mount).await.unwrap() else {
        panic!("mount answered otherwise")
    };
    assert!(msg.contains("; 0 bytes from the origin"), "{msg}");
    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(r.version, v2);
    assert_eq!(
        (r.sources.origin_bytes, r.sources.peer_bytes),
        (0, 0),
        "{r:?}"
    );

    // Unmounting ends the mount's follow; unfollowing ends the host's.
    f.req(
        1,
        Request::Unmount {
            name: Some("vol".into()),
            mode: ReloadMode::Refuse,
        },
    )
    .await
    .unwrap();
    until_status(&f, 1, "no follow after unmount", |s| s.follows.is_empty()).await;
    f.req(
        2,
        Request::Follow {
            name: "vol".into(),
            on: false,
        },
    )
    .await
    .unwrap();
    until_status(&f, 2, "no follow after unfollow", |s| s.follows.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_joins_the_follows_download_in_flight_instead_of_fetching_twice() {
    // Every agent takes in 2 MiB/s: the follower's download of 6 MiB takes about 3 s.
    let f = TestFleet::start_with(
        2,
        Limits {
            agent_ingress: Some(Rate(2 << 20)),
            ..Limits::default()
        },
    )
    .await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let m = f.mount_path(1);
    f.req(
        1,
        Request::Mount {
            name: "vol".into(),
            path: m.clone(),
            background_commit_secs: None,
            read_only: false,
            follow: Follow::Prefetch,
        },
    )
    .await
    .unwrap();
    std::fs::write(a.join("model.bin"), bytes(3, SIZE)).unwrap();
    let v = f.commit(0, "vol").await.unwrap().version;
    until_status(&f, 1, "the follow's download under way", |s| {
        s.follows
            .iter()
            .any(|x| x.newest == Some(v) && x.bytes_to_go > 0 && x.bytes_to_go < SIZE as u64)
    })
    .await;
    // The reload joins it: it fetches nothing itself, and the bytes are the version's.
    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(r.version, v);
    assert_eq!(
        (r.sources.origin_bytes, r.sources.peer_bytes),
        (0, 0),
        "a second download ran: {r:?}"
    );
    assert_eq!(r.sources.local_bytes, SIZE as u64, "{r:?}");
    assert_eq!(std::fs::read(m.join("model.bin")).unwrap(), bytes(3, SIZE));
    until_held(&f, 1, "vol", v).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_head_pushed_is_refused_and_the_follow_goes_on() {
    let mut f = TestFleet::start(3).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    f.req(
        1,
        Request::Follow {
            name: "vol".into(),
            on: true,
        },
    )
    .await
    .unwrap();
    std::fs::write(a.join("one"), b"1").unwrap();
    let v1 = f.commit(0, "vol").await.unwrap().version;
    until_held(&f, 1, "vol", v1).await;
    // A backup of the coordinator at v1; then v2, which the follower takes.
    f.stop_coordinator().await;
    let backup = f.coord_dir().with_extension("backup");
    copy_dir(&f.coord_dir(), &backup);
    f.start_coordinator().await;
    std::fs::write(a.join("two"), b"2").unwrap();
    let v2 = f.commit(0, "vol").await.unwrap().version;
    until_held(&f, 1, "vol", v2).await;
    // The coordinator comes back from the backup: it pushes v1, a rollback.
    f.stop_coordinator().await;
    std::fs::remove_dir_all(f.coord_dir()).unwrap();
    std::fs::rename(&backup, f.coord_dir()).unwrap();
    f.start_coordinator().await;
    let s = until_status(&f, 1, "the rolled-back head refused", |s| {
        s.follows.iter().any(|x| x.refused.is_some())
    })
    .await;
    let refused = s.follows[0].refused.clone().unwrap();
    assert!(refused.contains(&format!("version {v1}")), "{refused}");
    assert_eq!(s.follows[0].held, Some(v2), "nothing rolled back: {s:?}");
    // The follow goes on: a version past what it saw arrives (agent 2 never saw v2).
    let b = f.mount(2, "vol").await;
    for (i, name) in ["three", "four"].iter().enumerate() {
        std::fs::write(b.join(name), [i as u8]).unwrap();
        f.commit(2, "vol").await.unwrap();
    }
    until_held(&f, 1, "vol", v2 + 1).await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switching_follower_moves_by_itself_only_when_its_mount_is_clean() {
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let m = f.mount_path(1);
    f.req(
        1,
        Request::Mount {
            name: "vol".into(),
            path: m.clone(),
            background_commit_secs: None,
            read_only: false,
            follow: Follow::Switch,
        },
    )
    .await
    .unwrap();
    std::fs::write(a.join("one"), b"1").unwrap();
    let v1 = f.commit(0, "vol").await.unwrap().version;
    until_mount_status(&f, 1, "switched to v1", |s| s.local_version == v1).await;
    assert_eq!(std::fs::read(m.join("one")).unwrap(), b"1");
    // An uncommitted change holds the switch back, and status says why.
    std::fs::write(m.join("mine"), b"x").unwrap();
    std::fs::write(a.join("two"), b"2").unwrap();
    let v2 = f.commit(0, "vol").await.unwrap().version;
    let s = until_status(&f, 1, "the switch waits", |s| {
        s.follows[0].held == Some(v2) && s.follows[0].waiting.is_some()
    })
    .await;
    let why = s.follows[0].waiting.clone().unwrap();
    assert!(why.contains("uncommitted"), "{why}");
    assert_eq!(s.mounts[0].local_version, v1, "it did not move: {s:?}");
    assert!(!m.join("two").exists());
    // Clean again: it moves.
    std::fs::remove_file(m.join("mine")).unwrap();
    until_mount_status(&f, 1, "switched to v2", |s| s.local_version == v2).await;
    assert_eq!(std::fs::read(m.join("two")).unwrap(), b"2");
}
