//! The swarm side of the agent: its endpoint, its connections to peers, and serving the
//! blobs it holds to fleet members.

use super::*;

/// The swarm side of the agent.
pub(super) struct Peers {
    /// This node's endpoint (its key, its address).
    pub(super) ep: Endpoint,
    /// Connections to peers and the origin, with the ingress limit.
    pub(super) pool: ConnPool,
    /// What and how it serves (egress limit, the swarm's knobs, the pushes).
    pub(super) serve: crate::blobs::ServeOptions,
    /// Its downloads by priority: background ones wait while a foreground one fetches.
    pub(super) arbiter: crate::blobs::Arbiter,
}

/// Serves the blobs this node holds to the fleet members that connect.
pub(super) async fn peer_loop(inner: Arc<Inner>, cancel: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            i = inner.peers.ep.accept() => match i { Some(i) => i, None => return },
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let Ok(accepting) = incoming.accept() else {
                return;
            };
            let Ok(conn) = accepting.await else { return };
            // Only fleet members the coordinator vouches for may fetch.
            let member = inner.is_member(&conn.remote_id()).await;
            if !member {
                warn!(peer = %conn.remote_id().fmt_short(), "refused a node that is not a fleet member");
            }
            // Checked again at every request: a node removed meanwhile is refused.
            let i = inner.clone();
            let allow: crate::blobs::Allow = Arc::new(move |id| member && i.is_listed_member(id));
            crate::blobs::serve(conn, inner.store.clone(), allow, inner.peers.serve.clone()).await;
        });
    }
}
