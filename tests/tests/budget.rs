//! The agent's disk budget: past `--store-max`, what no mounted snapshot needs is evicted,
//! partial blobs of abandoned downloads first, then least recently used first, down to the
//! low watermark; evicted blobs are withdrawn from the tracker; status counts them.

use std::time::{Duration, Instant};

use voltool_agent::control::{ReloadMode, Reply, Request, StatusReport};
use voltool_agent::node::StoreBudget;
use voltool_protocol::Hash;
use voltool_protocol::coord::{CoordRequest, CoordResponse};
use voltool_tests::metrics::{scrape, value};
use voltool_tests::{TestFleet, bytes, tree};

async fn status(f: &TestFleet, i: usize) -> StatusReport {
    match f.req(i, Request::Status).await.unwrap() {
        Reply::Status(s) => s,
        other => panic!("unexpected {other:?}"),
    }
}

/// Two agents, the second with a store budget.
async fn fleet_with_budget(budget: StoreBudget) -> TestFleet {
    let mut f = TestFleet::start(2).await;
    f.agents.pop().unwrap().shutdown().await;
    f.limits.store_max = Some(budget);
    let b = f.start_agent(1).await;
    f.agents.push(b);
    f
}

/// Whether the tracker names agent `i` as a provider of `hash`.
async fn tracker_lists(f: &TestFleet, i: usize, hash: Hash) -> bool {
    let c = f.client_as(0).await;
    let me = f.agent_id(i);
    match c.request(&CoordRequest::Lookup { hash }).await.unwrap() {
        CoordResponse::Providers(list) => list.iter().any(|p| p.id == *me.as_bytes()),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_budget_an_agent_evicts_what_no_snapshot_needs_least_recently_used_first() {
    // Agent 1 gets a budget of 1,000,000 bytes, freeing down to 600,000.
    let f = fleet_with_budget(StoreBudget::new(1_000_000, Some(600_000))).await;

    // A mounted volume (needed) and another whose files agent 1 only copies out.
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let kept = bytes(1, 100_000);
    std::fs::write(a.join("kept.bin"), &kept).unwrap();
    f.commit(0, "vol").await.unwrap();
    f.create("big").await;
    let files: Vec<Vec<u8>> = (0..3u8).map(|i| bytes(10 + i, 300_000)).collect();
    for (i, content) in files.iter().enumerate() {
        let local = f.dir.path().join(format!("f{i}"));
        std::fs::write(&local, content).unwrap();
        f.put(0, "big", &local, &format!("/f{i}"), false)
            .await
            .unwrap();
    }
    let m = f.mount(1, "vol").await;
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();

    // A download abandoned halfway: a partial blob nothing is fetching.
    let abandoned = Hash::of(b"abandoned");
    f.agents[1]
        .store()
        .begin_partial(&abandoned, 1 << 20)
        .unwrap();

    // Two files copied out stay within the budget; the third goes past it.
    let out = f.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for i in 0..3 {
        f.get(
            1,
            "big",
            &format!("/f{i}"),
            &out.join(format!("f{i}")),
            false,
        )
        .await
        .unwrap();
        if i == 1 {
            let s = status(&f, 1).await;
            assert_eq!(s.store.evictions, 0, "{:?}", s.store);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = status(&f, 1).await;
        if s.store.evictions > 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "no eviction: {:?}", s.store);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(s.store.bytes <= 600_000, "{:?}", s.store);
    assert_eq!(s.store.max, Some(1_000_000));
    let addr = f.agents[1].metrics_addr().unwrap();
    let (_, body) = scrape(addr, "/metrics").await;
    assert_eq!(
        value(&body, "voltool_evictions_total"),
        s.store.evictions as f64
    );
    assert_eq!(
        value(&body, "voltool_evicted_bytes_total"),
        s.store.evicted_bytes as f64
    );

    // The partial blob and the two least recently used files went; the newest file and
    // the mounted one stayed.
    let store = f.agents[1].store();
    let held = |h: Hash| store.meta(&h).unwrap().is_some();
    let [f0, f1, f2] = [0, 1, 2].map(|i| Hash::of(&files[i]));
    assert!(!held(abandoned));
    assert!(!held(f0) && !held(f1), "{:?}", s.store);
    assert!(held(f2) && held(Hash::of(&kept)));
    assert_eq!(std::fs::read(m.join("kept.bin")).unwrap(), kept);
    for (i, content) in files.iter().enumerate() {
        assert_eq!(&std::fs::read(out.join(format!("f{i}"))).unwrap(), content);
    }
    // Withdrawn from the tracker: lookups no longer name agent 1 for them.
    assert!(tracker_lists(&f, 1, f2).await);
    assert!(!tracker_lists(&f, 1, f0).await && !tracker_lists(&f, 1, f1).await);

    // What went comes back when asked for again; the mount still reloads whole.
    f.get(1, "big", "/f0", &out.join("again"), false)
        .await
        .unwrap();
    assert_eq!(std::fs::read(out.join("again")).unwrap(), files[0]);
    std::fs::write(a.join("new.bin"), bytes(4, 50_000)).unwrap();
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&m));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_a_layer_of_a_mounted_snapshot_names_is_never_evicted() {
    let f = fleet_with_budget(StoreBudget::new(500_000, Some(100_000))).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let (old, new) = (bytes(1, 300_000), bytes(2, 300_000));
    std::fs::write(a.join("x.bin"), &old).unwrap();
    std::fs::write(a.join("y.bin"), bytes(3, 1000)).unwrap();
    f.commit(0, "vol").await.unwrap();
    let m = f.mount(1, "vol").await;
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    std::fs::write(a.join("x.bin"), &new).unwrap();
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();

    f.agents[1].enforce_store_budget().await.unwrap();
    let s = status(&f, 1).await;
    let held = f.agents[1].store().meta(&Hash::of(&old)).unwrap().is_some();
    if s.snapshots == "overlay" {
        // The first version's layer lies under the second's thin one, and names the old
        // blob: it stays, over budget or not.
        assert_eq!(s.mounts[0].layers, 2, "{s:?}");
        assert!(held, "{:?}", s.store);
    } else {
        // A copied snapshot needs no blob: the old one goes.
        assert!(!held, "{:?}", s.store);
        assert!(s.store.evictions >= 1);
    }
    assert!(f.agents[1].store().meta(&Hash::of(&new)).unwrap().is_some());
    assert_eq!(tree(&a), tree(&m));
}
