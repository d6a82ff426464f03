//! `voltool-testnet bench --scenario fanout`: scenario B1 (and B5 with `--evil K`) of
//! shared/BENCH.md on loopback, with every node's links capped by its own token buckets.
//!
//! `--net netns` runs every node in a network namespace of its own with `tc tbf` links
//! instead (see `netns`); `--compare bittorrent` runs the same bytes through aria2c and
//! opentracker at the same caps afterwards (see `torrent`).
//!
//! One agent writes a volume of `--size` bytes in 4 files and commits; all other agents
//! reload at once. Reported against the Kumar–Ross bound for the run's caps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use voltool_agent::control::{self, Event, ReloadMode, Reply, Request};
use voltool_agent::rate::Rate;

use crate::fleet::{self, ask};
use crate::netns::Netns;
use crate::torrent;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// B1: one writer, every other agent reloads at once.
    Fanout,
    /// B8: a sharded safetensors model; every other agent switches to it and loads every
    /// tensor (eager, lazy, following), see `coldstart`.
    Coldstart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// Peers feed each other.
    P2p,
    /// Every agent fetches from the origin alone.
    OriginOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Net {
    /// All nodes on 127.0.0.1, links capped by each node's token buckets (no root needed).
    Loopback,
    /// One network namespace per node with tbf caps (needs root).
    Netns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Compare {
    /// The same data through aria2c peers and an opentracker tracker, at the same caps.
    Bittorrent,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Scenario.
    #[arg(long, value_enum, default_value = "fanout")]
    scenario: Scenario,
    /// Agents, the writer included.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Volume size in bytes (split in 4 files).
    #[arg(long, default_value_t = 128 << 20)]
    size: u64,
    /// Every node's link speed each way, e.g. 50mbit.
    #[arg(long, default_value = "50mbit")]
    rate: String,
    /// p2p or origin-only.
    #[arg(long, value_enum, default_value = "p2p")]
    mode: Mode,
    /// How links are emulated.
    #[arg(long, value_enum, default_value = "loopback")]
    net: Net,
    /// Also run the same data through another swarm, at the same caps, in the same run.
    #[arg(long, value_enum)]
    compare: Option<Compare>,
    /// Agents (among the reloading ones) that serve corrupt bytes.
    #[arg(long, default_value_t = 0)]
    evil: usize,
    /// Fleet directory (default: a temporary one).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Where to write the plot of per-node progress over time (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// With `--net netns`: every node also paces what it sends at this fraction of
    /// `--rate` (its `--max-egress`), as an operator who knows the hosts' uplinks would set
    /// it, so that queues in the links stay short.
    #[arg(long, value_name = "FRACTION")]
    pace: Option<f64>,
    /// Then measure following: a second volume of the same size that every other agent
    /// mounts with `--follow`, from the writer's commit acknowledgement to every follower
    /// holding it whole, then their reloads (against the fan-out above, and a one-change
    /// reload, of the same run).
    #[arg(long)]
    follow: bool,
    /// `--scenario coldstart`: the Python interpreter whose `safetensors` and `numpy`
    /// load the model (testnet/bench/coldstart.sh makes a virtualenv with both).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Print only the JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: Scenario,
    mode: Mode,
    net: Net,
    agents: usize,
    volume_bytes: u64,
    rate_bytes_per_s: u64,
    t_min_s: f64,
    fleet_s: f64,
    p50_s: f64,
    p99_s: f64,
    ratio: f64,
    origin_bytes: u64,
    origin_ratio: f64,
    peer_bytes: u64,
    corrupt_bytes_accepted: u64,
    bans: usize,
    loadavg: String,
    plot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bittorrent: Option<torrent::BtReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    follow: Option<FollowReport>,
}

/// What `--follow` measured.
#[derive(Debug, Serialize)]
struct FollowReport {
    /// From the commit's acknowledgement to every follower holding the version whole.
    fleet_s: f64,
    /// That against the fan-out's fleet time of the same run (B1's target: at most 1.05).
    ratio_to_fanout: f64,
    /// That against T_min.
    ratio: f64,
    /// Bytes the followers' downloads took from the origin, and that against F.
    origin_bytes: u64,
    origin_ratio: f64,
    peer_bytes: u64,
    /// Then every follower's reload, one after the other: the slowest, and bytes they
    /// fetched (0).
    reload_max_s: f64,
    reload_fetched_bytes: u64,
    reloads_prepared: usize,
    /// A reload of a one-file change in the same run, and the slowest follower's reload
    /// against it (target: at most 2).
    one_change_reload_s: f64,
    reload_ratio: f64,
    /// A foreground reload (of another volume, F/4) on agent 1 alone, then while a new
    /// version of the followed volume downloads everywhere, and the ratio (target: at most
    /// 1.2); `foreground_overlapped`: the follow's download was still under way when the
    /// foreground reload ended.
    foreground_alone_s: f64,
    foreground_during_follow_s: f64,
    foreground_ratio: f64,
    foreground_overlapped: bool,
}

/// Kumar & Ross: no schedule finishes before
/// `max(F / u_s, F / min d_i, N·F / (u_s + Σ u_i))`, with the origin and the writer as the
/// two seeds (u_s = 2R) and N downloaders of link R each way.
fn t_min(f: f64, r: f64, downloaders: usize) -> f64 {
    let n = downloaders as f64;
    let u_s = 2.0 * r;
    (f / u_s).max(f / r).max(n * f / (u_s + n * r))
}

/// Bytes of `got` that differ from `want` (a missing or extra byte counts as one).
pub(crate) fn differing_bytes(want: &Path, got: &Path) -> anyhow::Result<u64> {
    let want = std::fs::read(want).with_context(|| want.display().to_string())?;
    let got = std::fs::read(got).with_context(|| got.display().to_string())?;
    Ok(want.iter().zip(&got).filter(|(x, y)| x != y).count() as u64
        + want.len().abs_diff(got.len()) as u64)
}

pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) async fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.agents < 2 || a.evil >= a.agents - 1 {
        bail!("need at least 2 agents, and fewer evil ones than reloading ones");
    }
    let rate: Rate = a.rate.parse()?;
    if a.compare == Some(Compare::Bittorrent) {
        torrent::check_tools()?;
    }
    let tmp;
    let root = match &a.root {
        Some(r) => r.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("voltool-bench-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    // Node 0 is the coordinator, agent i is node i + 1; deleted on drop, even on error.
    let net = match a.net {
        Net::Netns => Some(Netns::create(a.agents + 1, rate)?),
        Net::Loopback => None,
    };
    let done = if a.scenario == Scenario::Coldstart {
        crate::coldstart::check_python(&a.python)?;
        report(coldstart(&a, &root, rate, net.as_ref()), &root, a.json).await
    } else {
        report(measure(&a, &root, rate, net.as_ref()), &root, a.json).await
    };
    // The namespaces go once the work is over, either way.
    drop(net);
    done
}

/// Runs `work` and prints its report; on a signal, stops the fleet first.
async fn report<T: Serialize>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
    root: &Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = tokio::select! {
        r = work => r,
        sig = interrupted() => {
            // The measuring future is dropped (BitTorrent processes with it); stop the fleet,
            // then the caller drops the namespaces.
            let _ = fleet::down(root).await;
            Err(anyhow::anyhow!("interrupted by {sig}; nodes stopped, namespaces removed"))
        }
    };
    let report = report?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT, SIGTERM or SIGHUP, with the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Starts the fleet, runs the scenario, stops the fleet (also when the scenario fails), then
/// runs the comparison swarm if asked.
async fn measure(
    a: &BenchArgs,
    root: &Path,
    rate: Rate,
    net: Option<&Netns>,
) -> anyhow::Result<Report> {
    let evil = a.evil;
    let origin_only = a.mode == Mode::OriginOnly;
    let extra = move |i: usize| {
        let mut v = Vec::new();
        // Agents 1..=evil serve corrupt bytes (agent 0 is the writer).
        if i >= 1 && i <= evil {
            v.push("--evil".to_string());
        }
        if origin_only {
            v.push("--origin-only".to_string());
        }
        v
    };
    // With namespaces the links are capped by tc; on loopback by each node's token buckets.
    let caps = net.is_none().then_some(a.rate.as_str());
    let paced = match (net, a.pace) {
        (Some(_), Some(f)) if f > 0.0 => Some(format!("{}B/s", (rate.0 as f64 * f) as u64)),
        _ => None,
    };
    let egress = caps.or(paced.as_deref());
    let up = fleet::up_with(root, a.agents, caps, egress, &extra, net).await;
    let f = match up {
        Ok(f) => f,
        Err(e) => {
            let _ = fleet::down(root).await;
            return Err(e);
        }
    };
    let result = match bench(a, &f, rate).await {
        Ok(mut r) if a.follow => match follow(a, &f, &r).await {
            Ok(fr) => {
                r.follow = Some(fr);
                Ok(r)
            }
            Err(e) => Err(e),
        },
        r => r,
    };
    // The writer's files, kept for the comparison: its mount goes with the fleet.
    let src = f.root.join("bittorrent-src");
    let kept = match (&result, a.compare) {
        (Ok(_), Some(Compare::Bittorrent)) => keep_files(&f.root.join("mnt-0"), &src),
        _ => Ok(()),
    };
    let stopped = fleet::down(&f.root).await;
    let mut report = result?;
    stopped?;
    kept?;
    if a.compare == Some(Compare::Bittorrent) {
        let files = (0..4).map(|i| src.join(format!("part-{i}.bin"))).collect();
        let bt = torrent::run(torrent::BtRun {
            dir: f.root.join("bittorrent"),
            files,
            leechers: a.agents - 1,
            rate,
            net,
            pace: a.pace,
            t_min: report.t_min_s,
        })
        .await?;
        report.bittorrent = Some(bt);
    }
    Ok(report)
}

/// B8 on a fleet of the run's caps (see `coldstart`): started, measured, stopped.
async fn coldstart(
    a: &BenchArgs,
    root: &Path,
    rate: Rate,
    net: Option<&Netns>,
) -> anyhow::Result<crate::coldstart::ColdReport> {
    let caps = net.is_none().then_some(a.rate.as_str());
    let paced = match (net, a.pace) {
        (Some(_), Some(f)) if f > 0.0 => Some(format!("{}B/s", (rate.0 as f64 * f) as u64)),
        _ => None,
    };
    let egress = caps.or(paced.as_deref());
    let f = match fleet::up_with(root, a.agents, caps, egress, &|_| Vec::new(), net).await {
        Ok(f) => f,
        Err(e) => {
            let _ = fleet::down(root).await;
            return Err(e);
        }
    };
    let t_min_s = t_min(a.size as f64, rate.0 as f64, a.agents - 1);
    // The plots: PLOT's path without its extension, then `-MODE.svg`.
    let plots = a
        .plot
        .as_ref()
        .map(|p| p.with_extension(""))
        .unwrap_or_else(|| PathBuf::from("coldstart"));
    let r = crate::coldstart::run(&f, &a.python, a.size, t_min_s, &plots).await;
    let stopped = fleet::down(&f.root).await;
    let r = r?;
    stopped?;
    Ok(r)
}

/// Copies the bench's files out of a mount.
fn keep_files(mount: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for i in 0..4 {
        let name = format!("part-{i}.bin");
        std::fs::copy(mount.join(&name), to.join(&name))
            .with_context(|| format!("keeping {name} for the comparison"))?;
    }
    Ok(())
}

async fn bench(a: &BenchArgs, f: &fleet::Fleet, rate: Rate) -> anyhow::Result<Report> {
    let volume = "bench";
    let mounts = f.create_and_mount_all(volume).await?;
    write_parts(&mounts[0], a.size, 0)?;
    ask(
        &f.agents[0],
        Request::Commit {
            name: Some(volume.into()),
        },
    )
    .await?;

    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, agent) in f.agents.iter().enumerate().skip(1) {
        let agent = agent.clone();
        set.spawn(async move {
            let mut trace: Vec<(f64, u64)> = Vec::new();
            let r = control::call(
                &agent,
                &Request::Reload {
                    name: Some(volume.into()),
                    mode: ReloadMode::Refuse,
                    lazy: false,
                },
                |ev| {
                    if let Event::Progress { phase, done, .. } = ev
                        && phase == "download"
                    {
                        trace.push((start.elapsed().as_secs_f64(), done));
                    }
                },
            )
            .await;
            (i, start.elapsed().as_secs_f64(), r, trace)
        });
    }
    let mut finish = Vec::new();
    let mut traces = BTreeMap::new();
    let (mut origin, mut peers, mut bans) = (0u64, 0u64, 0usize);
    while let Some(j) = set.join_next().await {
        let (i, t, r, trace) = j?;
        match r?.map_err(|e| anyhow::anyhow!("agent-{i}: {}", e.message))? {
            Reply::Reloaded(rep) => {
                origin += rep.sources.origin_bytes;
                peers += rep.sources.peer_bytes;
                bans += rep.sources.banned.len();
            }
            _ => bail!("unexpected answer to reload"),
        }
        finish.push(t);
        traces.insert(i, trace);
    }
    finish.sort_by(f64::total_cmp);
    let fleet_s = *finish.last().unwrap_or(&0.0);
    // Every reloaded byte compared with the writer's.
    let mut corrupt = 0u64;
    for m in &mounts[1..] {
        for i in 0..4 {
            let name = format!("part-{i}.bin");
            corrupt += differing_bytes(&mounts[0].join(&name), &m.join(&name))?;
        }
    }
    let r = rate.0 as f64;
    let t_min_s = t_min(a.size as f64, r, a.agents - 1);
    let mode = match a.mode {
        Mode::P2p => "p2p",
        Mode::OriginOnly => "origin-only",
    };
    let plot = a
        .plot
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("fanout-{mode}.svg")));
    write_svg(&plot, &traces, a.size, t_min_s)?;
    Ok(Report {
        scenario: a.scenario,
        mode: a.mode,
        net: a.net,
        agents: a.agents,
        volume_bytes: a.size,
        rate_bytes_per_s: rate.0,
        t_min_s,
        fleet_s,
        p50_s: quantile(&finish, 0.5),
        p99_s: quantile(&finish, 0.99),
        ratio: fleet_s / t_min_s,
        origin_bytes: origin,
        origin_ratio: origin as f64 / a.size as f64,
        peer_bytes: peers,
        corrupt_bytes_accepted: corrupt,
        bans,
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        plot: Some(plot.display().to_string()),
        bittorrent: None,
        follow: None,
    })
}

