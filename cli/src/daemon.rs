//! `voltool coordinator`, `voltool agent`, `voltool node-id`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tracing_subscriber::EnvFilter;
use voltool_agent::net::{Congestion, NodeAddr};
use voltool_agent::node::{Agent, AgentOptions, SnapshotMode, StoreBudget};
use voltool_agent::rate::Rate;
use voltool_agent::store::S3Options;
use voltool_coordinator::{
    Coordinator, CoordinatorOptions, Membership, MetaOptions, Retention, read_members,
};

/// File in an agent's data directory holding `NODE_ID@IP:PORT` once it listens.
pub(crate) const AGENT_ADDR_FILE: &str = "agent.addr";

/// Where data lives when no `--data` / `--agent` is given.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".voltool")
}

/// Where a root agent's control sockets live unless `--run-dir` says otherwise, and where
/// clients look for them first.
pub(crate) const SYSTEM_RUN_DIR: &str = "/run/voltool";

/// The agent's run directory when `--run-dir` is not given: `/run/voltool` for root, the
/// data directory for anyone else.
pub(crate) fn default_run_dir(data: &std::path::Path) -> PathBuf {
    if rustix::process::geteuid().is_root() {
        PathBuf::from(SYSTEM_RUN_DIR)
    } else {
        data.to_path_buf()
    }
}

/// Where clients find the agent when neither `--agent` nor `VOLTOOL_AGENT` is given:
/// `/run/voltool` if it exists, else `~/.voltool` (an agent of one's own).
pub(crate) fn default_agent_dir() -> PathBuf {
    let system = PathBuf::from(SYSTEM_RUN_DIR);
    if system.is_dir() {
        system
    } else {
        default_data_dir()
    }
}

/// How a daemon moves bytes: options the coordinator and the agent share.
#[derive(Debug, Args)]
pub(crate) struct Tuning {
    /// QUIC congestion controller: cubic, newreno or bbr.
    #[arg(
        long,
        env = "VOLTOOL_CONGESTION",
        default_value = "cubic",
        value_name = "CC"
    )]
    congestion: Congestion,
    /// Turn a knob of the swarm, NAME=VALUE (repeatable, or comma-separated in the
    /// environment): for trials; the defaults are what the simulator and the benches chose.
    #[arg(
        long = "swarm-knob",
        env = "VOLTOOL_SWARM_KNOBS",
        value_delimiter = ',',
        hide = true,
        value_name = "NAME=VALUE"
    )]
    swarm_knob: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct CoordinatorArgs {
    /// Read options from this TOML file: its keys are the long options (`max-egress =
    /// "50mbit"`); an environment variable or a flag of the same option wins.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print the effective options as a config file, each with its description, and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// Data directory: node key, database, origin blobs.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    listen: SocketAddr,
    /// File of node ids allowed in the fleet, one per line (`#` comments); required unless
    /// --open. Re-read on SIGHUP: a node removed is refused at once, by the coordinator and
    /// by its peers.
    #[arg(long, value_name = "FILE")]
    members: Option<PathBuf>,
    /// Admit every node that reaches the coordinator as a member and a writer, with no
    /// members file: only for a trial on a network nobody else reaches.
    #[arg(long, conflicts_with = "members")]
    open: bool,
    /// File of node ids that may write (commit, put, rm, cp, batch uploads; create, rename
    /// and delete volumes), one per line; they are members too. Without it every member
    /// may write. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    writers: Option<PathBuf>,
    /// Egress limit of the origin, e.g. 50mbit, 12MiB/s.
    #[arg(long, value_name = "RATE")]
    max_egress: Option<Rate>,
    /// Versions of each volume the origin keeps (with every blob they reference); older
    /// versions and blobs nothing kept references are freed.
    #[arg(long, default_value_t = 10, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_versions: u64,
    /// How long a blob uploaded, or found held, is kept for the commit about to name it.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = humantime::parse_duration)]
    gc_grace: std::time::Duration,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Longest time a commit may take to send its change set (it holds the lock every
    /// commit takes meanwhile).
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    commit_deadline: std::time::Duration,
    /// Time between garbage collections of the origin (deleting a volume starts one).
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    gc_interval: std::time::Duration,
    #[command(flatten)]
    origin: OriginArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The lead's lease on etcd: a leader that stops renewing it (a crash, a pause, a
    /// partition) loses the lead this long after, and another takes over.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    lease_ttl: std::time::Duration,
    /// The key that signs heads (hex, mode 0600, like node.key), the same file on every
    /// coordinator of the fleet; agents trust its id. Without it: this coordinator's own
    /// node.key.
    #[arg(long, value_name = "FILE")]
    fleet_key: Option<PathBuf>,
    #[command(flatten)]
    tuning: Tuning,
}

/// Where the origin keeps its blobs.
#[derive(Debug, Args)]
pub(crate) struct OriginArgs {
    /// Keep the origin's blobs in an S3-compatible bucket, s3://BUCKET/PREFIX, rather than
    /// under the data directory (which keeps the metadata either way). Credentials come
    /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_SESSION_TOKEN).
    #[arg(long, value_name = "URL", value_parser = parse_s3)]
    origin: Option<S3Options>,
    /// The S3 endpoint, e.g. http://127.0.0.1:3900 for a local Garage; without it, AWS's.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    s3_endpoint: Option<String>,
    /// The S3 region.
    #[arg(long, env = "AWS_REGION", value_name = "REGION")]
    s3_region: Option<String>,
}

