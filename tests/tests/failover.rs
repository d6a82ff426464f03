//! Coordinators in failover over a real etcd cluster (three members) and a real S3 origin
//! (Garage): one leads, the others wait; heads are signed by the fleet key they share; a
//! leader whose lease ended writes nothing. None depends on the snapshot mode.

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use voltool_agent::control::Request;
use voltool_agent::coord_client::CoordClient;
use voltool_agent::net::NodeAddr;
use voltool_coordinator::meta::EtcdUrl;
use voltool_coordinator::{Coordinator, CoordinatorOptions, Hooks, MetaOptions};
use voltool_protocol::coord::{CoordRequest, CoordResponse, ErrorKind};
use voltool_protocol::{SecretKey, SignedHead};
use voltool_tests::etcd::EtcdCluster;
use voltool_tests::garage::Garage;

/// A fleet's shared parts: etcd, the bucket, the fleet key (a file, as an operator makes it).
struct Shared {
    etcd: EtcdCluster,
    garage: Garage,
    dir: tempfile::TempDir,
    fleet: SecretKey,
}

impl Shared {
    fn start() -> Self {
        let dir = voltool_tests::test_dir();
        let fleet = SecretKey::from_bytes(&[42; 32]);
        let file = dir.path().join("fleet.key");
        std::fs::write(&file, hex::encode(fleet.to_bytes())).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        Shared {
            etcd: EtcdCluster::start(3),
            garage: Garage::start(),
            dir,
            fleet,
        }
    }

    /// Coordinator `name`'s options: its own data directory and node key, the fleet's
    /// state, origin and key.
    fn options(&self, name: &str, ttl: Duration) -> CoordinatorOptions {
        let url: EtcdUrl = self.etcd.meta_url("fleet").parse().unwrap();
        CoordinatorOptions {
            s3: Some(self.garage.origin("fleet")),
            meta: MetaOptions::Etcd {
                url,
                tls: None,
                lease_ttl: ttl,
            },
            fleet_key: Some(self.dir.path().join("fleet.key")),
            ..CoordinatorOptions::new(self.dir.path().join(name))
        }
    }
}

async fn client(addrs: Vec<NodeAddr>) -> CoordClient {
    let key = SecretKey::from_bytes(&rand::random());
    let ep = voltool_agent::net::bind(
        key,
        "127.0.0.1:0".parse().unwrap(),
        vec![],
        Default::default(),
    )
    .await
    .unwrap();
    CoordClient::with_addrs(ep, addrs)
}

async fn create(c: &CoordClient, name: &str) -> SignedHead {
    match c
        .request(&CoordRequest::CreateVolume { name: name.into() })
        .await
        .unwrap()
    {
        CoordResponse::Volume(v) => v.head,
        other => panic!("creating {name}: {other:?}"),
    }
}

/// A client that knows both coordinators (as an agent given every `--coordinator`) is
/// refused at once by the one that does not lead and served by the leader; after the
/// leader steps down, the same client reaches the new leader, which has the fleet's state.
/// The fleet's state in `etcd` under `fleet/`, on a 2 s lease.
/// A three-member etcd cluster, a Garage origin, and a fleet of `agents` agents whose
/// coordinator runs in failover over them with `standbys` standbys' options made.
async fn ha_fleet(
    agents: usize,
    standbys: usize,
) -> (EtcdCluster, Garage, voltool_tests::TestFleet) {
    let etcd = EtcdCluster::start(3);
    let garage = Garage::start();
    let f = voltool_tests::TestFleet::start_ha(
        agents,
        garage.origin("fleet"),
        ha_meta(&etcd),
        standbys,
        Default::default(),
        Default::default(),
    )
    .await;
    (etcd, garage, f)
}

fn ha_meta(etcd: &EtcdCluster) -> MetaOptions {
    MetaOptions::Etcd {
        url: etcd.meta_url("fleet").parse().unwrap(),
        tls: None,
        lease_ttl: Duration::from_secs(2),
    }
}

/// A pause: who hears that it began, and what ends it.
type Pause = (mpsc::Sender<()>, mpsc::Receiver<()>);

