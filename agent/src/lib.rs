//! voltool's node: content store, blob service, coordinator and agent roles.

pub mod blobs;
pub mod control;
pub mod coord_client;
pub mod coordinator;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod node;
pub mod overlay;
pub mod rate;
pub mod scan;
pub mod store;