impl OriginArgs {
    /// The bucket, with its endpoint and region (`None`: the data directory).
    pub(crate) fn s3(&self) -> Option<S3Options> {
        self.origin.clone().map(|o| S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            ..o
        })
    }
}

/// Where the fleet's state is in etcd, and how to reach it.
#[derive(Debug, Args)]
pub(crate) struct EtcdArgs {
    /// Keep the fleet's volumes, heads and version records in etcd,
    /// etcd://HOST:PORT[,HOST:PORT…]/PREFIX, shared by several coordinators of which one
    /// leads at a time (the others wait to take over); needs --origin s3://… and, unless
    /// --etcd-open, --etcd-ca, --etcd-cert and --etcd-key. Without it: a redb file in the
    /// data directory, one coordinator.
    #[arg(long, value_name = "URL")]
    meta: Option<voltool_coordinator::meta::EtcdUrl>,
    /// The CA certificate that signed the etcd members' certificates (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    /// This coordinator's client certificate for etcd (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_ca")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_ca")]
    etcd_key: Option<PathBuf>,
    /// Talk to etcd without TLS: only on a network nobody else reaches.
    #[arg(long, conflicts_with = "etcd_ca")]
    etcd_open: bool,
}

impl EtcdArgs {
    /// The cluster's address and TLS files (`None` if --meta is not given).
    pub(crate) fn etcd(
        &self,
    ) -> anyhow::Result<
        Option<(
            voltool_coordinator::meta::EtcdUrl,
            Option<voltool_coordinator::meta::EtcdTls>,
        )>,
    > {
        let Some(url) = self.meta.clone() else {
            return Ok(None);
        };
        let tls = match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (Some(ca), Some(cert), Some(key)) => Some(voltool_coordinator::meta::EtcdTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ if self.etcd_open => {
                tracing::warn!("--etcd-open: the fleet's state travels to etcd unencrypted");
                None
            }
            _ => anyhow::bail!(
                "--meta etcd://… needs --etcd-ca, --etcd-cert and --etcd-key (TLS with a client certificate), or --etcd-open on a network nobody else reaches"
            ),
        };
        Ok(Some((url, tls)))
    }
}

/// Where the coordinator keeps the fleet's state, from its options.
fn meta_options(a: &CoordinatorArgs) -> anyhow::Result<MetaOptions> {
    let Some((url, tls)) = a.etcd.etcd()? else {
        return Ok(MetaOptions::Redb);
    };
    Ok(MetaOptions::Etcd {
        url,
        tls,
        lease_ttl: a.lease_ttl,
    })
}

/// A group by number, or by its name in /etc/group.
fn parse_group(g: &str) -> Result<u32, String> {
    if let Ok(n) = g.parse() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group").map_err(|e| format!("/etc/group: {e}"))?;
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(g)).then(|| f.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| format!("no group {g:?} in /etc/group (give its number)"))
}

fn parse_zone(z: &str) -> Result<String, String> {
    if z.len() > voltool_protocol::coord::MAX_ZONE {
        return Err(format!(
            "{} bytes; a zone label has at most {}",
            z.len(),
            voltool_protocol::coord::MAX_ZONE
        ));
    }
    Ok(z.to_string())
}

