//! The store's own tests: imports, ranges, damage, batches.

use super::*;

#[test]
fn databases_of_an_older_version_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("agent.redb");
    let db = Database::create(&file).unwrap();
    let w = db.begin_write().unwrap();
    w.open_table(TableDefinition::<&str, &[u8]>::new("mounts-1"))
        .unwrap();
    w.commit().unwrap();
    refuse_old_tables(&db, &file, &["heads-0"]).unwrap();
    let e = refuse_old_tables(&db, &file, &["heads-0", "mounts-1"]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("older voltool") && msg.contains("mounts-1"),
        "{msg}"
    );
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn import_encode_decode_ranges_and_reject_corruption() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let src = Store::open(a.path()).unwrap();
    let dst = Store::open(b.path()).unwrap();
    let bytes = data(200_000);
    let hash = src.import_bytes(&bytes).unwrap();
    assert_eq!(hash, Hash::of(&bytes));
    let size = bytes.len() as u64;

    dst.begin_partial(&hash, size).unwrap();
    let first = RangeList(vec![(0, 64)]);
    let mut enc = Vec::new();
    src.encode(&hash, size, &first, &mut enc).unwrap();
    let m = dst.write_encoded(&hash, size, &first, &enc).unwrap();
    assert_eq!(m.state, BlobState::Partial(first.clone()));
    // A partial holder serves what it has, and refuses what it lacks.
    let mut again = Vec::new();
    dst.encode(&hash, size, &first, &mut again).unwrap();
    assert_eq!(again, enc);
    let rest = RangeList(vec![(64, 196)]);
    assert!(matches!(
        dst.encode(&hash, size, &rest, Vec::new()),
        Err(StoreError::MissingRanges(_))
    ));
    let mut enc2 = Vec::new();
    src.encode(&hash, size, &rest, &mut enc2).unwrap();
    // One flipped byte: refused, nothing recorded.
    let mut bad = enc2.clone();
    let last = bad.len() - 10;
    bad[last] ^= 1;
    assert!(matches!(
        dst.write_encoded(&hash, size, &rest, &bad),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(dst.meta(&hash).unwrap().unwrap().ranges(), first);
    let m = dst.write_encoded(&hash, size, &rest, &enc2).unwrap();
    assert!(m.is_complete());
    assert_eq!(dst.read_all(&hash).unwrap(), bytes);
}

#[test]
fn damaged_file_is_never_served() {
    let a = tempfile::tempdir().unwrap();
    let s = Store::open(a.path()).unwrap();
    let bytes = data(100_000);
    let hash = s.import_bytes(&bytes).unwrap();
    let p = s.data_path(&hash);
    let mut on_disk = std::fs::read(&p).unwrap();
    on_disk[50_000] ^= 0xff;
    std::fs::write(&p, on_disk).unwrap();
    let r = s.encode(
        &hash,
        bytes.len() as u64,
        &RangeList::all(100_000),
        Vec::new(),
    );
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
}

#[test]
fn a_large_batch_places_as_it_goes_and_a_failed_one_takes_its_links_back() {
    let a = tempfile::tempdir().unwrap();
    let s = Store::open(&a.path().join("store")).unwrap();
    let files: Vec<PathBuf> = (0..5)
        .map(|i| {
            let p = a.path().join(format!("f{i}"));
            std::fs::write(&p, format!("file {i}")).unwrap();
            p
        })
        .collect();
    let hashes: Vec<Hash> = (0..5)
        .map(|i| Hash::of(format!("file {i}").as_bytes()))
        .collect();
    // Imported (copied) blobs placed by a flush stay when the batch fails: they are
    // whole and verified, and a retry finds them.
    let b = s.batch_flushing_at(2);
    for f in &files {
        b.import_file(f).unwrap();
    }
    let held = s.has_complete_many(&hashes).unwrap();
    assert_eq!(held, [true, true, true, true, false]);
    drop(b);
    assert_eq!(s.has_complete_many(&hashes).unwrap(), held);
    std::fs::remove_dir_all(a.path().join("store")).unwrap();
    // Linked files are taken back out when the batch fails.
    let s = Store::open(&a.path().join("store")).unwrap();
    let b = s.batch_flushing_at(2);
    for f in &files {
        b.link_file(f).unwrap();
    }
    assert_eq!(s.has_complete_many(&hashes).unwrap(), held);
    drop(b);
    assert_eq!(s.has_complete_many(&hashes).unwrap(), [false; 5]);
    for h in &hashes {
        assert!(!s.data_path(h).exists());
    }
    // A finished one keeps them all, and names the files it linked.
    let b = s.batch_flushing_at(2);
    for f in &files {
        b.link_file(f).unwrap();
    }
    let mut linked = b.finish().unwrap();
    linked.sort_unstable_by_key(|h| h.0);
    let mut want = hashes.clone();
    want.sort_unstable_by_key(|h| h.0);
    assert_eq!(linked, want);
    assert_eq!(s.has_complete_many(&hashes).unwrap(), [true; 5]);
}

#[test]
fn adopt_refuses_wrong_hash() {
    let a = tempfile::tempdir().unwrap();
    let s = Store::open(a.path()).unwrap();
    let tmp = s.tmp_path("t");
    std::fs::write(&tmp, b"hello").unwrap();
    let r = s.adopt_tmp(&tmp, 5, Some(Hash::of(b"other")));
    assert!(matches!(r, Err(StoreError::Corrupt { .. })));
    assert!(!s.has_complete(&Hash::of(b"hello")).unwrap());
}

/// A receiver that stops reading an encoding is not a damaged blob: the provider's copy
/// stays trusted (and, on a bucket, its outboard kept).
#[test]
fn a_receiver_that_stops_is_not_a_damaged_blob() {
    struct Stops(usize);
    impl std::io::Write for Stops {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "receiver gone",
                ));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let bytes = data(3 << 20);
    let hash = store.import_bytes(&bytes).unwrap();
    let size = bytes.len() as u64;
    let all = RangeList(vec![(0, size.div_ceil(1024))]);
    let e = store.encode(&hash, size, &all, Stops(100_000)).unwrap_err();
    assert!(matches!(e, StoreError::ReceiverGone(_)), "{e}");
    let mut out = Vec::new();
    store.encode(&hash, size, &all, &mut out).unwrap();
    assert!(!out.is_empty());
}
