//! A model-based test of the coordinator's state ([`Meta`]): random sequences of writes are
//! applied to an implementation and to a reference built of `BTreeMap`s, and every read is
//! compared after every step, for redb and for etcd (a real three-member cluster). Then
//! what each implementation adds: durability, the refusal of an old format, the fence.
//! None depends on the snapshot mode: they run in one pass of the suite.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use voltool_coordinator::meta::{
    EtcdMeta, EtcdTls, EtcdUrl, Fence, LinkEntry, LinkUpdate, Meta, MetaError, RedbMeta,
    VolumeRecord,
};
use voltool_protocol::{Commit, Hash, SecretKey, SignedHead, VolumeId};
use voltool_tests::etcd::EtcdCluster;

const NAMES: &[&str] = &["alpha", "beta", "gamma"];
const PATHS: &[&str] = &["a", "a/b", "a/b/c", "a0", "d", "d/e", "z"];
const NODES: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Create(usize),
    Rename(usize, usize),
    Delete(usize),
    /// Moves a volume's head by `skip` versions past the next one (0: the next one), with
    /// new index entries for some links (`None`: no link any more).
    MoveHead {
        vol: usize,
        skip: u64,
        links: Vec<(usize, Option<BTreeSet<usize>>)>,
    },
    DropVersions(usize, u64),
    Distrust(usize, u64),
    ForgetDistrust(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    let links = prop::collection::vec(
        (
            0..PATHS.len(),
            prop::option::weighted(0.8, prop::collection::btree_set(0..PATHS.len(), 0..3)),
        ),
        0..4,
    );
    prop_oneof![
        2 => n.clone().prop_map(Op::Create),
        1 => (n.clone(), n.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => n.clone().prop_map(Op::Delete),
        4 => (n.clone(), prop::sample::select(vec![0u64, 0, 0, 1, 2]), links)
            .prop_map(|(vol, skip, links)| Op::MoveHead { vol, skip, links }),
        1 => (n.clone(), 0u64..6).prop_map(|(v, f)| Op::DropVersions(v, f)),
        1 => (0..NODES, 0u64..10).prop_map(|(n, u)| Op::Distrust(n, u)),
        1 => (0u64..10).prop_map(Op::ForgetDistrust),
    ]
}

/// The reference: what each read must return.
#[derive(Default, Debug)]
struct Model {
    volumes: BTreeMap<String, VolumeRecord>,
    heads: BTreeMap<VolumeId, SignedHead>,
    versions: BTreeMap<(VolumeId, u64), Commit>,
    links: BTreeMap<(VolumeId, String), Vec<String>>,
    indexed: BTreeMap<VolumeId, u64>,
    distrust: BTreeMap<[u8; 32], u64>,
    /// Every volume id ever made (deleted ones too: their reads must be empty).
    ids: BTreeSet<VolumeId>,
}

impl Model {
    fn deps(&self, id: VolumeId, path: &str) -> Vec<String> {
        let set: BTreeSet<String> = self
            .links
            .iter()
            .filter(|((v, _), looked)| *v == id && looked.iter().any(|p| p == path))
            .map(|((_, l), _)| l.clone())
            .collect();
        set.into_iter().collect()
    }
}

fn key() -> SecretKey {
    SecretKey::from_bytes(&[7; 32])
}

fn head(id: VolumeId, version: u64, seq: u64) -> SignedHead {
    Commit {
        volume: id,
        version,
        parent: (version > 0).then(|| Hash::of(format!("parent {version}").as_bytes())),
        manifest: Hash::of(format!("manifest {seq}").as_bytes()),
        manifest_size: seq,
        author: [1; 32],
        time_ms: seq,
    }
    .sign(&key())
}

fn node(n: usize) -> [u8; 32] {
    [n as u8 + 1; 32]
}

/// Applies `ops` to `meta` (empty at the start) and to the reference, comparing every read
/// after each step.
fn check(meta: &dyn Meta, ops: &[Op]) {
    let mut m = Model::default();
    for (seq, op) in ops.iter().enumerate() {
        let seq = seq as u64;
        match op {
            Op::Create(n) => {
                let name = NAMES[*n];
                let rec = VolumeRecord {
                    id: VolumeId([seq as u8 + 1; 16]),
                    created_ms: seq,
                };
                let h = head(rec.id, 0, seq);
                let r = meta.create(name, rec, &h);
                if m.volumes.contains_key(name) {
                    assert!(matches!(r, Err(MetaError::Exists(_))), "{op:?}: {r:?}");
                } else {
                    r.unwrap();
                    m.ids.insert(rec.id);
                    m.volumes.insert(name.to_string(), rec);
                    m.versions.insert((rec.id, 0), h.commit.clone());
                    m.heads.insert(rec.id, h);
                }
            }
            Op::Rename(a, b) => {
                let (a, b) = (NAMES[*a], NAMES[*b]);
                let r = meta.rename(a, b);
                match (m.volumes.get(a).copied(), m.volumes.contains_key(b)) {
                    (None, _) => assert!(matches!(r, Err(MetaError::NoVolume(_))), "{op:?}: {r:?}"),
                    (Some(_), true) => {
                        assert!(matches!(r, Err(MetaError::Exists(_))), "{op:?}: {r:?}")
                    }
                    (Some(rec), false) => {
                        r.unwrap();
                        m.volumes.remove(a);
                        m.volumes.insert(b.to_string(), rec);
                    }
                }
            }
            Op::Delete(n) => {
                let name = NAMES[*n];
                let r = meta.delete(name);
                match m.volumes.remove(name) {
                    None => assert!(matches!(r, Err(MetaError::NoVolume(_))), "{op:?}: {r:?}"),
                    Some(rec) => {
                        assert_eq!(r.unwrap(), rec);
                        m.heads.remove(&rec.id);
                        m.versions.retain(|(v, _), _| *v != rec.id);
                        m.links.retain(|(v, _), _| *v != rec.id);
                        m.indexed.remove(&rec.id);
                    }
                }
            }
            Op::MoveHead { vol, skip, links } => {
                let Some(rec) = m.volumes.get(NAMES[*vol]).copied() else {
                    continue;
                };
                let id = rec.id;
                let now = m.heads[&id].commit.version;
                let h = head(id, now + 1 + skip, seq);
                let mut update = LinkUpdate::default();
                let mut seen = BTreeSet::new();
                for (l, new) in links {
                    if !seen.insert(*l) {
                        continue;
                    }
                    let link = PATHS[*l].to_string();
                    update.entries.push(LinkEntry {
                        old: m.links.get(&(id, link.clone())).cloned(),
                        new: new
                            .as_ref()
                            .map(|s| s.iter().map(|p| PATHS[*p].to_string()).collect()),
                        link,
                    });
                }
                let r = meta.move_head(&h, &update, &[]);
                if *skip > 0 {
                    assert!(
                        matches!(r, Err(MetaError::HeadMoved { now: Some(v), .. }) if v == now),
                        "{op:?}: {r:?}"
                    );
                    continue;
                }
                r.unwrap();
                for e in update.entries {
                    match e.new {
                        Some(new) => m.links.insert((id, e.link), new),
                        None => m.links.remove(&(id, e.link)),
                    };
                }
                m.indexed.insert(id, h.commit.version);
                m.versions.insert((id, h.commit.version), h.commit.clone());
                m.heads.insert(id, h);
            }
            Op::DropVersions(n, first) => {
                let Some(rec) = m.volumes.get(NAMES[*n]).copied() else {
                    continue;
                };
                let before = m.versions.len();
                m.versions.retain(|(v, n), _| *v != rec.id || n >= first);
                let dropped = (before - m.versions.len()) as u64;
                assert_eq!(
                    meta.drop_versions(rec.id, *first).unwrap(),
                    dropped,
                    "{op:?}"
                );
            }
            Op::Distrust(n, until) => {
                meta.distrust(node(*n), *until).unwrap();
                m.distrust.insert(node(*n), *until);
            }
            Op::ForgetDistrust(now) => {
                meta.forget_distrust(*now).unwrap();
                m.distrust.retain(|_, u| *u > *now);
            }
        }
        compare(meta, &m, op);
    }
}

fn compare(meta: &dyn Meta, m: &Model, op: &Op) {
    let volumes: Vec<(String, VolumeRecord)> =
        m.volumes.iter().map(|(n, r)| (n.clone(), *r)).collect();
    assert_eq!(meta.volumes().unwrap(), volumes, "after {op:?}");
    for name in NAMES {
        assert_eq!(meta.volume(name).unwrap(), m.volumes.get(*name).copied());
    }
    let mut heads = meta.heads().unwrap();
    heads.sort_by_key(|h| h.commit.volume);
    assert_eq!(
        heads,
        m.heads.values().cloned().collect::<Vec<_>>(),
        "after {op:?}"
    );
    // Every id ever made, deleted ones too (their reads are empty), and one never made.
    let never = VolumeId([0xff; 16]);
    for &id in m.ids.iter().chain([&never]) {
        assert_eq!(meta.head(id).unwrap().as_ref(), m.heads.get(&id));
        let top = m.heads.get(&id).map_or(3, |h| h.commit.version + 2);
        let want: Vec<Option<Commit>> = (0..top)
            .map(|v| m.versions.get(&(id, v)).cloned())
            .collect();
        assert_eq!(
            meta.commits(id, 0..top).unwrap(),
            want,
            "versions of {id} after {op:?}"
        );
        assert_eq!(meta.links_indexed(id).unwrap(), m.indexed.get(&id).copied());
        let links: Vec<(String, Vec<String>)> = m
            .links
            .iter()
            .filter(|((v, _), _)| *v == id)
            .map(|((_, l), looked)| (l.clone(), looked.clone()))
            .collect();
        assert_eq!(meta.has_links(id).unwrap(), !links.is_empty());
        assert_eq!(meta.links(id).unwrap(), links, "links of {id} after {op:?}");
        for p in PATHS {
            assert_eq!(
                meta.link(id, p).unwrap(),
                m.links.get(&(id, p.to_string())).cloned()
            );
            assert_eq!(meta.link_deps(id, p).unwrap(), m.deps(id, p), "deps of {p}");
            let below: Vec<String> = links
                .iter()
                .filter(|(l, _)| l.starts_with(&format!("{p}/")))
                .map(|(l, _)| l.clone())
                .collect();
            assert_eq!(meta.links_below(id, p).unwrap(), below, "below {p}");
        }
    }
    let distrust: Vec<([u8; 32], u64)> = m.distrust.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(meta.distrusted().unwrap(), distrust, "after {op:?}");
}

#[test]
fn redb_state_matches_the_model() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    proptest!(ProptestConfig::with_cases(64), |(ops in prop::collection::vec(op(), 1..40))| {
        let dir = voltool_tests::test_dir();
        let meta = RedbMeta::open(&dir.path().join("coordinator.redb")).unwrap();
        check(&meta, &ops);
    });
}

