//! `voltool-testnet failover`: the failover series. Three coordinators over a three-member
//! etcd cluster and an S3 origin (Garage), agents given all three; again and again a writer
//! has a change ready, the leader dies by kill -9 (its service manager starts it again at
//! once, as a candidate), and the writer commits until the next leader acknowledges it; a
//! reader then reloads to that version by itself. Prints the time from each kill to the
//! acknowledged commit, its median and p99, as multiples of the lease's TTL.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use voltool_agent::control::{ReloadMode, Reply, Request};

use crate::fleet::{self, Fleet};
use crate::ha::HaRun;

/// Longest a commit may keep failing after a kill before the series gives up.
const GIVE_UP: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
pub(crate) struct FailoverArgs {
    /// How many times the leader is killed.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// The lead's lease (whole seconds).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Agents (the first writes, the others reload in turn).
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Keep the fleet's directory here (by default a temporary one, removed).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Print only one JSON object at the end.
    #[arg(long)]
    json: bool,
}

/// The figures of a series.
#[derive(Debug, Serialize)]
struct Series {
    kills: usize,
    lease_ttl_s: f64,
    /// From each kill -9 of the leader to the first commit acknowledged after it, sorted.
    failover_s: Vec<f64>,
    median_s: f64,
    p99_s: f64,
    median_over_ttl: f64,
    p99_over_ttl: f64,
    /// Commits refused or failed between a kill and the acknowledged one (retried at once).
    failed_tries: u64,
    /// Reloads by another agent after each failover that reached the new version.
    reloads_ok: usize,
    /// A commit in steady state, before the first kill (median of 5), for scale.
    steady_commit_s: f64,
    seconds: f64,
}

/// The `q`-quantile of sorted `xs` (nearest rank).
fn quantile(xs: &[f64], q: f64) -> f64 {
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

pub(crate) async fn run(a: FailoverArgs) -> anyhow::Result<ExitCode> {
    if a.agents < 2 || a.kills == 0 {
        bail!("--agents must be at least 2 (a writer and a reader) and --kills at least 1");
    }
    let say = |msg: String| {
        if !a.json {
            eprintln!("{msg}");
        }
    };
    let start = Instant::now();
    say("starting a three-member etcd cluster and an S3 server (Garage)".into());
    let ha = tokio::task::block_in_place(HaRun::start)?;
    let (root, _tmp) = match &a.keep {
        Some(k) => (k.clone(), None),
        None => {
            let d = tempfile::Builder::new()
                .prefix("voltool-failover-")
                .tempdir()?;
            (d.path().to_path_buf(), Some(d))
        }
    };
    let setup = ha.setup(0, a.lease_ttl);
    let mut fleet = fleet::up_ha(&root, a.agents, &setup, &|_| Vec::new()).await?;
    let result = series(&a, &mut fleet, &say).await;
    let _ = fleet::down(&root).await;
    let mut s = result?;
    s.seconds = start.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&s)?);
    }
    Ok(ExitCode::SUCCESS)
}

async fn series(
    a: &FailoverArgs,
    fleet: &mut Fleet,
    say: &dyn Fn(String),
) -> anyhow::Result<Series> {
    let mounts = fleet.create_and_mount_all("v").await?;
    let writer = fleet.agents[0].clone();
    let commit = Request::Commit {
        name: Some("v".into()),
    };
    // Steady state, for scale.
    let mut steady = Vec::new();
    for n in 0..5 {
        std::fs::write(mounts[0].join(format!("steady-{n}")), n.to_string())?;
        let t = Instant::now();
        fleet::ask(&writer, commit.clone()).await?;
        steady.push(t.elapsed().as_secs_f64());
    }
    steady.sort_by(f64::total_cmp);
    let mut times = Vec::new();
    let mut failed_tries = 0;
    let mut reloads_ok = 0;
    for k in 0..a.kills {
        let leader = await_leader(fleet).await?;
        // The change is ready before the kill: what is measured is the fleet's, not the
        // writer's.
        std::fs::write(mounts[0].join(format!("after-kill-{k}")), k.to_string())?;
        let killed = Instant::now();
        fleet.kill(leader).await?;
        // Its service manager starts it again at once, as a candidate.
        fleet.restart(leader).await?;
        let version = loop {
            match fleet::ask(&writer, commit.clone()).await {
                Ok(Reply::Committed(c)) if c.changed > 0 => break c.version,
                Ok(other) => bail!("unexpected answer to a commit: {other:?}"),
                Err(e) => {
                    failed_tries += 1;
                    if killed.elapsed() > GIVE_UP {
                        return Err(e).context(format!(
                            "no commit acknowledged {GIVE_UP:?} after the kill of coordinator {leader}"
                        ));
                    }
                    pause_before_retry().await;
                }
            }
        };
        let t = killed.elapsed().as_secs_f64();
        times.push(t);
        // A reader follows by itself: its reload reaches the new version.
        let i = 1 + k % (a.agents - 1);
        let reload = Request::Reload {
            name: Some("v".into()),
            mode: ReloadMode::Discard,
            lazy: false,
        };
        match fleet::ask(&fleet.agents[i], reload).await {
            Ok(Reply::Reloaded(r)) if r.version >= version => reloads_ok += 1,
            other => say(format!(
                "  agent {i}'s reload after failover {k}: {other:?}"
            )),
        }
        say(format!(
            "kill {}/{}: coordinator {leader} killed; version {version} acknowledged {t:.2}s after",
            k + 1,
            a.kills
        ));
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let ttl = a.lease_ttl.as_secs_f64();
    let (median, p99) = (quantile(&sorted, 0.5), quantile(&sorted, 0.99));
    Ok(Series {
        kills: a.kills,
        lease_ttl_s: ttl,
        failover_s: sorted,
        median_s: median,
        p99_s: p99,
        median_over_ttl: median / ttl,
        p99_over_ttl: p99 / ttl,
        failed_tries,
        reloads_ok,
        steady_commit_s: quantile(&steady, 0.5),
        seconds: 0.0,
    })
}

/// A short pause between a failed commit and the next (the agent itself waits out a
/// change of leader: this only keeps a refusal from spinning).
async fn pause_before_retry() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Waits (bounded) until one coordinator leads and every coordinator runs; returns the
/// leader.
async fn await_leader(fleet: &Fleet) -> anyhow::Result<usize> {
    let start = Instant::now();
    loop {
        let leading = fleet.leading();
        let all_up = (0..fleet.coordinators()).all(|k| fleet.is_running(k));
        if leading.len() == 1 && all_up {
            return Ok(leading[0]);
        }
        if start.elapsed() > GIVE_UP {
            bail!("no single leader within {GIVE_UP:?} (leading: {leading:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
