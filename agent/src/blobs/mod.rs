//! `voltool/blobs/4`: serving verified ranges from a store, and fetching them from the
//! swarm (the driver of the sans-IO engine).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iroh::EndpointId;
use iroh::endpoint::{Connection, ReadError, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use voltool_protocol::blobs::{
    ALPN, BlobRequest, GetHeader, Held, MAX_GET_MANY, MAX_GET_MANY_SIZE, MAX_REQUEST, MAX_RESPONSE,
};
use voltool_protocol::swarm::PieceSet;
use voltool_protocol::{Hash, RangeList, blob};

use crate::net::{self, NetError, NodeAddr};
use crate::rate::TokenBucket;
use crate::store::{Store, StoreError};

/// Stream reset code: the provider's copy failed its own verification while encoding.
pub(crate) const RESET_SELF_CHECK: VarInt = VarInt::from_u32(1);

mod client;
mod driver;
mod landed;
mod serve;
mod tracker;

pub use client::*;
pub use driver::*;
pub use landed::{Landed, Waited, Watch};
pub use serve::*;
pub use tracker::*;

/// Callback told the verified bytes of each unit as it lands.
pub type OnBytes = Arc<dyn Fn(u64) + Send + Sync>;

/// Splits blobs into runs of at most `max_count` blobs and about `max_bytes` (a larger blob
/// goes alone), in order: the batches of a batched upload or fetch.
pub fn batches(blobs: &[(Hash, u64)], max_count: usize, max_bytes: u64) -> Vec<&[(Hash, u64)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, (_, size)) in blobs.iter().enumerate() {
        if i > start && (i - start >= max_count || bytes + size > max_bytes) {
            out.push(&blobs[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < blobs.len() {
        out.push(&blobs[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_bounds_and_a_large_blob_goes_alone() {
        let blob = |s: u64| (Hash([s as u8; 32]), s);
        let blobs: Vec<_> = [3, 3, 3, 3, 100, 1, 1, 1, 1, 1]
            .into_iter()
            .map(blob)
            .collect();
        let b = batches(&blobs, 3, 8);
        assert_eq!(b.concat(), blobs);
        assert!(b.iter().all(|g| g.len() <= 3));
        assert!(
            b.iter()
                .all(|g| g.len() == 1 || g.iter().map(|x| x.1).sum::<u64>() <= 8)
        );
        assert!(b.contains(&&blobs[4..5]));
        assert!(batches(&[], 3, 8).is_empty());
    }
}
