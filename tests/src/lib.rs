//! A fleet of real nodes in one process for integration tests: a coordinator and agents on
//! 127.0.0.1 with port 0, seeded keys, temp dirs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use voltool_agent::control::{CommitReport, ErrorReply, ReloadMode, ReloadReport, Reply, Request};
use voltool_agent::node::{Agent, AgentOptions, Events};
use voltool_agent::rate::Rate;
use voltool_coordinator::{Coordinator, CoordinatorOptions};

mod container;
pub mod etcd;
mod files;
pub mod garage;
mod ha;
mod host;

pub use container::{Container, shown};
pub use files::{bytes, ino, tree};
pub use host::{
    TEST_DIR_PREFIX, is_root, mode_independent_pass, need, on_path, overlay_pass, snapshot_mode,
    test_dir,
};
pub(crate) use host::{run_ok, until_command_succeeds};

pub mod metrics;

/// Writes a seeded key into a data directory.
pub fn seed_key(dir: &Path, seed: u8) -> voltool_protocol::PublicKey {
    std::fs::create_dir_all(dir).unwrap();
    let bytes = [seed; 32];
    let path = dir.join("node.key");
    std::fs::write(&path, hex::encode(bytes)).unwrap();
    // The agent refuses a key others may read.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    voltool_protocol::SecretKey::from_bytes(&bytes).public()
}

/// A coordinator and agents.
#[derive(Debug)]
pub struct TestFleet {
    /// Everything lives here.
    pub dir: TempDir,
    /// The coordinator (None while stopped).
    pub coord: Option<Coordinator>,
    /// The coordinator's address, kept across restarts.
    pub coord_listen: SocketAddr,
    /// The agents.
    pub agents: Vec<Agent>,
    members: HashSet<voltool_protocol::PublicKey>,
    writers: Option<HashSet<voltool_protocol::PublicKey>>,
    /// The limits agents and the coordinator start with (changed, they apply at the next
    /// start).
    pub limits: Limits,
    s3: Option<voltool_agent::store::S3Options>,
    /// Where the coordinators keep the fleet's state (redb unless a test asks for etcd).
    meta: voltool_coordinator::MetaOptions,
    /// The fleet key's file and id, for coordinators in failover.
    fleet_key: Option<(PathBuf, voltool_protocol::PublicKey)>,
    /// Coordinators that campaign beside the first (started by the test with
    /// [`Self::standby_options`]): their addresses and ids, which every agent knows from
    /// its start.
    pub standbys: Vec<voltool_agent::net::NodeAddr>,
    /// The first coordinator's fault injection.
    hooks: voltool_coordinator::Hooks,
}

/// Limits of a test fleet: bandwidth, and what the origin keeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// The origin's retention.
    pub retention: voltool_coordinator::Retention,
    /// The origin's egress.
    pub origin_egress: Option<Rate>,
    /// Every agent's ingress.
    pub agent_ingress: Option<Rate>,
    /// Every agent's egress.
    pub agent_egress: Option<Rate>,
    /// Every agent's store budget.
    pub store_max: Option<voltool_agent::node::StoreBudget>,
    /// The coordinator's commit deadline (default: the coordinator's).
    pub commit_deadline: Option<std::time::Duration>,
}

