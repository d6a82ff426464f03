//! Range lists from a peer: a list that validates converts to chunk ranges and back to
//! itself (it is sorted, disjoint and not adjacent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use voltool_protocol::RangeList;

fuzz_target!(|bytes: &[u8]| {
    let Ok(list) = postcard::from_bytes::<RangeList>(bytes) else {
        return;
    };
    if list.validate().is_ok() {
        let chunks = list.0.last().map_or(1, |r| r.1.max(1));
        let back = RangeList::from_chunk_ranges(&list.to_chunk_ranges(), chunks);
        assert_eq!(back, list);
        let _ = list.chunks();
    }
});
