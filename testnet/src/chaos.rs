//! `voltool-testnet chaos`: random operations on a fleet of real processes, with faults at
//! random points, checked against a model of what every acknowledged operation wrote.
//!
//! A trial starts a coordinator and four agents: agents 0 and 1 write, agent 2 writes from
//! a data directory on a small tmpfs (a disk that fills), agent 3 only reads and serves
//! corrupt bytes to its peers (a lying peer: the others must catch it and ban it). Two
//! volumes are mounted on every agent; scratch volumes are created, renamed and deleted.
//! The operations run one at a time, so the model knows exactly what each acknowledged one
//! wrote; a fault strikes in the middle of one: kill -9 of an agent during a commit or a
//! reload, kill -9 of the coordinator during anything, a peer killed while another fetches
//! a large file that it holds, a full disk under agent 2. Whatever a fault interrupted is
//! retried once the node is back, as a user would, and the model takes it as acknowledged
//! only then.
//!
//! Checks: after every reload and every restart, each mount shows one whole snapshot (the
//! one before or the one after the interrupted operation, with its own uncommitted writes);
//! at the end every acknowledged write is there with its bytes unless a later acknowledged
//! one replaced it; no store (agents' and the origin's) holds a byte that does not verify
//! against its hash; every agent answers and reloads within [`OP_TIMEOUT`].
//!
//! Trial `i` of `--seed S` runs with seed `S + i`: `--trials 1 --seed S+i` replays it (the
//! operations and fault points are the same; the timing of processes is not).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use voltool_agent::control::{self, ErrorCode, ErrorReply, PutItem, ReloadMode, Reply, Request};

use crate::fleet::{self, Fleet};

/// Longest any one operation may take before its agent counts as stuck.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries of an operation interrupted by a fault (or refused by a full disk).
const RETRIES: usize = 6;
/// Agents in a trial (see the module's documentation for their roles).
const AGENTS: usize = 4;
const TMPFS_AGENT: usize = 2;
const LIAR: usize = 3;
/// Agents that write into their mounts and commit.
const WRITERS: [usize; 3] = [0, 1, 2];
/// The volumes mounted on every agent.
const MOUNTED: [&str; 2] = ["m0", "m1"];
/// Size of agent 2's tmpfs, and its store budget below it.
const TMPFS_BYTES: u64 = 96 << 20;
const TMPFS_STORE_MAX: &str = "40MiB";

#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// Number of trials.
    #[arg(long, default_value_t = 10)]
    trials: u64,
    /// Seed of the first trial (trial i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Operations per trial.
    #[arg(long, default_value_t = 30)]
    ops: usize,
    /// Keep every trial's directory (logs, stores) under this one; by default only those of
    /// failing trials are kept, in the temporary directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Print only one JSON object at the end.
    #[arg(long)]
    json: bool,
}

/// The figures of a run (the JSON printed at the end).
#[derive(Debug, Default, Serialize)]
struct Totals {
    trials: u64,
    /// Every trial's outcome added up (its problems: the first 50).
    #[serde(flatten)]
    sum: Outcome,
    failed_seeds: Vec<u64>,
    seconds: f64,
}

/// A file's content: its length and BLAKE3 hash (the bytes derive from a seed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Content {
    size: u64,
    hash: [u8; 32],
}

/// A volume's files, by path.
type Tree = BTreeMap<String, Content>;
/// Changes written into a mount and not yet committed: a path's new content, or `None`
/// where it was deleted.
type Pending = BTreeMap<String, Option<Content>>;

fn apply(base: &Tree, pending: &Pending) -> Tree {
    let mut t = base.clone();
    for (p, c) in pending {
        match c {
            Some(c) => t.insert(p.clone(), *c),
            None => t.remove(p),
        };
    }
    t
}

/// The model's picture of one agent's mount of one volume.
#[derive(Clone, Debug, Default)]
struct View {
    /// The committed snapshot the mount is on.
    base: Tree,
    pending: Pending,
}

impl View {
    fn expected(&self) -> Tree {
        apply(&self.base, &self.pending)
    }

    /// A file deleted from the mount: a change only if the snapshot has it (one created
    /// and deleted since is no change at all, and leaves another writer's file alone).
    fn delete(&mut self, path: String) {
        if self.base.contains_key(&path) {
            self.pending.insert(path, None);
        } else {
            self.pending.remove(&path);
        }
    }
}

/// What one trial found.
#[derive(Debug, Default, Serialize)]
struct Outcome {
    faults: BTreeMap<&'static str, u64>,
    operations: u64,
    acknowledged: u64,
    lost: u64,
    mixed_snapshots: u64,
    unverified_bytes: u64,
    stuck_agents: u64,
    /// Operations that failed with no fault to explain it (each retried until it went
    /// through; the first messages are in `problems`).
    unexplained_errors: u64,
    problems: Vec<String>,
}

impl Outcome {
    /// Adds trial `seed`'s outcome.
    fn add(&mut self, seed: u64, o: &Outcome) {
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.operations += o.operations;
        self.acknowledged += o.acknowledged;
        self.lost += o.lost;
        self.mixed_snapshots += o.mixed_snapshots;
        self.unverified_bytes += o.unverified_bytes;
        self.stuck_agents += o.stuck_agents;
        self.unexplained_errors += o.unexplained_errors;
        for p in &o.problems {
            if self.problems.len() < 50 {
                self.problems.push(format!("seed {seed}: {p}"));
            }
        }
    }

