//! A model-based test of the coordinator's merges: random sequences of commits from two
//! agents' mounts (on stale bases, to overlapping paths), puts, removals, copies and
//! reloads, checked after every step against a `BTreeMap` of what each acknowledged step
//! wrote (last writer wins, per path); between any two steps the coordinator or an agent
//! may stop and start again on its data directory. Runs in both snapshot modes.

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use voltool_agent::control::{ReloadMode, Reply, Request};
use voltool_tests::{TestFleet, bytes};

/// A volume's files: path to bytes.
type Files = BTreeMap<String, Vec<u8>>;

/// The files under `root`.
fn files(root: &Path) -> Files {
    fn walk(root: &Path, dir: &Path, out: &mut Files) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = Files::new();
    walk(root, root, &mut out);
    out
}

fn apply(base: &Files, pending: &BTreeMap<String, Option<Vec<u8>>>) -> Files {
    let mut t = base.clone();
    for (p, c) in pending {
        match c {
            Some(c) => t.insert(p.clone(), c.clone()),
            None => t.remove(p),
        };
    }
    t
}

/// The head's files as agent `i` lists them: paths and sizes.
async fn listed(f: &TestFleet, i: usize) -> BTreeMap<String, u64> {
    let req = Request::VolumeLs {
        name: "vol".into(),
        path: None,
        recursive: true,
    };
    let Reply::Ls(ls) = f.req(i, req).await.unwrap() else {
        panic!("unexpected answer to ls");
    };
    ls.into_iter()
        .filter(|e| e.kind == "file")
        .map(|e| (e.path, e.size))
        .collect()
}

fn sizes(t: &Files) -> BTreeMap<String, u64> {
    t.iter().map(|(p, b)| (p.clone(), b.len() as u64)).collect()
}

fn random_path(rng: &mut StdRng) -> String {
    format!("d{}/f{}", rng.random_range(0..2), rng.random_range(0..4))
}

async fn sequence(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = TestFleet::start(2).await;
    f.create("vol").await;
    let mounts = [f.mount(0, "vol").await, f.mount(1, "vol").await];
    let src = f.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut head = Files::new();
    // Each agent's mount: the snapshot it is on, and what it wrote since.
    let mut base = [Files::new(), Files::new()];
    let mut pending: [BTreeMap<String, Option<Vec<u8>>>; 2] = Default::default();
    let mut next = 0u8;
    for n in 0..steps {
        let a = rng.random_range(0..2);
        let step = rng.random_range(0..10);
        let what = format!("seed {seed} step {n} ({step} on agent {a})");
        match step {
            0..3 => {
                let p = random_path(&mut rng);
                let file = mounts[a].join(&p);
                if rng.random_bool(0.2) && apply(&base[a], &pending[a]).contains_key(&p) {
                    std::fs::remove_file(&file).unwrap();
                    // A change only if the snapshot has the file: one created and deleted
                    // since is no change, and leaves another writer's file alone.
                    if base[a].contains_key(&p) {
                        pending[a].insert(p, None);
                    } else {
                        pending[a].remove(&p);
                    }
                } else {
                    next = next.wrapping_add(1);
                    let data = bytes(next, rng.random_range(0..40_000));
                    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                    std::fs::write(&file, &data).unwrap();
                    pending[a].insert(p, Some(data));
                }
            }
            3..5 => {
                f.commit(a, "vol").await.unwrap();
                head = apply(&head, &pending[a]);
                pending[a].clear();
                base[a] = head.clone();
                assert_eq!(
                    files(&mounts[a]),
                    head,
                    "{what}: the mount after its commit"
                );
            }
            5 => {
                next = next.wrapping_add(1);
                let data = bytes(next, rng.random_range(0..40_000));
                let local = src.join(format!("put-{n}"));
                std::fs::write(&local, &data).unwrap();
                let p = random_path(&mut rng);
                f.put(a, "vol", &local, &p, true).await.unwrap();
                head.insert(p, data);
            }
            6 => {
                let Some(p) = head.keys().nth(rng.random_range(0..head.len().max(1))) else {
                    continue;
                };
                let p = p.clone();
                let req = Request::VolumeRm {
                    name: "vol".into(),
                    path: p.clone(),
                    recursive: false,
                };
                f.req(a, req).await.unwrap();
                head.remove(&p);
            }
            7 => {
                let Some(p) = head.keys().nth(rng.random_range(0..head.len().max(1))) else {
                    continue;
                };
                let (p, data) = (p.clone(), head[p].clone());
                let dst = random_path(&mut rng);
                if dst == p {
                    continue;
                }
                let req = Request::VolumeCp {
                    name: "vol".into(),
                    srcs: vec![p],
                    dst: dst.clone(),
                    recursive: false,
                };
                f.req(a, req).await.unwrap();
                head.insert(dst, data);
            }
            8 => {
                f.reload(a, "vol", ReloadMode::Discard).await.unwrap();
                pending[a].clear();
                base[a] = head.clone();
                assert_eq!(
                    files(&mounts[a]),
                    head,
                    "{what}: the mount after its reload"
                );
            }
            _ => {
                // A stop and a start, of the coordinator or of agent `a`.
                if rng.random_bool(0.5) {
                    f.stop_coordinator().await;
                    f.start_coordinator().await;
                } else {
                    f.agents.remove(a).shutdown().await;
                    let again = f.start_agent(a).await;
                    f.agents.insert(a, again);
                    let own = apply(&base[a], &pending[a]);
                    assert_eq!(files(&mounts[a]), own, "{what}: the mount after a restart");
                }
            }
        }
        // After every step: each mount shows its snapshot and its own writes, byte for
        // byte, and the head holds the model's bytes (listed, and read back whole).
        for (m, mount) in mounts.iter().enumerate() {
            let own = apply(&base[m], &pending[m]);
            assert_eq!(files(mount), own, "{what}: agent {m}'s mount");
        }
        assert_eq!(listed(&f, a).await, sizes(&head), "{what}: the head");
        let got = f.dir.path().join("got");
        let _ = std::fs::remove_dir_all(&got);
        f.get(a, "vol", "/", &got, true).await.unwrap();
        assert_eq!(files(&got), head, "{what}: the head's contents");
    }
    // In the end every agent shows the head, byte for byte.
    for (a, mount) in mounts.iter().enumerate() {
        f.reload(a, "vol", ReloadMode::Discard).await.unwrap();
        assert_eq!(files(mount), head, "seed {seed}: agent {a} at the end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_merges_with_restarts_between_steps_match_the_model() {
    for seed in 0..12 {
        sequence(seed, 50).await;
    }
}
