//! A model-based test of [`Meta`]: random sequences of writes are applied to an
//! implementation and to a reference built of `BTreeMap`s, and every read is compared
//! after every step. [`check`] takes any implementation.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use voltool_protocol::{Commit, Hash, SecretKey, SignedHead, VolumeId};

use super::*;

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
                let r = meta.move_head(&h, &update);
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
    // Every id ever made, deleted ones too (their reads are empty).
    for i in 0..=64u8 {
        let id = VolumeId([i; 16]);
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn redb_meta_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let meta = RedbMeta::open(&dir.path().join("coordinator.redb")).unwrap();
        check(&meta, &ops);
    }
}

/// The state outlives a reopen of its file.
#[test]
fn redb_meta_is_durable() {
    let dir = tempfile::tempdir().unwrap();
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
        meta.move_head(&head(id, 1, 1), &update).unwrap();
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
fn redb_meta_refuses_an_old_format() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.redb");
    {
        let db = ::redb::Database::create(&file).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(::redb::TableDefinition::<&str, &[u8]>::new("heads-0"))
            .unwrap();
        w.commit().unwrap();
    }
    let e = RedbMeta::open(&file).unwrap_err().to_string();
    assert!(e.contains("heads-0"), "{e}");
}
