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
    /// Pieces a reader waits for ([`super::Engine::want_now`]) that may be in flight beyond
    /// [`Config::pieces_in_flight`], so that a read never queues behind the fill.
    pub urgent_in_flight: usize,
    /// Pieces of the fill in flight at once while a reader waits for units: the rest of
    /// [`Config::pieces_in_flight`] is left to what is read.
    pub fill_while_reading: usize,
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
    /// Slots one peer may hold at once (the others stay for other peers).
    pub serve_slots_per_peer: usize,
    /// Places in the queue one peer may hold at once.
    pub serve_queue_per_peer: usize,
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
    /// How long a report counts, how long a provider handed to a member counts as evidence
    /// for that member's report, and how long a reported provider stays out of answers
    /// after the report that made the quorum.
    pub report_ttl: Duration,
    /// Most (blob, holder) entries the tracker keeps for one member; more announcements
    /// are not entered.
    pub max_held_per_member: usize,
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
            urgent_in_flight: 4,
            fill_while_reading: 2,
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
            serve_slots_per_peer: 2,
            serve_queue_per_peer: 2,
            max_subscribers: 64,
            have_interval: Duration::from_millis(100),
            lookup_answer: 32,
            lookup_sample: 4,
            holder_ttl: Duration::from_secs(90),
            report_quorum: 2,
            report_ttl: Duration::from_secs(1800),
            max_held_per_member: 1 << 20,
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
    /// The value is not a whole number the knob can take.
    #[error(
        "{0:?}: not a value the swarm can run with (counts 1 to 1,000,000; piece_kib a \
         multiple of 16 up to 65,536; _ms up to a day)"
    )]
    Value(String),
    /// No knob of this name.
    #[error("unknown knob {0:?}; the knobs are: {knobs}", knobs = Config::knobs().collect::<Vec<_>>().join(", "))]
    Unknown(String),
}

/// How a knob's value reads.
#[derive(Clone, Copy)]
enum Unit {
    /// A count, at least 1.
    Count,
    /// KiB, a positive multiple of 16 (the chunk group).
    Kib,
    /// Milliseconds, at most a day.
    Ms,
}

type Setter = fn(&mut Config, u64);

/// Every knob: its name, its unit, and what it sets.
const TABLE: [(&str, Unit, Setter); 21] = [
    ("piece_kib", Unit::Kib, |c, v| c.piece_bytes = v << 10),
    ("pieces_in_flight", Unit::Count, |c, v| {
        c.pieces_in_flight = v as usize
    }),
    ("pieces_per_provider", Unit::Count, |c, v| {
        c.pieces_per_provider = v as usize
    }),
    ("origin_in_flight", Unit::Count, |c, v| {
        c.origin_in_flight = v as usize
    }),
    ("serve_slots", Unit::Count, |c, v| {
        c.serve_slots = v as usize
    }),
    ("serve_queue", Unit::Count, |c, v| {
        c.serve_queue = v as usize
    }),
    ("serve_slots_per_peer", Unit::Count, |c, v| {
        c.serve_slots_per_peer = v as usize
    }),
    ("serve_queue_per_peer", Unit::Count, |c, v| {
        c.serve_queue_per_peer = v as usize
    }),
    ("rarest_of", Unit::Count, |c, v| c.rarest_of = v as usize),
    ("urgent_in_flight", Unit::Count, |c, v| {
        c.urgent_in_flight = v as usize
    }),
    ("fill_while_reading", Unit::Count, |c, v| {
        c.fill_while_reading = v as usize
    }),
    ("subscriptions", Unit::Count, |c, v| {
        c.subscriptions = v as usize
    }),
    ("max_sources", Unit::Count, |c, v| {
        c.max_sources = v as usize
    }),
    ("max_subscribers", Unit::Count, |c, v| {
        c.max_subscribers = v as usize
    }),
    ("lookup_answer", Unit::Count, |c, v| {
        c.lookup_answer = v as usize
    }),
    ("busy_backoff_ms", Unit::Ms, |c, v| {
        c.busy_backoff = Duration::from_millis(v)
    }),
    ("busy_backoff_max_ms", Unit::Ms, |c, v| {
        c.busy_backoff_max = Duration::from_millis(v)
    }),
    ("endgame_after_ms", Unit::Ms, |c, v| {
        c.endgame_after = Duration::from_millis(v)
    }),
    ("have_interval_ms", Unit::Ms, |c, v| {
        c.have_interval = Duration::from_millis(v)
    }),
    ("lookup_refresh_ms", Unit::Ms, |c, v| {
        c.lookup_refresh = Duration::from_millis(v)
    }),
    ("lookup_refresh_max_ms", Unit::Ms, |c, v| {
        c.lookup_refresh_max = Duration::from_millis(v)
    }),
];

impl Config {
    /// The knobs [`Config::set`] takes: counts, sizes in KiB (`_kib`) and durations in
    /// milliseconds (`_ms`).
    pub fn knobs() -> impl Iterator<Item = &'static str> {
        TABLE.iter().map(|(name, ..)| *name)
    }

    /// Turns one knob, written `NAME=VALUE` (see [`Config::knobs`]): for the simulator and
    /// for trials on a fleet. A value the swarm cannot run with is refused, naming the
    /// knob: a count of 0 or past a million, a piece size that is not a positive multiple
    /// of 16 KiB (at most 64 MiB), a duration past a day.
    pub fn set(&mut self, kv: &str) -> Result<(), KnobError> {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| KnobError::Form(kv.to_string()))?;
        let (_, unit, setter) = TABLE
            .iter()
            .find(|(name, ..)| *name == k.trim())
            .ok_or_else(|| KnobError::Unknown(k.trim().to_string()))?;
        let n: u64 = v
            .trim()
            .parse()
            .map_err(|_| KnobError::Value(kv.to_string()))?;
        let fits = match unit {
            Unit::Count => (1..=1_000_000).contains(&n),
            Unit::Kib => n > 0 && n.is_multiple_of(16) && n <= 64 << 10,
            Unit::Ms => n <= 86_400_000,
        };
        if !fits {
            return Err(KnobError::Value(kv.to_string()));
        }
        setter(self, n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_knob_turns_and_bad_ones_are_named() {
        for k in Config::knobs() {
            let mut c = Config::default();
            c.set(&format!("{k}=112")).unwrap();
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
        // What would stop or crash the swarm is refused.
        for bad in [
            "serve_slots=0",
            "serve_slots=1.5",
            "piece_kib=0",
            "piece_kib=24",
            "piece_kib=1048576",
            "max_sources=100000000000000000000000",
            "endgame_after_ms=100000000000",
        ] {
            assert!(matches!(c.set(bad), Err(KnobError::Value(_))), "{bad}");
        }
        c.set("piece_kib=256").unwrap();
        assert_eq!(c.piece_bytes, 256 << 10);
    }
}
