//! The tracker at the coordinator: the swarm's sans-IO bookkeeping ([`swarm::Tracker`]:
//! bounded, ranked, partly random answers; expiry; reports) behind a lock, with the origin
//! added as the last provider of every answer it can serve.

use std::time::Instant;

use voltool_protocol::swarm::{self, Holder, NodeId};

use super::meta::{Meta, MetaError};
use super::*;

/// Who holds which blobs, and where they listen.
pub(super) type Tracker = swarm::Tracker<SocketAddr>;

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Leaves out again the providers distrusted before a restart, for what remains of their
/// time (distrust is the one part of the tracker that outlives a restart, since the
/// evidence behind it, who was handed whom, does not); forgets those whose time is up.
pub(super) fn restore_distrust(meta: &dyn Meta, t: &mut Tracker) -> Result<(), MetaError> {
    let now_ms = unix_ms(std::time::SystemTime::now());
    let now = Instant::now();
    for (id, until) in meta.distrusted()? {
        if until > now_ms {
            t.distrust_until(
                NodeId(id),
                now + std::time::Duration::from_millis(until - now_ms),
            );
        }
    }
    meta.forget_distrust(now_ms)
}

/// A report from `reporter` against `liar` for `hash`: counted if the tracker can check
/// it; a provider that the report leaves out is recorded, so it stays out after a restart
/// (a write that happens once a quorum forms, at most once a provider per report time).
pub(super) fn report(state: &State, reporter: &NodeId, liar: NodeId, hash: &Hash) {
    let newly = {
        let mut t = state.tracker.lock().expect("not poisoned");
        let now = Instant::now();
        let before = t.distrusted(now, &liar);
        t.report(now, reporter, &liar, hash) && !before
    };
    if newly {
        warn!(provider = ?liar, "tracker: left out of answers, reported by several members for bytes that fail verification");
        let until = unix_ms(std::time::SystemTime::now() + state.swarm.report_ttl);
        if let Err(e) = state.meta.distrust(liar.0, until) {
            warn!("cannot record a distrusted provider: {e}");
        }
    }
}

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
