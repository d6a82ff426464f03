//! Reload from peers: a fleet feeds itself, the origin sends about one copy.

use voltool_agent::control::ReloadMode;
use voltool_agent::rate::Rate;
use voltool_tests::{Limits, TestFleet, bytes, tree};

const SIZE: usize = 6 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_reloads_feed_each_other() {
    // The origin sends at 2 MiB/s: three agents pulling 6 MiB each from it alone would
    // take 9 s and cost it 18 MiB.
    let mut f = TestFleet::start_with(
        4,
        Limits {
            origin_egress: Some(Rate(2 << 20)),
            ..Limits::default()
        },
    )
    .await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    for i in 1..4 {
        f.mount(i, "vol").await;
    }
    std::fs::write(a.join("model.bin"), bytes(7, SIZE)).unwrap();
    f.commit(0, "vol").await.unwrap();
    // The writer leaves (it withdraws what it holds): only the origin has the blob.
    let writer = f.agents.remove(0);
    writer.shutdown().await;

    let (r1, r2, r3) = tokio::join!(
        f.reload(0, "vol", ReloadMode::Refuse),
        f.reload(1, "vol", ReloadMode::Refuse),
        f.reload(2, "vol", ReloadMode::Refuse)
    );
    let reports = [r1.unwrap(), r2.unwrap(), r3.unwrap()];
    let origin: u64 = reports.iter().map(|r| r.sources.origin_bytes).sum();
    let peers: u64 = reports.iter().map(|r| r.sources.peer_bytes).sum();
    assert_eq!(origin + peers, 3 * SIZE as u64, "{reports:?}");
    assert!(peers > 0, "no peer served anything: {reports:?}");
    assert!(
        origin < 2 * SIZE as u64,
        "the origin sent {origin} bytes for 3 agents of {SIZE}: {reports:?}"
    );
    for i in 1..4 {
        assert_eq!(tree(&f.mount_path(i)), tree(&f.mount_path(1)));
    }
    assert_eq!(
        std::fs::read(f.mount_path(1).join("model.bin")).unwrap(),
        bytes(7, SIZE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_banned_and_the_reload_completes_with_correct_bytes() {
    let mut f = TestFleet::start(2).await;
    // Agent 0 holds the blob complete but flips bytes in everything it serves.
    f.make_liar(0).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    f.mount(1, "vol").await;
    std::fs::write(a.join("model.bin"), bytes(8, SIZE)).unwrap();
    f.commit(0, "vol").await.unwrap();

    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    let liar_id = f.agents[0].addr().id.to_string();
    assert!(r.sources.banned.contains(&liar_id), "{r:?}");
    assert_eq!(
        r.sources.peer_bytes, 0,
        "no byte of the liar was accepted: {r:?}"
    );
    assert_eq!(r.sources.origin_bytes, SIZE as u64);
    assert_eq!(
        std::fs::read(f.mount_path(1).join("model.bin")).unwrap(),
        bytes(8, SIZE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_dying_mid_transfer_does_not_fail_the_reload() {
    // The peer sends at 4 MiB/s, the origin at 1 MiB/s: most of the first half comes
    // from the peer, the rest must come from the origin once the peer is gone.
    let mut f = TestFleet::start_with(
        2,
        Limits {
            agent_egress: Some(Rate(4 << 20)),
            origin_egress: Some(Rate(1 << 20)),
            ..Limits::default()
        },
    )
    .await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    f.mount(1, "vol").await;
    let data = bytes(9, SIZE);
    std::fs::write(a.join("model.bin"), &data).unwrap();
    f.commit(0, "vol").await.unwrap();
    let hash = voltool_protocol::Hash::of(&data);

    let downloader = f.agents.remove(1);
    let reload = tokio::spawn(async move {
        let r = downloader
            .request(
                voltool_agent::control::Request::Reload {
                    name: Some("vol".into()),
                    mode: ReloadMode::Refuse,
                    lazy: false,
                },
                voltool_agent::node::Events::none(),
            )
            .await;
        (downloader, r)
    });
    // Wait (bounded) until part of the blob has arrived, then stop the provider.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let part = std::fs::metadata(voltool_agent::store::Store::blob_path_in(
            &f.agent_dir(1).join("store"),
            &hash,
        ))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
        if part >= (SIZE / 2) as u64 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let provider = f.agents.remove(0);
    provider.shutdown().await;
    let (_downloader, r) = reload.await.unwrap();
    let r = match r.unwrap() {
        voltool_agent::control::Reply::Reloaded(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(r.sources.peer_bytes > 0, "{r:?}");
    assert!(r.sources.origin_bytes > 0, "{r:?}");
    assert_eq!(
        std::fs::read(f.mount_path(1).join("model.bin")).unwrap(),
        data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_ranks_providers_by_the_askers_round_trip_times() {
    use voltool_protocol::coord::{CoordRequest, CoordResponse, PeerRtt};
    let f = TestFleet::start(3).await;
    // The tracker enters only blobs the origin holds.
    f.create("vol").await;
    let content = f.dir.path().join("content");
    std::fs::write(&content, b"held by the origin").unwrap();
    f.put(0, "vol", &content, "c", false).await.unwrap();
    let hash = voltool_protocol::Hash::of(b"held by the origin");
    let ids: Vec<[u8; 32]> = (0..3)
        .map(|i| {
            *voltool_agent::keys::load_or_create(&f.agent_dir(i))
                .unwrap()
                .public()
                .as_bytes()
        })
        .collect();
    for i in [1, 2] {
        let c = f.client_as(i).await;
        let r = c
            .request(&CoordRequest::Announce {
                addr: format!("127.0.0.{}:9", i + 1).parse().unwrap(),
                zone: None,
                blobs: vec![hash],
                complete: true,
            })
            .await
            .unwrap();
        assert_eq!(r, CoordResponse::Ok);
    }
    let asker = f.client_as(0).await;
    // Round-trip times count for members the tracker knows (the agent's own heartbeat may
    // not have arrived yet).
    let r = asker
        .request(&CoordRequest::Heartbeat {
            addr: "127.0.0.1:9".parse().unwrap(),
            zone: None,
        })
        .await
        .unwrap();
    assert!(matches!(r, CoordResponse::Tracked { .. }), "{r:?}");
    for (near, far) in [(1usize, 2usize), (2, 1)] {
        let r = asker
            .request(&CoordRequest::Rtts {
                rtts: vec![
                    PeerRtt {
                        id: ids[near],
                        micros: 300,
                    },
                    PeerRtt {
                        id: ids[far],
                        micros: 40_000,
                    },
                ],
            })
            .await
            .unwrap();
        assert_eq!(r, CoordResponse::Ok);
        // Both are complete holders in no zone: only the round-trip time orders them
        // (within a band the order would be random, so ask several times).
        for _ in 0..8 {
            let p = providers(&asker, hash).await;
            let order: Vec<[u8; 32]> = p.iter().filter(|p| !p.origin).map(|p| p.id).collect();
            assert_eq!(order, vec![ids[near], ids[far]]);
        }
    }
    // Too many entries are refused with a clear error.
    let many = vec![
        PeerRtt {
            id: ids[1],
            micros: 1
        };
        voltool_protocol::coord::MAX_RTTS + 1
    ];
    let e = asker
        .request(&CoordRequest::Rtts { rtts: many })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 4096"), "{e}");
}

/// What the tracker answers `client`'s lookup of `hash` with.
async fn providers(
    client: &voltool_agent::coord_client::CoordClient,
    hash: voltool_protocol::Hash,
) -> Vec<voltool_protocol::coord::ProviderInfo> {
    use voltool_protocol::coord::{CoordRequest, CoordResponse};
    match client
        .request(&CoordRequest::Lookup { hash })
        .await
        .unwrap()
    {
        CoordResponse::Providers(p) => p,
        other => panic!("not a provider list: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_is_banned_once_across_blobs_and_left_out_once_reported_by_two() {
    use voltool_protocol::coord::{CoordRequest, CoordResponse};
    let mut f = TestFleet::start(3).await;
    f.make_liar(0).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    f.mount(1, "vol").await;
    // Three large blobs and a few small ones: the ban holds across all of them.
    let mut hashes = Vec::new();
    for k in 0..3u8 {
        let data = bytes(20 + k, 3 << 20);
        hashes.push(voltool_protocol::Hash::of(&data));
        std::fs::write(a.join(format!("shard-{k}.bin")), data).unwrap();
    }
    for k in 0..4u8 {
        std::fs::write(a.join(format!("small-{k}.json")), bytes(40 + k, 5000)).unwrap();
    }
    f.commit(0, "vol").await.unwrap();

    let r = f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    let liar = f.agents[0].addr().id;
    assert_eq!(
        r.sources.banned,
        vec![liar.to_string()],
        "one ban for the whole reload: {r:?}"
    );
    assert_eq!(
        r.sources.peer_bytes, 0,
        "no byte of the liar was kept: {r:?}"
    );
    assert_eq!(tree(&f.mount_path(1)), tree(&a));

    // Agent 1 reported the liar; one more member's report makes the tracker leave it out,
    // but only a report with evidence: the reporter was handed the liar for that blob.
    let witness = f.client_as(2).await;
    let report = CoordRequest::Report {
        provider: *liar.as_bytes(),
        hash: hashes[0],
    };
    assert_eq!(witness.request(&report).await.unwrap(), CoordResponse::Ok);
    let p = providers(&witness, hashes[0]).await;
    assert!(
        p.iter().any(|p| p.id == *liar.as_bytes()),
        "a report with no evidence counted: {p:?}"
    );
    let r = witness.request(&report).await.unwrap();
    assert_eq!(r, CoordResponse::Ok);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let p = providers(&witness, hashes[0]).await;
        if p.iter().all(|p| p.id != *liar.as_bytes()) {
            // Agent 1 and the origin still are.
            assert!(p.iter().any(|p| p.origin), "{p:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tracker still hands out a provider two members reported: {p:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A restarted coordinator's tracker is rebuilt by the agents' announcements, and the
    // liar stays out: the distrust was recorded.
    f.stop_coordinator().await;
    f.start_coordinator().await;
    let honest = *f.agents[1].addr().id.as_bytes();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let p = providers(&witness, hashes[0]).await;
        assert!(
            p.iter().all(|p| p.id != *liar.as_bytes()),
            "a restart let the liar back in: {p:?}"
        );
        if p.iter().any(|p| p.id == honest) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted tracker never learnt of agent 1 again: {p:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