/// Writes the bench's 4 files of `size` bytes in all into `dir`, from keys of `seed`.
fn write_parts(dir: &Path, size: u64, seed: u8) -> anyhow::Result<()> {
    let per_file = size / 4;
    for i in 0..4u64 {
        let len = if i == 3 {
            size - 3 * per_file
        } else {
            per_file
        };
        let mut key = [0u8; 32];
        key[0] = i as u8 + 1;
        key[1] = seed;
        let mut xof = blake3::Hasher::new_keyed(&key).finalize_xof();
        let mut buf = vec![0u8; len as usize];
        xof.fill(&mut buf);
        std::fs::write(dir.join(format!("part-{i}.bin")), &buf)?;
    }
    Ok(())
}

/// Commits `volume` through `agent`: the new version.
pub(crate) async fn commit(agent: &Path, volume: &str) -> anyhow::Result<u64> {
    match ask(
        agent,
        Request::Commit {
            name: Some(volume.into()),
        },
    )
    .await?
    {
        Reply::Committed(c) => Ok(c.version),
        _ => bail!("unexpected answer to commit"),
    }
}

async fn reload(agent: &Path, volume: &str) -> anyhow::Result<control::ReloadReport> {
    match ask(
        agent,
        Request::Reload {
            name: Some(volume.into()),
            mode: ReloadMode::Refuse,
            lazy: false,
        },
    )
    .await?
    {
        Reply::Reloaded(r) => Ok(r),
        _ => bail!("unexpected answer to reload"),
    }
}

