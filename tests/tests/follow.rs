//! Following a volume: each new version is downloaded as soon as it is committed, so a
//! reload only switches; a host may follow without a mount, and preheat one version.

use voltool_agent::control::{ReloadMode, Reply, Request};
use voltool_tests::{TestFleet, bytes, until_status};

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
            follow: true,
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
        follow: false,
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