fn etcd_meta(cluster: &EtcdCluster, prefix: &str) -> EtcdMeta {
    let url: EtcdUrl = cluster.meta_url(prefix).parse().unwrap();
    EtcdMeta::connect(&url, None).unwrap()
}

/// Writes while etcd's own raft leader is stopped (SIGSTOP), through a member that forwards
/// to it: an answer may be lost after the write reached a member ("request timed out,
/// possibly due to previous leader failure"), and the write may have landed or not. Its
/// mark settles which: every head lands, once, in one chain.
#[test]
fn etcd_writes_through_a_stopped_raft_leader_land_exactly_once() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let leader = cluster.raft_leader();
    // Through a follower, the others after it.
    let order: Vec<String> = (1..=3)
        .map(|k| cluster.endpoint((leader + k) % 3))
        .collect();
    let url: EtcdUrl = format!("etcd://{}/p", order.join(",")).parse().unwrap();
    let meta = EtcdMeta::connect(&url, None).unwrap();
    let id = VolumeId([9; 16]);
    meta.create("v", VolumeRecord { id, created_ms: 0 }, &head(id, 0, 0))
        .unwrap();
    cluster.pause(leader, true);
    let written: Vec<_> = std::thread::scope(|s| {
        s.spawn(|| {
            // Long enough for the others to elect a leader and for the write forwarded to
            // the stopped one to time out at the member (5 s and two elections).
            std::thread::sleep(std::time::Duration::from_secs(8));
            cluster.pause(leader, false);
        });
        (1..=3u64)
            .map(|v| meta.move_head(&head(id, v, v), &LinkUpdate::default(), &[]))
            .collect()
    });
    for (v, w) in written.iter().enumerate() {
        assert!(w.is_ok(), "version {}: {w:?}\n{}", v + 1, cluster.log());
    }
    assert_eq!(meta.head(id).unwrap().unwrap(), head(id, 3, 3));
    let commits = meta.commits(id, 0..4).unwrap();
    for (v, c) in commits.iter().enumerate() {
        assert_eq!(c.as_ref(), Some(&head(id, v as u64, v as u64).commit));
    }
}

