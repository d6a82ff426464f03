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

/// A knob that [`Config::set`] cannot take.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KnobError {
    /// Not `NAME=VALUE`.
    #[error("{0:?}: expected NAME=VALUE")]
    Form(String),
    /// The value is not a non-negative number.
    #[error("{0:?}: the value is not a non-negative number")]
    Value(String),
    /// No knob of this name.
    #[error("unknown knob {0:?}; the knobs are: {knobs}", knobs = Config::KNOBS.join(", "))]
    Unknown(String),
}

impl Config {
    /// The knobs [`Config::set`] takes: counts, sizes in KiB (`_kib`) and durations in
    /// milliseconds (`_ms`).
    pub const KNOBS: [&str; 17] = [
        "piece_kib",
        "pieces_in_flight",
        "pieces_per_provider",
        "origin_in_flight",
        "serve_slots",
        "serve_queue",
        "rarest_of",
        "subscriptions",
        "max_sources",
        "max_subscribers",
        "lookup_answer",
        "busy_backoff_ms",
        "busy_backoff_max_ms",
        "endgame_after_ms",
        "have_interval_ms",
        "lookup_refresh_ms",
        "lookup_refresh_max_ms",
    ];

    /// Turns one knob, written `NAME=VALUE` (see [`Config::KNOBS`]): for the simulator and
    /// for trials on a fleet. A knob that makes no sense (a piece size that is not a
    /// multiple of 16 KiB, zero slots) is taken as given; the simulator exists to try such.
    pub fn set(&mut self, kv: &str) -> Result<(), KnobError> {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| KnobError::Form(kv.to_string()))?;
        let n: f64 = v
            .trim()
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n >= 0.0)
            .ok_or_else(|| KnobError::Value(kv.to_string()))?;
        let ms = Duration::from_secs_f64(n / 1e3);
        let count = n as usize;
        match k.trim() {
            "piece_kib" => self.piece_bytes = (n as u64) << 10,
            "pieces_in_flight" => self.pieces_in_flight = count,
            "pieces_per_provider" => self.pieces_per_provider = count,
            "origin_in_flight" => self.origin_in_flight = count,
            "serve_slots" => self.serve_slots = count,
            "serve_queue" => self.serve_queue = count,
            "rarest_of" => self.rarest_of = count,
            "subscriptions" => self.subscriptions = count,
            "max_sources" => self.max_sources = count,
            "max_subscribers" => self.max_subscribers = count,
            "lookup_answer" => self.lookup_answer = count,
            "busy_backoff_ms" => self.busy_backoff = ms,
            "busy_backoff_max_ms" => self.busy_backoff_max = ms,
            "endgame_after_ms" => self.endgame_after = ms,
            "have_interval_ms" => self.have_interval = ms,
            "lookup_refresh_ms" => self.lookup_refresh = ms,
            "lookup_refresh_max_ms" => self.lookup_refresh_max = ms,
            other => return Err(KnobError::Unknown(other.to_string())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_knob_turns_and_bad_ones_are_named() {
        for k in Config::KNOBS {
            let mut c = Config::default();
            c.set(&format!("{k}=7")).unwrap();
            assert_ne!(c, Config::default(), "{k} changed nothing");
        }
        let mut c = Config::default();
        c.set("serve_slots=4").unwrap();
        assert_eq!(c.serve_slots, 4);
        c.set("endgame_after_ms=250").unwrap();
        assert_eq!(c.endgame_after, Duration::from_millis(250));
        let e = c.set("serve_slot=4").unwrap_err().to_string();
        assert!(e.contains("serve_slot") && e.contains("serve_slots"), "{e}");
        assert!(matches!(c.set("serve_slots"), Err(KnobError::Form(_))));
        assert!(matches!(c.set("serve_slots=-1"), Err(KnobError::Value(_))));
        assert!(matches!(c.set("serve_slots=NaN"), Err(KnobError::Value(_))));
    }
}
