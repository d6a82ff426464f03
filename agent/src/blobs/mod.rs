//! `voltool/blobs/1`: serving verified ranges from a store, and fetching them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iroh::EndpointId;
use iroh::endpoint::{Connection, ReadError, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use voltool_protocol::blobs::{
    ALPN, BlobRequest, GetHeader, HaveResponse, MAX_GET_MANY, MAX_GET_MANY_SIZE, MAX_REQUEST,
    MAX_RESPONSE,
};
use voltool_protocol::{Hash, RangeList, blob};

use crate::net::{self, NetError, NodeAddr};
use crate::rate::TokenBucket;
use crate::store::{Store, StoreError};

/// Stream reset code: the provider's copy failed its own verification while encoding.
pub(crate) const RESET_SELF_CHECK: VarInt = VarInt::from_u32(1);

mod client;
mod serve;
mod swarm;

pub use client::*;
pub use serve::*;
pub use swarm::*;
