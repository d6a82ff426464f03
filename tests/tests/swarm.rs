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
