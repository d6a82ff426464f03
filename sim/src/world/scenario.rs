//! What a simulation is given (the scenario, each node's spec) and what it gives back.

use super::*;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Origin,
    Seed,
    Downloader,
}

/// One node's link and behaviour.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub(crate) role: Role,
    pub(crate) up: f64,
    pub(crate) down: f64,
    /// One-way latency of its access link, nanoseconds.
    pub(crate) latency: u64,
    pub(crate) zone: u8,
    /// Serves corrupt bytes.
    pub(crate) liar: bool,
    /// Leaves the fleet at this time (nanoseconds), for good.
    pub(crate) leaves_at: Option<u64>,
    /// A background download (a follow) held back until this time (nanoseconds), as the
    /// agent pauses one while a foreground download of the node runs.
    pub(crate) paused_until: Option<u64>,
    /// A reader on this node reads the files in order at this many bytes a second, as
    /// soon as the bytes are here (a lazy mount): what it waits for, the engine fetches
    /// first ([`Engine::want_now`]).
    pub(crate) reader: Option<f64>,
}

/// The whole scenario.
#[derive(Clone, Debug)]
pub(crate) struct Scenario {
    pub(crate) nodes: Vec<Spec>,
    /// Blob sizes: the files of the volume.
    pub(crate) blobs: Vec<u64>,
    /// Extra one-way latency between zones, nanoseconds.
    pub(crate) cross_zone: u64,
    pub(crate) seed: u64,
    pub(crate) cfg: Config,
    /// Nodes whose progress is sampled for the plot.
    pub(crate) traced: usize,
    /// Pieces a waiting reader asks for from where it stands (its readahead).
    pub(crate) read_window: u32,
}

/// What one node did.
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeResult {
    pub(crate) done_at: Option<f64>,
    pub(crate) failed: bool,
    pub(crate) lookups: u64,
    pub(crate) bans: usize,
    /// Verified bytes counted from liars (must stay 0).
    pub(crate) corrupt_accepted: u64,
    pub(crate) requests: u64,
    pub(crate) busy: u64,
    pub(crate) timeouts: u64,
    pub(crate) duplicate_bytes: u64,
    pub(crate) trace: Vec<(f64, u64)>,
    /// When its reader had read its first byte, and all (seconds).
    pub(crate) read_first_at: Option<f64>,
    pub(crate) read_done_at: Option<f64>,
}

/// What the run measured.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) nodes: Vec<NodeResult>,
    pub(crate) origin_bytes: f64,
    pub(crate) events: u64,
    pub(crate) sim_s: f64,
    pub(crate) reported_liars_left_out: usize,
    /// Bytes delivered in each second of simulated time.
    pub(crate) per_second: Vec<f64>,
    /// Events processed, by kind.
    pub(crate) kinds: Vec<(&'static str, u64)>,
}
