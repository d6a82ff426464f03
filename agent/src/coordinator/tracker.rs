//! The tracker at the coordinator: the swarm's sans-IO bookkeeping ([`swarm::Tracker`]:
//! bounded, ranked, partly random answers; expiry; reports) behind a lock, with the origin
//! added as the last provider of every answer it can serve.

use std::time::Instant;

use voltool_protocol::swarm::{self, Holder, NodeId};

use super::*;

/// Who holds which blobs, and where they listen.
pub(super) type Tracker = swarm::Tracker<SocketAddr>;

/// A node's id as the swarm names it.
pub(super) fn node_id(id: &EndpointId) -> NodeId {
    NodeId(*id.as_bytes())
}

/// Providers of a blob for `asker`: a bounded sample of live, trusted fleet members that
/// announced it (never the asker), ranked (zone, round-trip time, whole before partial, at
/// random within a rank); then the origin if it holds the blob.
pub(super) fn lookup(state: &State, asker: &EndpointId, hash: &Hash) -> Vec<coord::ProviderInfo> {
    state.metrics.tracker_lookups.inc();
    let holders =
        state
            .tracker
            .lock()
            .expect("not poisoned")
            .lookup(Instant::now(), &node_id(asker), hash);
    let origin_holds = state.origin.has_complete(hash).unwrap_or(false);
    answer(state, holders, origin_holds)
}

/// Providers that hold every one of `hashes` whole, ranked as [`lookup`] ranks them; then
/// the origin if it holds them all. One lookup for a batch of small blobs that one provider
/// sends on one stream.
pub(super) fn lookup_all(
    state: &State,
    asker: &EndpointId,
    hashes: &[Hash],
) -> Vec<coord::ProviderInfo> {
    state.metrics.tracker_lookups.inc();
    let holders = state.tracker.lock().expect("not poisoned").lookup_all(
        Instant::now(),
        &node_id(asker),
        hashes,
    );
    let origin_holds = state
        .origin
        .has_complete_many(hashes)
        .is_ok_and(|v| v.iter().all(|h| *h));
    answer(state, holders, origin_holds)
}

fn answer(
    state: &State,
    holders: Vec<Holder<SocketAddr>>,
    origin_holds: bool,
) -> Vec<coord::ProviderInfo> {
    let mut out: Vec<coord::ProviderInfo> = holders
        .into_iter()
        .filter(|h| EndpointId::from_bytes(&h.id.0).is_ok_and(|id| state.is_member(&id)))
        .map(|h| coord::ProviderInfo {
            id: h.id.0,
            addr: h.addr,
            zone: h.zone,
            complete: h.complete,
            origin: false,
        })
        .collect();
    if origin_holds {
        out.push(coord::ProviderInfo {
            id: *state.addr.id.as_bytes(),
            addr: state.addr.addr,
            zone: None,
            complete: true,
            origin: true,
        });
    }
    out
}

/// Drops the holdings of members that stopped announcing and sending heartbeats, now and
/// then, until `cancel`.
pub(super) async fn expire_loop(state: Arc<State>, cancel: CancellationToken) {
    let every = state.swarm.holder_ttl / 6;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let gone = state
            .tracker
            .lock()
            .expect("not poisoned")
            .expire(Instant::now());
        if gone > 0 {
            info!(
                members = gone,
                "tracker: members expired (no announcement or heartbeat)"
            );
        }
    }
}