    fn failed(&self) -> bool {
        self.lost + self.mixed_snapshots + self.unverified_bytes + self.stuck_agents > 0
    }

    fn fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    fn problem(&mut self, msg: String) {
        if self.problems.len() < 20 {
            self.problems.push(msg);
        }
    }
}

/// How a call to an agent ended.
enum Answer {
    Ok(Box<Reply>),
    /// The agent refused or failed it.
    Refused(ErrorReply),
    /// The connection broke (the agent died) or could not be made.
    Lost(String),
    /// No answer within [`OP_TIMEOUT`].
    TimedOut,
}

async fn call(agent: PathBuf, req: Request) -> Answer {
    match tokio::time::timeout(OP_TIMEOUT, control::call(&agent, &req, |_| {})).await {
        Err(_) => Answer::TimedOut,
        Ok(Err(e)) => Answer::Lost(e.to_string()),
        Ok(Ok(Err(e))) => Answer::Refused(e),
        Ok(Ok(Ok(r))) => Answer::Ok(Box::new(r)),
    }
}

/// A fault struck in the middle of an operation.
#[derive(Clone, Copy, Debug)]
enum Strike {
    /// kill -9 of node k (0: the coordinator, i + 1: agent i) after the delay.
    Kill { node: usize, after: Duration },
}

/// Whether to print every operation and its time (`CHAOS_TRACE=1`).
fn tracing() -> bool {
    std::env::var_os("CHAOS_TRACE").is_some()
}

/// Whether an error is the disk's doing (agent 2's tmpfs).
fn is_disk_full(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("no space") || e.contains("room") || e.contains("disk") || e.contains("full")
}

/// Deterministic file bytes: BLAKE3 in XOF mode keyed by the seed.
fn bytes_of(seed: u64, size: u64) -> Vec<u8> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut out = vec![0u8; size as usize];
    blake3::Hasher::new_keyed(&key)
        .finalize_xof()
        .fill(&mut out);
    out
}

fn content_of(bytes: &[u8]) -> Content {
    Content {
        size: bytes.len() as u64,
        hash: *blake3::hash(bytes).as_bytes(),
    }
}

/// The files under `dir` (directories are not compared: the model knows only files).
fn read_tree(dir: &Path) -> anyhow::Result<Tree> {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) -> anyhow::Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(root, &p, out)?;
            } else {
                let bytes = std::fs::read(&p).with_context(|| p.display().to_string())?;
                let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(rel, content_of(&bytes));
            }
        }
        Ok(())
    }
    let mut t = Tree::new();
    walk(dir, dir, &mut t)?;
    Ok(t)
}

/// The paths where two trees differ, for messages.
fn diff(a: &Tree, b: &Tree) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |c: Option<&Content>| match c {
                None => "absent".to_string(),
                Some(c) => format!("{} bytes {}", c.size, hex8(&c.hash)),
            };
            format!("{k}: {} vs {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

fn hex8(h: &[u8; 32]) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// File paths the operations pick from: few enough that writers overlap often.
fn random_path(rng: &mut SmallRng) -> String {
    format!("d{}/f{}", rng.random_range(0..3), rng.random_range(0..5))
}

fn random_size(rng: &mut SmallRng) -> u64 {
    match rng.random_range(0..100) {
        0..5 => 0,
        5..80 => rng.random_range(1..32 << 10),
        80..97 => rng.random_range(64 << 10..1 << 20),
        _ => rng.random_range(2 << 20..6 << 20),
    }
}

struct Trial<'a> {
    rng: SmallRng,
    fleet: Fleet,
    /// Every volume's acknowledged state, by name.
    model: BTreeMap<String, Tree>,
    /// Each agent's mounts, by volume.
    views: Vec<BTreeMap<&'static str, View>>,
    out: Outcome,
    next_seed: u64,
    next_volume: u64,
    src: PathBuf,
    say: &'a dyn Fn(String),
    last: &'static str,
}

