//! The blob protocol: requests a provider reads from any peer, the headers and piece sets a
//! downloader reads back; the ranges of a request checked as a provider checks them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voltool_protocol::blobs::{BlobRequest, GetHeader, Held};
use voltool_protocol::frame;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(BlobRequest::Get { ranges, .. }) = frame::decode::<BlobRequest>(bytes)
        && ranges.validate().is_ok()
    {
        let _ = ranges.to_chunk_ranges();
    }
    let _ = frame::decode::<GetHeader>(bytes);
    let _ = frame::decode::<Held>(bytes);
});