/// Writes whose answers are lost, after they landed or before they were sent (as when
/// etcd's leader changes under them): each is settled by its mark, and lands once.
#[test]
fn etcd_writes_whose_answers_are_lost_are_settled_by_their_marks() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let cluster = EtcdCluster::start(1);
    let meta = etcd_meta(&cluster, "p");
    let id = VolumeId([9; 16]);
    let rec = VolumeRecord { id, created_ms: 0 };
    // A creation that landed, its answer lost: not refused as taken by itself.
    meta.lose_answers(1, 0);
    meta.create("v", rec, &head(id, 0, 0)).unwrap();
    // Heads that landed, or were never sent: each moves once, in order.
    meta.lose_answers(1, 1);
    for v in 1..=3u64 {
        meta.move_head(&head(id, v, v), &LinkUpdate::default(), &[])
            .unwrap();
    }
    assert_eq!(meta.head(id).unwrap().unwrap(), head(id, 3, 3));
    let commits = meta.commits(id, 0..4).unwrap();
    for (v, c) in commits.iter().enumerate() {
        assert_eq!(c.as_ref(), Some(&head(id, v as u64, v as u64).commit));
    }
    // Lost answers past the tries: the write fails and says so.
    meta.lose_answers(0, 3);
    let e = meta.rename("v", "w").unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
    assert!(meta.volume("w").unwrap().is_none());
}

