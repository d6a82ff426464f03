//! Prometheus metrics of an agent or a coordinator, served as text on `GET /metrics`.
//!
//! Counters move where the work is done (a fetch, a served chunk, a commit); gauges that
//! describe a state (the store's bytes, the tracker's entries) are read when scraped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Where received bytes came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    /// The origin (the coordinator).
    Origin,
    /// Another agent.
    Peer,
    /// This node's own store: held already, nothing moved.
    Local,
}

impl EncodeLabelValue for Source {
    fn encode(
        &self,
        e: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        e.write_str(match self {
            Source::Origin => "origin",
            Source::Peer => "peer",
            Source::Local => "local",
        })
    }
}

/// The `source` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// Where the bytes came from.
    pub source: Source,
}

/// What the node reads when scraped, besides its counters.
pub type Refresh = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The metrics of one node. Every field is a handle on a registered metric.
pub struct Metrics {
    registry: Registry,
    refresh: std::sync::OnceLock<Refresh>,
    /// Verified bytes a node's downloads received (or found held), by source.
    pub bytes_in: Family<SourceLabel, Counter>,
    /// Blob bytes this node sent to others.
    pub bytes_out: Counter,
    /// Commits (an agent's: sent; the coordinator's: signed).
    pub commits: Counter,
    /// How long commits took, in seconds.
    pub commit_seconds: Histogram,
    /// Reloads an agent completed.
    pub reloads: Counter,
    /// How long reloads took, in seconds.
    pub reload_seconds: Histogram,
    /// Providers banned for bytes that failed verification.
    pub bans: Counter,
    /// Peers with an open connection.
    pub active_peers: Gauge,
    /// Bytes of blobs in the node's store (the origin's, for the coordinator).
    pub store_bytes: Gauge,
    /// Blobs in the node's store.
    pub store_blobs: Gauge,
    /// Holders the tracker knows of, summed over blobs (coordinator).
    pub tracker_entries: Gauge,
    /// Lookups the tracker answered (coordinator).
    pub tracker_lookups: Counter,
    /// Bytes the origin's garbage collection freed (coordinator).
    pub gc_freed_bytes: Counter,
    /// Blobs evicted from an agent's store to keep it within its budget.
    pub evictions: Counter,
    /// Bytes those evictions freed.
    pub evicted_bytes: Counter,
    /// Bytes downloads of followed volumes and preheats received from peers and the origin.
    pub prefetched_bytes: Counter,
    /// Versions of followed volumes (and preheats) downloaded whole.
    pub prefetched_versions: Counter,
    /// Heads pushed for followed volumes and refused (forged, rolled back).
    pub heads_refused: Counter,
    /// Followed volumes whose download waits (no room in the store, a failure).
    pub follows_waiting: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn seconds() -> Histogram {
    // 10 ms to about 11 minutes.
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

impl Metrics {
    /// The metrics of an agent (`coordinator` false) or a coordinator.
    pub fn new(coordinator: bool) -> Arc<Self> {
        let mut r = Registry::with_prefix("voltool");
        let m = Metrics {
            bytes_in: Family::default(),
            bytes_out: Counter::default(),
            commits: Counter::default(),
            commit_seconds: seconds(),
            reloads: Counter::default(),
            reload_seconds: seconds(),
            bans: Counter::default(),
            active_peers: Gauge::default(),
            store_bytes: Gauge::default(),
            store_blobs: Gauge::default(),
            tracker_entries: Gauge::default(),
            tracker_lookups: Counter::default(),
            gc_freed_bytes: Counter::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            prefetched_bytes: Counter::default(),
            prefetched_versions: Counter::default(),
            heads_refused: Counter::default(),
            follows_waiting: Gauge::default(),
            registry: Registry::default(),
            refresh: std::sync::OnceLock::new(),
        };
        r.register(
            "bytes_out",
            "Blob bytes sent to other nodes",
            m.bytes_out.clone(),
        );
        r.register("commits", "Commits completed", m.commits.clone());
        r.register(
            "commit_duration_seconds",
            "How long commits took",
            m.commit_seconds.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes of blobs in the store (the origin's, on the coordinator)",
            m.store_bytes.clone(),
        );
        r.register("store_blobs", "Blobs in the store", m.store_blobs.clone());
        if coordinator {
            r.register(
                "tracker_entries",
                "Holders the tracker knows of, summed over blobs",
                m.tracker_entries.clone(),
            );
            r.register(
                "tracker_lookups",
                "Lookups the tracker answered",
                m.tracker_lookups.clone(),
            );
            r.register(
                "gc_freed_bytes",
                "Bytes the origin's garbage collection freed",
                m.gc_freed_bytes.clone(),
            );
        } else {
            r.register(
                "bytes_in",
                "Verified bytes downloads received, by source (local: held already)",
                m.bytes_in.clone(),
            );
            r.register("reloads", "Reloads completed", m.reloads.clone());
            r.register(
                "reload_duration_seconds",
                "How long reloads took",
                m.reload_seconds.clone(),
            );
            r.register(
                "bans",
                "Providers banned for bytes that failed verification",
                m.bans.clone(),
            );
            r.register(
                "active_peers",
                "Peers with an open connection",
                m.active_peers.clone(),
            );
            r.register(
                "evictions",
                "Blobs evicted from the store to keep it within its budget",
                m.evictions.clone(),
            );
            r.register(
                "evicted_bytes",
                "Bytes evictions freed",
                m.evicted_bytes.clone(),
            );
            r.register(
                "prefetched_bytes",
                "Bytes followed volumes' downloads and preheats received",
                m.prefetched_bytes.clone(),
            );
            r.register(
                "prefetched_versions",
                "Versions of followed volumes and preheats downloaded whole",
                m.prefetched_versions.clone(),
            );
            r.register(
                "heads_refused",
                "Heads pushed for followed volumes and refused (forged, rolled back)",
                m.heads_refused.clone(),
            );
            r.register(
                "follows_waiting",
                "Followed volumes whose download waits (no room in the store, a failure)",
                m.follows_waiting.clone(),
            );
        }
        Arc::new(Metrics { registry: r, ..m })
    }

    /// What to read when scraped (set once, when the node is up).
    pub fn on_scrape(&self, f: Refresh) {
        let _ = self.refresh.set(f);
    }

    /// The store's bytes and blobs, read now.
    pub fn read_store(&self, store: &crate::store::Store) {
        if let Ok((bytes, blobs)) = store.usage() {
            self.store_blobs
                .set(i64::try_from(blobs).unwrap_or(i64::MAX));
            self.store_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Bytes received from (or found held at) `source` since the start.
    pub fn received_from(&self, source: Source) -> u64 {
        self.bytes_in.get_or_create(&SourceLabel { source }).get()
    }

    /// Bytes received from (or found held at) `source`.
    pub fn received(&self, source: Source, bytes: u64) {
        self.bytes_in
            .get_or_create(&SourceLabel { source })
            .inc_by(bytes);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        if let Some(f) = self.refresh.get() {
            f(self);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records how long an operation took.
pub fn observe(h: &Histogram, took: Duration) {
    h.observe(took.as_secs_f64());
}

/// A failure to serve metrics.
#[derive(Debug, thiserror::Error)]
#[error("metrics on {addr}: {source}")]
pub struct MetricsError {
    /// Where.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// Serves `GET /metrics` on `addr` until `cancel`; returns where it listens.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError { addr, source })?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        debug!("metrics: accept failed: {e}");
                        continue;
                    }
                },
            };
            let m = metrics.clone();
            let service = hyper::service::service_fn(move |req| {
                let m = m.clone();
                async move { Ok::<_, Infallible>(respond(&m, &req)) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    debug!("metrics: connection failed: {e}");
                }
            });
        }
    });
    Ok(local)
}

fn respond<B>(m: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at GET /metrics\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
