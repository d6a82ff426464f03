//! Manifest pages as a hostile coordinator or a damaged store could hold them: decoded,
//! then read as the root of a whole manifest (paths, order, entries checked).
#![no_main]

use libfuzzer_sys::fuzz_target;
use voltool_protocol::tree::{MemPages, Page};
use voltool_protocol::{Hash, Manifest, PageRef};

fuzz_target!(|bytes: &[u8]| {
    let _ = Page::decode(bytes);
    let root = PageRef {
        hash: Hash::of(bytes),
        size: bytes.len() as u64,
    };
    let mut pages = MemPages::default();
    if pages.insert(root, bytes).is_ok() {
        let _ = Manifest::from_tree(&pages, &root);
        let (mut p, mut b) = (Default::default(), Default::default());
        let _ = voltool_protocol::tree::mark(&pages, &root, &mut p, &mut b);
    }
});
