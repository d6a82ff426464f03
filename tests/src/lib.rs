//! A fleet of real nodes in one process for integration tests: a coordinator and agents on
//! 127.0.0.1 with port 0, seeded keys, temp dirs.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use voltool_agent::control::{CommitReport, ErrorReply, ReloadMode, ReloadReport, Reply, Request};
use voltool_agent::node::{Agent, AgentOptions, Events};
use voltool_agent::rate::Rate;
use voltool_coordinator::{Coordinator, CoordinatorOptions};

pub mod etcd;
pub mod garage;

/// Runs `cmd` (quietly) every 100 ms until it succeeds, for up to a minute; fails the test
/// with `what` and `log()` otherwise. For servers a test starts, which answer a command of
/// their own once up.
pub(crate) fn until_command_succeeds(
    what: &str,
    mut cmd: impl FnMut() -> std::process::Command,
    log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ok = cmd()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {}", log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The program `name` where `PATH` finds it.
pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
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

    /// Starts a fleet in failover: its first coordinator (which leads, with `hooks`) keeps
    /// the fleet's state in etcd (`meta`) and its blobs in the bucket `s3`, heads are
    /// signed by a fleet key, `standbys` more coordinators are ready to campaign (on
    /// addresses the `n` agents know from their start; without hooks), and the agents
    /// trust the fleet key.
    pub async fn start_ha(
        n: usize,
        s3: voltool_agent::store::S3Options,
        meta: voltool_coordinator::MetaOptions,
        standbys: usize,
        hooks: voltool_coordinator::Hooks,
        limits: Limits,
    ) -> Self {
        let dir = test_dir();
        let fleet_dir = dir.path().join("fleet");
        let fleet_id = seed_key(&fleet_dir, 0xF1);
        let mut f = TestFleet {
            dir,
            coord: None,
            coord_listen: "127.0.0.1:0".parse().unwrap(),
            agents: Vec::new(),
            members: HashSet::new(),
            writers: None,
            limits,
            s3: Some(s3),
            meta,
            fleet_key: Some((fleet_dir.join("node.key"), fleet_id)),
            standbys: Vec::new(),
            hooks,
        };
        seed_key(&f.coord_dir(), 0xC0);
        for j in 0..standbys {
            let id = seed_key(&f.standby_dir(j), 0xD0 + j as u8);
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            f.standbys
                .push(voltool_agent::net::NodeAddr { id, addr: port });
        }
        for i in 0..n {
            f.members.insert(seed_key(&f.agent_dir(i), i as u8 + 1));
        }
        f.start_nodes(n).await
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

    /// Data directory of standby coordinator `j`.
    pub fn standby_dir(&self, j: usize) -> PathBuf {
        self.dir.path().join(format!("coordinator-{}", j + 1))
    }

    /// Standby coordinator `j`'s options: the first's, on its own data directory and
    /// address.
    pub fn standby_options(&self, j: usize) -> CoordinatorOptions {
        CoordinatorOptions {
            data: self.standby_dir(j),
            listen: self.standbys[j].addr,
            hooks: Default::default(),
            ..self.coord_options()
        }
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

/// What a tree holds, for comparison: kind, mode, content hash or target.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let v = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else {
                let bytes = std::fs::read(&p).unwrap();
                format!(
                    "file {mode:o} {} {}",
                    bytes.len(),
                    blake3::hash(&bytes).to_hex()
                )
            };
            out.insert(rel, v);
        }
    }
    out
}

/// Seeded pseudo-random bytes.
pub fn bytes(seed: u8, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Inode of a file (to check snapshots never share one with the store).
pub fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

/// The snapshot mode the suite runs in: `VOLTOOL_SNAPSHOTS` (auto, overlay or copy), auto
/// by default, so one run covers overlays (as root) and another the copy fallback.
pub fn snapshot_mode() -> voltool_agent::node::SnapshotMode {
    std::env::var("VOLTOOL_SNAPSHOTS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("VOLTOOL_SNAPSHOTS is auto, overlay or copy")
        })
        .unwrap_or_default()
}

