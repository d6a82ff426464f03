//! Pins the wire encoding with annotated hex dumps, and round-trips messages.

use proptest::prelude::*;

use crate::blob::RangeList;
use crate::blobs::{BlobRequest, GetHeader};
use crate::commit::{Commit, VolumeId};
use crate::coord::{CoordRequest, CoordResponse, ErrorKind};
use crate::frame;
use crate::hash::Hash;
use crate::manifest::{Change, Entry, Manifest};
use crate::path::VolPath;
use crate::tree::{Page, Shape};

fn hexdump(s: &str) -> Vec<u8> {
    let clean: String = s
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .collect::<String>()
        .split_whitespace()
        .collect();
    hex::decode(clean).unwrap()
}

#[test]
fn control_upload_is_pinned() {
    use crate::control::{Request, UploadEntry, UploadKind};
    let put = Request::VolumeUpload {
        name: "v".into(),
        entries: vec![UploadEntry {
            path: "/d/a".into(),
            kind: UploadKind::File {
                mode: 0o644,
                mtime_ns: 1,
            },
        }],
        force: false,
    };
    let expected = hexdump(
        "
        0e 00 00 00   # frame length 14
        06            # Request::VolumeUpload
        01 76         # name \"v\"
        01            # 1 entry
        04 2f642f61   # path \"/d/a\"
        00            # UploadKind::File
        a4 03         # mode 0o644 (varint 420)
        02            # mtime_ns 1 (zigzag)
        00            # force false
        ",
    );
    assert_eq!(frame::encode(&put), expected);
    let json = r#"{"VolumeUpload":{"name":"v","entries":[{"path":"/d/a","kind":{"File":{"mode":420,"mtime_ns":1}}}],"force":false}}"#;
    assert_eq!(serde_json::to_string(&put).unwrap(), json);
    let back: Request = serde_json::from_str(json).unwrap();
    assert_eq!(frame::encode(&back), expected);
}

#[test]
fn batched_requests_are_pinned() {
    let many = BlobRequest::GetMany {
        blobs: vec![(Hash([0xcd; 32]), 4096), (Hash([0xef; 32]), 5)],
        rank: 300,
    };
    let expected = hexdump(
        "
        47 00 00 00   # frame length 71 (u32 LE)
        02            # BlobRequest::GetMany
        02            # 2 blobs
        cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd
        cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd # hash, 32 bytes
        80 20         # size 4096 (varint)
        efefefefefefefefefefefefefefefef
        efefefefefefefefefefefefefefefef # hash
        05            # size 5
        ac 02         # rank 300 permille (varint)
        ",
    );
    assert_eq!(frame::encode(&many), expected);
    let upload = CoordRequest::Upload {
        blobs: vec![(Hash([0x11; 32]), 300)],
    };
    let expected = hexdump(
        "
        24 00 00 00   # frame length 36
        06            # CoordRequest::Upload
        01            # 1 blob; its 300 raw bytes follow the frame
        11111111111111111111111111111111
        11111111111111111111111111111111 # hash
        ac 02         # size 300
        ",
    );
    assert_eq!(frame::encode(&upload), expected);
}

#[test]
fn blob_get_frame_is_pinned() {
    let msg = BlobRequest::Get {
        hash: Hash([0xab; 32]),
        size: 300,
        ranges: RangeList(vec![(0, 16), (32, 48)]),
        rank: 7,
    };
    let expected = hexdump(
        "
        29 00 00 00   # frame length 41 (u32 LE)
        00            # BlobRequest::Get
        abababababababababababababababab
        abababababababababababababababab # hash, 32 bytes
        ac 02         # size 300 (varint)
        02            # 2 ranges
        00 10         # [0, 16)
        20 30         # [32, 48)
        07            # rank 7 permille
        ",
    );
    assert_eq!(frame::encode(&msg), expected);
    assert_eq!(
        frame::encode(&BlobRequest::Subscribe {
            hash: Hash([1; 32]),
            size: 1,
            piece_bytes: 16384,
        })[..6],
        hexdump("25 00 00 00  01  01")
    );
    assert_eq!(
        frame::encode(&GetHeader::Picked { unit: 300 }),
        hexdump("03 00 00 00  06  ac 02  # Picked: variant 6, the piece")
    );
    assert_eq!(
        frame::encode(&GetHeader::Missing),
        hexdump("01 00 00 00  02")
    );
    assert_eq!(
        frame::encode(&GetHeader::Busy),
        hexdump("01 00 00 00  05  # Busy: variant 5, nothing follows")
    );
}