/// etcd keeps every revision of every key until compacted: each call compacts what was
/// current at the call before, and the state stays whole.
#[test]
fn etcd_history_is_compacted_one_call_behind() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let cluster = EtcdCluster::start(1);
    let meta = etcd_meta(&cluster, "p");
    let id = VolumeId([3; 16]);
    meta.create("v", VolumeRecord { id, created_ms: 0 }, &head(id, 0, 0))
        .unwrap();
    let old_read = |rev: u64| {
        std::process::Command::new(voltool_tests::on_path("etcdctl").unwrap())
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &cluster.endpoints()])
            .args(["get", "--prefix", "p/", &format!("--rev={rev}")])
            .output()
            .unwrap()
    };
    // The first call notes where the store is; nothing is compacted yet.
    meta.compact_history().unwrap();
    assert!(old_read(1).status.success());
    for v in 1..=3 {
        meta.move_head(&head(id, v, v), &LinkUpdate::default(), &[])
            .unwrap();
    }
    // The second drops what came before the first (revision 2, the volume's creation: the
    // empty store's revision 1 goes).
    meta.compact_history().unwrap();
    assert!(old_read(2).status.success());
    let o = old_read(1);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("compacted"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(meta.head(id).unwrap().unwrap(), head(id, 3, 3));
    assert_eq!(meta.commits(id, 0..4).unwrap().len(), 4);
    // Called again at once, or after etcd compacted further on its own: no error.
    meta.compact_history().unwrap();
    meta.compact_history().unwrap();
}

