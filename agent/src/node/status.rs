//! `voltool status`.

use super::*;

impl Inner {
    pub(super) async fn status(&self) -> OpResult<StatusReport> {
        let mut mounts = Vec::new();
        for m in self.mounts()? {
            let remote = match self
                .remote
                .coord
                .request(&CoordRequest::GetHead {
                    name: m.name.clone(),
                })
                .await
            {
                Ok(CoordResponse::Volume(v)) if self.accept_head(&v.head).is_ok() => {
                    Some(v.head.commit.version)
                }
                _ => None,
            };
            let compacted = self.base_layers(&m) != m.layers;
            let lazy = self.lazy_status(&m);
            mounts.push(MountStatus {
                last_reload: self
                    .mounted
                    .last_reload
                    .lock()
                    .expect("not poisoned")
                    .get(&m.name)
                    .cloned(),
                volume: m.name,
                path: m.path,
                local_version: m.version,
                remote_version: remote,
                background_commit_secs: m.background_commit_secs,
                layers: m.layers.len(),
                compacted,
                read_only: m.read_only,
                lazy,
            });
        }
        let st = self.store.clone();
        let s = tokio::task::spawn_blocking(move || st.usage())
            .await
            .map_err(failed)?
            .map_err(failed)?;
        let evicted = self.budget.evicted();
        Ok(StatusReport {
            node_id: self.peers.ep.id().to_string(),
            addr: net::local_addr(&self.peers.ep).to_string(),
            coordinator: self.remote.coord.addr().to_string(),
            zone: self.opts.zone.clone(),
            snapshots: self.snapshots.name().to_string(),
            mounts,
            store: voltool_protocol::control::StoreStatus {
                bytes: s.0,
                blobs: s.1,
                max: self.opts.store_max.map(|b| b.max),
                evictions: evicted.blobs,
                evicted_bytes: evicted.bytes,
                from_origin: self.metrics.received_from(crate::metrics::Source::Origin),
                from_peers: self.metrics.received_from(crate::metrics::Source::Peer),
            },
            follows: self.follow_status()?,
        })
    }
}