impl TestFleet {
    /// Starts a coordinator and `n` agents.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, Limits::default()).await
    }

    /// Starts a coordinator and `n` agents with bandwidth limits.
    pub async fn start_with(n: usize, limits: Limits) -> Self {
        Self::start_on(n, limits, None).await
    }

    /// Starts a coordinator whose origin keeps its blobs in the bucket `s3` (if given),
    /// and `n` agents.
    pub async fn start_on(
        n: usize,
        limits: Limits,
        s3: Option<voltool_agent::store::S3Options>,
    ) -> Self {
        let dir = test_dir();
        seed_key(&dir.path().join("coordinator"), 0xC0);
        let mut members = HashSet::new();
        for i in 0..n {
            members.insert(seed_key(
                &dir.path().join(format!("agent-{i}")),
                i as u8 + 1,
            ));
        }
        let f = TestFleet {
            dir,
            coord: None,
            coord_listen: "127.0.0.1:0".parse().unwrap(),
            agents: Vec::new(),
            members,
            writers: None,
            limits,
            meta: Default::default(),
            fleet_key: None,
            standbys: Vec::new(),
            hooks: Default::default(),
            s3,
        };
        f.start_nodes(n).await
    }

    /// Starts (or restarts) agent `i` on its data directory.
    pub async fn start_agent(&self, i: usize) -> Agent {
        self.start_agent_with(i, false).await
    }

    /// Starts agent `i`, serving corrupt bytes if `evil`.
    pub async fn start_agent_with(&self, i: usize, evil: bool) -> Agent {
        Agent::start(AgentOptions {
            data: self.agent_dir(i),
            run_dir: self.run_dir(i),
            follow: Vec::new(),
            coordinators: self.coordinators(),
            fleet_key: self.fleet_key.as_ref().map(|(_, id)| *id),
            listen: "127.0.0.1:0".parse().unwrap(),
            zone: None,
            max_ingress: self.limits.agent_ingress,
            max_egress: self.limits.agent_egress,
            corrupt_served_bytes: evil,
            origin_only: false,
            snapshots: snapshot_mode(),
            crash_at: None,
            congestion: Default::default(),
            swarm: Default::default(),
            metrics: Some("127.0.0.1:0".parse().unwrap()),
            store_max: self.limits.store_max,
            socket_group: None,
            admin_group: None,
        })
        .await
        .unwrap()
    }

    /// An endpoint holding agent `i`'s key, on a port of its own: a fleet member that
    /// sends crafted requests (the agent may be running or not).
    pub async fn endpoint_as(&self, i: usize) -> iroh::Endpoint {
        let key = voltool_agent::keys::load_or_create(&self.agent_dir(i)).unwrap();
        voltool_agent::net::bind(
            key,
            "127.0.0.1:0".parse().unwrap(),
            vec![],
            Default::default(),
        )
        .await
        .unwrap()
    }

    /// A raw client of the coordinator speaking with agent `i`'s key (for crafted
    /// requests; the agent may be running or not).
    pub async fn client_as(&self, i: usize) -> voltool_agent::coord_client::CoordClient {
        let ep = self.endpoint_as(i).await;
        let coord = self.coord.as_ref().expect("coordinator running").addr();
        voltool_agent::coord_client::CoordClient::new(ep, coord)
    }

    /// A raw client of the coordinator with the last agent's key (that agent stopped first,
    /// so the fleet has a member that is no running agent).
    pub async fn member_client(&mut self) -> voltool_agent::coord_client::CoordClient {
        let i = self.agents.len() - 1;
        let agent = self.agents.remove(i);
        agent.shutdown().await;
        self.client_as(i).await
    }

    /// Restarts agent `i` as a liar: it holds what it held, but flips bytes in everything it
    /// serves.
    pub async fn make_liar(&mut self, i: usize) {
        let honest = self.agents.remove(i);
        honest.shutdown().await;
        let liar = self.start_agent_with(i, true).await;
        self.agents.insert(i, liar);
    }

    /// Data directory of agent `i`.
    /// Where agent `i`'s control sockets are.
    pub fn run_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("run-{i}"))
    }

    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    /// The coordinator's options: its data directory and address, the fleet's members and
    /// limits, metrics on a free port.
    fn coord_options(&self) -> CoordinatorOptions {
        CoordinatorOptions {
            listen: self.coord_listen,
            members: Some(self.members.clone()),
            writers: self.writers.clone(),
            max_egress: self.limits.origin_egress,
            retention: self.limits.retention,
            metrics: Some("127.0.0.1:0".parse().unwrap()),
            s3: self.s3.clone(),
            commit_deadline: self
                .limits
                .commit_deadline
                .unwrap_or(voltool_coordinator::COMMIT_DEADLINE),
            meta: self.meta.clone(),
            fleet_key: self.fleet_key.as_ref().map(|(f, _)| f.clone()),
            hooks: self.hooks.clone(),
            ..CoordinatorOptions::new(self.coord_dir())
        }
    }

    /// Every coordinator the agents know: the first, then the standbys.
    fn coordinators(&self) -> Vec<voltool_agent::net::NodeAddr> {
        let first = voltool_agent::net::NodeAddr {
            id: voltool_agent::keys::load_or_create(&self.coord_dir())
                .unwrap()
                .public(),
            addr: self.coord_listen,
        };
        std::iter::once(first)
            .chain(self.standbys.iter().cloned())
            .collect()
    }

    /// Starts the coordinator, then `n` agents.
    async fn start_nodes(mut self, n: usize) -> Self {
        let coord = Coordinator::start(self.coord_options()).await.unwrap();
        self.coord_listen = coord.addr().addr;
        self.coord = Some(coord);
        for i in 0..n {
            let a = self.start_agent(i).await;
            self.agents.push(a);
        }
        self
    }

    /// Replaces the fleet's members and writers (kept for restarts); `None` writers: every
    /// member may write.
    pub fn set_membership(
        &mut self,
        members: HashSet<voltool_protocol::PublicKey>,
        writers: Option<HashSet<voltool_protocol::PublicKey>>,
    ) {
        self.members = members.clone();
        self.writers = writers.clone();
        if let Some(c) = &self.coord {
            c.set_membership(voltool_coordinator::Membership {
                members: Some(members),
                writers,
            });
        }
    }

    /// Agent `i`'s node id.
    pub fn agent_id(&self, i: usize) -> voltool_protocol::PublicKey {
        voltool_agent::keys::load_or_create(&self.agent_dir(i))
            .unwrap()
            .public()
    }

    /// Data directory of the coordinator.
    pub fn coord_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// Stops the coordinator.
    pub async fn stop_coordinator(&mut self) {
        if let Some(c) = self.coord.take() {
            c.shutdown().await;
        }
    }

    /// Starts the coordinator again on the same address and data directory.
    pub async fn start_coordinator(&mut self) {
        // The old endpoint's socket is released asynchronously after shutdown: retry the
        // bind on the same address for a bounded time.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Coordinator::start(self.coord_options()).await {
                Ok(c) => {
                    self.coord = Some(c);
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("coordinator restart: {e}"),
            }
        }
    }

    /// Where agent `i` mounts volumes.
    pub fn mount_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("mnt-{i}"))
    }

    /// Sends a request to agent `i`.
    pub async fn req(&self, i: usize, r: Request) -> Result<Reply, ErrorReply> {
        self.agents[i].request(r, Events::none()).await
    }

    /// Puts the local `local` at `remote` of volume `name` through agent `i`'s control
    /// socket, as `voltool volume put` does (this process reads the files).
    pub async fn put(
        &self,
        i: usize,
        name: &str,
        local: &Path,
        remote: &str,
        force: bool,
    ) -> Result<Reply, ErrorReply> {
        let mut up = voltool_agent::control::upload::Upload::new();
        up.add_local(local, remote, None).unwrap();
        up.send(&self.run_dir(i), name, force, |_| {})
            .await
            .unwrap()
    }

    /// Writes `remote` of volume `name` at `local` (into it, if a directory) through agent
    /// `i`'s control socket, as `voltool volume get` does (this process writes the files).
    pub async fn get(
        &self,
        i: usize,
        name: &str,
        remote: &str,
        local: &Path,
        force: bool,
    ) -> Result<Reply, ErrorReply> {
        use voltool_agent::control::export;
        let dest = export::destination(remote, local);
        export::get(&self.run_dir(i), name, remote, &dest, force, |_| {})
            .await
            .unwrap()
    }

    /// Creates a volume through agent 0.
    pub async fn create(&self, name: &str) {
        let req = Request::VolumeCreate {
            name: name.into(),
            allow_existing: false,
        };
        self.req(0, req).await.unwrap();
    }

    /// Mounts `name` on agent `i` at [`Self::mount_path`].
    pub async fn mount(&self, i: usize, name: &str) -> PathBuf {
        let path = self.mount_path(i);
        self.req(
            i,
            Request::Mount {
                name: name.into(),
                path: path.clone(),
                background_commit_secs: None,
                read_only: false,
                follow: voltool_agent::control::Follow::No,
                lazy: false,
            },
        )
        .await
        .unwrap();
        path
    }

    /// Commits on agent `i`.
    pub async fn commit(&self, i: usize, name: &str) -> Result<CommitReport, ErrorReply> {
        match self
            .req(
                i,
                Request::Commit {
                    name: Some(name.into()),
                },
            )
            .await?
        {
            Reply::Committed(r) => Ok(r),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Reloads on agent `i`.
    pub async fn reload(
        &self,
        i: usize,
        name: &str,
        mode: ReloadMode,
    ) -> Result<ReloadReport, ErrorReply> {
        match self
            .req(
                i,
                Request::Reload {
                    name: Some(name.into()),
                    mode,
                    lazy: false,
                },
            )
            .await?
        {
            Reply::Reloaded(r) => Ok(r),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits until `cond` holds of agent `i`'s status of its one mount (a background change
/// such as a compaction, seen in what the agent reports), or fails after 60 s.
pub async fn until_mount_status(
    f: &TestFleet,
    i: usize,
    what: &str,
    cond: impl Fn(&voltool_agent::control::MountStatus) -> bool,
) -> voltool_agent::control::MountStatus {
    until_status(f, i, what, |s| cond(&s.mounts[0]))
        .await
        .mounts[0]
        .clone()
}

/// Waits until `cond` holds of agent `i`'s status (a change made in the background, seen
/// in what the agent reports), or fails after 60 s.
pub async fn until_status(
    f: &TestFleet,
    i: usize,
    what: &str,
    cond: impl Fn(&voltool_agent::control::StatusReport) -> bool,
) -> voltool_agent::control::StatusReport {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = match f.req(i, Request::Status).await.unwrap() {
            Reply::Status(s) => s,
            other => panic!("unexpected {other:?}"),
        };
        if cond(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {s:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        // Agents leave their overlays mounted when they stop (as a daemon does): detach
        // them, or the directory cannot be removed.
        voltool_agent::overlay::unmount_all_under(self.dir.path());
    }
}
