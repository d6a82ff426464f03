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
use voltool_agent::control::export;
use voltool_agent::control::upload::{Source, Upload};
use voltool_agent::control::{
    self, ErrorCode, ErrorReply, Follow, ReloadMode, Reply, Request, UploadEntry, UploadKind,
};

use crate::fleet::{self, Fleet};
use voltool_coordinator::ADDR_FILE;

mod binds;
mod ha;
mod host;
mod model;
mod ops;
mod outcome;
mod trial;

use ha::*;
use host::*;
use model::*;
use outcome::*;
use trial::*;

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
    /// Coordinators in failover: three over a three-member etcd cluster, the origin in an
    /// S3 bucket (Garage); the faults of failover (the leader killed or paused past its
    /// lease, a standby killed, an etcd member killed or paused) strike among the others.
    /// Needs etcd (`scripts/etcd.sh`) and Garage (`scripts/garage.sh`).
    #[arg(long)]
    ha: bool,
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
    let mut ha = if a.ha {
        say("starting a three-member etcd cluster and an S3 server (Garage)".into());
        Some(tokio::task::block_in_place(HaRun::start)?)
    } else {
        None
    };
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
        let result = trial(seed, a.ops, &root, &say, ha.as_mut()).await;
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
                "trial with seed {seed} FAILED; its directory: {}; replay: voltool-testnet chaos --trials 1 --seed {seed} --ops {}{}",
                kept.display(),
                a.ops,
                if a.ha { " --ha" } else { "" }
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
