//! The tracker at the coordinator: the swarm's sans-IO bookkeeping ([`swarm::Tracker`]:
//! bounded, ranked, partly random answers; expiry; reports) behind a lock, with the origin
//! added as the last provider of every answer it can serve.

use std::time::Instant;

use voltool_protocol::swarm::{self, Holder, NodeId};

use super::*;

/// Who holds which blobs, and where they listen.
pub(super) type Tracker = swarm::Tracker<SocketAddr>;

/// Providers left out of answers for reports against them, and until when (ms since the
/// Unix epoch): the one part of the tracker that outlives a restart, since the evidence
/// behind it (who was handed whom) does not.
const DISTRUST: TableDefinition<[u8; 32], u64> = TableDefinition::new("distrust-0");

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Leaves out again the providers distrusted before a restart, for what remains of their
/// time; forgets those whose time is up.
pub(super) fn restore_distrust(db: &Database, t: &mut Tracker) -> Result<(), CoordinatorError> {
    let now_ms = unix_ms(std::time::SystemTime::now());
    let now = Instant::now();
    let w = db.begin_write().map_err(db_err)?;
    {
        let mut table = w.open_table(DISTRUST).map_err(db_err)?;
        let all: Vec<([u8; 32], u64)> = table
            .iter()
            .map_err(db_err)?
            .filter_map(Result::ok)
            .map(|(k, v)| (k.value(), v.value()))
            .collect();
        for (id, until) in all {
            if until > now_ms {
                t.distrust_until(
                    NodeId(id),
                    now + std::time::Duration::from_millis(until - now_ms),
                );
            } else {
                table.remove(id).map_err(db_err)?;
            }
        }
    }
    w.commit().map_err(db_err)
}

/// Records that `id` is left out of answers for `ttl` from now.
fn save_distrust(
    db: &Database,
    id: &NodeId,
    ttl: std::time::Duration,
) -> Result<(), CoordinatorError> {
    let until = unix_ms(std::time::SystemTime::now() + ttl);
    let w = db.begin_write().map_err(db_err)?;
    w.open_table(DISTRUST)
        .map_err(db_err)?
        .insert(id.0, until)
        .map_err(db_err)?;
    w.commit().map_err(db_err)
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
        if let Err(e) = save_distrust(&state.db, &liar, state.swarm.report_ttl) {
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