/// Where a pause hook waits to be armed.
type Armed = Arc<Mutex<Option<Pause>>>;

/// A hook that does nothing until armed ([`arm`]); armed, it pauses once where it is
/// called: it says so, then waits to be let go.
fn pause_hook() -> (Armed, Arc<dyn Fn() + Send + Sync>) {
    let armed: Armed = Default::default();
    let hook = {
        let armed = armed.clone();
        move || {
            let taken = armed.lock().unwrap().take();
            if let Some((paused, resume)) = taken {
                paused.send(()).unwrap();
                resume.recv().unwrap();
            }
        }
    };
    (armed, Arc::new(hook))
}

/// Arms a pause hook; returns what hears that it paused and what lets it go.
fn arm(armed: &Mutex<Option<Pause>>) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (paused_tx, paused_rx) = mpsc::channel();
    let (resume_tx, resume_rx) = mpsc::channel();
    *armed.lock().unwrap() = Some((paused_tx, resume_rx));
    (paused_rx, resume_tx)
}

/// Waits (bounded) until an armed hook paused, naming where.
async fn until_paused(paused: mpsc::Receiver<()>, where_: &str) {
    tokio::task::spawn_blocking(move || paused.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("the leader never paused {where_}"));
}

/// Ends the leader's lease at etcd, as a pause past it would; waits (bounded) until the
/// old leader sees it.
async fn end_the_lease(etcd: &EtcdCluster, old: &Coordinator) {
    etcd.ctl(&["lease", "revoke", &leaders_lease(etcd)]);
    tokio::time::timeout(Duration::from_secs(10), old.lead_lost())
        .await
        .expect("the old leader sees its lease gone");
}

/// The lease of the leader of the fleet under `fleet/`: the election's keys are
/// `fleet/leader/<lease in hex>`, and the leader's is the one made first (candidates'
/// keys hold leases too).
fn leaders_lease(etcd: &EtcdCluster) -> String {
    let keys = etcd.ctl(&[
        "get",
        "--prefix",
        "fleet/leader/",
        "--sort-by=CREATE",
        "--order=ASCEND",
        "--keys-only",
        "--limit=1",
    ]);
    let key = keys
        .lines()
        .find(|l| !l.trim().is_empty())
        .expect("a leader key");
    key.trim().rsplit('/').next().unwrap().to_string()
}