#[test]
fn etcd_state_matches_the_model() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    // One cluster for every case (each under a prefix of its own), gone with the test.
    let cluster = EtcdCluster::start(3);
    let case = std::cell::Cell::new(0);
    // Each case writes to a real cluster: fewer cases than redb's, as long.
    proptest!(ProptestConfig::with_cases(24), |(ops in prop::collection::vec(op(), 1..40))| {
        case.set(case.get() + 1);
        let meta = etcd_meta(&cluster, &format!("model/{}", case.get()));
        check(&meta, &ops);
    });
}

/// A commit whose link-index changes do not fit in one etcd transaction (128 operations)
/// goes in fenced batches and still reads back whole.
#[test]
fn etcd_writes_a_large_link_index_change_in_batches() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let meta = etcd_meta(&cluster, "batches");
    let id = VolumeId([3; 16]);
    meta.create("v", VolumeRecord { id, created_ms: 0 }, &head(id, 0, 0))
        .unwrap();
    let entries: Vec<LinkEntry> = (0..500)
        .map(|i| LinkEntry {
            link: format!("links/l{i:04}"),
            old: None,
            new: Some(vec![format!("targets/t{}", i % 7), "targets".to_string()]),
        })
        .collect();
    // With the pages it wrote: too many for the head's own transaction as well.
    let pages: Vec<(Hash, u64)> = (0..200u64)
        .map(|i| (Hash::of(&i.to_be_bytes()), 100 + i))
        .collect();
    meta.move_head(&head(id, 1, 1), &LinkUpdate { entries }, &pages)
        .unwrap();
    let mut recorded = meta.blob_records().unwrap().all_blobs().unwrap();
    recorded.sort();
    let mut want = pages.clone();
    want.sort();
    assert_eq!(recorded, want);
    assert_eq!(meta.links_indexed(id).unwrap(), Some(1));
    assert_eq!(meta.links(id).unwrap().len(), 500);
    assert_eq!(meta.links_below(id, "links").unwrap().len(), 500);
    assert_eq!(meta.link_deps(id, "targets").unwrap().len(), 500);
    assert_eq!(meta.link_deps(id, "targets/t0").unwrap().len(), 72);
    assert_eq!(meta.head(id).unwrap().unwrap().commit.version, 1);
}

