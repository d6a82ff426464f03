//! Many small files: commits upload them in batches, reloads fetch them in batches, and a
//! bad blob in a batch spoils nothing.

use voltool_agent::control::ReloadMode;
use voltool_agent::coord_client::{ClientError, CoordClient};
use voltool_agent::net;
use voltool_protocol::Hash;
use voltool_protocol::coord::{self, CoordRequest, CoordResponse, ErrorKind};
use voltool_tests::{TestFleet, bytes, tree};

/// A tree of `n` small files in a few directories: some equal, some empty, one larger than a
/// chunk group (it has an outboard).
fn small_tree(root: &std::path::Path, n: usize) {
    for i in 0..n {
        let dir = root.join(format!("d{}", i % 7));
        std::fs::create_dir_all(&dir).unwrap();
        let content = match i % 50 {
            0 => Vec::new(),
            1 => b"the same bytes".to_vec(),
            _ => bytes(i as u8, 1000 + (i * 37) % 3000),
        };
        std::fs::write(dir.join(format!("f{i}")), content).unwrap();
    }
    std::fs::write(root.join("big"), bytes(9, 100_000)).unwrap();
}

fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_files_travel_in_batches_and_arrive_whole() {
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    small_tree(&a, 3000);
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.changed, 3000 + 7 + 1);

    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&b));
    // Each distinct blob travels once, whatever the number of files that hold it.
    let mut distinct = std::collections::HashMap::new();
    for e in walk(&a) {
        let b = std::fs::read(&e).unwrap();
        distinct.insert(Hash::of(&b), b.len() as u64);
    }
    assert_eq!(
        r.sources.origin_bytes + r.sources.peer_bytes + r.sources.local_bytes,
        distinct.values().sum::<u64>(),
        "{r:?}"
    );
    // Every blob is recorded complete, and a blob of one chunk group has no outboard file.
    let small = std::fs::read(a.join("d3/f3")).unwrap();
    let meta = f.agents[1]
        .store()
        .meta(&Hash::of(&small))
        .unwrap()
        .unwrap();
    assert!(meta.is_complete());
    let data = f.agents[1].store().data_path(&Hash::of(&small));
    assert!(data.exists());
    assert!(!data.with_extension("obao").exists());
    let big = std::fs::read(a.join("big")).unwrap();
    let data = f.agents[1].store().data_path(&Hash::of(&big));
    assert!(data.with_extension("obao").exists());

    // One changed file: committed and reloaded alone.
    std::fs::write(a.join("d1/f1"), b"changed").unwrap();
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.changed, 1);
    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(r.fetched_files_bytes, 7);
    assert_eq!(std::fs::read(b.join("d1/f1")).unwrap(), b"changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_of_small_files_is_banned_and_the_bytes_come_right() {
    let mut f = TestFleet::start(2).await;
    f.make_liar(0).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    small_tree(&a, 200);
    f.commit(0, "vol").await.unwrap();

    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    let liar_id = f.agents[0].addr().id.to_string();
    assert!(r.sources.banned.contains(&liar_id), "{r:?}");
    assert_eq!(r.sources.peer_bytes, 0, "no byte of the liar kept: {r:?}");
    assert_eq!(tree(&a), tree(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_batch_with_one_bad_blob_is_refused_whole() {
    let mut f = TestFleet::start(2).await;
    let client = f.member_client().await;
    let dir = f.dir.path().join("up");
    std::fs::create_dir_all(&dir).unwrap();
    let mut blobs = Vec::new();
    for i in 0..3u8 {
        let b = bytes(40 + i, 5000);
        let p = dir.join(format!("b{i}"));
        std::fs::write(&p, &b).unwrap();
        blobs.push((Hash::of(&b), b.len() as u64, p));
    }
    // The middle one claims a hash its bytes do not have.
    let lie = Hash::of(b"something else");
    blobs[1].0 = lie;
    let e = client.upload(&blobs, &|_| {}).await.unwrap_err();
    match &e {
        ClientError::Remote { kind, message } => {
            assert_eq!(*kind, ErrorKind::Corrupt);
            assert!(message.contains(&lie.short().to_string()), "{message}");
        }
        other => panic!("unexpected {other}"),
    }
    let origin = f.coord.as_ref().unwrap().origin();
    for (h, _, _) in &blobs {
        assert!(
            !origin.has_complete(h).unwrap(),
            "nothing of the batch kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_upload_is_refused_by_name() {
    let mut f = TestFleet::start(2).await;
    let client = f.member_client().await;
    let b = bytes(50, 3000);
    let hash = Hash::of(&b);
    // The request names 3000 bytes; only 1000 follow before the stream ends.
    let ep = net::bind(
        voltool_agent::keys::load_or_create(&f.agent_dir(1)).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        vec![coord::ALPN.to_vec()],
        Default::default(),
    )
    .await
    .unwrap();
    let conn = net::connect(&ep, &f.coord.as_ref().unwrap().addr(), coord::ALPN)
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = CoordRequest::Upload {
        blobs: vec![(hash, 3000)],
    };
    net::write_frame(&mut send, &req).await.unwrap();
    send.write_all(&b[..1000]).await.unwrap();
    send.finish().unwrap();
    let resp: CoordResponse = net::read_frame(&mut recv, coord::MAX_RESPONSE)
        .await
        .unwrap();
    match resp {
        CoordResponse::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::Corrupt);
            assert!(message.contains("truncated"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        !f.coord
            .as_ref()
            .unwrap()
            .origin()
            .has_complete(&hash)
            .unwrap()
    );
    // The same client still works afterwards.
    let p = f.dir.path().join("ok");
    std::fs::write(&p, &b).unwrap();
    client.upload(&[(hash, 3000, p)], &|_| {}).await.unwrap();
    assert!(
        f.coord
            .as_ref()
            .unwrap()
            .origin()
            .has_complete(&hash)
            .unwrap()
    );
}

/// Sends a commit of `parts` (each a list of directory paths, with whether it says it is
/// the last) on `client`.
async fn commit_parts(
    client: &CoordClient,
    info: &coord::VolumeInfo,
    parts: Vec<(Vec<&str>, bool)>,
) -> Result<CoordResponse, ClientError> {
    use voltool_protocol::{Change, Entry, VolPath};
    let (tx, mut rx) = tokio::sync::mpsc::channel(parts.len().max(1));
    for (paths, last) in parts {
        let changes: Vec<Change> = paths
            .iter()
            .map(|p| Change {
                path: VolPath::new(p).unwrap(),
                entry: Some(Entry::Dir { mode: 0o755 }),
            })
            .collect();
        let priors = vec![None; changes.len()];
        tx.try_send(coord::CommitPart {
            changes,
            priors,
            last,
        })
        .unwrap();
    }
    drop(tx);
    let header = CoordRequest::Commit {
        name: info.name.clone(),
        volume: info.id,
        base_version: info.head.commit.version,
    };
    client.commit(&header, &mut rx).await
}

async fn head(client: &CoordClient, name: &str) -> coord::VolumeInfo {
    match client
        .request(&CoordRequest::GetHead { name: name.into() })
        .await
        .unwrap()
    {
        CoordResponse::Volume(v) => v,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_parts_lands_whole_or_not_at_all() {
    let mut f = TestFleet::start(2).await;
    f.create("vol").await;
    let client = f.member_client().await;
    let v0 = head(&client, "vol").await;

    // Cut short: parts come, but none says it is the last.
    let e = commit_parts(&client, &v0, vec![(vec!["a", "b"], false)])
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::CutShort), "{e}");
    // A bad part after good ones: one prior per change is expected.
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    tx.try_send(coord::CommitPart {
        changes: Vec::new(),
        priors: vec![None],
        last: true,
    })
    .unwrap();
    drop(tx);
    let header = CoordRequest::Commit {
        name: "vol".into(),
        volume: v0.id,
        base_version: 0,
    };
    match client.commit(&header, &mut rx).await.unwrap_err() {
        ClientError::Remote { kind, message } => {
            assert_eq!(kind, ErrorKind::Invalid);
            assert!(message.contains("prior"), "{message}");
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(
        head(&client, "vol").await.head,
        v0.head,
        "the head did not move"
    );

    // Three parts, the later ones building on the earlier (c/d needs c): one new version.
    let r = commit_parts(
        &client,
        &v0,
        vec![
            (vec!["a", "c"], false),
            (vec!["c/d", "b"], false),
            (vec!["c/d/e"], true),
        ],
    )
    .await
    .unwrap();
    let CoordResponse::Committed {
        head: h,
        overwritten_total,
        ..
    } = r
    else {
        panic!("unexpected {r:?}")
    };
    assert_eq!(h.commit.version, 1);
    assert_eq!(overwritten_total, 0);
    let v1 = head(&client, "vol").await;
    assert_eq!(v1.head, h);
    let m = f.mount(0, "vol").await;
    for d in ["a", "b", "c", "c/d", "c/d/e"] {
        assert!(m.join(d).is_dir(), "{d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_files_than_one_part_holds_commit_and_reload_whole() {
    // More than one part of everything a commit and a reload stream: change sets, upper
    // layer reads, store batches, fetches.
    const N: usize = 20_000;
    const _: () = assert!(N > coord::MAX_COMMIT_PART);
    const _: () = assert!(N > voltool_agent::store::BATCH_FLUSH);
    const _: () = assert!(N > voltool_agent::overlay::upper::UPPER_PART);
    let n = N;
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let b = f.mount(1, "vol").await;
    for i in 0..n {
        let dir = a.join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir(&dir).unwrap();
        }
        std::fs::write(dir.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let c = f.commit(0, "vol").await.unwrap();
    assert_eq!(c.changed, n + n / 1000, "{c:?}");
    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert!(r.changed);
    assert_eq!(tree(&a), tree(&b));
    // And back: a change of every 100th file from the other side.
    for i in (0..n).step_by(100) {
        std::fs::write(b.join(format!("d{}/f{i}", i / 1000)), "changed").unwrap();
    }
    let c = f.commit(1, "vol").await.unwrap();
    assert_eq!(c.changed, n / 100);
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&b));
}