/// Waits (bounded) until a standby leads.
async fn takes_over(
    standby: tokio::task::JoinHandle<Result<Coordinator, voltool_coordinator::CoordinatorError>>,
) -> Coordinator {
    tokio::time::timeout(Duration::from_secs(30), standby)
        .await
        .expect("the standby takes over")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_waits_and_takes_over_the_fleet_when_the_leader_steps_down() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let shared = Shared::start();
    let ttl = Duration::from_secs(2);
    let a = Coordinator::start(shared.options("a", ttl)).await.unwrap();
    // The second campaigns, on an address and with a node key known beforehand: it
    // refuses every connection while the first leads.
    let b_addr = NodeAddr {
        id: voltool_tests::seed_key(&shared.dir.path().join("b"), 0xB0),
        addr: std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap(),
    };
    let mut b = tokio::spawn(Coordinator::start(CoordinatorOptions {
        listen: b_addr.addr,
        ..shared.options("b", ttl)
    }));
    let c = client(vec![b_addr.clone(), a.addr()]).await;
    let head = create(&c, "v").await;
    assert_eq!(c.addr(), a.addr(), "served by the leader");
    // Heads are the fleet's: signed by the fleet key, not by either coordinator's node key.
    head.verify(&shared.fleet.public()).unwrap();
    assert_ne!(a.addr().id, shared.fleet.public());
    assert!(
        futures_lite::future::poll_once(&mut b).await.is_none(),
        "b serves while a leads"
    );
    a.shutdown().await;
    // a stepped down: b leads now (well within the lease: a resigned).
    let b = tokio::time::timeout(Duration::from_secs(30), b)
        .await
        .expect("b takes over")
        .unwrap()
        .unwrap();
    assert_eq!(b.addr(), b_addr);
    match c
        .request(&CoordRequest::GetHead { name: "v".into() })
        .await
        .unwrap()
    {
        CoordResponse::Volume(v) => assert_eq!(v.head, head),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.addr(), b_addr, "the same client moved to the new leader");
    create(&c, "w")
        .await
        .verify(&shared.fleet.public())
        .unwrap();
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_ended_writes_nothing_and_stops() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let shared = Shared::start();
    let a = Coordinator::start(shared.options("a", Duration::from_secs(2)))
        .await
        .unwrap();
    let ca = client(vec![a.addr()]).await;
    create(&ca, "v").await;
    // As if a had been paused past its lease: etcd ends the lease under it.
    shared
        .etcd
        .ctl(&["lease", "revoke", &leaders_lease(&shared.etcd)]);
    // Whatever a still believes, its write is refused: the fence is gone.
    let r = ca
        .request(&CoordRequest::CreateVolume { name: "x".into() })
        .await;
    match r {
        Ok(CoordResponse::Error { kind, message }) => {
            assert_eq!(kind, ErrorKind::Internal, "{message}");
            assert!(message.contains("no longer the leader"), "{message}");
        }
        // It may already have stopped serving.
        Err(_) => {}
        Ok(other) => panic!("a wrote after its lease ended: {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(10), a.lead_lost())
        .await
        .expect("a sees it no longer leads");
    a.shutdown().await;
    assert!(
        !shared
            .etcd
            .ctl(&["get", "--prefix", "fleet/v/"])
            .contains("fleet/v/x"),
        "a volume was created by a leader without a lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_on_etcd_with_an_origin_in_a_directory_are_refused() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let shared = Shared::start();
    let opts = CoordinatorOptions {
        s3: None,
        ..shared.options("a", Duration::from_secs(2))
    };
    let e = Coordinator::start(opts).await.unwrap_err().to_string();
    assert!(e.contains("--origin s3://"), "{e}");
}

/// Agents that know every coordinator of the fleet commit through the leader, and again
/// through the next one after the leader steps down, trusting the fleet key alone; a
/// mount made after the change of leader shows both commits (its pages and blobs, which
/// the first leader wrote, are the new leader's through the fleet's records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_given_every_coordinator_commit_and_mount_across_a_change_of_leader() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let (_etcd, _garage, mut f) = ha_fleet(2, 1).await;
    let standby = tokio::spawn(Coordinator::start(f.standby_options(0)));
    f.create("v").await;
    let m0 = f.mount(0, "v").await;
    std::fs::write(m0.join("a.txt"), "one").unwrap();
    let first = f.commit(0, "v").await.unwrap();
    // The leader steps down; the standby leads, on the address the agents knew.
    f.stop_coordinator().await;
    let b = takes_over(standby).await;
    assert_eq!(b.addr().id, f.standbys[0].id);
    f.coord = Some(b);
    std::fs::write(m0.join("b.txt"), "two").unwrap();
    let second = f.commit(0, "v").await.unwrap();
    assert_eq!(second.version, first.version + 1);
    let m1 = f.mount(1, "v").await;
    assert_eq!(std::fs::read_to_string(m1.join("a.txt")).unwrap(), "one");
    assert_eq!(std::fs::read_to_string(m1.join("b.txt")).unwrap(), "two");
}

/// A leader whose fence is gone while its lease lives on (its election key deleted behind
/// its back, as when another candidate took the lead in a race) refuses the write that
/// finds it so and stops leading at once, not when its lease would have told it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_finds_its_fence_gone_stops_leading_at_once() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let (etcd, _garage, f) = ha_fleet(1, 0).await;
    f.create("v").await;
    etcd.ctl(&["del", "--prefix", "fleet/leader/"]);
    let refused = f
        .req(
            0,
            Request::VolumeCreate {
                name: "w".into(),
                allow_existing: false,
            },
        )
        .await
        .unwrap_err();
    assert!(
        refused.message.contains("no longer the leader"),
        "{refused:?}"
    );
    // Its lease is renewed all along: only the fence says it lost the lead.
    tokio::time::timeout(
        Duration::from_secs(1),
        f.coord.as_ref().unwrap().lead_lost(),
    )
    .await
    .expect("the lead ends at once");
}

/// A standby names the leader: a client that knows only the standby's address reaches
/// the leader through it (the standby answers on its own protocol and closes with the
/// leader's address), and the standby serves nothing itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_names_the_leader_to_a_client_that_knows_only_the_standby() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let (_etcd, _garage, f) = ha_fleet(1, 1).await;
    let standby = tokio::spawn(Coordinator::start(f.standby_options(0)));
    f.create("v").await;
    // A raw try of the standby alone: it answers on the standby's protocol, then closes
    // with the leader's address.
    let ep = f.endpoint_as(0).await;
    let leader = f.coord.as_ref().unwrap().addr();
    let closed = loop {
        match voltool_agent::net::connect_offering(
            &ep,
            &f.standbys[0],
            voltool_protocol::coord::ALPN,
            &[voltool_protocol::coord::STANDBY_ALPN],
        )
        .await
        {
            Ok(conn) => {
                assert_eq!(conn.alpn(), voltool_protocol::coord::STANDBY_ALPN);
                break conn.closed().await;
            }
            // Not listening yet.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    match closed {
        iroh::endpoint::ConnectionError::ApplicationClosed(a) => {
            assert_eq!(
                a.error_code,
                voltool_protocol::coord::CLOSE_NOT_LEADER.into()
            );
            assert_eq!(std::str::from_utf8(&a.reason).unwrap(), leader.to_string());
        }
        other => panic!("{other:?}"),
    }
    // A client given only the standby reaches the leader.
    let client =
        voltool_agent::coord_client::CoordClient::with_addrs(ep, vec![f.standbys[0].clone()]);
    match client
        .request(&CoordRequest::GetHead { name: "v".into() })
        .await
        .unwrap()
    {
        CoordResponse::Volume(info) => assert_eq!(info.head.commit.version, 0),
        other => panic!("{other:?}"),
    }
    standby.abort();
}

/// The fence: the leader pauses just before its head transaction (a test hook), its lease
/// ends meanwhile and the standby takes over and commits; when the old leader resumes, its
/// transaction is refused, its writer hears so, and the heads form one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_before_its_head_moves_is_refused_after_a_takeover_and_no_head_forks() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let garage = Garage::start();
    let meta = ha_meta(&etcd);
    let (armed, hook) = pause_hook();
    let hooks = Hooks {
        before_head_moves: Some(hook),
        ..Default::default()
    };
    let mut f = voltool_tests::TestFleet::start_ha(
        2,
        garage.origin("fleet"),
        meta,
        1,
        hooks,
        Default::default(),
    )
    .await;
    let standby = tokio::spawn(Coordinator::start(f.standby_options(0)));
    f.create("v").await;
    let m0 = f.mount(0, "v").await;
    let m1 = f.mount(1, "v").await;
    std::fs::write(m0.join("a.txt"), "one").unwrap();
    let base = f.commit(0, "v").await.unwrap().version;
    // Agent 0's next commit stops in the leader just before the head moves.
    let (paused_rx, resume_tx) = arm(&armed);
    std::fs::write(m0.join("b.txt"), "from the old leader").unwrap();
    // Through agent 0's control socket, as `voltool commit` would.
    let run0 = f.run_dir(0);
    let stuck = tokio::spawn(async move {
        let req = Request::Commit {
            name: Some("v".into()),
        };
        voltool_agent::control::call(&run0, &req, |_| {})
            .await
            .unwrap()
    });
    until_paused(paused_rx, "before its head transaction").await;
    // Its lease ends while it is paused (as a GC pause or SIGSTOP past the lease would).
    let old = f.coord.take().unwrap();
    end_the_lease(&etcd, &old).await;
    let b = takes_over(standby).await;
    // The new leader commits agent 1's change.
    std::fs::write(m1.join("c.txt"), "from the new leader").unwrap();
    let c = f.commit(1, "v").await.unwrap();
    assert_eq!(c.version, base + 1);
    // The old leader resumes: its head transaction is refused.
    resume_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), stuck)
        .await
        .unwrap()
        .unwrap();
    let e = r.expect_err("the old leader's commit must not land");
    assert!(e.message.contains("no longer the leader"), "{e:?}");
    // One chain: the new leader's head, then agent 0's change, committed again through it.
    f.coord = Some(b);
    let again = f.commit(0, "v").await.unwrap();
    assert_eq!(again.version, base + 2);
    let client = f.client_as(0).await;
    let versions = match client
        .request(&CoordRequest::GetVersions {
            name: "v".into(),
            from: 0,
        })
        .await
        .unwrap()
    {
        CoordResponse::Versions { head, commits } => (head, commits),
        other => panic!("{other:?}"),
    };
    voltool_protocol::commit::verify_chain(&versions.0.commit, &versions.1).unwrap();
    assert_eq!(versions.0.commit.version, base + 2);
    old.shutdown().await;
}

