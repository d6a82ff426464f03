//! Fleet members that attack the others: a huge size in a subscription or a request, a
//! peer that holds every serving slot with requests it never reads, a frame prefix of 256
//! MiB, floods of announcements of blobs nobody holds, reports with no evidence, a writer
//! that stalls its commit. Each is a real endpoint holding a member's key (a stopped agent's)
//! that sends crafted requests; each attack meets a bound, the others are still served, and
//! the memory of the process (coordinator and agents run in it) grows by less than the
//! documented bound per peer (`voltool_protocol::coord`, `voltool_protocol::blobs`) + 64 MiB.
//! None of this depends on the snapshot mode: these run in the suite's first pass only.

use std::time::{Duration, Instant};

use iroh::Endpoint;
use iroh::endpoint::Connection;
use voltool_agent::control::ReloadMode;
use voltool_agent::net::{self, NodeAddr};
use voltool_protocol::blobs::{self, BlobRequest, GetHeader};
use voltool_protocol::coord::{self, CommitPart, CoordRequest, CoordResponse};
use voltool_protocol::{Change, Entry, Hash, RangeList, VolPath};
use voltool_tests::{Limits, TestFleet, bytes, mode_independent_pass};

/// Resident memory of this process (coordinator and agents included), bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

/// Fails unless memory grew by at most `per_peer` × `peers` + 64 MiB since `before`.
fn assert_bounded(what: &str, before: u64, per_peer: u64, peers: u64) {
    let grew = rss().saturating_sub(before);
    let bound = per_peer * peers + (64 << 20);
    eprintln!(
        "{what}: memory grew by {} MiB (bound {} MiB)",
        grew >> 20,
        bound >> 20
    );
    assert!(
        grew <= bound,
        "{what}: memory grew by {} MiB, bound {} MiB",
        grew >> 20,
        bound >> 20
    );
}

/// What the agent may hold for one peer (`voltool_protocol::blobs`): its streams' requests,
/// its connection's windows.
const AGENT_PER_PEER: u64 = blobs::MAX_PER_PEER_BYTES;
/// What the coordinator may hold for one member, the tracker aside (`voltool_protocol::coord`).
const COORD_PER_MEMBER: u64 = coord::MAX_PER_MEMBER_BYTES;

/// Stops the last `n` agents of `f` and returns an endpoint for each, holding its key: fleet
/// members that are no running agent.
async fn hostile(f: &mut TestFleet, n: usize) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for _ in 0..n {
        let i = f.agents.len() - 1;
        f.agents.remove(i).shutdown().await;
        out.push(f.endpoint_as(i).await);
    }
    out
}

/// Commits a file of `len` bytes on agent 0 and returns its hash.
async fn committed_file(f: &TestFleet, name: &str, seed: u8, len: usize) -> Hash {
    let data = bytes(seed, len);
    let mnt = f.mount_path(0);
    std::fs::write(mnt.join(name), &data).unwrap();
    f.commit(0, "vol").await.unwrap();
    Hash::of(&data)
}

async fn blob_conn(ep: &Endpoint, to: &NodeAddr) -> Connection {
    net::connect(ep, to, blobs::ALPN).await.unwrap()
}

/// Sends one blob request; its answer stream.
async fn ask(conn: &Connection, req: &BlobRequest) -> iroh::endpoint::RecvStream {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    net::write_frame(&mut send, req).await.unwrap();
    send.finish().unwrap();
    recv
}