impl Trial<'_> {
    fn mount_path(&self, agent: usize, vol: &str) -> PathBuf {
        self.fleet.root.join(format!("mnt-{agent}-{vol}"))
    }

    fn agent(&self, i: usize) -> PathBuf {
        self.fleet.agents[i].clone()
    }

    fn fresh_seed(&mut self) -> u64 {
        self.next_seed += 1;
        self.next_seed
    }

    fn scratch_volumes(&self) -> Vec<String> {
        self.model
            .keys()
            .filter(|v| !MOUNTED.contains(&v.as_str()))
            .cloned()
            .collect()
    }

    /// Runs `req` on agent `agent`; with a strike, kills that node at its time unless the
    /// call ended first. Returns the answer and whether the strike came.
    async fn run(&mut self, agent: usize, req: Request, strike: Option<Strike>) -> (Answer, bool) {
        self.out.operations += 1;
        if tracing() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (self.say)(format!(
                "    {:.3} agent {agent}: {req:?} {strike:?}",
                now.as_secs_f64() % 1000.0
            ));
        }
        let call = call(self.agent(agent), req);
        let Some(Strike::Kill { node, after }) = strike else {
            return (call.await, false);
        };
        tokio::pin!(call);
        tokio::select! {
            a = &mut call => return (a, false),
            _ = tokio::time::sleep(after) => {}
        }
        if let Err(e) = self.fleet.kill(node).await {
            self.out.problem(format!("{e:#}"));
        }
        if node == 0 {
            // As its service manager would, the coordinator comes back at once; what was
            // in flight must end by itself, whether it went through or failed.
            if let Err(e) = self.fleet.restart(0).await {
                self.out
                    .problem(format!("the coordinator did not come back: {e:#}"));
            }
        }
        (call.await, true)
    }

    /// Starts every node that is not running (after a kill).
    async fn heal(&mut self) -> anyhow::Result<()> {
        for k in 0..=AGENTS {
            if !self.fleet.is_running(k) {
                self.fleet.restart(k).await?;
            }
        }
        Ok(())
    }

    /// An operation's answer after a strike or a failure: retried until it goes through,
    /// at most [`RETRIES`] times. `done_if` says whether a refusal of a retry means the
    /// interrupted attempt went through (an rm of what is gone, say).
    async fn settle(
        &mut self,
        agent: usize,
        req: &Request,
        mut answer: Answer,
        struck: bool,
        done_if: &dyn Fn(&ErrorReply) -> bool,
    ) -> anyhow::Result<Option<Reply>> {
        let mut tries = 0;
        let mut after_fault = struck;
        loop {
            match answer {
                Answer::Ok(r) => return Ok(Some(*r)),
                Answer::TimedOut => {
                    self.out.stuck_agents += 1;
                    self.out.problem(format!(
                        "agent {agent} gave no answer to {req:?} in {OP_TIMEOUT:?}"
                    ));
                    return Ok(None);
                }
                Answer::Refused(ref e) if tries > 0 && done_if(e) => {
                    // The first attempt went through before the fault.
                    return Ok(Some(Reply::Done(e.message.clone())));
                }
                Answer::Refused(ref e) if !after_fault && !is_disk_full(&e.message) => {
                    self.out.unexplained_errors += 1;
                    self.out
                        .problem(format!("agent {agent}: {req:?} refused: {}", e.message));
                    after_fault = true;
                }
                Answer::Lost(ref e) if !after_fault => {
                    self.out.unexplained_errors += 1;
                    self.out
                        .problem(format!("agent {agent}: {req:?} lost: {e}"));
                    after_fault = true;
                }
                _ => {}
            }
            if tracing() {
                (self.say)(format!(
                    "  agent {agent}: retrying {req:?} after {}",
                    match &answer {
                        Answer::Refused(e) => e.message.clone(),
                        Answer::Lost(e) => e.clone(),
                        _ => String::new(),
                    }
                ));
            }
            tries += 1;
            if tries > RETRIES {
                self.out.stuck_agents += 1;
                self.out.problem(format!(
                    "agent {agent}: {req:?} failed {RETRIES} retries: {}",
                    match &answer {
                        Answer::Refused(e) => e.message.clone(),
                        Answer::Lost(e) => e.clone(),
                        _ => String::new(),
                    }
                ));
                return Ok(None);
            }
            self.heal().await?;
            // A node just restarted may still be finding its peers and the coordinator's
            // connection; the next attempt waits a little longer each time.
            tokio::time::sleep(Duration::from_millis(50 << tries.min(5))).await;
            self.out.operations += 1;
            answer = call(self.agent(agent), req.clone()).await;
        }
    }

    /// Compares a mount with the snapshots it may show; a mismatch is a mixed snapshot.
    fn check_mount(
        &mut self,
        agent: usize,
        vol: &'static str,
        allowed: &[Tree],
        when: &str,
    ) -> anyhow::Result<bool> {
        let seen = read_tree(&self.mount_path(agent, vol))?;
        if allowed.contains(&seen) {
            return Ok(true);
        }
        self.out.mixed_snapshots += 1;
        let d = diff(&allowed[0], &seen);
        self.out.problem(format!(
            "agent {agent} mount of {vol} {when} shows no whole snapshot: {}",
            d.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
        ));
        Ok(false)
    }

    /// Writes or deletes a few files in one agent's mount.
    fn write(&mut self, agent: usize, vol: &'static str) -> anyhow::Result<()> {
        let r = self.write_files(agent, vol);
        if tracing() {
            (self.say)(format!(
                "    agent {agent} {vol} pending {:?}",
                self.views[agent][vol]
                    .pending
                    .iter()
                    .map(|(p, c)| (p, c.map(|c| c.size)))
                    .collect::<Vec<_>>()
            ));
        }
        r
    }

    fn write_files(&mut self, agent: usize, vol: &'static str) -> anyhow::Result<()> {
        let mnt = self.mount_path(agent, vol);
        for _ in 0..self.rng.random_range(1..4) {
            let path = random_path(&mut self.rng);
            let p = mnt.join(&path);
            let view = &self.views[agent][vol];
            if self.rng.random_bool(0.15) {
                if view.expected().contains_key(&path) {
                    std::fs::remove_file(&p).with_context(|| p.display().to_string())?;
                    self.views[agent]
                        .get_mut(vol)
                        .expect("mounted")
                        .delete(path);
                }
                continue;
            }
            let size = random_size(&mut self.rng);
            let seed = self.fresh_seed();
            let bytes = bytes_of(seed, size);
            std::fs::create_dir_all(p.parent().expect("a file in a directory"))?;
            let written = std::fs::write(&p, &bytes);
            let pending = &mut self.views[agent].get_mut(vol).expect("mounted").pending;
            match written {
                Ok(()) => {
                    pending.insert(path, Some(content_of(&bytes)));
                }
                Err(e) if e.raw_os_error() == Some(28) => {
                    // A full disk (agent 2): the user removes what could not be written.
                    std::fs::remove_file(&p)?;
                    let view = self.views[agent].get_mut(vol).expect("mounted");
                    view.delete(path);
                }
                Err(e) => return Err(e).with_context(|| p.display().to_string()),
            }
        }
        Ok(())
    }

    /// A commit of one agent's mount, maybe struck by a kill of the agent or the
    /// coordinator.
    async fn commit(
        &mut self,
        agent: usize,
        vol: &'static str,
        strike: Option<Strike>,
    ) -> anyhow::Result<()> {
        let before = self.views[agent][vol].clone();
        let req = Request::Commit {
            name: Some(vol.into()),
        };
        let (answer, struck) = self.run(agent, req.clone(), strike).await;
        if struck {
            self.count_strike(strike, "agent_killed_mid_commit");
            self.heal().await?;
            // The mount shows its own view: the commit either did not land, or landed and
            // the mount followed to the merged head.
            let landed = apply(&self.model[vol], &before.pending);
            self.check_mount(
                agent,
                vol,
                &[before.expected(), landed],
                "after a kill mid-commit",
            )?;
        }
        let Some(reply) = self.settle(agent, &req, answer, struck, &|_| false).await? else {
            return Ok(());
        };
        let Reply::Committed(rep) = reply else {
            bail!("unexpected answer to commit: {reply:?}");
        };
        if rep
            .reloaded
            .as_ref()
            .is_some_and(|r| !r.sources.banned.is_empty())
        {
            self.out.fault("lying_peer_banned");
        }
        let latest = apply(&self.model[vol], &before.pending);
        self.model.insert(vol.to_string(), latest.clone());
        if let Some(why) = rep.stayed {
            self.out.acknowledged += 1;
            let view = self.views[agent].get_mut(vol).expect("mounted");
            view.pending.clear();
            view.base = latest;
            self.out.unexplained_errors += 1;
            self.out.problem(format!(
                "agent {agent}: commit of {vol} stayed on its view: {why}"
            ));
            // Its own changes are committed: a discarding reload brings the merged head.
            return self.reload(agent, vol, None).await;
        }
        self.moved_to(agent, vol, latest, "after its commit")
    }

    fn count_strike(&mut self, strike: Option<Strike>, agent_kind: &'static str) {
        match strike {
            Some(Strike::Kill { node: 0, .. }) => self.out.fault("coordinator_killed"),
            Some(_) => self.out.fault(agent_kind),
            None => {}
        }
    }

    /// A reload (discarding what the mount holds uncommitted, if anything), maybe struck.
    async fn reload(
        &mut self,
        agent: usize,
        vol: &'static str,
        strike: Option<Strike>,
    ) -> anyhow::Result<()> {
        let before = self.views[agent][vol].clone();
        let (req, mode) = reload_request(vol, &before);
        let (answer, struck) = self.run(agent, req.clone(), strike).await;
        let latest = self.model[vol].clone();
        if struck {
            self.count_strike(strike, "agent_killed_mid_reload");
            self.heal().await?;
            let mut allowed = vec![before.expected(), latest.clone()];
            if mode == ReloadMode::Discard {
                allowed.push(before.base.clone());
            }
            self.check_mount(agent, vol, &allowed, "after a kill mid-reload")?;
        }
        let Some(reply) = self.settle(agent, &req, answer, struck, &|_| false).await? else {
            return Ok(());
        };
        if let Reply::Reloaded(r) = &reply
            && !r.sources.banned.is_empty()
        {
            self.out.fault("lying_peer_banned");
        }
        self.moved_to(agent, vol, latest, "after its reload")
    }

    /// A volume operation through an agent (put, rm, cp, create, rename, delete): applied
    /// to the model once acknowledged.
    async fn volume_op(
        &mut self,
        agent: usize,
        req: Request,
        strike: Option<Strike>,
        done_if: &dyn Fn(&ErrorReply) -> bool,
        change: impl FnOnce(&mut BTreeMap<String, Tree>),
    ) -> anyhow::Result<()> {
        let (answer, struck) = self.run(agent, req.clone(), strike).await;
        if struck {
            self.count_strike(strike, "agent_killed_mid_volume_op");
        }
        if self
            .settle(agent, &req, answer, struck, done_if)
            .await?
            .is_some()
        {
            self.out.acknowledged += 1;
            change(&mut self.model);
        }
        Ok(())
    }

    fn random_volume(&mut self) -> String {
        let mut all: Vec<String> = self.model.keys().cloned().collect();
        all.sort();
        all.swap_remove(self.rng.random_range(0..all.len()))
    }

    /// A strike at the coordinator with probability `p`.
    fn maybe_coordinator_strike(&mut self, p: f64) -> Option<Strike> {
        self.rng.random_bool(p).then(|| Strike::Kill {
            node: 0,
            after: Duration::from_millis(self.rng.random_range(0..60)),
        })
    }

    /// A kill of `agent` within `within_ms` of the start (one time in five), else maybe
    /// one of the coordinator.
    fn strike_agent_or_coordinator(&mut self, agent: usize, within_ms: u64) -> Option<Strike> {
        if self.rng.random_bool(0.2) {
            Some(Strike::Kill {
                node: agent + 1,
                after: Duration::from_millis(self.rng.random_range(0..within_ms)),
            })
        } else {
            self.maybe_coordinator_strike(0.1)
        }
    }

    async fn step(&mut self) -> anyhow::Result<()> {
        let writer = WRITERS[self.rng.random_range(0..WRITERS.len())];
        let vol = MOUNTED[self.rng.random_range(0..MOUNTED.len())];
        self.last = match self.rng.random_range(0..100) {
            0..22 => "write",
            22..42 => "commit",
            42..58 => "reload",
            58..68 => "put",
            68..74 => "rm",
            74..80 => "cp",
            80..90 => "scratch",
            90..95 => "peer_leaves",
            _ => "full_disk",
        };
        match self.last {
            "write" => self.write(writer, vol),
            "commit" => {
                if self.views[writer][vol].pending.is_empty() {
                    self.write(writer, vol)?;
                }
                let strike = self.strike_agent_or_coordinator(writer, 80);
                self.commit(writer, vol, strike).await
            }
            "reload" => {
                // The lying peer reloads most, so that it holds what the others fetch.
                let agent = if self.rng.random_bool(0.4) {
                    LIAR
                } else {
                    self.rng.random_range(0..AGENTS)
                };
                let strike = self.strike_agent_or_coordinator(agent, 60);
                self.reload(agent, vol, strike).await
            }
            "put" => self.put(writer).await,
            "rm" => self.rm(writer).await,
            "cp" => self.cp(writer).await,
            "scratch" => self.scratch(writer).await,
            "peer_leaves" => self.peer_leaves().await,
            _ => self.full_disk().await,
        }
    }

    async fn put(&mut self, agent: usize) -> anyhow::Result<()> {
        let vol = self.random_volume();
        let mut items = Vec::new();
        let mut changes = Vec::new();
        for _ in 0..self.rng.random_range(1..3) {
            let remote = random_path(&mut self.rng);
            let seed = self.fresh_seed();
            let size = random_size(&mut self.rng);
            let bytes = bytes_of(seed, size);
            let local = self.src.join(format!("put-{seed}"));
            std::fs::write(&local, &bytes)?;
            items.retain(|i: &PutItem| i.remote != remote);
            changes.retain(|(r, _): &(String, Content)| *r != remote);
            items.push(PutItem {
                local,
                remote: remote.clone(),
                mode: None,
            });
            changes.push((remote, content_of(&bytes)));
        }
        let req = Request::VolumePut {
            name: vol.clone(),
            items,
            force: true,
        };
        let strike = self.maybe_coordinator_strike(0.15);
        self.volume_op(agent, req, strike, &|_| false, move |m| {
            let t = m.get_mut(&vol).expect("a volume of the model");
            for (p, c) in changes {
                t.insert(p, c);
            }
        })
        .await
    }

    async fn rm(&mut self, agent: usize) -> anyhow::Result<()> {
        let vol = self.random_volume();
        let files: Vec<String> = self.model[&vol].keys().cloned().collect();
        if files.is_empty() {
            return Ok(());
        }
        let file = files[self.rng.random_range(0..files.len())].clone();
        // Now and then the whole directory.
        let (path, recursive) = if self.rng.random_bool(0.2) {
            (file.split('/').next().expect("d/f").to_string(), true)
        } else {
            (file, false)
        };
        let req = Request::VolumeRm {
            name: vol.clone(),
            path: path.clone(),
            recursive,
        };
        let strike = self.maybe_coordinator_strike(0.15);
        let prefix = format!("{path}/");
        self.volume_op(
            agent,
            req,
            strike,
            &|e| e.code == ErrorCode::NotFound,
            move |m| {
                m.get_mut(&vol)
                    .expect("a volume of the model")
                    .retain(|p, _| *p != path && !p.starts_with(&prefix));
            },
        )
        .await
    }

    async fn cp(&mut self, agent: usize) -> anyhow::Result<()> {
        let vol = self.random_volume();
        let files: Vec<(String, Content)> = self.model[&vol]
            .iter()
            .map(|(p, c)| (p.clone(), *c))
            .collect();
        if files.is_empty() {
            return Ok(());
        }
        let (src, content) = files[self.rng.random_range(0..files.len())].clone();
        let dst = random_path(&mut self.rng);
        if dst == src {
            return Ok(());
        }
        let req = Request::VolumeCp {
            name: vol.clone(),
            srcs: vec![src],
            dst: dst.clone(),
            recursive: false,
        };
        let strike = self.maybe_coordinator_strike(0.15);
        self.volume_op(agent, req, strike, &|_| false, move |m| {
            m.get_mut(&vol)
                .expect("a volume of the model")
                .insert(dst, content);
        })
        .await
    }

    /// Creates, renames or deletes a scratch volume (never one that is mounted).
    async fn scratch(&mut self, agent: usize) -> anyhow::Result<()> {
        let scratch = self.scratch_volumes();
        let strike = self.maybe_coordinator_strike(0.15);
        if scratch.is_empty() || scratch.len() < 3 && self.rng.random_bool(0.5) {
            self.next_volume += 1;
            let name = format!("s{}", self.next_volume);
            let req = Request::VolumeCreate {
                name: name.clone(),
                allow_existing: false,
            };
            return self
                .volume_op(
                    agent,
                    req,
                    strike,
                    &|e| e.code == ErrorCode::Exists,
                    move |m| {
                        m.insert(name, Tree::new());
                    },
                )
                .await;
        }
        let name = scratch[self.rng.random_range(0..scratch.len())].clone();
        if self.rng.random_bool(0.5) {
            self.next_volume += 1;
            let to = format!("s{}", self.next_volume);
            let req = Request::VolumeRename {
                from: name.clone(),
                to: to.clone(),
            };
            self.volume_op(
                agent,
                req,
                strike,
                &|e| e.code == ErrorCode::NotFound,
                move |m| {
                    let t = m.remove(&name).expect("a volume of the model");
                    m.insert(to, t);
                },
            )
            .await
        } else {
            let req = Request::VolumeDelete {
                name: name.clone(),
                allow_missing: false,
            };
            self.volume_op(
                agent,
                req,
                strike,
                &|e| e.code == ErrorCode::NotFound,
                move |m| {
                    m.remove(&name);
                },
            )
            .await
        }
    }

    /// A new file of a size in `sizes`, written into agent 0's mount and committed.
    async fn commit_new_file(
        &mut self,
        vol: &'static str,
        sizes: std::ops::Range<u64>,
    ) -> anyhow::Result<()> {
        let path = random_path(&mut self.rng);
        let seed = self.fresh_seed();
        let bytes = bytes_of(seed, self.rng.random_range(sizes));
        let p = self.mount_path(0, vol).join(&path);
        std::fs::create_dir_all(p.parent().expect("in a directory"))?;
        std::fs::write(&p, &bytes)?;
        self.views[0]
            .get_mut(vol)
            .expect("mounted")
            .pending
            .insert(path, Some(content_of(&bytes)));
        self.commit(0, vol, None).await
    }

    /// An acknowledged reload (or commit) brought `agent`'s mount of `vol` to `latest`:
    /// the model's view follows, and the mount must show it.
    fn moved_to(
        &mut self,
        agent: usize,
        vol: &'static str,
        latest: Tree,
        when: &str,
    ) -> anyhow::Result<()> {
        self.out.acknowledged += 1;
        let view = self.views[agent].get_mut(vol).expect("mounted");
        view.pending.clear();
        view.base = latest.clone();
        self.check_mount(agent, vol, &[latest], when)?;
        Ok(())
    }

    /// A large file committed by agent 0 and fetched by agent 1; then agent 2 or 3
    /// fetches it while agent 1 is killed (a peer leaving mid-piece).
    async fn peer_leaves(&mut self) -> anyhow::Result<()> {
        let vol = MOUNTED[self.rng.random_range(0..MOUNTED.len())];
        self.commit_new_file(vol, 4 << 20..8 << 20).await?;
        self.reload(1, vol, None).await?;
        let fetcher = [TMPFS_AGENT, LIAR][self.rng.random_range(0..2)];
        let strike = Strike::Kill {
            node: 2,
            after: Duration::from_millis(self.rng.random_range(0..40)),
        };
        let before = self.views[fetcher][vol].clone();
        let (req, _) = reload_request(vol, &before);
        let (answer, struck) = self.run(fetcher, req.clone(), Some(strike)).await;
        if struck {
            self.out.fault("peer_left_mid_fetch");
        }
        // The fetcher itself was not struck: a failure is not explained by a fault of its
        // own, but the reload may still have been refused for the disk.
        let latest = self.model[vol].clone();
        let settled = self
            .settle(fetcher, &req, answer, false, &|_| false)
            .await?;
        self.heal().await?;
        if settled.is_some() {
            self.moved_to(fetcher, vol, latest, "after a reload its peer left")?;
        }
        // Agent 1 was killed idle: its mount is still whole.
        let v1 = self.views[1][vol].expected();
        self.check_mount(1, vol, &[v1], "after a restart")?;
        Ok(())
    }

    /// Agent 2's disk filled by another program; an operation on agent 2 meets it; the
    /// space comes back; the operation goes through.
    async fn full_disk(&mut self) -> anyhow::Result<()> {
        let vol = MOUNTED[self.rng.random_range(0..MOUNTED.len())];
        // Something new to fetch.
        self.commit_new_file(vol, 256 << 10..2 << 20).await?;
        let filler = self.fleet.agents[TMPFS_AGENT].join("filler");
        fill(&filler)?;
        self.out.fault("full_disk");
        let before = self.views[TMPFS_AGENT][vol].clone();
        let commit = !before.pending.is_empty() && self.rng.random_bool(0.5);
        let req = if commit {
            Request::Commit {
                name: Some(vol.into()),
            }
        } else {
            Request::Reload {
                name: Some(vol.into()),
                mode: ReloadMode::Discard,
            }
        };
        let (first, _) = self.run(TMPFS_AGENT, req.clone(), None).await;
        let refused = match &first {
            Answer::Ok(_) => None,
            Answer::Refused(e) => Some(e.message.clone()),
            Answer::Lost(e) => Some(format!("lost: {e}")),
            Answer::TimedOut => Some("timed out".into()),
        };
        if let Some(msg) = &refused {
            if !is_disk_full(msg) {
                self.out.unexplained_errors += 1;
                self.out
                    .problem(format!("agent 2 on a full disk: {req:?}: {msg}"));
            }
            // Refused: the mount is as it was.
            self.check_mount(
                TMPFS_AGENT,
                vol,
                &[before.expected()],
                "after a refusal for a full disk",
            )?;
        }
        std::fs::remove_file(&filler)?;
        let answer = match first {
            Answer::Ok(r) => Answer::Ok(r),
            _ => {
                self.out.operations += 1;
                call(self.agent(TMPFS_AGENT), req.clone()).await
            }
        };
        let Some(_) = self
            .settle(TMPFS_AGENT, &req, answer, true, &|_| false)
            .await?
        else {
            return Ok(());
        };
        let latest = if commit {
            let l = apply(&self.model[vol], &before.pending);
            self.model.insert(vol.to_string(), l.clone());
            l
        } else {
            self.model[vol].clone()
        };
        self.moved_to(TMPFS_AGENT, vol, latest, "after the disk had room again")
    }

    /// The end of a trial: every node up, every writer's changes committed, every agent
    /// reloaded; then every mount and every scratch volume compared with the model.
    async fn finish(&mut self) -> anyhow::Result<()> {
        self.heal().await?;
        for agent in WRITERS {
            for vol in MOUNTED {
                if !self.views[agent][vol].pending.is_empty() {
                    self.commit(agent, vol, None).await?;
                }
            }
        }
        let mut lost = BTreeSet::new();
        for agent in 0..AGENTS {
            for vol in MOUNTED {
                let req = Request::Reload {
                    name: Some(vol.into()),
                    mode: ReloadMode::Discard,
                };
                let (a, _) = self.run(agent, req.clone(), None).await;
                if self
                    .settle(agent, &req, a, false, &|_| false)
                    .await?
                    .is_none()
                {
                    continue;
                }
                let seen = read_tree(&self.mount_path(agent, vol))?;
                for d in diff(&self.model[vol], &seen) {
                    self.out.problem(format!("agent {agent} {vol}: {d}"));
                    lost.insert(format!("{vol}:{}", d.split(':').next().unwrap_or("")));
                }
            }
        }
        // The scratch volumes, through agent 0: their names, then their files.
        let (a, _) = self.run(0, Request::VolumeList, None).await;
        if let Some(Reply::Volumes(list)) = self
            .settle(0, &Request::VolumeList, a, false, &|_| false)
            .await?
        {
            let names: BTreeSet<String> = list.into_iter().map(|v| v.name).collect();
            let want: BTreeSet<String> = self.model.keys().cloned().collect();
            for n in names.symmetric_difference(&want) {
                self.out.problem(format!(
                    "volume {n}: listed {} but the model says {}",
                    names.contains(n),
                    want.contains(n)
                ));
                lost.insert(format!("volume {n}"));
            }
        }
        for vol in self.scratch_volumes() {
            let dir = self.src.join(format!("get-{vol}"));
            let req = Request::VolumeGet {
                name: vol.clone(),
                remote: "/".into(),
                local: Some(dir.clone()),
                force: true,
            };
            let (a, _) = self.run(0, req.clone(), None).await;
            if self.settle(0, &req, a, false, &|_| false).await?.is_none() {
                continue;
            }
            let seen = if dir.exists() {
                read_tree(&dir)?
            } else {
                Tree::new()
            };
            for d in diff(&self.model[&vol], &seen) {
                self.out.problem(format!("{vol}: {d}"));
                lost.insert(format!("{vol}:{}", d.split(':').next().unwrap_or("")));
            }
        }
        self.out.lost += lost.len() as u64;
        Ok(())
    }
}

