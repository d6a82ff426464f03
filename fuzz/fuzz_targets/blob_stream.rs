//! The verified blob stream: a provider's answer to a request for ranges of a known blob,
//! decoded as a downloader decodes it. Whatever the bytes, a stream that decodes wrote
//! exactly the blob's own bytes in those ranges. The stream is the input itself, or (to
//! reach deep into the decoder) the honest answer with the input's edits: bytes flipped
//! at chosen places, and a cut.
#![no_main]

use std::sync::OnceLock;

use bao_tree::io::outboard::{PreOrderMemOutboard, PreOrderOutboard};
use libfuzzer_sys::fuzz_target;
use voltool_protocol::{Hash, RangeList, blob};

/// The blob: 100,000 bytes (seven chunk groups), its hash.
fn blob() -> &'static (Vec<u8>, Hash, PreOrderMemOutboard) {
    static B: OnceLock<(Vec<u8>, Hash, PreOrderMemOutboard)> = OnceLock::new();
    B.get_or_init(|| {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let h = Hash::of(&data);
        let ob = PreOrderMemOutboard::create(&data, blob::BLOCK_SIZE);
        (data, h, ob)
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&pick, edits)) = input.split_first() else {
        return;
    };
    let (data, hash, honest) = blob();
    let size = data.len() as u64;
    let chunks = size.div_ceil(blob::CHUNK_BYTES);
    // The ranges asked for: one of a few shapes, as downloaders ask.
    let start = u64::from(pick % 16) * 7 % chunks;
    let ranges = match pick >> 6 {
        0 => RangeList::all(size),
        1 => RangeList(vec![(start, (start + 16).min(chunks))]),
        2 => RangeList(vec![(0, 1), (start.max(2), chunks)]),
        _ => RangeList(vec![(start, start + 1)]),
    };
    if ranges.validate().is_err() {
        return;
    }
    let tree = blob::tree(size);
    let mut out = vec![0u8; data.len()];
    let mut ob = PreOrderOutboard {
        root: hash.as_blake3(),
        tree,
        data: vec![0u8; tree.outboard_size() as usize],
    };
    let want = ranges.to_chunk_ranges();
    let encoded = if pick & 0x20 != 0 {
        edits.to_vec()
    } else {
        let mut enc = Vec::new();
        bao_tree::io::sync::encode_ranges_validated(&data[..], honest, &want, &mut enc)
            .expect("the honest answer encodes");
        // Edits: (position high, position low, xor) triples; a last odd byte cuts there.
        let mut cut = enc.len();
        for e in edits.chunks(3) {
            match *e {
                [hi, lo, x] => {
                    let at = (usize::from(hi) << 8 | usize::from(lo)) * 7 % enc.len();
                    enc[at] ^= x;
                }
                [c] | [c, _] => cut = usize::from(c) * enc.len() / 256,
                _ => {}
            }
        }
        enc.truncate(cut);
        enc
    };
    if bao_tree::io::sync::decode_ranges(&encoded[..], &want, &mut out, &mut ob).is_ok() {
        for &(s, e) in &ranges.0 {
            let (a, b) = (
                (s * blob::CHUNK_BYTES) as usize,
                ((e * blob::CHUNK_BYTES) as usize).min(data.len()),
            );
            assert_eq!(
                &out[a..b],
                &data[a..b],
                "decoded bytes differ from the blob's"
            );
        }
    }
});
