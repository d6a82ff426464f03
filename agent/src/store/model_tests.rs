//! A model-based test of the store: random sequences of imports, verified ranges written
//! and recorded, ranges written but never recorded, and removals, checked after every step
//! against a `BTreeMap` of what each acknowledged step left; between any two steps the
//! store may be dropped without a word and opened again (a crash between steps: what an
//! acknowledged step recorded must be there, what was never recorded must not be claimed).

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use voltool_protocol::blob::{CHUNK_BYTES, GROUP_BYTES};

use super::*;

const GROUP_CHUNKS: u64 = GROUP_BYTES / CHUNK_BYTES;

/// What the model says the store holds of one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Held {
    Complete,
    /// Chunk groups held, verified.
    Groups(BTreeSet<u64>),
}

struct Blob {
    bytes: Vec<u8>,
    hash: Hash,
}

impl Blob {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn groups(&self) -> u64 {
        self.size().div_ceil(GROUP_BYTES)
    }
}

/// The range list of a set of chunk groups of a blob of `size` bytes.
fn ranges_of(groups: &BTreeSet<u64>, size: u64) -> RangeList {
    let chunks = size.div_ceil(CHUNK_BYTES).max(1);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &g in groups {
        let (s, e) = (g * GROUP_CHUNKS, ((g + 1) * GROUP_CHUNKS).min(chunks));
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    RangeList(out)
}

fn groups_of(r: &RangeList) -> BTreeSet<u64> {
    r.0.iter()
        .flat_map(|&(s, e)| s / GROUP_CHUNKS..e.div_ceil(GROUP_CHUNKS))
        .collect()
}

/// Compares everything the store records with the model, and reads every byte it claims.
fn check(store: &Store, blobs: &[Blob], model: &BTreeMap<usize, Held>, step: &str) {
    let metas: BTreeMap<Hash, BlobMeta> = store.all_metas().unwrap().into_iter().collect();
    let want: BTreeSet<Hash> = model.keys().map(|&k| blobs[k].hash).collect();
    let have: BTreeSet<Hash> = metas.keys().copied().collect();
    assert_eq!(have, want, "{step}: the blobs recorded");
    for (&k, held) in model {
        let b = &blobs[k];
        let m = &metas[&b.hash];
        assert_eq!(m.size, b.size(), "{step}: blob {k}'s size");
        match held {
            Held::Complete => {
                assert!(m.is_complete(), "{step}: blob {k} is complete, not {m:?}");
                let bytes = store.read_verified(&b.hash, b.size()).unwrap();
                assert_eq!(
                    bytes.as_deref(),
                    Some(&b.bytes[..]),
                    "{step}: blob {k}'s bytes"
                );
            }
            Held::Groups(g) => {
                assert!(!m.is_complete(), "{step}: blob {k} is partial");
                assert_eq!(&groups_of(&m.ranges()), g, "{step}: blob {k}'s ranges");
                // Every range claimed verifies against the blob's hash.
                let mut enc = Vec::new();
                store
                    .encode(&b.hash, b.size(), &m.ranges(), &mut enc)
                    .unwrap();
            }
        }
    }
}

/// One random sequence of `steps` steps from `seed`.
fn sequence(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let src_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The source of verified ranges: a store that holds every blob.
    let src = Store::open(src_dir.path()).unwrap();
    let blobs: Vec<Blob> = (0..6)
        .map(|i| {
            let size = rng.random_range(1..200_000usize);
            let mut bytes = vec![0u8; size];
            rng.fill(&mut bytes[..]);
            bytes[0] = i;
            let hash = src.import_bytes(&bytes).unwrap();
            Blob { bytes, hash }
        })
        .collect();
    let mut store = Store::open(dir.path()).unwrap();
    let mut model: BTreeMap<usize, Held> = BTreeMap::new();
    for n in 0..steps {
        let k = rng.random_range(0..blobs.len());
        let b = &blobs[k];
        let step = match rng.random_range(0..10) {
            0..2 => {
                store.import_bytes(&b.bytes).unwrap();
                model.insert(k, Held::Complete);
                format!("step {n}: import {k}")
            }
            2..6 if model.get(&k) != Some(&Held::Complete) => {
                // Verified ranges, written and recorded.
                let start = rng.random_range(0..b.groups());
                let end = rng.random_range(start + 1..=b.groups().min(start + 4));
                let new: BTreeSet<u64> = (start..end).collect();
                let ranges = ranges_of(&new, b.size());
                let mut enc = Vec::new();
                src.encode(&b.hash, b.size(), &ranges, &mut enc).unwrap();
                store.begin_partial(&b.hash, b.size()).unwrap();
                store
                    .write_encoded(&b.hash, b.size(), &ranges, &enc)
                    .unwrap();
                let mut held = match model.remove(&k) {
                    Some(Held::Groups(g)) => g,
                    _ => BTreeSet::new(),
                };
                held.extend(new);
                let all = held.len() as u64 == b.groups();
                model.insert(
                    k,
                    if all {
                        Held::Complete
                    } else {
                        Held::Groups(held)
                    },
                );
                format!("step {n}: ranges {ranges:?} of {k}")
            }
            6 if model.get(&k) != Some(&Held::Complete) => {
                // Written, never recorded: a crash before the record claims nothing.
                let g = rng.random_range(0..b.groups());
                let ranges = ranges_of(&BTreeSet::from([g]), b.size());
                let mut enc = Vec::new();
                src.encode(&b.hash, b.size(), &ranges, &mut enc).unwrap();
                store.begin_partial(&b.hash, b.size()).unwrap();
                store
                    .write_encoded_unsynced(&b.hash, b.size(), &ranges, &enc)
                    .unwrap();
                model
                    .entry(k)
                    .or_insert_with(|| Held::Groups(BTreeSet::new()));
                // The crash, at once.
                drop(store);
                store = Store::open(dir.path()).unwrap();
                format!("step {n}: unrecorded ranges {ranges:?} of {k}, then a crash")
            }
            7..9 => {
                store.remove(&b.hash).unwrap();
                model.remove(&k);
                format!("step {n}: remove {k}")
            }
            _ => {
                drop(store);
                store = Store::open(dir.path()).unwrap();
                format!("step {n}: crash")
            }
        };
        check(&store, &blobs, &model, &format!("seed {seed}, {step}"));
        // A crash between any two steps.
        if rng.random_bool(0.25) {
            drop(store);
            store = Store::open(dir.path()).unwrap();
            check(
                &store,
                &blobs,
                &model,
                &format!("seed {seed}, after a crash at {step}"),
            );
        }
    }
}

#[test]
fn random_store_operations_with_crashes_between_steps_match_the_model() {
    for seed in 0..24 {
        sequence(seed, 60);
    }
}
