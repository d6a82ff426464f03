//! The coordinator's wire: frame prefixes, requests (what any member sends it), answers
//! (what an agent reads), and the parts of a change set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voltool_protocol::coord::{self, CommitPart, CoordRequest, CoordResponse};
use voltool_protocol::frame;

fuzz_target!(|bytes: &[u8]| {
    if let Some(prefix) = bytes.get(..frame::PREFIX_LEN) {
        let _ = frame::body_len(prefix.try_into().unwrap(), coord::MAX_REQUEST);
    }
    let _ = frame::decode::<CoordRequest>(bytes);
    let _ = frame::decode::<CoordResponse>(bytes);
    let _ = frame::decode::<CommitPart>(bytes);
});
