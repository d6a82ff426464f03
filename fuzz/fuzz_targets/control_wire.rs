//! The control socket: requests (from any local process that can open it), in postcard and
//! in the JSON the Python package sends, and the events a client reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voltool_protocol::control::{Event, Request};
use voltool_protocol::frame;

fuzz_target!(|bytes: &[u8]| {
    let _ = frame::decode::<Request>(bytes);
    let _ = frame::decode::<Event>(bytes);
    let _ = serde_json::from_slice::<Request>(bytes);
});