/// GC under failover: the leader pauses in the middle of a collection, after condemning
/// blobs and before deleting their objects; its lease ends and the standby takes over. A
/// writer puts one of those blobs back at once: the new leader writes it only once the old
/// lead's lease surely ended. The old leader resumes and deletes nothing (its lease is
/// over); the blob stays readable, and the new leader's next collection finishes what the
/// old one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_in_the_middle_of_a_collection_deletes_nothing_after_a_takeover() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let garage = Garage::start();
    let meta = ha_meta(&etcd);
    let (armed, hook) = pause_hook();
    let hooks = Hooks {
        before_gc_deletes: Some(hook),
        ..Default::default()
    };
    let limits = voltool_tests::Limits {
        retention: voltool_coordinator::Retention {
            keep_versions: 1,
            grace: Duration::ZERO,
            interval: Duration::from_secs(3600),
        },
        ..Default::default()
    };
    let mut f =
        voltool_tests::TestFleet::start_ha(2, garage.origin("fleet"), meta, 1, hooks, limits).await;
    let standby = tokio::spawn(Coordinator::start(f.standby_options(0)));
    f.create("v").await;
    let m0 = f.mount(0, "v").await;
    let content = voltool_tests::bytes(7, 300_000);
    std::fs::write(m0.join("x.bin"), &content).unwrap();
    f.commit(0, "v").await.unwrap();
    std::fs::remove_file(m0.join("x.bin")).unwrap();
    f.commit(0, "v").await.unwrap();
    // The leader's collection condemns x.bin's blob and stops before deleting it.
    let (paused_rx, resume_tx) = arm(&armed);
    let old = Arc::new(f.coord.take().unwrap());
    let collecting = tokio::spawn({
        let old = old.clone();
        async move { old.collect_garbage().await }
    });
    until_paused(paused_rx, "before its collection's deletes").await;
    let marked = etcd.ctl(&["get", "--prefix", "--keys-only", "fleet/g/"]);
    assert!(!marked.trim().is_empty(), "nothing condemned");
    // Its lease ends while it is paused; the standby leads.
    end_the_lease(&etcd, &old).await;
    let b = takes_over(standby).await;
    f.coord = Some(b);
    // The writer puts the same bytes back at once, through the new leader.
    std::fs::write(m0.join("x.bin"), &content).unwrap();
    f.commit(0, "v").await.unwrap();
    // The old leader resumes: past its lease, it deletes nothing.
    resume_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), collecting)
        .await
        .unwrap()
        .unwrap();
    let e = r.expect_err("a collection past its lease stops");
    assert!(e.to_string().contains("lease"), "{e}");
    // The blob is there: another agent mounts the volume and reads it whole.
    let m1 = f.mount(1, "v").await;
    assert_eq!(std::fs::read(m1.join("x.bin")).unwrap(), content);
    // The new leader's collection finishes what the old one left: no mark stays.
    f.coord.as_ref().unwrap().collect_garbage().await.unwrap();
    let marked = etcd.ctl(&["get", "--prefix", "--keys-only", "fleet/g/"]);
    assert!(marked.trim().is_empty(), "marks left: {marked}");
    assert_eq!(std::fs::read(m1.join("x.bin")).unwrap(), content);
}