fn parse_s3(url: &str) -> Result<S3Options, String> {
    S3Options::from_url(url).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Read options from this TOML file: its keys are the long options (`max-egress =
    /// "50mbit"`); an environment variable or a flag of the same option wins.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print the effective options as a config file, each with its description, and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// Data directory: node key, store, snapshots (default ~/.voltool).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Where the control sockets go (`agent.sock`, `admin.sock`), the directory clients
    /// name with --agent: /run/voltool for root, else the data directory.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// The coordinator, as NODE_ID@IP:PORT (what `voltool coordinator` prints); repeated
    /// (or a list in the config file) for every coordinator of a fleet in failover, which
    /// the agent tries in turn.
    #[arg(long, value_name = "NODE_ID@ADDR", required = true)]
    coordinator: Vec<NodeAddr>,
    /// The id of the fleet key that signs heads (`voltool node-id` of the fleet key's
    /// folder), for coordinators in failover; without it, the first coordinator's id.
    #[arg(long, value_name = "NODE_ID")]
    fleet_key: Option<voltool_protocol::PublicKey>,
    /// Address to listen on for peers.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    listen: SocketAddr,
    /// Zone label (at most 64 bytes): peers in the same zone are preferred.
    #[arg(long, value_name = "Z", value_parser = parse_zone)]
    zone: Option<String>,
    /// Ingress limit, e.g. 50mbit, 12MiB/s.
    #[arg(long, value_name = "RATE")]
    max_ingress: Option<Rate>,
    /// Egress limit, e.g. 50mbit, 12MiB/s.
    #[arg(long, value_name = "RATE")]
    max_egress: Option<Rate>,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// The store's budget, e.g. 200GiB: past it, blobs no mounted snapshot needs are evicted,
    /// least recently used first (partial blobs of abandoned downloads before them), and
    /// withdrawn from the tracker. Without it nothing is evicted.
    #[arg(long, value_name = "SIZE")]
    store_max: Option<bytesize::ByteSize>,
    /// What an eviction frees down to (the low watermark); 90 % of --store-max by default.
    #[arg(long, value_name = "SIZE", requires = "store_max")]
    store_low: Option<bytesize::ByteSize>,
    /// The group (a name in /etc/group, or a number) whose members may use the agent: read
    /// volumes, and mount, commit, reload and unmount mounts of their own. Without it, root
    /// alone.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,
    /// The group whose members may also create, delete and rename volumes, rm and cp.
    /// Without it, root alone.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    admin_group: Option<u32>,
    /// Follow this volume from the start (repeat for more; `follow = [...]` in the config
    /// file): its newest version is downloaded as soon as it is committed and served to
    /// peers, as `voltool follow` does.
    #[arg(long, value_name = "VOLUME", action = clap::ArgAction::Append)]
    follow: Vec<String>,
    #[command(flatten)]
    tuning: Tuning,
    /// Fault injection for tests and the testnet's hostile-peer scenario: serve corrupt
    /// bytes to peers (they must detect them and ban this node).
    #[arg(long, hide = true)]
    evil: bool,
    /// Fetch from the origin only, never from peers (a baseline for benchmarks).
    #[arg(long)]
    origin_only: bool,
    /// How snapshots are made: `auto` (overlays where they can be mounted, else copies),
    /// `overlay` (refuse to start without them) or `copy`.
    #[arg(
        long,
        env = "VOLTOOL_SNAPSHOTS",
        default_value = "auto",
        value_name = "MODE"
    )]
    snapshots: SnapshotMode,
    /// Fault injection for crash tests: SIGKILL this agent when an operation reaches the
    /// named point.
    #[arg(long, hide = true, value_name = "POINT", value_parser = clap::builder::PossibleValuesParser::new(voltool_agent::node::CRASH_POINTS))]
    crash_at: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct NodeIdArgs {
    /// Data directory.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

/// The swarm's config with `knobs` turned.
fn swarm_config(knobs: &[String]) -> anyhow::Result<voltool_protocol::swarm::Config> {
    let mut c = voltool_protocol::swarm::Config::default();
    for k in knobs {
        c.set(k).context("--swarm-knob")?;
    }
    Ok(c)
}

pub(crate) fn init_logs() {
    // Colours only on a terminal: a log file or journald gets plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn until_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

pub(crate) async fn coordinator(a: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    init_logs();
    if let Some(f) = &a.config {
        tracing::info!(file = %f.display(), "options read from a config file");
    }
    if a.members.is_none() && !a.open {
        anyhow::bail!(
            "no --members file: a coordinator without one would admit every node that reaches it as a member and a writer; give --members FILE, or --open to run so on purpose"
        );
    }
    if a.open {
        tracing::warn!(
            "--open: every node that reaches this coordinator is a member and may write"
        );
    }
    let in_failover = a.etcd.meta.is_some();
    // SIGHUP: the members and writers files again (kept as they were if either fails).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let stop = until_signal();
    tokio::pin!(stop);
    // In failover a coordinator that loses the lead (its lease ended or went unrenewed:
    // another leads now, or will) drops all it held and campaigns again, as a candidate;
    // so does one whose campaign failed for etcd's trouble.
    let mut again = false;
    loop {
        let started = tokio::select! {
            r = &mut stop => { r?; return Ok(ExitCode::SUCCESS); }
            c = Coordinator::start(coordinator_options(&a)?) => c,
        };
        use voltool_coordinator::CoordinatorError as E;
        let c = match started {
            Ok(c) => {
                again = true;
                c
            }
            // etcd's trouble; and once this process ran a coordinator (or tried), the
            // socket and the origin's database it held, which take a moment to be let go.
            Err(e @ (E::Meta(_) | E::Net(_) | E::Store(_)))
                if in_failover && (again || matches!(e, E::Meta(_))) =>
            {
                again = true;
                tracing::warn!("campaigning again in a moment: {e}");
                tokio::select! {
                    r = &mut stop => { r?; return Ok(ExitCode::SUCCESS); }
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
            Err(e) => return Err(anyhow::Error::new(e).context("starting the coordinator")),
        };
        println!("coordinator {}", c.addr());
        loop {
            tokio::select! {
                r = &mut stop => {
                    c.shutdown().await;
                    r?;
                    return Ok(ExitCode::SUCCESS);
                }
                _ = c.lead_lost() => break,
                _ = hup.recv() => match membership(&a) {
                    Ok(m) => c.set_membership(m),
                    Err(e) => tracing::error!("membership kept as it was: {e:#}"),
                },
            }
        }
        c.shutdown().await;
        tracing::warn!(
            "this coordinator no longer leads the fleet (its lease on etcd ended): campaigning again"
        );
    }
}

/// The coordinator's options from its command line (the members and writers files read
/// now).
fn coordinator_options(a: &CoordinatorArgs) -> anyhow::Result<CoordinatorOptions> {
    let m = membership(a)?;
    Ok(CoordinatorOptions {
        data: a.data.clone(),
        listen: a.listen,
        members: m.members,
        writers: m.writers,
        max_egress: a.max_egress,
        congestion: a.tuning.congestion,
        swarm: swarm_config(&a.tuning.swarm_knob)?,
        retention: Retention {
            keep_versions: a.keep_versions,
            grace: a.gc_grace,
            interval: a.gc_interval,
        },
        metrics: a.metrics,
        commit_deadline: a.commit_deadline,
        s3: a.origin.s3(),
        meta: meta_options(a)?,
        fleet_key: a.fleet_key.clone(),
        hooks: Default::default(),
    })
}

/// The members and writers files, read.
fn membership(a: &CoordinatorArgs) -> anyhow::Result<Membership> {
    let read = |f: &Option<PathBuf>| f.as_deref().map(read_members).transpose();
    Ok(Membership {
        members: read(&a.members)?,
        writers: read(&a.writers)?,
    })
}

pub(crate) async fn agent(a: AgentArgs) -> anyhow::Result<ExitCode> {
    init_logs();
    if let Some(f) = &a.config {
        tracing::info!(file = %f.display(), "options read from a config file");
    }
    let data = a.data.unwrap_or_else(default_data_dir);
    let run_dir = a.run_dir.unwrap_or_else(|| default_run_dir(&data));
    let agent = Agent::start(AgentOptions {
        data: data.clone(),
        run_dir,
        coordinators: a.coordinator,
        fleet_key: a.fleet_key,
        listen: a.listen,
        zone: a.zone,
        max_ingress: a.max_ingress,
        max_egress: a.max_egress,
        corrupt_served_bytes: a.evil,
        congestion: a.tuning.congestion,
        swarm: swarm_config(&a.tuning.swarm_knob)?,
        origin_only: a.origin_only,
        snapshots: a.snapshots,
        crash_at: a.crash_at,
        metrics: a.metrics,
        store_max: a
            .store_max
            .map(|m| StoreBudget::new(m.as_u64(), a.store_low.map(|l| l.as_u64()))),
        socket_group: a.socket_group,
        admin_group: a.admin_group,
        follow: a.follow,
    })
    .await
    .context("starting the agent")?;
    let addr = agent.addr();
    let file = data.join(AGENT_ADDR_FILE);
    std::fs::write(&file, format!("{addr}\n")).with_context(|| file.display().to_string())?;
    println!("agent {addr}");
    until_signal().await?;
    agent.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn node_id(a: NodeIdArgs) -> anyhow::Result<ExitCode> {
    let data = a.data.unwrap_or_else(default_data_dir);
    let key = voltool_agent::keys::load_or_create(&data)?;
    println!("{}", key.public());
    Ok(ExitCode::SUCCESS)
}