/// A writer whose fence is gone (its leader key deleted, as when its lease ends) writes
/// nothing, and says why; a writer with the live fence writes.
#[test]
fn etcd_refuses_every_write_of_a_writer_whose_fence_is_gone() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let meta = etcd_meta(&cluster, "fence");
    let leader = b"fence/leader".to_vec();
    cluster.ctl(&["put", "fence/leader", "me"]);
    let rev_of = |meta: &EtcdMeta| {
        let mut kv = meta.client().kv_client();
        let k = leader.clone();
        meta.run(async move { Ok(kv.get(k, None).await?.kvs()[0].create_revision()) })
            .unwrap()
    };
    let fence = Fence {
        key: leader.clone(),
        revision: rev_of(&meta),
    };
    meta.set_fence(Some(fence.clone()));
    let id = VolumeId([4; 16]);
    meta.create("v", VolumeRecord { id, created_ms: 0 }, &head(id, 0, 0))
        .unwrap();
    // Another leader: the key made again, at a new revision.
    cluster.ctl(&["del", "fence/leader"]);
    cluster.ctl(&["put", "fence/leader", "other"]);
    let e = meta.move_head(&head(id, 1, 1), &LinkUpdate::default(), &[]);
    assert!(matches!(e, Err(MetaError::Fenced)), "{e:?}");
    let e = meta.create(
        "w",
        VolumeRecord {
            id: VolumeId([5; 16]),
            created_ms: 0,
        },
        &head(VolumeId([5; 16]), 0, 0),
    );
    assert!(matches!(e, Err(MetaError::Fenced)), "{e:?}");
    assert!(matches!(meta.distrust(node(0), 9), Err(MetaError::Fenced)));
    assert!(matches!(meta.drop_versions(id, 1), Err(MetaError::Fenced)));
    assert!(matches!(meta.rename("v", "x"), Err(MetaError::Fenced)));
    assert!(matches!(meta.delete("v"), Err(MetaError::Fenced)));
    let records = meta.blob_records().unwrap();
    let blob = Hash::of(b"a blob");
    assert!(matches!(
        records.record_blobs(&[(blob, 6)]),
        Err(MetaError::Fenced)
    ));
    assert!(matches!(
        records.condemn_blobs(&[blob]),
        Err(MetaError::Fenced)
    ));
    assert!(matches!(
        records.clear_condemned(&[blob]),
        Err(MetaError::Fenced)
    ));
    assert_eq!(meta.head(id).unwrap().unwrap().commit.version, 0);
    assert!(meta.volume("w").unwrap().is_none());
    // The new leader's fence writes.
    meta.set_fence(Some(Fence {
        key: leader.clone(),
        revision: rev_of(&meta),
    }));
    // A page's record goes with the head, in its transaction.
    let page = (Hash::of(b"a page"), 77);
    meta.move_head(&head(id, 1, 1), &LinkUpdate::default(), &[page])
        .unwrap();
    assert_eq!(
        meta.blob_records().unwrap().all_blobs().unwrap(),
        vec![page]
    );
}

/// The state outlives a reopen of its file.
#[test]
fn redb_state_is_durable() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let dir = voltool_tests::test_dir();
    let file = dir.path().join("coordinator.redb");
    let id = VolumeId([9; 16]);
    {
        let meta = RedbMeta::open(&file).unwrap();
        let rec = VolumeRecord { id, created_ms: 5 };
        meta.create("v", rec, &head(id, 0, 0)).unwrap();
        let update = LinkUpdate {
            entries: vec![LinkEntry {
                link: "l".into(),
                old: None,
                new: Some(vec!["t".into()]),
            }],
        };
        meta.move_head(&head(id, 1, 1), &update, &[]).unwrap();
        meta.distrust(node(0), 77).unwrap();
    }
    let meta = RedbMeta::open(&file).unwrap();
    assert_eq!(meta.head(id).unwrap().unwrap().commit.version, 1);
    assert_eq!(meta.commits(id, 0..2).unwrap().iter().flatten().count(), 2);
    assert_eq!(meta.link_deps(id, "t").unwrap(), vec!["l".to_string()]);
    assert_eq!(meta.distrusted().unwrap(), vec![(node(0), 77)]);
}

/// A file of the old format is refused, by name, rather than read wrong.
#[test]
fn redb_state_refuses_an_old_format() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let dir = voltool_tests::test_dir();
    let file = dir.path().join("coordinator.redb");
    {
        let db = redb::Database::create(&file).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(redb::TableDefinition::<&str, &[u8]>::new("heads-0"))
            .unwrap();
        w.commit().unwrap();
    }
    let e = RedbMeta::open(&file).unwrap_err().to_string();
    assert!(e.contains("heads-0"), "{e}");
}

