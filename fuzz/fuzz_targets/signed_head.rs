//! Signed heads as a forging coordinator or a man in the middle could send them: decoded,
//! checked under a fixed key against a head seen before (rollback, wrong volume); and the
//! older commits of a `GetVersions` answer, checked link by link from the head.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voltool_protocol::commit::verify_chain;
use voltool_protocol::{Commit, SecretKey, SignedHead};

fuzz_target!(|bytes: &[u8]| {
    let key = SecretKey::from_bytes(&[7; 32]).public();
    let (head, rest) = match postcard::take_from_bytes::<SignedHead>(bytes) {
        Ok(x) => x,
        Err(_) => return,
    };
    let seen = postcard::from_bytes::<Commit>(rest).ok();
    let _ = head.verify_against(&key, seen.as_ref());
    if let Ok(older) = postcard::from_bytes::<Vec<Commit>>(rest) {
        let _ = verify_chain(&head.commit, &older);
    }
});