/// `--follow`: a second volume every other agent follows through its mount; the time from
/// the commit's acknowledgement until all of them hold it whole, then their reloads.
async fn follow(a: &BenchArgs, f: &fleet::Fleet, fanout: &Report) -> anyhow::Result<FollowReport> {
    let volume = "bench-follow";
    let mounts = f
        .create_and_mount_following(volume, "-follow", control::Follow::Prefetch)
        .await?;
    write_parts(&mounts[0], a.size, 2)?;
    let version = commit(&f.agents[0], volume).await?;
    let start = Instant::now();
    let mut waiting: Vec<usize> = (1..f.agents.len()).collect();
    let (mut origin, mut peers) = (0u64, 0u64);
    let deadline = start + std::time::Duration::from_secs(3600);
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for &i in &waiting {
            let Reply::Status(s) = ask(&f.agents[i], Request::Status).await? else {
                bail!("unexpected answer to status");
            };
            match s.follows.iter().find(|x| x.volume == volume) {
                Some(x) if x.held == Some(version) && x.bytes_to_go == 0 => {
                    origin += x.origin_bytes;
                    peers += x.peer_bytes;
                }
                _ => still.push(i),
            }
        }
        waiting = still;
        if Instant::now() > deadline {
            bail!("followers {waiting:?} never held version {version}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let fleet_s = start.elapsed().as_secs_f64();
    // The reference: a one-file change of the fan-out's volume, reloaded by one agent.
    std::fs::write(f.root.join("mnt-0").join("one-change"), b"1")?;
    commit(&f.agents[0], "bench").await?;
    let one_change = reload(&f.agents[1], "bench").await?;
    // Every follower reloads, one after the other (as the one-change reload ran alone).
    let (mut reload_max_s, mut fetched, mut prepared) = (0f64, 0u64, 0usize);
    for agent in f.agents.iter().skip(1) {
        let r = reload(agent, volume).await?;
        reload_max_s = reload_max_s.max(r.seconds);
        fetched += r.sources.origin_bytes + r.sources.peer_bytes;
        prepared += usize::from(r.prepared);
    }
    // A foreground reload of another volume on agent 1, alone, then during a follow's
    // download of a new version of the followed volume.
    let fg = "bench-fg";
    let fg_mounts = f
        .create_and_mount_following(fg, "-fg", control::Follow::No)
        .await?;
    write_parts(&fg_mounts[0], a.size / 4, 3)?;
    commit(&f.agents[0], fg).await?;
    let alone = reload(&f.agents[1], fg).await?.seconds;
    write_parts(&mounts[0], a.size, 4)?;
    let v = commit(&f.agents[0], volume).await?;
    write_parts(&fg_mounts[0], a.size / 4, 5)?;
    commit(&f.agents[0], fg).await?;
    let bytes_to_go = |s: &control::StatusReport| {
        s.follows
            .iter()
            .find(|x| x.volume == volume && x.newest == Some(v))
            .map(|x| x.bytes_to_go)
    };
    let started = Instant::now();
    loop {
        let Reply::Status(s) = ask(&f.agents[1], Request::Status).await? else {
            bail!("unexpected answer to status");
        };
        if bytes_to_go(&s).is_some_and(|b| b > 0) || started.elapsed().as_secs() > 60 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let during = reload(&f.agents[1], fg).await?.seconds;
    let Reply::Status(s) = ask(&f.agents[1], Request::Status).await? else {
        bail!("unexpected answer to status");
    };
    let overlapped = bytes_to_go(&s).is_some_and(|b| b > 0);
    Ok(FollowReport {
        foreground_alone_s: alone,
        foreground_during_follow_s: during,
        foreground_ratio: during / alone.max(1e-6),
        foreground_overlapped: overlapped,
        fleet_s,
        ratio_to_fanout: fleet_s / fanout.fleet_s,
        ratio: fleet_s / fanout.t_min_s,
        origin_bytes: origin,
        origin_ratio: origin as f64 / a.size as f64,
        peer_bytes: peers,
        reload_max_s,
        reload_fetched_bytes: fetched,
        reloads_prepared: prepared,
        one_change_reload_s: one_change.seconds,
        reload_ratio: reload_max_s / one_change.seconds.max(1e-6),
    })
}

/// Per-node download progress over time, with T_min marked.
pub(crate) fn write_svg(
    path: &Path,
    traces: &BTreeMap<usize, Vec<(f64, u64)>>,
    size: u64,
    t_min: f64,
) -> anyhow::Result<()> {
    let (w, h, pad) = (800.0, 480.0, 50.0);
    let t_max = traces
        .values()
        .flat_map(|t| t.iter().map(|(x, _)| *x))
        .fold(t_min * 1.1, f64::max);
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |b: u64| h - pad - (h - 2.0 * pad) * b as f64 / size.max(1) as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">seconds (0 to {t_max:.1})</text>\n\
         <text x=\"12\" y=\"{pad}\">bytes (0 to {size})</text>\n\
         <line x1=\"{tm}\" y1=\"{pad}\" x2=\"{tm}\" y2=\"{b}\" stroke=\"red\" stroke-dasharray=\"4 4\"/>\n\
         <text x=\"{tm}\" y=\"{lt}\" fill=\"red\">T_min {t_min:.1}s</text>\n",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        ty = h - 15.0,
        tm = x(t_min),
        lt = pad - 8.0,
    );
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    for (k, (node, trace)) in traces.iter().enumerate() {
        let pts: Vec<String> = std::iter::once((0.0, 0))
            .chain(trace.iter().copied())
            .map(|(t, b)| format!("{:.1},{:.1}", x(t), y(b)))
            .collect();
        let c = colors[k % colors.len()];
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{c}\">agent-{node}</text>\n",
            pts.join(" "),
            w - pad + 2.0,
            pad + 14.0 * k as f64
        ));
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).with_context(|| path.display().to_string())
}
