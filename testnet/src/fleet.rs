//! Starting and stopping a fleet of node processes.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use voltool_agent::control::{self, Follow, Reply, Request};
use voltool_coordinator::ADDR_FILE;

use crate::netns::{self, Netns};

/// How long a node may take to come up or go down.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Number of agents.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Directory for the fleet's data, logs and pids.
    #[arg(long)]
    root: PathBuf,
    /// Ingress limit of every agent, e.g. 50mbit.
    #[arg(long)]
    max_ingress: Option<String>,
    /// Egress limit of every node, e.g. 50mbit.
    #[arg(long)]
    max_egress: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct DownArgs {
    /// The fleet's directory.
    #[arg(long)]
    root: PathBuf,
}

/// A fleet of processes in a root directory.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) root: PathBuf,
    /// The first coordinator's address, `ID@HOST:PORT`.
    pub(crate) coordinator: String,
    pub(crate) agents: Vec<PathBuf>,
    /// Node k's command line and process: coordinator j is j, agent i is
    /// `coordinators + i`.
    nodes: Vec<(Vec<String>, u32)>,
    /// How many coordinators (one, or several in failover over etcd).
    coordinators: usize,
    /// Environment every node starts with (the S3 origin's key, in failover).
    env: Vec<(String, String)>,
    net: bool,
}

/// A fleet whose coordinators run in failover: their state in etcd, the origin in an S3
/// bucket, heads signed by a fleet key every coordinator holds.
#[derive(Clone, Debug)]
pub(crate) struct HaSetup {
    /// How many coordinators.
    pub(crate) coordinators: usize,
    /// `--meta etcd://…` (plain connections: the cluster listens on loopback).
    pub(crate) meta: String,
    /// The origin.
    pub(crate) s3: voltool_agent::store::S3Options,
    /// The lead's lease.
    pub(crate) lease_ttl: Duration,
}

/// Sends a request to an agent; a refusal becomes an error naming the agent.
pub(crate) async fn ask(agent: &Path, req: Request) -> anyhow::Result<Reply> {
    control::call(agent, &req, |_| {})
        .await?
        .map_err(|e| anyhow::anyhow!("{}: {}", agent.display(), e.message))
}

impl Fleet {
    /// Creates `volume` through agent 0 and mounts it on every agent, at `ROOT/mnt-I`.
    pub(crate) async fn create_and_mount_all(&self, volume: &str) -> anyhow::Result<Vec<PathBuf>> {
        self.create_and_mount_following(volume, "", Follow::No)
            .await
    }

    /// Creates `volume` through agent 0 and mounts it on every agent at
    /// `ROOT/mnt-I{suffix}`; every agent but the writer (agent 0) follows it as `follow`
    /// says.
    pub(crate) async fn create_and_mount_following(
        &self,
        volume: &str,
        suffix: &str,
        follow: Follow,
    ) -> anyhow::Result<Vec<PathBuf>> {
        ask(
            &self.agents[0],
            Request::VolumeCreate {
                name: volume.into(),
                allow_existing: false,
            },
        )
        .await?;
        let mut mounts = Vec::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let path = self.root.join(format!("mnt-{i}{suffix}"));
            ask(
                agent,
                Request::Mount {
                    name: volume.into(),
                    path: path.clone(),
                    background_commit_secs: None,
                    read_only: false,
                    follow: if i == 0 { Follow::No } else { follow },
                    lazy: false,
                },
            )
            .await?;
            mounts.push(path);
        }
        Ok(mounts)
    }
}

fn coordinator_dir(root: &Path) -> PathBuf {
    root.join("coordinator")
}

/// Data directory of coordinator `j` (the first is [`coordinator_dir`]).
fn coordinator_dir_n(root: &Path, j: usize) -> PathBuf {
    match j {
        0 => coordinator_dir(root),
        j => root.join(format!("coordinator-{j}")),
    }
}

/// Whether `dir` is a coordinator's.
fn is_coordinator_dir(dir: &Path) -> bool {
    dir.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("coordinator"))
}

pub(crate) fn agent_dir(root: &Path, i: usize) -> PathBuf {
    root.join(format!("agent-{i}"))
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("pid")
}

/// Starts this binary as `exec -- ARGS`, in node `k`'s namespace if there are namespaces.
fn spawn_node(
    dir: &Path,
    net: Option<&Netns>,
    k: usize,
    args: &[String],
    env: &[(String, String)],
) -> anyhow::Result<u32> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("log")).context("log file")?;
    let exe = std::env::current_exe().context("own executable")?;
    let child = netns::command(net, k, exe)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("exec")
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        // glibc's malloc keeps up to 8 arenas a core, and memory freed in them stays
        // resident: two arenas hold a daemon's resident set near its heap (at 200,000
        // files: 102 MiB against 146-165 MiB committing). README asks the same of a host.
        .env(
            "MALLOC_ARENA_MAX",
            std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".into()),
        )
        // Own process group: a Ctrl-C to `up` does not reach the fleet.
        .process_group(0)
        .spawn()
        .context("starting a node")?;
    let pid = child.id();
    std::fs::write(pid_file(dir), pid.to_string())?;
    Ok(pid)
}

