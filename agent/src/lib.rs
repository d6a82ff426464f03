//! voltool's node: content store, blob service, mounts, and the agent role (the coordinator, in
//! `voltool-coordinator`, builds on the store, blob service and transport here).

pub mod blobs;
pub mod control;
pub mod coord_client;
pub mod keys;
pub mod lazy;
pub mod metrics;
pub mod net;
pub mod node;
pub mod overlay;
pub mod rate;
pub mod scan;
pub mod store;