#[test]
fn etcd_addresses_are_parsed_and_bad_ones_named() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let u: EtcdUrl = "etcd://10.0.0.1:2379,h2:2379/fleet/a/".parse().unwrap();
    assert_eq!(u.endpoints, vec!["10.0.0.1:2379", "h2:2379"]);
    assert_eq!(u.prefix, "fleet/a");
    assert_eq!(u.to_string(), "etcd://10.0.0.1:2379,h2:2379/fleet/a");
    for bad in [
        "http://h:1/p",
        "etcd://h:1",
        "etcd://h:1/",
        "etcd://h/p",
        "etcd://h:0/p",
        "etcd://h:99999/p",
        "etcd://:1/p",
        "etcd://h:1/a//b",
        "etcd://h:1/a/../b",
    ] {
        let e = bad.parse::<EtcdUrl>().unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn etcd_address_parsing_never_panics() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    proptest!(|(s in ".{0,80}")| {
        let _ = s.parse::<EtcdUrl>();
        let _ = format!("etcd://{s}").parse::<EtcdUrl>();
    });
}

/// The fleet's blob records: written and forgotten in batches past one transaction's
/// limit, read back whole; redb keeps none (its origin's store keeps them alone).
#[test]
fn etcd_keeps_the_fleets_blob_records() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let meta = etcd_meta(&cluster, "blobs");
    let records = meta.blob_records().unwrap();
    let blobs: Vec<(Hash, u64)> = (0..300u64)
        .map(|i| (Hash::of(&i.to_le_bytes()), i * 1000))
        .collect();
    records.record_blobs(&blobs).unwrap();
    let mut all = records.all_blobs().unwrap();
    all.sort();
    let mut want = blobs.clone();
    want.sort();
    assert_eq!(all, want);
    let gone: Vec<Hash> = blobs[..150].iter().map(|(h, _)| *h).collect();
    records.condemn_blobs(&gone).unwrap();
    let mut left = records.all_blobs().unwrap();
    left.sort();
    let mut want: Vec<(Hash, u64)> = blobs[150..].to_vec();
    want.sort();
    assert_eq!(left, want);
    // Condemned, with the revision of the lead that condemned them (no fence here: 0),
    // until cleared.
    let mut marked = records.condemned().unwrap();
    marked.sort();
    let mut want: Vec<(Hash, i64)> = gone.iter().map(|h| (*h, 0)).collect();
    want.sort();
    assert_eq!(marked, want);
    records.clear_condemned(&gone[..100]).unwrap();
    assert_eq!(records.condemned().unwrap().len(), 50);
    let dir = voltool_tests::test_dir();
    let redb = RedbMeta::open(&dir.path().join("coordinator.redb")).unwrap();
    assert!(redb.blob_records().is_none());
}

/// etcd with TLS and client certificates: the state is reached with the certificate the
/// cluster's CA signed, and refused, by name, without one.
#[test]
fn etcd_is_reached_over_tls_with_a_client_certificate_and_refused_without() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let cluster = EtcdCluster::start_tls(3);
    let t = cluster.tls().unwrap();
    let url: EtcdUrl = cluster.meta_url("tls").parse().unwrap();
    let tls = EtcdTls {
        ca: t.ca.clone(),
        cert: t.client_cert.clone(),
        key: t.client_key.clone(),
    };
    let meta = EtcdMeta::connect(&url, Some(&tls)).unwrap();
    let id = VolumeId([6; 16]);
    meta.create("v", VolumeRecord { id, created_ms: 0 }, &head(id, 0, 0))
        .unwrap();
    assert_eq!(meta.volume("v").unwrap().unwrap().id, id);
    // Plain connections to a TLS port fail, and so does TLS with a client certificate the
    // CA did not sign.
    let e = EtcdMeta::connect(&url, None).unwrap_err().to_string();
    assert!(e.contains("etcd"), "{e}");
    let stranger = EtcdTls {
        cert: t.stranger_cert.clone(),
        key: t.stranger_key.clone(),
        ..tls
    };
    let e = EtcdMeta::connect(&url, Some(&stranger))
        .unwrap_err()
        .to_string();
    assert!(e.contains("etcd"), "{e}");
}