use std::os::unix::process::CommandExt;

/// Waits until `path` exists and is not empty, or the node's process is gone.
async fn wait_file(path: &Path, pid: u32, what: &str) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return Ok(s.trim().to_string());
        }
        if !alive(pid) {
            bail!("{what} exited during start-up; see its log");
        }
        if start.elapsed() > NODE_TIMEOUT {
            bail!("{what} did not come up within {NODE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u32) -> bool {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    // Reap it if it is our child and has exited (demo mode), then probe.
    let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
    rustix::process::test_kill_process(p).is_ok()
}

pub(crate) fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// The absolute `root`, the data directories of `n` agents under it (each with its key)
/// and a members file listing them.
fn agents_and_members(root: &Path, n: usize) -> anyhow::Result<(PathBuf, Vec<PathBuf>, PathBuf)> {
    std::fs::create_dir_all(root)?;
    let root = std::path::absolute(root)?;
    let mut members = String::new();
    let mut agents = Vec::new();
    for i in 0..n {
        let dir = agent_dir(&root, i);
        let key = voltool_agent::keys::load_or_create(&dir)?;
        members.push_str(&format!("{}  # agent-{i}\n", key.public()));
        agents.push(dir);
    }
    let members_file = root.join("members.txt");
    std::fs::write(&members_file, members)?;
    Ok((root, agents, members_file))
}

/// Starts agent `i` of `agents` as node `first + i` with `args(i)` after its data and
/// socket directories (the testnet's agents share a host: the sockets go beside the data),
/// and waits until each serves; returns their command lines and processes.
async fn start_agents(
    agents: &[PathBuf],
    net: Option<&Netns>,
    first: usize,
    args: impl Fn(usize) -> Vec<String>,
) -> anyhow::Result<Vec<(Vec<String>, u32)>> {
    let mut started = Vec::new();
    for (i, dir) in agents.iter().enumerate() {
        let _ = std::fs::remove_file(dir.join("agent.addr"));
        let mut all = vec![
            "agent".to_string(),
            "--data".into(),
            dir.display().to_string(),
            "--run-dir".into(),
            dir.display().to_string(),
        ];
        all.extend(args(i));
        let pid = spawn_node(dir, net, first + i, &all, &[])?;
        started.push((all, pid));
    }
    for (dir, (_, pid)) in agents.iter().zip(&started) {
        wait_file(
            &dir.join("agent.addr"),
            *pid,
            &format!("agent {}", dir.display()),
        )
        .await?;
        // The control socket exists before the address file is written.
        debug_assert!(dir.join(control::SOCKET).exists());
    }
    Ok(started)
}

/// Starts a coordinator and `n` agents under `root`, with seeded-per-run keys, a members
/// file listing exactly those agents, and per-node logs.
pub(crate) async fn up(
    root: &Path,
    n: usize,
    max_ingress: Option<&str>,
    max_egress: Option<&str>,
) -> anyhow::Result<Fleet> {
    up_with(root, n, max_ingress, max_egress, &|_| Vec::new(), None).await
}

/// [`up`], with extra arguments for agent `i`.
pub(crate) async fn up_with(
    root: &Path,
    n: usize,
    max_ingress: Option<&str>,
    max_egress: Option<&str>,
    agent_args: &dyn Fn(usize) -> Vec<String>,
    net: Option<&Netns>,
) -> anyhow::Result<Fleet> {
    // Node k of the namespaces: the coordinator is 0, agent i is i + 1.
    let listen = |k: usize, args: &mut Vec<String>| {
        if let Some(net) = net {
            args.extend(["--listen".into(), format!("{}:0", net.ip(k))]);
        }
    };
    let (root, agents, members_file) = agents_and_members(root, n)?;
    let cdir = coordinator_dir(&root);
    let _ = std::fs::remove_file(cdir.join(ADDR_FILE));
    let mut cargs: Vec<String> = vec![
        "coordinator".to_string(),
        "--data".into(),
        cdir.display().to_string(),
        "--members".into(),
        members_file.display().to_string(),
    ];
    if let Some(r) = max_egress {
        cargs.extend(["--max-egress".into(), r.to_string()]);
    }
    listen(0, &mut cargs);
    let cpid = spawn_node(&cdir, net, 0, &cargs, &[])?;
    let coordinator = wait_file(&cdir.join(ADDR_FILE), cpid, "the coordinator").await?;
    if net.is_none() {
        // A restart binds the same port, so that the agents find it again.
        let port = coordinator.rsplit(':').next().unwrap_or("0");
        cargs.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
    }
    let mut nodes = vec![(cargs, cpid)];
    let started = start_agents(&agents, net, 1, |i| {
        let mut args = vec!["--coordinator".to_string(), coordinator.clone()];
        if let Some(r) = max_ingress {
            args.extend(["--max-ingress".into(), r.to_string()]);
        }
        if let Some(r) = max_egress {
            args.extend(["--max-egress".into(), r.to_string()]);
        }
        args.extend(agent_args(i));
        listen(i + 1, &mut args);
        args
    })
    .await?;
    nodes.extend(started);
    Ok(Fleet {
        root,
        coordinator,
        agents,
        nodes,
        coordinators: 1,
        env: Vec::new(),
        net: net.is_some(),
    })
}

/// Starts a fleet in failover under `root`: `ha.coordinators` coordinators over etcd and
/// an S3 origin (the first waits until it leads; the others campaign), and `n` agents
/// given every coordinator and the fleet key.
pub(crate) async fn up_ha(
    root: &Path,
    n: usize,
    ha: &HaSetup,
    agent_args: &dyn Fn(usize) -> Vec<String>,
) -> anyhow::Result<Fleet> {
    let (root, agents, members_file) = agents_and_members(root, n)?;
    let fleet_dir = root.join("fleet");
    let fleet_id = voltool_agent::keys::load_or_create(&fleet_dir)?.public();
    let mut env = Vec::new();
    if let Some(k) = &ha.s3.access_key_id {
        env.push(("AWS_ACCESS_KEY_ID".to_string(), k.clone()));
    }
    if let Some(k) = &ha.s3.secret_access_key {
        env.push(("AWS_SECRET_ACCESS_KEY".to_string(), k.clone()));
    }
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for j in 0..ha.coordinators {
        let dir = coordinator_dir_n(&root, j);
        let id = voltool_agent::keys::load_or_create(&dir)?.public();
        let _ = std::fs::remove_file(dir.join(ADDR_FILE));
        // Each on a port of its own, kept across restarts: the agents know them all.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        addrs.push(format!("{id}@127.0.0.1:{port}"));
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--data".into(),
            dir.display().to_string(),
            "--members".into(),
            members_file.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--meta".into(),
            ha.meta.clone(),
            "--etcd-open".into(),
            "--origin".into(),
            format!("s3://{}/{}", ha.s3.bucket, ha.s3.prefix),
            "--fleet-key".into(),
            fleet_dir.join("node.key").display().to_string(),
            "--lease-ttl".into(),
            format!("{}s", ha.lease_ttl.as_secs().max(1)),
        ];
        if let Some(e) = &ha.s3.endpoint {
            args.extend(["--s3-endpoint".into(), e.clone()]);
        }
        if let Some(r) = &ha.s3.region {
            args.extend(["--s3-region".into(), r.clone()]);
        }
        let pid = spawn_node(&dir, None, j, &args, &env)?;
        if j == 0 {
            // A coordinator writes its address once it leads: the first leads before
            // the others campaign, so that the fleet starts with a known leader.
            wait_file(&dir.join(ADDR_FILE), pid, "the first coordinator").await?;
        }
        nodes.push((args, pid));
    }
    let started = start_agents(&agents, None, ha.coordinators, |i| {
        let mut args = vec!["--fleet-key".to_string(), fleet_id.to_string()];
        for a in &addrs {
            args.extend(["--coordinator".into(), a.clone()]);
        }
        args.extend(agent_args(i));
        args
    })
    .await?;
    nodes.extend(started);
    Ok(Fleet {
        root,
        coordinator: addrs[0].clone(),
        agents,
        nodes,
        coordinators: ha.coordinators,
        env,
        net: false,
    })
}

