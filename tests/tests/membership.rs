//! Membership without restarts: writers apart from readers, nodes added and removed while
//! the fleet runs, a removed node refused at once by the coordinator and by its peers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use voltool_agent::blobs::{FetchError, get_encoded};
use voltool_agent::control::{ErrorReply, ReloadMode, Request};
use voltool_protocol::blobs::GetHeader;
use voltool_protocol::{Hash, RangeList};
use voltool_tests::{TestFleet, bytes, tree};

fn refused(r: Result<impl std::fmt::Debug, ErrorReply>, what: &str) -> String {
    let e = r.expect_err(what);
    e.message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_read_writers_write_and_the_lists_change_without_a_restart() {
    let mut f = TestFleet::start(2).await;
    let everyone: HashSet<_> = (0..2).map(|i| f.agent_id(i)).collect();
    f.set_membership(everyone.clone(), Some([f.agent_id(0)].into()));
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    std::fs::write(a.join("w.bin"), bytes(1, 100_000)).unwrap();
    f.commit(0, "vol").await.unwrap();

    // A reader reloads, and may not commit, put or create.
    let b = f.mount(1, "vol").await;
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&b));
    std::fs::write(b.join("r.bin"), bytes(2, 100_000)).unwrap();
    let e = refused(f.commit(1, "vol").await, "a reader's commit");
    assert!(e.contains("may read but not write"), "{e}");
    let local = f.dir.path().join("local.txt");
    std::fs::write(&local, b"hello").unwrap();
    let e = refused(
        f.put(1, "vol", &local, "/hello.txt", false).await,
        "a reader's put",
    );
    assert!(e.contains("writers list"), "{e}");
    let e = refused(
        f.req(
            1,
            Request::VolumeCreate {
                name: "other".into(),
                allow_existing: false,
            },
        )
        .await,
        "a reader's volume create",
    );
    assert!(e.contains("writers list"), "{e}");

    // Made a writer while everything runs, it commits what it wrote.
    f.set_membership(everyone, Some([f.agent_id(0), f.agent_id(1)].into()));
    let c = f.commit(1, "vol").await.unwrap();
    assert_eq!(c.version, 2);
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(std::fs::read(a.join("r.bin")).unwrap(), bytes(2, 100_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_refused_at_once_and_one_added_joins_without_a_restart() {
    let mut f = TestFleet::start(3).await;
    let all: HashSet<_> = (0..3).map(|i| f.agent_id(i)).collect();
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    let content = bytes(3, 300_000);
    std::fs::write(a.join("m.bin"), &content).unwrap();
    f.commit(0, "vol").await.unwrap();
    f.mount(2, "vol").await;
    f.reload(2, "vol", ReloadMode::Refuse).await.unwrap();
    f.mount(1, "vol").await;

    // Agent 1's key fetches from agent 2, which holds the blob, on one connection.
    let ep = f.endpoint_as(1).await;
    let conn = voltool_agent::net::connect(&ep, &f.agents[2].addr(), voltool_protocol::blobs::ALPN)
        .await
        .unwrap();
    let (hash, size) = (Hash::of(&content), content.len() as u64);
    let first = RangeList(vec![(0, 16)]);
    get_encoded(&conn, hash, size, &first, 0, None)
        .await
        .expect("a member fetches from a peer");

    // Removed: the coordinator refuses its next request; its peer refuses its next
    // request on the connection already open, once the change has reached it (pushed).
    let mut without: HashSet<_> = all.clone();
    without.remove(&f.agent_id(1));
    f.set_membership(without, None);
    let e = refused(
        f.reload(1, "vol", ReloadMode::Refuse).await,
        "a removed node's reload",
    );
    assert!(e.contains("not a member"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get_encoded(&conn, hash, size, &first, 0, None).await {
            Err(FetchError::Refused(GetHeader::Forbidden)) => break,
            Ok(_) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "agent 2 still serves a removed node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Listed again, it reloads; and the peer serves it again on a new connection.
    f.set_membership(all, None);
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(tree(&a), tree(&f.mount_path(1)));
    // (A connection accepted before the change reached the peer stays refused: a new
    // one is admitted once it has.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn =
            voltool_agent::net::connect(&ep, &f.agents[2].addr(), voltool_protocol::blobs::ALPN)
                .await
                .unwrap();
        match get_encoded(&conn, hash, size, &first, 0, None).await {
            Ok(_) => break,
            Err(FetchError::Refused(GetHeader::Forbidden)) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "agent 2 refuses a node listed again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