/// A reload of `vol`: refusing uncommitted changes where the model knows of none (so that
/// one it does not know of shows), discarding them where there are some.
fn reload_request(vol: &str, view: &View) -> (Request, ReloadMode) {
    let mode = if view.pending.is_empty() {
        ReloadMode::Refuse
    } else {
        ReloadMode::Discard
    };
    let req = Request::Reload {
        name: Some(vol.into()),
        mode,
    };
    (req, mode)
}

/// Fills the file system holding `path` with a file until it refuses more.
fn fill(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let buf = vec![0xa5u8; 1 << 20];
    loop {
        match f.write(&buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The last partial megabyte, byte by byte in small writes, so nothing is left.
    let small = [0xa5u8; 4096];
    while let Ok(n) = f.write(&small) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// Bytes held in `store_dir` that do not verify against their hashes: complete blobs read
/// whole, partial ones encoded range by range against their outboards.
fn unverified_bytes(store_dir: &Path, problems: &mut Vec<String>) -> anyhow::Result<u64> {
    if !store_dir.join("store.redb").exists() {
        return Ok(0);
    }
    let store = voltool_agent::store::Store::open(store_dir)
        .with_context(|| format!("opening {}", store_dir.display()))?;
    let mut bad = 0;
    for (hash, meta) in store.all_metas()? {
        let held = if meta.is_complete() {
            store.read_verified(&hash, meta.size).map(|_| ())
        } else {
            store.encode(&hash, meta.size, &meta.ranges(), std::io::sink())
        };
        if let Err(e) = held {
            bad += meta.held_bytes();
            problems.push(format!("{}: blob {hash}: {e}", store_dir.display()));
        }
    }
    Ok(bad)
}

fn mount_tmpfs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_BYTES}"), "tmpfs"])
        .arg(dir)
        .status()
        .context("running mount")?;
    if !st.success() {
        bail!(
            "mounting a tmpfs at {} failed (chaos needs root)",
            dir.display()
        );
    }
    Ok(())
}

/// Copies what agent 2 left on its tmpfs beside it, for a failing trial's post-mortem.
fn save_tmpfs(dir: &Path) {
    let mut to = dir.as_os_str().to_owned();
    to.push("-saved");
    let _ = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir)
        .arg(&to)
        .status();
}