impl Fleet {
    fn node_dir(&self, k: usize) -> PathBuf {
        if k < self.coordinators {
            coordinator_dir_n(&self.root, k)
        } else {
            self.agents[k - self.coordinators].clone()
        }
    }

    /// How many coordinators: nodes `0..coordinators()`.
    pub(crate) fn coordinators(&self) -> usize {
        self.coordinators
    }

    /// The node number of agent `i`.
    pub(crate) fn agent_node(&self, i: usize) -> usize {
        self.coordinators + i
    }

    /// Every node: the coordinators, then the agents.
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The process id of node `k`.
    pub(crate) fn pid(&self, k: usize) -> u32 {
        self.nodes[k].1
    }

    /// Whether node `k` (see [`Self::agent_node`]) runs.
    pub(crate) fn is_running(&self, k: usize) -> bool {
        alive(self.nodes[k].1)
    }

    /// The coordinators that run and have written their address since they last started:
    /// those that took the lead (in failover, one that lost it exits).
    pub(crate) fn leading(&self) -> Vec<usize> {
        (0..self.coordinators)
            .filter(|&j| self.is_running(j) && self.node_dir(j).join(ADDR_FILE).exists())
            .collect()
    }

    /// Kills node `k` with SIGKILL and waits until it is gone.
    pub(crate) async fn kill(&self, k: usize) -> anyhow::Result<()> {
        let pid = self.nodes[k].1;
        signal(pid, rustix::process::Signal::KILL);
        let start = Instant::now();
        while alive(pid) {
            if start.elapsed() > NODE_TIMEOUT {
                bail!("node {k} (pid {pid}) outlived SIGKILL for {NODE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Starts node `k` again with its command line (the coordinator on its old port) and
    /// waits until it serves.
    pub(crate) async fn restart(&mut self, k: usize) -> anyhow::Result<()> {
        if self.net {
            bail!("restarting nodes in network namespaces is not supported");
        }
        let dir = self.node_dir(k);
        let (addr, what) = if k < self.coordinators {
            (dir.join(ADDR_FILE), format!("coordinator {k}"))
        } else {
            (
                dir.join("agent.addr"),
                format!("agent {}", k - self.coordinators),
            )
        };
        let _ = std::fs::remove_file(&addr);
        // The old log is kept beside the new one.
        let _ = std::fs::rename(
            dir.join("log"),
            dir.join(format!("log.{}", self.nodes[k].1)),
        );
        let pid = spawn_node(&dir, None, k, &self.nodes[k].0, &self.env)?;
        self.nodes[k].1 = pid;
        if k < self.coordinators && self.coordinators > 1 {
            // In failover a coordinator comes back as a candidate: it writes its address
            // only if it wins the lead, which another may hold.
            return Ok(());
        }
        wait_file(&addr, pid, &what).await?;
        Ok(())
    }
}

/// Stops every node under `root` (see [`stop`]) and detaches what is mounted below it.
pub(crate) async fn down(root: &Path) -> anyhow::Result<usize> {
    let stopped = stop(root).await?;
    // Agents leave their overlay snapshots mounted when they stop (a restart mounts them
    // again); a fleet taken down detaches them, so its root can be removed.
    voltool_agent::overlay::unmount_all_under(root);
    Ok(stopped)
}

/// Stops every node under `root`: SIGTERM (agents make their final commits), then SIGKILL
/// for any still running after the timeout.
pub(crate) async fn stop(root: &Path) -> anyhow::Result<usize> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| root.display().to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| pid_file(p).exists())
        .collect();
    // Agents first, the coordinators last.
    dirs.sort_by_key(|p| is_coordinator_dir(p));
    let mut stopped = 0;
    for group in [false, true] {
        let mut pids = Vec::new();
        for d in dirs.iter().filter(|d| is_coordinator_dir(d) == group) {
            let pid: u32 = std::fs::read_to_string(pid_file(d))?.trim().parse()?;
            signal(pid, rustix::process::Signal::TERM);
            pids.push((d.clone(), pid));
        }
        let start = Instant::now();
        for (d, pid) in pids {
            while alive(pid) && start.elapsed() < NODE_TIMEOUT {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if alive(pid) {
                signal(pid, rustix::process::Signal::KILL);
            }
            let _ = std::fs::remove_file(pid_file(&d));
            stopped += 1;
        }
    }
    Ok(stopped)
}

pub(crate) async fn up_cmd(a: UpArgs) -> anyhow::Result<ExitCode> {
    if a.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let f = up(
        &a.root,
        a.agents,
        a.max_ingress.as_deref(),
        a.max_egress.as_deref(),
    )
    .await?;
    println!("testnet up in {}", f.root.display());
    println!("  coordinator {}", f.coordinator);
    for (i, d) in f.agents.iter().enumerate() {
        let addr = std::fs::read_to_string(d.join("agent.addr")).unwrap_or_default();
        println!("  agent-{i}     {}", addr.trim());
    }
    println!();
    println!("Point voltool at an agent with --agent or VOLTOOL_AGENT, for example:");
    println!("  export VOLTOOL_AGENT={}", f.agents[0].display());
    println!("  voltool volume create my-model");
    println!("  voltool mount my-model /tmp/my-model");
    println!(
        "  voltool commit my-model; VOLTOOL_AGENT={} voltool status",
        f.agents.last().expect("one agent").display()
    );
    println!("Logs: {}/*/log", f.root.display());
    println!("Stop: voltool-testnet down --root {}", f.root.display());
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn down_cmd(a: DownArgs) -> anyhow::Result<ExitCode> {
    let n = down(&a.root).await?;
    println!("stopped {n} node(s)");
    Ok(ExitCode::SUCCESS)
}