/// Fails the test, naming `what`, unless its requirement is met (`available`): a test never
/// passes without checking what its name promises.
pub fn need(what: &str, available: bool) -> bool {
    assert!(available, "this test needs {what}, which is missing here");
    true
}

/// Whether this process runs as root (tests that run programs as other users, mount
/// file systems or make namespaces need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Whether this pass of the suite runs the tests that do not depend on the snapshot mode:
/// the suite runs twice, and those tests run only in the pass that is not forced to copies.
pub fn mode_independent_pass() -> bool {
    let run = snapshot_mode() != voltool_agent::node::SnapshotMode::Copy;
    if !run {
        eprintln!("not in the copy pass: this test does not depend on the snapshot mode");
    }
    run
}

/// Whether this pass of the suite runs overlay snapshots: `false` (saying so) in the pass
/// forced to copies; fails if an agent of `f` could not mount overlays where the suite
/// requires them.
pub async fn overlay_pass(f: &TestFleet) -> bool {
    if snapshot_mode() == voltool_agent::node::SnapshotMode::Copy {
        eprintln!("the copy pass: overlay checks belong to the overlay pass");
        return false;
    }
    let s = match f.req(0, Request::Status).await.unwrap() {
        Reply::Status(s) => s,
        other => panic!("unexpected {other:?}"),
    };
    need("overlay snapshots", s.snapshots == "overlay")
}

/// A process in a mount namespace of its own with slave propagation, as a container's,
/// that binds a mount path recursively (`mount --rbind`, as Docker's `-v PATH:…:rslave`
/// does) and reports what a file reads there whenever asked.
#[derive(Debug)]
pub struct Container {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    input: std::process::ChildStdin,
}

impl Container {
    /// Binds `path` at `at` in a new namespace.
    pub fn bind(path: &Path, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let script = format!(
            "mount --rbind '{p}' '{x}' && echo ready && while read -r c f; do case $c in \
             open) exec 3>>\"{x}/$f\" && echo ok ;; \
             write) echo \"$f\" >&3 && echo ok ;; \
             close) exec 3>&- && echo ok ;; \
             *) cat \"{x}/$f\" 2>/dev/null; echo ;; esac; done",
            p = path.display(),
            x = at.display()
        );
        let mut child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare runs");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let input = child.stdin.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the bind could not be made");
        Container { child, out, input }
    }

    /// What `file` (relative to the bind) holds, as the container sees it (empty if
    /// missing).
    pub fn read(&mut self, file: &str) -> String {
        self.say(&format!("cat {file}"))
    }

    /// Opens `file` (relative to the bind) for appending, and holds it open.
    pub fn open(&mut self, file: &str) {
        assert_eq!(self.say(&format!("open {file}")), "ok");
    }

    /// Appends a line (no spaces) to the file held open.
    pub fn write(&mut self, line: &str) {
        assert_eq!(self.say(&format!("write {line}")), "ok");
    }

    /// Closes the file held open.
    pub fn close(&mut self) {
        assert_eq!(self.say("close -"), "ok");
    }

    fn say(&mut self, command: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.input, "{command}").unwrap();
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim_end_matches('\n').to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prefix of the temporary directories of fleets started by tests.
/// Which snapshot a mount path shows: the link's target (copy mode), or the device of
/// the file system mounted there (overlay mode: each snapshot is an overlay of its own).
pub fn shown(path: &Path) -> String {
    match std::fs::read_link(path) {
        Ok(t) => t.display().to_string(),
        Err(_) => format!(
            "device {}",
            std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(path).unwrap())
        ),
    }
}

pub const TEST_DIR_PREFIX: &str = "voltool-test-";

/// A temporary directory for a test fleet, named after this process. Mounts left under the
/// directories of test processes that are gone (a run killed before it could clean up)
/// are detached and their directories removed first.
pub fn test_dir() -> TempDir {
    let tmp = std::env::temp_dir();
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(TEST_DIR_PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                voltool_agent::overlay::unmount_all_under(&e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("{TEST_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .unwrap()
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        // Agents leave their overlays mounted when they stop (as a daemon does): detach
        // them, or the directory cannot be removed.
        voltool_agent::overlay::unmount_all_under(self.dir.path());
    }
}