/// An etcd member killed and restarted while a fleet commits: a cluster of three keeps its
/// quorum, and every commit is acknowledged and in one chain; the leader keeps the lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_member_killed_and_restarted_during_commits_loses_nothing() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let (mut etcd, _garage, f) = ha_fleet(1, 0).await;
    f.create("v").await;
    let m0 = f.mount(0, "v").await;
    let mut versions = Vec::new();
    for (step, kill) in [(0, None), (1, Some(0)), (2, None), (3, Some(1)), (4, None)] {
        match kill {
            Some(i) => etcd.kill(i),
            None => {
                for i in 0..3 {
                    etcd.restart_if_down(i);
                }
            }
        }
        std::fs::write(m0.join(format!("f{step}.txt")), format!("step {step}")).unwrap();
        versions.push(f.commit(0, "v").await.unwrap().version);
    }
    assert!(
        versions.windows(2).all(|w| w[1] == w[0] + 1),
        "{versions:?}"
    );
    let lost = futures_lite::future::poll_once(f.coord.as_ref().unwrap().lead_lost()).await;
    assert!(lost.is_none(), "the leader lost the lead");
    let client = f.client_as(0).await;
    match client
        .request(&CoordRequest::GetVersions {
            name: "v".into(),
            from: 0,
        })
        .await
        .unwrap()
    {
        CoordResponse::Versions { head, commits } => {
            voltool_protocol::commit::verify_chain(&head.commit, &commits).unwrap();
            assert_eq!(head.commit.version, *versions.last().unwrap());
        }
        other => panic!("{other:?}"),
    }
}

