//! The tracker: who holds which blobs, where they listen, and how to rank them for an
//! asker.

use super::*;

/// Who holds which blobs, and where they listen.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    pub(super) peers: HashMap<EndpointId, (SocketAddr, Option<String>)>,
    pub(super) holders: HashMap<Hash, HashMap<EndpointId, bool>>,
    /// Round-trip times each node reported to its peers, microseconds.
    pub(super) rtts: HashMap<EndpointId, HashMap<EndpointId, u32>>,
}

/// Coarse band of a round-trip time (the swarm tracker's own).
pub(super) use voltool_protocol::swarm::rtt_band;

impl Tracker {
    pub(super) fn forget(&mut self, peer: &EndpointId) {
        self.peers.remove(peer);
        self.rtts.remove(peer);
        for m in self.holders.values_mut() {
            m.remove(peer);
        }
        self.holders.retain(|_, m| !m.is_empty());
    }
}

/// Providers of a blob for `asker`: fleet members that announced it (never the asker), those
/// in the asker's zone first, then by the round-trip time the asker measured to them (in
/// bands of a factor of two, unmeasured last), complete holders before partial ones, in
/// random order within each group so that askers spread over them; then the origin if it
/// holds the blob.
pub(super) fn lookup(state: &State, asker: &EndpointId, hash: &Hash) -> Vec<coord::ProviderInfo> {
    let t = state.tracker.lock().expect("not poisoned");
    let holders: Vec<(EndpointId, bool)> = t
        .holders
        .get(hash)
        .into_iter()
        .flatten()
        .map(|(id, c)| (*id, *c))
        .collect();
    let origin_holds = state.origin.has_complete(hash).unwrap_or(false);
    rank(state, &t, asker, holders, origin_holds)
}

/// Providers that hold every one of `hashes` complete, ranked for `asker` as [`lookup`]
/// ranks them; then the origin if it holds them all. One lookup for a batch of small
/// blobs that one provider sends on one stream.
pub(super) fn lookup_all(
    state: &State,
    asker: &EndpointId,
    hashes: &[Hash],
) -> Vec<coord::ProviderInfo> {
    let t = state.tracker.lock().expect("not poisoned");
    let Some((first, rest)) = hashes.split_first() else {
        return Vec::new();
    };
    let holders: Vec<(EndpointId, bool)> = t
        .holders
        .get(first)
        .into_iter()
        .flatten()
        .filter(|(id, complete)| {
            **complete
                && rest
                    .iter()
                    .all(|h| t.holders.get(h).is_some_and(|m| m.get(*id) == Some(&true)))
        })
        .map(|(id, c)| (*id, *c))
        .collect();
    let origin_holds = state
        .origin
        .has_complete_many(hashes)
        .is_ok_and(|v| v.iter().all(|h| *h));
    rank(state, &t, asker, holders, origin_holds)
}

fn rank(
    state: &State,
    t: &Tracker,
    asker: &EndpointId,
    holders: Vec<(EndpointId, bool)>,
    origin_holds: bool,
) -> Vec<coord::ProviderInfo> {
    let my_zone = t.peers.get(asker).and_then(|(_, z)| z.clone());
    let my_rtts = t.rtts.get(asker);
    let mut out: Vec<((bool, u32, bool, u64), coord::ProviderInfo)> = holders
        .into_iter()
        .filter(|(id, _)| id != asker && state.is_member(id))
        .filter_map(|(id, complete)| {
            let (addr, zone) = t.peers.get(&id)?;
            let same_zone = my_zone.is_some() && *zone == my_zone;
            let rtt = rtt_band(my_rtts.and_then(|m| m.get(&id)).copied());
            Some((
                (!same_zone, rtt, !complete, rand::random::<u64>()),
                coord::ProviderInfo {
                    id: *id.as_bytes(),
                    addr: *addr,
                    zone: zone.clone(),
                    complete,
                    origin: false,
                },
            ))
        })
        .collect();
    out.sort_by_key(|(rank, _)| *rank);
    let mut out: Vec<coord::ProviderInfo> = out.into_iter().map(|(_, p)| p).collect();
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

#[cfg(test)]
mod tests {
    use super::rtt_band;

    #[test]
    fn rtt_bands_double() {
        assert_eq!(rtt_band(Some(0)), 0);
        assert_eq!(rtt_band(Some(999)), 0);
        assert_eq!(rtt_band(Some(1_000)), 1);
        assert_eq!(rtt_band(Some(1_999)), 1);
        assert_eq!(rtt_band(Some(2_000)), 2);
        assert_eq!(rtt_band(Some(40_000)), 6);
        assert!(rtt_band(Some(u32::MAX)) < rtt_band(None));
    }
}