/// The header answering a `Get`.
async fn header(conn: &Connection, req: &BlobRequest) -> GetHeader {
    net::read_frame(&mut ask(conn, req).await, blobs::MAX_RESPONSE)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_size_in_a_subscription_or_a_request_allocates_nothing() {
    if !mode_independent_pass() {
        return;
    }
    let mut f = TestFleet::start(3).await;
    f.create("vol").await;
    f.mount(0, "vol").await;
    let held = committed_file(&f, "big", 1, 3 << 20).await;
    let eps = hostile(&mut f, 1).await;
    let piece = 512u64 << 10;
    // The largest size a subscription can name: 2^32 - 1 pieces, a piece set of 512 MiB.
    let huge = u32::MAX as u64 * piece;
    let before = rss();
    for to in [f.agents[0].addr(), f.coord.as_ref().unwrap().addr()] {
        let conn = blob_conn(&eps[0], &to).await;
        for hash in [held, Hash([7; 32])] {
            for _ in 0..8 {
                let sub = BlobRequest::Subscribe {
                    hash,
                    size: huge,
                    piece_bytes: piece,
                };
                let mut recv = ask(&conn, &sub).await;
                let held_frame: Option<blobs::Held> =
                    net::read_frame_or_end(&mut recv, blobs::MAX_RESPONSE)
                        .await
                        .unwrap();
                assert!(held_frame.is_none(), "a subscription of a made-up size");
                let get = BlobRequest::Get {
                    hash,
                    size: huge,
                    ranges: RangeList(vec![(0, 1)]),
                    rank: 0,
                };
                assert_eq!(header(&conn, &get).await, GetHeader::NotFound);
            }
        }
    }
    assert_bounded("huge sizes", before, AGENT_PER_PEER + COORD_PER_MEMBER, 1);
    // The blob is still served at its own size.
    let conn = blob_conn(&eps[0], &f.agents[0].addr()).await;
    let get = BlobRequest::Get {
        hash: held,
        size: 3 << 20,
        ranges: RangeList(vec![(0, 1)]),
        rank: 0,
    };
    assert_eq!(header(&conn, &get).await, GetHeader::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_hogs_every_slot_leaves_room_for_the_others() {
    if !mode_independent_pass() {
        return;
    }
    let mut f = TestFleet::start(4).await;
    f.create("vol").await;
    f.mount(0, "vol").await;
    let size = 32u64 << 20;
    let hash = committed_file(&f, "big", 2, size as usize).await;
    let eps = hostile(&mut f, 2).await;
    let (hog, honest) = (&eps[0], &eps[1]);
    let provider = f.agents[0].addr();
    let before = rss();
    // The hog asks for the whole blob again and again, at the rank that goes first, and
    // never reads a byte.
    let conn = blob_conn(hog, &provider).await;
    let all = RangeList(vec![(0, size.div_ceil(1024))]);
    let mut held_open = Vec::new();
    for _ in 0..20 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let req = BlobRequest::Get {
            hash,
            size,
            ranges: all.clone(),
            rank: 0,
        };
        net::write_frame(&mut send, &req).await.unwrap();
        send.finish().unwrap();
        held_open.push(recv);
    }
    // Another peer, far along, is served within 30 s, and gets its piece whole.
    let started = Instant::now();
    let conn = blob_conn(honest, &provider).await;
    let piece = blobs::piece_ranges(size, 512 << 10, 3);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = BlobRequest::Get {
        hash,
        size,
        ranges: piece,
        rank: 900,
    };
    net::write_frame(&mut send, &req).await.unwrap();
    send.finish().unwrap();
    let header: GetHeader = tokio::time::timeout(
        Duration::from_secs(30),
        net::read_frame(&mut recv, blobs::MAX_RESPONSE),
    )
    .await
    .expect("served within 30 s")
    .unwrap();
    assert_eq!(header, GetHeader::Ok, "after {:?}", started.elapsed());
    let body = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(4 << 20))
        .await
        .expect("the piece within 30 s")
        .unwrap();
    assert!(body.len() >= 512 << 10, "{} bytes", body.len());
    assert_bounded("slot hogging", before, AGENT_PER_PEER, 2);
    drop(held_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_prefix_of_256_mib_is_refused_before_a_byte_of_it_is_kept() {
    if !mode_independent_pass() {
        return;
    }
    let mut f = TestFleet::start(3).await;
    // Only agent 0 may write: the attacker is a reader.
    let writers = [f.agent_id(0)].into_iter().collect();
    let members = (0..3).map(|i| f.agent_id(i)).collect();
    f.set_membership(members, Some(writers));
    let eps = hostile(&mut f, 1).await;
    let coord_addr = f.coord.as_ref().unwrap().addr();
    let conn = net::connect(&eps[0], &coord_addr, coord::ALPN)
        .await
        .unwrap();
    let before = rss();
    let junk = vec![0xA5u8; 1 << 20];
    let mut refused = 0;
    for _ in 0..64 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&(256u32 << 20).to_le_bytes()).await.unwrap();
        // Then a MiB of the body, as fast as the coordinator takes it.
        let _ = tokio::time::timeout(Duration::from_secs(2), send.write_all(&junk)).await;
        // The coordinator drops the stream without an answer.
        let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
            .await
            .expect("the coordinator ends the stream");
        if answer.map_or(true, |b| b.is_empty()) {
            refused += 1;
        }
    }
    assert_eq!(refused, 64);
    assert_bounded("huge frame prefixes", before, COORD_PER_MEMBER, 1);
    // Others are still served.
    f.create("vol").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_announcements_of_blobs_nobody_holds_enters_nothing() {
    if !mode_independent_pass() {
        return;
    }
    let mut f = TestFleet::start(3).await;
    f.create("vol").await;
    f.mount(0, "vol").await;
    let real = committed_file(&f, "real", 3, 2 << 20).await;
    let eps = hostile(&mut f, 1).await;
    let coord = voltool_agent::coord_client::CoordClient::new(
        eps[0].clone(),
        f.coord.as_ref().unwrap().addr(),
    );
    let metrics = f.coord.as_ref().unwrap().metrics_addr().unwrap();
    let entries = || async {
        let (_, body) = voltool_tests::metrics::scrape(metrics, "/metrics").await;
        voltool_tests::metrics::value(&body, "voltool_tracker_entries")
    };
    let at_start = entries().await;
    let before = rss();
    let addr = "127.0.0.1:9".parse().unwrap();
    let mut seed = 0u64;
    for _ in 0..64 {
        let blobs: Vec<Hash> = (0..coord::MAX_HAS)
            .map(|_| {
                seed += 1;
                Hash(*blake3::hash(&seed.to_le_bytes()).as_bytes())
            })
            .collect();
        let req = CoordRequest::Announce {
            addr,
            zone: None,
            blobs,
            complete: true,
        };
        assert_eq!(coord.request(&req).await.unwrap(), CoordResponse::Ok);
    }
    // A million hashes announced; none entered. A blob the origin holds is.
    assert_eq!(entries().await, at_start);
    assert_bounded("announce flood", before, COORD_PER_MEMBER, 1);
    let req = CoordRequest::Announce {
        addr,
        zone: None,
        blobs: vec![real],
        complete: true,
    };
    coord.request(&req).await.unwrap();
    assert_eq!(entries().await, at_start + 1.0);
    // Too many in one, or a zone label past 64 bytes: refused by name.
    for (blobs, zone, why) in [
        (vec![real; coord::MAX_HAS + 1], None, "too many"),
        (vec![real], Some("z".repeat(65)), "zone label"),
    ] {
        let req = CoordRequest::Announce {
            addr,
            zone,
            blobs,
            complete: true,
        };
        let e = coord.request(&req).await.unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
    // A zone of 65 MiB does not even reach the coordinator's decoder.
    let req = CoordRequest::Heartbeat {
        addr,
        zone: Some("z".repeat(65 << 20)),
    };
    assert!(coord.request(&req).await.is_err());
    // The fleet still fetches.
    f.mount(1, "vol").await;
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
}

/// Whether a lookup of `hash` by `c` names `provider` (it is then handed to `c`).
async fn handed(
    c: &voltool_agent::coord_client::CoordClient,
    hash: Hash,
    provider: iroh::EndpointId,
) -> bool {
    match c.request(&CoordRequest::Lookup { hash }).await.unwrap() {
        CoordResponse::Providers(p) => p.iter().any(|p| p.id == *provider.as_bytes()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_without_evidence_leave_an_honest_provider_in_the_answers() {
    if !mode_independent_pass() {
        return;
    }
    let mut f = TestFleet::start(4).await;
    f.create("vol").await;
    f.mount(0, "vol").await;
    let hash = committed_file(&f, "big", 4, 3 << 20).await;
    let honest = f.agents[0].addr().id;
    let eps = hostile(&mut f, 2).await;
    let coord_addr = f.coord.as_ref().unwrap().addr();
    let forgers: Vec<_> = eps
        .iter()
        .map(|ep| voltool_agent::coord_client::CoordClient::new(ep.clone(), coord_addr.clone()))
        .collect();
    // Reports with no lookup before them, then reports for a blob it never announced.
    for c in &forgers {
        let r = CoordRequest::Report {
            provider: *honest.as_bytes(),
            hash,
        };
        assert_eq!(c.request(&r).await.unwrap(), CoordResponse::Ok);
    }
    for c in &forgers {
        assert!(
            handed(c, hash, honest).await,
            "the honest provider was left out"
        );
        let r = CoordRequest::Report {
            provider: *honest.as_bytes(),
            hash: Hash([9; 32]),
        };
        assert_eq!(c.request(&r).await.unwrap(), CoordResponse::Ok);
    }
    assert!(
        handed(&forgers[0], hash, honest).await,
        "the honest provider was left out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_committer_holds_the_commit_lock_for_a_bounded_time() {
    if !mode_independent_pass() {
        return;
    }
    let deadline = Duration::from_secs(3);
    let mut f = TestFleet::start_with(
        3,
        Limits {
            commit_deadline: Some(deadline),
            ..Limits::default()
        },
    )
    .await;
    f.create("vol").await;
    f.mount(0, "vol").await;
    let eps = hostile(&mut f, 1).await;
    let coord_addr = f.coord.as_ref().unwrap().addr();
    let client = voltool_agent::coord_client::CoordClient::new(eps[0].clone(), coord_addr.clone());
    let CoordResponse::Volume(info) = client
        .request(&CoordRequest::GetHead { name: "vol".into() })
        .await
        .unwrap()
    else {
        panic!("no volume");
    };
    let conn = net::connect(&eps[0], &coord_addr, coord::ALPN)
        .await
        .unwrap();
    let commit = CoordRequest::Commit {
        name: "vol".into(),
        volume: info.id,
        base_version: info.head.commit.version,
    };
    // An empty part that is not the last is refused at once.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    net::write_frame(&mut send, &commit).await.unwrap();
    let empty = CommitPart {
        changes: vec![],
        priors: vec![],
        last: false,
    };
    net::write_frame(&mut send, &empty).await.unwrap();
    let r: CoordResponse = net::read_frame(&mut recv, coord::MAX_RESPONSE)
        .await
        .unwrap();
    assert!(format!("{r:?}").contains("empty part"), "{r:?}");
    // A commit that sends one small part a second and never its last.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    net::write_frame(&mut send, &commit).await.unwrap();
    let stall = tokio::spawn(async move {
        for k in 0..60u32 {
            let part = CommitPart {
                changes: vec![Change {
                    path: VolPath::new(&format!("d{k}")).unwrap(),
                    entry: Some(Entry::Dir { mode: 0o755 }),
                }],
                priors: vec![None],
                last: false,
            };
            if net::write_frame(&mut send, &part).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let started = Instant::now();
    std::fs::write(f.mount_path(0).join("mine"), b"mine").unwrap();
    f.commit(0, "vol").await.unwrap();
    assert!(
        started.elapsed() < deadline + Duration::from_secs(30),
        "another writer waited {:?}",
        started.elapsed()
    );
    let r: CoordResponse = net::read_frame(&mut recv, coord::MAX_RESPONSE)
        .await
        .unwrap();
    assert!(format!("{r:?}").contains("within 3 s"), "{r:?}");
    stall.abort();
}
