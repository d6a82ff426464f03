//! voltool's node: content store, blob service, coordinator and agent roles.

pub mod keys;
pub mod net;
pub mod store;
