//! What runs of coordinators in failover share: a three-member etcd cluster and an S3
//! server (Garage) on 127.0.0.1, from the test suite's fixtures, and a fleet's place in
//! them.

use std::time::Duration;

use anyhow::bail;
use voltool_tests::etcd::EtcdCluster;
use voltool_tests::garage::Garage;

use crate::fleet::HaSetup;

/// Coordinators in failover.
pub(crate) const COORDINATORS: usize = 3;

/// What a run in failover keeps from fleet to fleet: the etcd cluster and the S3 server
/// (each fleet under a prefix of its own).
pub(crate) struct HaRun {
    pub(crate) etcd: EtcdCluster,
    pub(crate) garage: Garage,
}

impl HaRun {
    /// Starts the etcd cluster and the S3 server (both must be installed:
    /// `scripts/etcd.sh`, `scripts/garage.sh`).
    pub(crate) fn start() -> anyhow::Result<Self> {
        for p in ["etcd", "etcdctl"] {
            if voltool_tests::on_path(p).is_none() {
                bail!("coordinators in failover need {p}: run scripts/etcd.sh");
            }
        }
        let started = std::panic::catch_unwind(|| (EtcdCluster::start(3), Garage::start()));
        let (etcd, garage) = started.map_err(|e| {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            anyhow::anyhow!("starting etcd and Garage: {msg}")
        })?;
        Ok(HaRun { etcd, garage })
    }

    /// A fleet (the `n`th of the run), under a prefix of its own.
    pub(crate) fn setup(&self, n: u64, lease_ttl: Duration) -> HaSetup {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let prefix = format!("fleet-{n}-{nanos}");
        HaSetup {
            coordinators: COORDINATORS,
            meta: self.etcd.meta_url(&prefix),
            s3: self.garage.origin(&prefix),
            lease_ttl,
        }
    }
}