#[test]
fn coord_frames_are_pinned() {
    let msg = CoordRequest::CreateVolume { name: "m".into() };
    assert_eq!(
        frame::encode(&msg),
        hexdump("03 00 00 00  00  01 6d  # CreateVolume, name len 1, 'm'")
    );
    let err = CoordResponse::Error {
        kind: ErrorKind::NotFound,
        message: "x".into(),
    };
    assert_eq!(
        frame::encode(&err),
        hexdump("04 00 00 00  05  00  01 78  # Error (variant 5), NotFound, \"x\"")
    );
    let rtts = CoordRequest::Rtts {
        rtts: vec![crate::coord::PeerRtt {
            id: [7; 32],
            micros: 300,
        }],
    };
    let mut expected = hexdump("24 00 00 00  0c  01  # Rtts (variant 12), one entry");
    expected.extend([7u8; 32]);
    expected.extend(hexdump("ac 02  # 300 as a varint"));
    assert_eq!(frame::encode(&rtts), expected);
}

#[test]
fn manifest_and_commit_are_pinned() {
    let mut m = Manifest::new();
    m.apply(&[Change {
        path: VolPath::new("a").unwrap(),
        entry: Some(Entry::File {
            size: 1,
            mode: 0o644,
            mtime_ns: -1,
            hash: Hash([2; 32]),
        }),
    }])
    .unwrap();
    let expected = hexdump(
        "
        02          # page version
        00          # level 0: a leaf
        01          # 1 entry
        01 61       # path \"a\"
        00          # Entry::File
        01          # size 1
        a4 03       # mode 0o644 = 420
        01          # mtime_ns -1 (zigzag)
        0202020202020202020202020202020202020202020202020202020202020202
        ",
    );
    let mut pages = Vec::new();
    let built = m.build(Shape::CANONICAL, &mut |r, b| pages.push((r, b)));
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].1, expected);
    assert_eq!(built.root.hash, Hash::of(&expected));
    assert_eq!(Page::decode(&expected).unwrap().encode(), expected);
    let c = Commit {
        volume: VolumeId([9; 16]),
        version: 1,
        parent: None,
        manifest: Hash([3; 32]),
        manifest_size: 2,
        author: [4; 32],
        time_ms: 1,
    };
    let enc = c.encode();
    assert_eq!(
        enc[..17],
        hexdump("09090909090909090909090909090909 01")[..]
    );
    assert_eq!(enc[17], 0, "parent None");
}

#[test]
fn oversized_frames_are_refused_before_allocation() {
    assert!(frame::body_len([0xff, 0xff, 0xff, 0x7f], 1024).is_err());
    assert_eq!(frame::body_len([4, 0, 0, 0], 1024).unwrap(), 4);
    let mut body = frame::encode(&GetHeader::Ok)[4..].to_vec();
    body.push(0);
    assert!(frame::decode::<GetHeader>(&body).is_err());
}

fn arb_path() -> impl Strategy<Value = VolPath> {
    proptest::collection::vec("[a-z0-9._-]{1,8}", 1..4)
        .prop_filter_map("valid", |parts| VolPath::new(&parts.join("/")).ok())
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        (any::<u64>(), 0u32..0o7777, any::<i64>(), any::<[u8; 32]>()).prop_map(
            |(size, mode, mtime_ns, h)| Entry::File {
                size,
                mode,
                mtime_ns,
                hash: Hash(h)
            }
        ),
        (0u32..0o7777).prop_map(|mode| Entry::Dir { mode }),
        "[a-z]{1,5}".prop_map(|target| Entry::Symlink { target }),
    ]
}