/// One trial in `root`.
async fn trial(
    seed: u64,
    ops: usize,
    root: &Path,
    say: &dyn Fn(String),
) -> anyhow::Result<Outcome> {
    let tmpfs = fleet::agent_dir(root, TMPFS_AGENT);
    mount_tmpfs(&tmpfs)?;
    let result = trial_in(seed, ops, root, say).await;
    let mut out = match result {
        Ok(o) => o,
        Err(e) => {
            if let Some(secs) = std::env::var("CHAOS_HOLD")
                .ok()
                .and_then(|s| s.parse().ok())
            {
                // A post-mortem of the live fleet: its mounts stay as they are for a while.
                eprintln!("trial with seed {seed} failed: {e:#}; holding the fleet for {secs}s");
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            let _ = fleet::stop(root).await;
            save_tmpfs(&tmpfs);
            voltool_agent::overlay::unmount_all_under(root);
            return Err(e);
        }
    };
    // Every store checked once its node has stopped.
    let mut problems = Vec::new();
    let t0 = Instant::now();
    let _ = fleet::stop(root).await;
    if tracing() {
        say(format!("  stop {:?}", t0.elapsed()));
    }
    for i in 0..AGENTS {
        out.unverified_bytes +=
            unverified_bytes(&fleet::agent_dir(root, i).join("store"), &mut problems)?;
    }
    out.unverified_bytes +=
        unverified_bytes(&root.join("coordinator").join("origin"), &mut problems)?;
    for p in problems {
        out.problem(p);
    }
    if out.failed() {
        save_tmpfs(&tmpfs);
    }
    voltool_agent::overlay::unmount_all_under(root);
    Ok(out)
}

async fn trial_in(
    seed: u64,
    ops: usize,
    root: &Path,
    say: &dyn Fn(String),
) -> anyhow::Result<Outcome> {
    let agent_args = |i: usize| -> Vec<String> {
        match i {
            TMPFS_AGENT => vec!["--store-max".into(), TMPFS_STORE_MAX.into()],
            LIAR => vec!["--evil".into()],
            _ => Vec::new(),
        }
    };
    let t0 = Instant::now();
    let fleet = fleet::up_with(root, AGENTS, None, None, &agent_args, None).await?;
    if tracing() {
        say(format!("  up {:?}", t0.elapsed()));
    }
    let src = root.join("src");
    std::fs::create_dir_all(&src)?;
    let mut t = Trial {
        rng: SmallRng::seed_from_u64(seed),
        fleet,
        model: BTreeMap::new(),
        views: vec![BTreeMap::new(); AGENTS],
        out: Outcome::default(),
        next_seed: seed << 20,
        next_volume: 0,
        src,
        say,
        last: "",
    };
    for vol in MOUNTED {
        let req = Request::VolumeCreate {
            name: vol.into(),
            allow_existing: false,
        };
        fleet::ask(&t.agent(0), req).await?;
        t.model.insert(vol.into(), Tree::new());
        for i in 0..AGENTS {
            let req = Request::Mount {
                name: vol.into(),
                path: t.mount_path(i, vol),
                background_commit_secs: None,
                read_only: i == LIAR,
            };
            fleet::ask(&t.agent(i), req).await?;
            t.views[i].insert(vol, View::default());
        }
    }
    for n in 0..ops {
        let t0 = Instant::now();
        t.step().await.with_context(|| format!("operation {n}"))?;
        if tracing() {
            (t.say)(format!("  op {n}: {:?} {:?}", t.last, t0.elapsed()));
        }
        if t.out.stuck_agents > 0 {
            (t.say)(format!(
                "seed {seed}: an agent is stuck; the trial stops here"
            ));
            break;
        }
    }
    let t0 = Instant::now();
    if t.out.stuck_agents == 0 {
        t.finish().await?;
    }
    if tracing() {
        (t.say)(format!("  finish {:?}", t0.elapsed()));
    }
    Ok(t.out)
}

pub(crate) async fn run(a: ChaosArgs) -> anyhow::Result<ExitCode> {
    if !rustix::process::geteuid().is_root() {
        bail!("chaos mounts a tmpfs for the agent whose disk fills: run it as root");
    }
    let say = |msg: String| {
        if !a.json {
            eprintln!("{msg}");
        }
    };
    let start = Instant::now();
    let mut totals = Totals::default();
    for i in 0..a.trials {
        let seed = a.seed + i;
        let t0 = Instant::now();
        let (root, tmp) = match &a.keep {
            Some(k) => (k.join(format!("trial-{seed}")), None),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("voltool-chaos-")
                    .tempdir()?;
                (d.path().to_path_buf(), Some(d))
            }
        };
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let result = trial(seed, a.ops, &root, &say).await;
        totals.trials += 1;
        let failed = match result {
            Ok(o) => {
                for p in &o.problems {
                    say(format!("  seed {seed}: {p}"));
                }
                totals.sum.add(seed, &o);
                o.failed()
            }
            Err(e) => {
                say(format!("  seed {seed}: the trial could not go on: {e:#}"));
                let msg = format!("the trial could not go on: {e:#}");
                totals.sum.add(
                    seed,
                    &Outcome {
                        problems: vec![msg],
                        ..Outcome::default()
                    },
                );
                true
            }
        };
        if failed {
            totals.failed_seeds.push(seed);
            let kept = match tmp {
                Some(d) => d.keep(),
                None => root.clone(),
            };
            eprintln!(
                "trial with seed {seed} FAILED; its directory: {}; replay: voltool-testnet chaos --trials 1 --seed {seed} --ops {}",
                kept.display(),
                a.ops
            );
        } else {
            say(format!(
                "trial {}/{} (seed {seed}) passed in {:.1}s",
                i + 1,
                a.trials,
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    totals.seconds = start.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::to_string(&totals)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&totals)?);
    }
    Ok(if totals.failed_seeds.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
