//! Following a volume: each new version is downloaded as soon as it is committed, so a
//! reload only switches; a host may follow without a mount, and preheat one version.

use voltool_agent::control::{Follow, ReloadMode, Reply, Request};
use voltool_agent::rate::Rate;
use voltool_tests::{Limits, TestFleet, bytes, until_mount_status, until_status};

const SIZE: usize = 6 * 1024 * 1024;

/// Two agents that take in 2 MiB/s each: a follower's download of 6 MiB takes about 3 s.
async fn slow_fleet() -> TestFleet {
    TestFleet::start_with(
        2,
        Limits {
            agent_ingress: Some(Rate(2 << 20)),
            ..Limits::default()
        },
    )
    .await
}

/// Mounts "vol" on agent `i` at `path`, following as `follow` says: the agent's message.
async fn mount_as(f: &TestFleet, i: usize, path: std::path::PathBuf, follow: Follow) -> String {
    let req = Request::Mount {
        name: "vol".into(),
        path,
        background_commit_secs: None,
        read_only: false,
        follow,
        lazy: false,
    };
    match f.req(i, req).await.unwrap() {
        Reply::Done(msg) => msg,
        other => panic!("mount answered {other:?}"),
    }
}

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
    mount_as(&f, 1, m.clone(), Follow::Prefetch).await;
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
    let msg = mount_as(&f, 2, f.mount_path(2), Follow::No).await;
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
    let f = slow_fleet().await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let m = f.mount_path(1);
    mount_as(&f, 1, m.clone(), Follow::Prefetch).await;
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
    mount_as(&f, 1, m.clone(), Follow::Switch).await;
    std::fs::write(a.join("one"), b"1").unwrap();
    let v1 = f.commit(0, "vol").await.unwrap().version;
    // Its reload done (the record moves before the path shows the new version).
    let switched = |v: u64| {
        move |s: &voltool_agent::control::MountStatus| {
            s.last_reload.as_ref().is_some_and(|r| r.version == v)
        }
    };
    until_mount_status(&f, 1, "switched to v1", switched(v1)).await;
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
    until_mount_status(&f, 1, "switched to v2", switched(v2)).await;
    assert_eq!(std::fs::read(m.join("two")).unwrap(), b"2");
}

/// Follows volume `name` on agent `i` as a host.
async fn follow(f: &TestFleet, i: usize, name: &str) {
    f.req(
        i,
        Request::Follow {
            name: name.into(),
            on: true,
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_banned_for_the_whole_follow_download() {
    let mut f = TestFleet::start(2).await;
    // Agent 0 holds what it commits and flips bytes in everything it serves.
    f.make_liar(0).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    follow(&f, 1, "vol").await;
    std::fs::write(a.join("model.bin"), bytes(4, SIZE)).unwrap();
    let v = f.commit(0, "vol").await.unwrap().version;
    until_held(&f, 1, "vol", v).await;
    let s = until_status(&f, 1, "status", |_| true).await;
    let liar = f.agents[0].addr().id.to_string();
    assert!(s.follows[0].banned.contains(&liar), "{s:?}");
    let msg = mount_as(&f, 1, f.mount_path(1), Follow::No).await;
    assert!(msg.contains("; 0 bytes from the origin"), "{msg}");
    assert_eq!(
        std::fs::read(f.mount_path(1).join("model.bin")).unwrap(),
        bytes(4, SIZE),
        "no byte of the liar's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_faster_than_the_download_move_it_to_the_newest_version() {
    // The follower takes in 2 MiB/s: 6 MiB take about 3 s.
    let f = slow_fleet().await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    follow(&f, 1, "vol").await;
    let big = bytes(5, SIZE);
    std::fs::write(a.join("big.bin"), &big).unwrap();
    let v1 = f.commit(0, "vol").await.unwrap().version;
    until_status(&f, 1, "v1 under way", |s| {
        s.follows[0].newest == Some(v1) && s.follows[0].bytes_to_go < SIZE as u64
    })
    .await;
    // v2 no longer has the big file: its download stops, v2 is what the follower holds.
    std::fs::remove_file(a.join("big.bin")).unwrap();
    std::fs::write(a.join("small"), b"s").unwrap();
    let v2 = f.commit(0, "vol").await.unwrap().version;
    until_held(&f, 1, "vol", v2).await;
    let meta = f.agents[1]
        .store()
        .meta(&voltool_protocol::Hash::of(&big))
        .unwrap();
    assert!(
        meta.is_some_and(|m| !m.is_complete() && m.held_bytes() > 0),
        "v1's blob was neither finished nor dropped: what was verified stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_past_the_store_budget_waits_and_says_so_and_the_follow_goes_on() {
    let f = TestFleet::start_with(
        2,
        Limits {
            store_max: Some(voltool_agent::node::StoreBudget::new(4 << 20, None)),
            ..Limits::default()
        },
    )
    .await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::write(a.join("kept"), bytes(6, 1 << 20)).unwrap();
    f.commit(0, "vol").await.unwrap();
    // The follower's mount needs 1 MiB; the next version would not fit in 4 MiB.
    let m = f.mount(1, "vol").await;
    follow(&f, 1, "vol").await;
    std::fs::write(a.join("big.bin"), bytes(7, SIZE)).unwrap();
    let v2 = f.commit(0, "vol").await.unwrap().version;
    let s = until_status(&f, 1, "the follow waits for room", |s| {
        s.follows[0].newest == Some(v2)
            && s.follows[0]
                .waiting
                .as_deref()
                .is_some_and(|w| w.contains("no room"))
    })
    .await;
    assert!(s.store.bytes <= 4 << 20, "over the budget: {s:?}");
    assert_eq!(std::fs::read(m.join("kept")).unwrap(), bytes(6, 1 << 20));
    // A version that fits again: the follow goes on.
    std::fs::remove_file(a.join("big.bin")).unwrap();
    let v3 = f.commit(0, "vol").await.unwrap().version;
    until_held(&f, 1, "vol", v3).await;
    let s = until_status(&f, 1, "status", |_| true).await;
    assert_eq!(s.follows[0].waiting, None, "{s:?}");
    assert_eq!(std::fs::read(m.join("kept")).unwrap(), bytes(6, 1 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preheat_of_an_older_version_is_that_version_and_nothing_else() {
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let (one, two) = (bytes(8, 1 << 20), bytes(9, 1 << 20));
    std::fs::write(a.join("one"), &one).unwrap();
    let v1 = f.commit(0, "vol").await.unwrap().version;
    std::fs::remove_file(a.join("one")).unwrap();
    std::fs::write(a.join("two"), &two).unwrap();
    f.commit(0, "vol").await.unwrap();
    let prefetch = |version| Request::Prefetch {
        name: "vol".into(),
        version,
    };
    let Reply::Done(msg) = f.req(1, prefetch(Some(v1))).await.unwrap() else {
        panic!("prefetch answered otherwise")
    };
    assert!(msg.contains(&format!("version {v1} is here")), "{msg}");
    let held = |b: &[u8]| {
        f.agents[1]
            .store()
            .has_complete(&voltool_protocol::Hash::of(b))
            .unwrap()
    };
    assert!(held(&one) && !held(&two), "only version {v1}'s file");
    let e = f.req(1, prefetch(Some(99))).await.unwrap_err();
    assert_eq!(e.code, voltool_agent::control::ErrorCode::NotFound, "{e:?}");
    // The newest by default.
    f.req(1, prefetch(None)).await.unwrap();
    assert!(held(&two));
}
