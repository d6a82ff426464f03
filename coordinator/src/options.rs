//! What a coordinator is started with.

use super::*;

/// File in the data directory holding `NODE_ID@IP:PORT` once the coordinator listens.
pub const ADDR_FILE: &str = "coordinator.addr";

/// Coordinator options.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    /// Data directory (key, database, origin blobs).
    pub data: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Node ids allowed in the fleet; `None` admits any node (a warning is logged).
    pub members: Option<HashSet<EndpointId>>,
    /// Node ids that may write (they are members too); `None`: every member may.
    pub writers: Option<HashSet<EndpointId>>,
    /// Egress limit of the origin (bytes/s).
    pub max_egress: Option<Rate>,
    /// The QUIC congestion controller.
    pub congestion: voltool_agent::net::Congestion,
    /// The swarm's knobs (the tracker's, and the origin's as a provider).
    pub swarm: voltool_protocol::swarm::Config,
    /// What the origin keeps.
    pub retention: Retention,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
    /// Keep the origin's blobs in this S3-compatible bucket rather than under `data`
    /// (which keeps the metadata either way).
    pub s3: Option<voltool_agent::store::S3Options>,
    /// Longest time a commit may take to send its change set: it holds the lock every
    /// commit takes meanwhile (default [`COMMIT_DEADLINE`]).
    pub commit_deadline: std::time::Duration,
    /// Where the volumes, heads and version records are.
    pub meta: MetaOptions,
    /// The key that signs heads, a file every coordinator of the fleet holds (`None`: this
    /// coordinator's own `node.key`, which then also names it on the network).
    pub fleet_key: Option<PathBuf>,
    /// Fault injection for tests (none by default).
    pub hooks: Hooks,
}

/// Points where a test stops the coordinator (fault injection); none by default.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called (blocking, on the blocking pool) when a commit has signed its new head and is
    /// about to move the head: a test pauses the leader here.
    pub before_head_moves: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Called (blocking) when a collection has condemned a chunk of blobs and is about to
    /// delete their objects.
    pub before_gc_deletes: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("before_head_moves", &self.before_head_moves.is_some())
            .field("before_gc_deletes", &self.before_gc_deletes.is_some())
            .finish()
    }
}

impl CoordinatorOptions {
    /// Options with every default: the data directory `data`, 127.0.0.1 on a free port, no
    /// members list (any node may join), no limits, state in redb, the node key signing.
    pub fn new(data: PathBuf) -> Self {
        CoordinatorOptions {
            data,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            members: None,
            writers: None,
            max_egress: None,
            congestion: Default::default(),
            swarm: Default::default(),
            retention: Retention::default(),
            metrics: None,
            s3: None,
            commit_deadline: COMMIT_DEADLINE,
            meta: MetaOptions::Redb,
            fleet_key: None,
            hooks: Hooks::default(),
        }
    }
}

/// Where a coordinator keeps the fleet's state.
#[derive(Clone, Debug, Default)]
pub enum MetaOptions {
    /// A redb file in the data directory: one coordinator.
    #[default]
    Redb,
    /// An etcd cluster, shared by the fleet's coordinators, of which one leads at a time
    /// (with the origin on S3, shared as well).
    Etcd {
        /// The members and the fleet's prefix.
        url: meta::EtcdUrl,
        /// TLS with a client certificate (`None`: plain connections, `--etcd-open`).
        tls: Option<meta::EtcdTls>,
        /// The lead's lease: a leader that stops renewing it loses the lead this long after.
        lease_ttl: std::time::Duration,
    },
}

/// How long a commit may take to send its change set by default.
pub const COMMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);
