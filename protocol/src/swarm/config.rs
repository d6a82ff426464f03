//! Every tuning knob of the swarm, in one place.

use std::time::Duration;

/// The swarm's knobs: the downloader's, a provider's and the tracker's. One value is shared
/// by the agent, the coordinator and the simulator, so what the simulator shows is what the
/// fleet runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    // The downloader.
    /// Bytes of a piece of a large blob: a multiple of the 16 KiB chunk group; small enough
    /// that simultaneous downloaders spread over many pieces and pass them on soon.
    pub piece_bytes: u64,
    /// Blobs at most this large are fetched whole, many to a request.
    pub small_max: u64,
    /// Most blobs in one batch of small blobs (one lookup, one request).
    pub small_batch_count: usize,
    /// Most bytes in one batch of small blobs.
    pub small_batch_bytes: u64,
    /// Requests for small blobs in flight at once.
    pub small_lanes: usize,
    /// Pieces in flight at once, over all blobs and providers.
    pub pieces_in_flight: usize,
    /// Pieces in flight at once from one peer.
    pub pieces_per_provider: usize,
    /// Requests in flight at once to the origin while other downloaders may share it.
    pub origin_in_flight: usize,
    /// Large blobs started at once (a blob whose pieces are all handed out no longer counts,
    /// so the next one starts while its last pieces land).
    pub blobs_in_flight: usize,
    /// How long a piece is in flight before the endgame asks a second provider for it.
    pub endgame_after: Duration,
    /// A request's deadline: this, plus its bytes at [`Config::slowest_rate`].
    pub request_timeout: Duration,
    /// The slowest link a request is given time for, bytes per second.
    pub slowest_rate: u64,
    /// How long a provider that answered busy is first left alone; it doubles while it
    /// keeps answering busy, up to [`Config::busy_backoff_max`].
    pub busy_backoff: Duration,
    /// Longest rest after busy answers.
    pub busy_backoff_max: Duration,
    /// Failures in a row (other than bad bytes) after which a provider is dropped for the
    /// rest of the download.
    pub max_failures: u32,
    /// The first look at the tracker again after a blob's first lookup; the gap doubles up
    /// to [`Config::lookup_refresh_max`] while the blob is not complete.
    pub lookup_refresh: Duration,
    /// Longest gap between lookups of one blob.
    pub lookup_refresh_max: Duration,
    /// Lookups in a row that bring nothing a stuck blob can use before it fails.
    pub stuck_rounds: u32,
    /// Pieces drawn at random when choosing one; the rarest of them (among the providers
    /// known) is asked for.
    pub rarest_of: usize,
    /// Providers of one blob kept at once (partial holders beyond it are not taken on).
    pub max_sources: usize,
    /// Partial holders of one blob subscribed to at once (they push what they newly hold).
    pub subscriptions: usize,
    /// Blobs announced in one message.
    pub announce_batch: usize,
    /// Longest wait before what was fetched is announced.
    pub announce_interval: Duration,

    // A provider.
    /// Requests served at once; more wait their turn.
    pub serve_slots: usize,
    /// Requests that may wait for a slot; more are answered busy.
    pub serve_queue: usize,
    /// Subscribers to one blob's progress at once.
    pub max_subscribers: usize,
    /// Longest wait before newly held pieces are pushed to subscribers (pushes coalesce).
    pub have_interval: Duration,

    // The tracker.
    /// Most providers in one lookup's answer (the origin comes in addition).
    pub lookup_answer: usize,
    /// Holders drawn at random before ranking, as a multiple of [`Config::lookup_answer`].
    pub lookup_sample: usize,
    /// A member's holdings expire when it has not announced (or sent a heartbeat) for this
    /// long.
    pub holder_ttl: Duration,
    /// Distinct members that must report a provider before the tracker stops handing it out.
    pub report_quorum: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            piece_bytes: 512 << 10,
            small_max: 1 << 20,
            small_batch_count: 1024,
            small_batch_bytes: 16 << 20,
            small_lanes: 2,
            pieces_in_flight: 8,
            pieces_per_provider: 4,
            origin_in_flight: 2,
            blobs_in_flight: 2,
            endgame_after: Duration::from_millis(750),
            request_timeout: Duration::from_secs(10),
            slowest_rate: 64 << 10,
            busy_backoff: Duration::from_millis(200),
            busy_backoff_max: Duration::from_millis(3200),
            max_failures: 3,
            lookup_refresh: Duration::from_millis(500),
            lookup_refresh_max: Duration::from_secs(8),
            stuck_rounds: 4,
            rarest_of: 4,
            max_sources: 96,
            subscriptions: 48,
            announce_batch: 4096,
            announce_interval: Duration::from_millis(200),
            serve_slots: 3,
            serve_queue: 6,
            max_subscribers: 64,
            have_interval: Duration::from_millis(100),
            lookup_answer: 32,
            lookup_sample: 4,
            holder_ttl: Duration::from_secs(90),
            report_quorum: 2,
        }
    }
}

impl Config {
    /// A request's deadline after it is sent, for `bytes`.
    pub fn deadline_for(&self, bytes: u64) -> Duration {
        self.request_timeout + Duration::from_secs_f64(bytes as f64 / self.slowest_rate as f64)
    }
}