/// A restore of the fleet's state from an etcd snapshot is a rollback: the commits after
/// the snapshot are gone from the coordinators, an agent that saw them refuses the older
/// head (its rollback protection) and stays on what it shows, an agent that did not goes on
/// from the restored head, and once new commits pass the newest version the first saw, it
/// reloads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_an_etcd_snapshot_is_a_rollback_that_agents_refuse_until_passed() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let (mut etcd, _garage, mut f) = ha_fleet(2, 0).await;
    f.create("v").await;
    let m0 = f.mount(0, "v").await;
    std::fs::write(m0.join("a.txt"), "kept").unwrap();
    let kept = f.commit(0, "v").await.unwrap().version;
    let snap = f.dir.path().join("etcd.snapshot");
    etcd.snapshot(&snap);
    std::fs::write(m0.join("b.txt"), "after the snapshot").unwrap();
    let seen = f.commit(0, "v").await.unwrap().version;
    assert_eq!(seen, kept + 1);
    // The cluster is lost and rebuilt from the snapshot; the coordinator starts on it.
    f.stop_coordinator().await;
    etcd.restore(&snap);
    f.start_coordinator().await;
    // Agent 0 saw version `seen`: the restored head is older, refused, and its mount stays.
    let e = f
        .reload(0, "v", voltool_agent::control::ReloadMode::Refuse)
        .await
        .expect_err("a rolled-back head must be refused");
    assert!(e.message.contains("rollback"), "{e:?}");
    assert_eq!(
        std::fs::read_to_string(m0.join("b.txt")).unwrap(),
        "after the snapshot"
    );
    // Agent 1 never saw it: it mounts the restored head and commits past it.
    let m1 = f.mount(1, "v").await;
    assert!(m1.join("a.txt").exists() && !m1.join("b.txt").exists());
    for (i, name) in ["c.txt", "d.txt"].iter().enumerate() {
        std::fs::write(m1.join(name), "new").unwrap();
        assert_eq!(f.commit(1, "v").await.unwrap().version, kept + 1 + i as u64);
    }
    // Past the newest version agent 0 saw, it reloads again (without the lost commit).
    f.reload(0, "v", voltool_agent::control::ReloadMode::Refuse)
        .await
        .unwrap();
    assert!(m0.join("c.txt").exists() && m0.join("d.txt").exists());
    assert!(!m0.join("b.txt").exists());
}