proptest! {
    #[test]
    fn manifest_round_trips(changes in proptest::collection::vec((arb_path(), proptest::option::of(arb_entry())), 0..40)) {
        let mut m = Manifest::new();
        let changes: Vec<Change> = changes.into_iter().map(|(path, entry)| Change { path, entry }).collect();
        m.apply(&changes).unwrap();
        let mut pages = crate::tree::MemPages::default();
        let small = Shape { bits: 1, fill: 64 };
        let built = m.build(small, &mut |r, b| pages.insert(r, &b).unwrap());
        prop_assert_eq!(built.entries, m.len() as u64);
        prop_assert_eq!(&Manifest::from_tree(&pages, &built.root).unwrap(), &m);
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Page::decode(&bytes);
        // Pages, reached on purpose: a leaf and a branch header.
        let _ = Page::decode(&[&[2u8, 0][..], &bytes].concat());
        let _ = Page::decode(&[&[2u8, 1][..], &bytes].concat());
        let _ = frame::decode::<CoordRequest>(&bytes);
        let _ = frame::decode::<CoordResponse>(&bytes);
        let _ = frame::decode::<BlobRequest>(&bytes);
        // The batched requests, reached on purpose (random bytes seldom start with their tag).
        let _ = frame::decode::<BlobRequest>(&[&[2u8][..], &bytes].concat());
        // Subscriptions, picks and their frames (a piece set decoded from hostile bytes).
        let _ = frame::decode::<BlobRequest>(&[&[1u8][..], &bytes].concat());
        let _ = frame::decode::<BlobRequest>(&[&[3u8][..], &bytes].concat());
        let _ = frame::decode::<crate::blobs::Held>(&bytes);
        let _ = frame::decode::<GetHeader>(&[&[6u8][..], &bytes].concat());
        let _ = frame::decode::<CoordRequest>(&[&[6u8][..], &bytes].concat());
        let _ = frame::decode::<crate::coord::CommitPart>(&bytes);
        // The control socket, both ways, and the JSON form the Python package sends.
        let _ = frame::decode::<crate::control::Request>(&bytes);
        let _ = frame::decode::<crate::control::Request>(&[&[6u8][..], &bytes].concat());
        let _ = frame::decode::<crate::control::Event>(&bytes);
        let _ = serde_json::from_slice::<crate::control::Request>(&bytes);
    }

    #[test]
    fn json_control_requests_never_panic(s in "\\PC{0,200}", name in "[a-z]{1,8}") {
        let _ = serde_json::from_str::<crate::control::Request>(&s);
        let wrapped = format!("{{\"VolumeUpload\":{{\"name\":\"{name}\",\"entries\":{s},\"force\":true}}}}");
        let _ = serde_json::from_str::<crate::control::Request>(&wrapped);
    }

    #[test]
    fn requests_round_trip(name in "[a-zA-Z0-9._-]{1,64}", base in any::<u64>(), paths in proptest::collection::vec((arb_path(), proptest::option::of(arb_entry())), 0..8)) {
        let msg = CoordRequest::Commit {
            name,
            volume: VolumeId([1; 16]),
            base_version: base,
        };
        let f = frame::encode(&msg);
        let len = frame::body_len(f[..4].try_into().unwrap(), crate::coord::MAX_REQUEST).unwrap();
        prop_assert_eq!(len, f.len() - 4);
        prop_assert_eq!(frame::decode::<CoordRequest>(&f[4..]).unwrap(), msg);
        let part = crate::coord::CommitPart {
            priors: paths.iter().map(|(_, e)| e.clone()).collect(),
            changes: paths.into_iter().map(|(path, entry)| Change { path, entry }).collect(),
            last: base % 2 == 0,
        };
        let f = frame::encode(&part);
        let len = frame::body_len(f[..4].try_into().unwrap(), crate::coord::MAX_COMMIT_PART_BYTES).unwrap();
        prop_assert_eq!(len, f.len() - 4);
        prop_assert_eq!(frame::decode::<crate::coord::CommitPart>(&f[4..]).unwrap(), part);
    }
}

/// Manifest pages built byte by byte, as a hostile coordinator or a damaged blob could hold them.
#[test]
fn hostile_manifests_are_refused() {
    #[derive(serde::Serialize)]
    struct Raw<'a> {
        version: u8,
        level: u8,
        entries: Vec<(&'a str, Entry)>,
    }
    let file = Entry::File {
        size: 1,
        mode: 0o644,
        mtime_ns: 0,
        hash: Hash([1; 32]),
    };
    let link = |t: &str| Entry::Symlink { target: t.into() };
    let cases: Vec<Vec<(&str, Entry)>> = vec![
        vec![("../x", file.clone())],
        vec![("/etc/x", file.clone())],
        vec![("a/../../b", file.clone())],
        vec![("a\0b", file.clone())],
        vec![("a//b", file.clone())],
        vec![("out", link("../outside"))],
        vec![("abs", link("/etc/passwd"))],
        vec![("d/x", file.clone())],
        vec![("b", file.clone()), ("a", file.clone())],
        vec![("a", file.clone()), ("a", file.clone())],
        vec![("f", file.clone()), ("f/x", file.clone())],
    ];
    for (i, entries) in cases.into_iter().enumerate() {
        let bytes = postcard::to_stdvec(&Raw {
            version: 2,
            level: 0,
            entries: entries.clone(),
        })
        .unwrap();
        // A page refuses what it can see alone; a whole tree refuses orphans as well.
        let refused = Page::decode(&bytes).is_err() || {
            let mut pages = crate::tree::MemPages::default();
            let r = crate::tree::PageRef {
                hash: Hash::of(&bytes),
                size: bytes.len() as u64,
            };
            pages.insert(r, &bytes).unwrap();
            Manifest::from_tree(&pages, &r).is_err()
        };
        assert!(refused, "case {i} accepted");
    }
}
