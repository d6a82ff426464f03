//! What a node tells the tracker (the coordinator) and asks of it.

use std::net::SocketAddr;

use voltool_protocol::coord::{self, CoordRequest, CoordResponse, MAX_HAS, PeerRtt};
use voltool_protocol::swarm::NodeId;

use super::*;
use crate::coord_client::CoordClient;

/// A node's side of the tracker: announcements, heartbeats, reports, lookups.
#[derive(Debug)]
pub struct TrackerClient {
    coord: Arc<CoordClient>,
    pool: ConnPool,
    /// Where this node serves blobs.
    addr: SocketAddr,
    zone: Option<String>,
    /// The tracker's epoch at the last heartbeat (0: none yet).
    epoch: std::sync::atomic::AtomicU64,
}

impl TrackerClient {
    /// A client over the coordinator connection; `addr` is where this node serves blobs,
    /// and `pool` its blob connections (whose round-trip times it reports).
    pub fn new(
        coord: Arc<CoordClient>,
        pool: ConnPool,
        addr: SocketAddr,
        zone: Option<String>,
    ) -> Self {
        TrackerClient {
            coord,
            pool,
            addr,
            zone,
            epoch: Default::default(),
        }
    }

    /// Tells the tracker this node holds `blobs` (complete or in part), with the
    /// round-trip times to the peers it talks to (the tracker ranks providers for this
    /// node's next lookups by them).
    pub async fn announce(&self, blobs: Vec<Hash>, complete: bool) {
        for chunk in blobs.chunks(MAX_HAS) {
            let req = CoordRequest::Announce {
                addr: self.addr,
                zone: self.zone.clone(),
                blobs: chunk.to_vec(),
                complete,
            };
            if let Err(e) = self.coord.request(&req).await {
                debug!("announce failed: {e}");
            }
        }
        let rtts: Vec<PeerRtt> = self
            .pool
            .rtts()
            .await
            .into_iter()
            .take(coord::MAX_RTTS)
            .map(|(id, rtt)| PeerRtt {
                id: *id.as_bytes(),
                micros: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
            })
            .collect();
        if !rtts.is_empty()
            && let Err(e) = self.coord.request(&CoordRequest::Rtts { rtts }).await
        {
            debug!("reporting round-trip times failed: {e}");
        }
    }

    /// Tells the tracker this node is alive (and registers it): without one within the
    /// tracker's time to live, what it announced expires. Returns whether what this node
    /// holds must be announced again: the tracker started afresh (a new epoch: a restart,
    /// a new leader), or did not know this node (an entry that expired).
    pub async fn heartbeat(&self) -> bool {
        let req = CoordRequest::Heartbeat {
            addr: self.addr,
            zone: self.zone.clone(),
        };
        match self.coord.request(&req).await {
            Ok(CoordResponse::Tracked { epoch, known }) => {
                let before = self.epoch.swap(epoch, std::sync::atomic::Ordering::Relaxed);
                // A new epoch is a tracker that started afresh (a restart, a new leader):
                // everything is announced again, even where it already knows this node
                // from what it announced since (a commit's blobs, say), which is not all.
                let afresh = before != epoch && before != 0;
                if afresh {
                    tracing::info!("the tracker started afresh (a new epoch)");
                }
                afresh || !known
            }
            Ok(other) => {
                debug!("the tracker answered a heartbeat with {other:?}");
                false
            }
            Err(e) => {
                debug!("heartbeat failed: {e}");
                false
            }
        }
    }

    /// Tells the tracker that `provider` sent bytes of `hash` that failed verification.
    pub async fn report(&self, provider: NodeId, hash: Hash) {
        let req = CoordRequest::Report {
            provider: provider.0,
            hash,
        };
        if let Err(e) = self.coord.request(&req).await {
            debug!("report failed: {e}");
        }
    }

    /// Tells the tracker this node no longer holds `blobs` (none: it leaves).
    pub async fn withdraw(&self, blobs: Vec<Hash>) {
        if let Err(e) = self.coord.request(&CoordRequest::Withdraw { blobs }).await {
            debug!("withdraw failed: {e}");
        }
    }

    /// The tracker's answer to a lookup (`Lookup` or `LookupAll`), or `None` when it
    /// cannot be asked.
    pub async fn providers(&self, req: &CoordRequest) -> Result<Vec<coord::ProviderInfo>, String> {
        match self.coord.request(req).await {
            Ok(CoordResponse::Providers(list)) => Ok(list),
            Ok(other) => Err(format!("the tracker answered a lookup with {other:?}")),
            Err(e) => {
                debug!("lookup failed: {e}");
                Err(format!("tracker lookup failed: {e}"))
            }
        }
    }
}
