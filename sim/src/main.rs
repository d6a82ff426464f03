//! `voltool-sim`: voltool's swarm engine at fleet scale. Every simulated downloader runs the
//! agent's own engine (`voltool_protocol::swarm`), every provider its admission and
//! subscribers, the tracker the coordinator's bookkeeping, over a model of links with
//! per-node capacities, latency, zones, slow links, liars and churn; time is simulated and
//! every random choice comes from `--seed`. Prints one JSON object per run in the shape of
//! `voltool-testnet bench` and writes a plot.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use voltool_protocol::swarm::Config;

mod links;
mod plot;
mod world;

use world::{Role, Scenario, Spec, World};

/// Simulate a fleet reloading one volume at once.
#[derive(Parser, Debug, Clone)]
#[command(name = "voltool-sim", version)]
struct Args {
    /// Downloaders (the reloading agents).
    #[arg(long, default_value_t = 7)]
    nodes: usize,
    /// Peers that hold the volume whole from the start, besides the origin (the writer).
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Volume size (B, KiB, MiB, GiB).
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    size: u64,
    /// Files the volume is split into, equally.
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Every node's link, each way (bit/s with Kbit, Mbit, Gbit).
    #[arg(long, default_value = "50Mbit", value_parser = parse_rate)]
    rate: f64,
    /// The origin's link, each way (default: --rate).
    #[arg(long, value_parser = parse_rate)]
    origin_rate: Option<f64>,
    /// One-way latency of each node's access link, milliseconds.
    #[arg(long, default_value_t = 0.05)]
    latency_ms: f64,
    /// Zones the downloaders are spread over (the origin and the seeds are in zone 0).
    #[arg(long, default_value_t = 1)]
    zones: u8,
    /// Extra one-way latency between zones, milliseconds.
    #[arg(long, default_value_t = 20.0)]
    cross_zone_ms: f64,
    /// Fraction of downloaders with slow links.
    #[arg(long, default_value_t = 0.0)]
    slow_frac: f64,
    /// A slow link's speed as a fraction of --rate.
    #[arg(long, default_value_t = 0.25)]
    slow_factor: f64,
    /// Downloaders that serve corrupt bytes (a count).
    #[arg(long, default_value_t = 0)]
    evil: usize,
    /// Downloaders that serve corrupt bytes, as a fraction (added to --evil).
    #[arg(long, default_value_t = 0.0)]
    liars_frac: f64,
    /// Fraction of downloaders that leave mid-download for good.
    #[arg(long, default_value_t = 0.0)]
    churn_frac: f64,
    /// Fraction of downloaders whose download is a background one (a follow) held back
    /// for the first --paused-s seconds, as the agent pauses it while a foreground
    /// download of the node runs; they serve what they hold meanwhile.
    #[arg(long, default_value_t = 0.0)]
    paused_frac: f64,
    /// How long the background downloads are held back (seconds).
    #[arg(long, default_value_t = 0.0)]
    paused_s: f64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the plot (SVG) of progress over time.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Downloaders whose progress is drawn.
    #[arg(long, default_value_t = 16)]
    traced: usize,
    /// Give up after this many times T_min of simulated time.
    #[arg(long, default_value_t = 20.0)]
    limit: f64,
    /// Every downloader also reads the files in order at this rate (bit/s, as --rate) as
    /// soon as the bytes are here, as from a lazy mount: what its reader waits for goes
    /// first in its download. Reports when the readers read their first byte and all.
    #[arg(long, value_parser = parse_rate)]
    read_rate: Option<f64>,
    /// Pieces a waiting reader asks for from where it stands (its readahead).
    #[arg(long, default_value_t = 4)]
    read_window: u32,
    /// Set a knob of the engine's config, e.g. `--knob serve_slots=4` (repeatable; an
    /// unknown name lists the knobs).
    #[arg(long, value_name = "NAME=VALUE")]
    knob: Vec<String>,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    let n: f64 = num.trim().parse().map_err(|e| format!("{s}: {e}"))?;
    Ok((n * mult as f64) as u64)
}

/// Bytes per second from bits per second with a unit.
fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, mult) = [("Gbit", 1e9), ("Mbit", 1e6), ("Kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1.0));
    let n: f64 = num.trim().parse().map_err(|e| format!("{s}: {e}"))?;
    Ok(n * mult / 8.0)
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    nodes: usize,
    seeds: usize,
    volume_bytes: u64,
    files: usize,
    rate_bytes_per_s: f64,
    zones: u8,
    slow_frac: f64,
    liars: usize,
    churned: usize,
    seed: u64,
    t_min_s: f64,
    fleet_s: f64,
    p50_s: f64,
    p99_s: f64,
    ratio: f64,
    p50_ratio: f64,
    p99_ratio: f64,
    origin_bytes: u64,
    origin_ratio: f64,
    bans: usize,
    liars_left_out_by_tracker: usize,
    corrupt_bytes_accepted: u64,
    failed: usize,
    unfinished: usize,
    lookups_per_node_per_blob: f64,
    requests_per_node: f64,
    busy_per_node: f64,
    timeouts: u64,
    duplicate_ratio: f64,
    /// With --read-rate: the median reader's first byte, and the last reader's last, as
    /// multiples of T_min.
    read_first_p50_ratio: Option<f64>,
    read_done_max_ratio: Option<f64>,
    events: u64,
    events_per_s: f64,
    sim_s: f64,
    wall_s: f64,
    plot: Option<String>,
}

/// Kumar & Ross: no schedule finishes before `max(F / u_s, F / min d_i, N·F / (u_s + Σ u_i))`
/// over the honest downloaders that stay, with the origin and the seeds as sources.
fn t_min(f: f64, specs: &[Spec], honest: &[usize]) -> f64 {
    let u_s: f64 = specs
        .iter()
        .filter(|s| s.role != Role::Downloader)
        .map(|s| s.up)
        .sum();
    let n = honest.len() as f64;
    let sum_u: f64 = honest.iter().map(|i| specs[*i].up).sum();
    let min_d = honest
        .iter()
        .map(|i| specs[*i].down)
        .fold(f64::INFINITY, f64::min);
    (f / u_s).max(f / min_d).max(n * f / (u_s + sum_u))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn scenario(a: &Args) -> anyhow::Result<Scenario> {
    let mut cfg = Config::default();
    for kv in &a.knob {
        cfg.set(kv)?;
    }
    let mut rng = SmallRng::seed_from_u64(a.seed ^ 0x5eed);
    let lat = (a.latency_ms * 1e6) as u64;
    let mut nodes = vec![Spec {
        role: Role::Origin,
        up: a.origin_rate.unwrap_or(a.rate),
        down: a.origin_rate.unwrap_or(a.rate),
        latency: lat,
        zone: 0,
        liar: false,
        leaves_at: None,
        paused_until: None,
        reader: None,
    }];
    for _ in 0..a.seeds {
        nodes.push(Spec {
            role: Role::Seed,
            up: a.rate,
            down: a.rate,
            latency: lat,
            zone: 0,
            liar: false,
            leaves_at: None,
            paused_until: None,
            reader: None,
        });
    }
    let liars = (a.evil + (a.liars_frac * a.nodes as f64).round() as usize).min(a.nodes);
    let t_guess = a.size as f64 / a.rate;
    let paused = (a.paused_frac.clamp(0.0, 1.0) * a.nodes as f64).round() as usize;
    for i in 0..a.nodes {
        let slow = rng.random_bool(a.slow_frac.clamp(0.0, 1.0));
        let r = if slow { a.rate * a.slow_factor } else { a.rate };
        let churn = rng.random_bool(a.churn_frac.clamp(0.0, 1.0));
        nodes.push(Spec {
            role: Role::Downloader,
            up: r,
            down: r,
            latency: lat,
            zone: (i % a.zones.max(1) as usize) as u8,
            // The last downloaders lie, so that the traced ones are honest.
            liar: i >= a.nodes - liars,
            leaves_at: churn.then(|| (t_guess * rng.random_range(0.2..0.8) * 1e9) as u64),
            // The first downloaders (after the traced ones' order) are background ones.
            paused_until: (i < paused).then_some((a.paused_s * 1e9) as u64),
            reader: a.read_rate,
        });
    }
    let per_file = a.size / a.files.max(1) as u64;
    let mut blobs = vec![per_file; a.files.max(1)];
    *blobs.last_mut().expect("one file") += a.size - per_file * a.files.max(1) as u64;
    Ok(Scenario {
        nodes,
        blobs,
        cross_zone: (a.cross_zone_ms * 1e6) as u64,
        seed: a.seed,
        cfg,
        traced: a.traced,
        read_window: a.read_window,
    })
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(a.nodes > 0, "--nodes must be at least 1");
    anyhow::ensure!(a.size > 0, "--size must be more than 0");
    let sc = scenario(&a)?;
    let specs = sc.nodes.clone();
    let honest: Vec<usize> = (0..specs.len())
        .filter(|i| {
            let s = &specs[*i];
            s.role == Role::Downloader && !s.liar && s.leaves_at.is_none()
        })
        .collect();
    let tmin = t_min(a.size as f64, &specs, &honest);
    let wall = std::time::Instant::now();
    let run = World::new(sc).run(tmin * a.limit);
    let wall_s = wall.elapsed().as_secs_f64();
    let mut finish: Vec<f64> = honest
        .iter()
        .filter_map(|i| run.nodes[*i].done_at)
        .collect();
    finish.sort_by(f64::total_cmp);
    let downloaders = specs.iter().filter(|s| s.role == Role::Downloader).count();
    if std::env::var_os("VOLTOOL_SIM_DEBUG").is_some() {
        debug_print(&a, &run, &finish, tmin, downloaders);
    }
    if let Some(p) = &a.plot {
        let traces: Vec<&[(f64, u64)]> = run
            .nodes
            .iter()
            .filter(|n| !n.trace.is_empty())
            .map(|n| n.trace.as_slice())
            .collect();
        plot::write_svg(p, &traces, &finish, a.size, tmin)
            .with_context(|| p.display().to_string())?;
    }
    let report = report(&a, &specs, &run, &finish, tmin, wall_s);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The JSON object of a run.
fn report(
    a: &Args,
    specs: &[Spec],
    run: &world::Run,
    finish: &[f64],
    tmin: f64,
    wall_s: f64,
) -> Report {
    let downloaders = specs.iter().filter(|s| s.role == Role::Downloader).count();
    let lookups: u64 = run.nodes.iter().map(|n| n.lookups).sum();
    let unfinished = specs
        .iter()
        .filter(|s| s.role == Role::Downloader && !s.liar && s.leaves_at.is_none())
        .count()
        - finish.len();
    // The honest readers' first bytes and last bytes (a reader that never finished counts
    // as never).
    let reads = {
        let honest = specs.iter().zip(&run.nodes).filter(|(s, _)| {
            s.role == Role::Downloader && !s.liar && s.leaves_at.is_none() && s.reader.is_some()
        });
        let (mut first, mut done) = (Vec::new(), Vec::new());
        for (_, n) in honest {
            first.push(n.read_first_at.unwrap_or(f64::INFINITY));
            done.push(n.read_done_at.unwrap_or(f64::INFINITY));
        }
        first.sort_by(f64::total_cmp);
        done.sort_by(f64::total_cmp);
        (first, done)
    };
    let fleet_s = if unfinished > 0 {
        f64::INFINITY
    } else {
        finish.last().copied().unwrap_or(0.0)
    };
    Report {
        scenario: "B7",
        nodes: a.nodes,
        seeds: a.seeds,
        volume_bytes: a.size,
        files: a.files,
        rate_bytes_per_s: a.rate,
        zones: a.zones,
        slow_frac: a.slow_frac,
        liars: specs.iter().filter(|s| s.liar).count(),
        churned: specs.iter().filter(|s| s.leaves_at.is_some()).count(),
        seed: a.seed,
        t_min_s: tmin,
        fleet_s,
        p50_s: quantile(finish, 0.5),
        p99_s: quantile(finish, 0.99),
        ratio: fleet_s / tmin,
        p50_ratio: quantile(finish, 0.5) / tmin,
        p99_ratio: quantile(finish, 0.99) / tmin,
        origin_bytes: run.origin_bytes as u64,
        origin_ratio: run.origin_bytes / a.size as f64,
        bans: run.nodes.iter().map(|n| n.bans).sum(),
        liars_left_out_by_tracker: run.reported_liars_left_out,
        corrupt_bytes_accepted: run.nodes.iter().map(|n| n.corrupt_accepted).sum(),
        failed: run.nodes.iter().filter(|n| n.failed).count(),
        unfinished,
        lookups_per_node_per_blob: lookups as f64 / downloaders as f64 / a.files.max(1) as f64,
        requests_per_node: run.nodes.iter().map(|n| n.requests).sum::<u64>() as f64
            / downloaders as f64,
        busy_per_node: run.nodes.iter().map(|n| n.busy).sum::<u64>() as f64 / downloaders as f64,
        timeouts: run.nodes.iter().map(|n| n.timeouts).sum(),
        duplicate_ratio: run.nodes.iter().map(|n| n.duplicate_bytes).sum::<u64>() as f64
            / (downloaders as f64 * a.size as f64),
        read_first_p50_ratio: a.read_rate.map(|_| quantile(&reads.0, 0.5) / tmin),
        read_done_max_ratio: a
            .read_rate
            .map(|_| reads.1.last().copied().unwrap_or(f64::INFINITY) / tmin),
        events: run.events,
        events_per_s: run.events as f64 / wall_s,
        sim_s: run.sim_s,
        wall_s,
        plot: a.plot.as_ref().map(|p| p.display().to_string()),
    }
}

/// What `VOLTOOL_SIM_DEBUG` prints to stderr: finish-time quantiles, the fleet's upload use
/// over time, and the slowest traced node's progress.
fn debug_print(a: &Args, run: &world::Run, finish: &[f64], tmin: f64, downloaders: usize) {
    let q: Vec<String> = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
        .iter()
        .map(|q| format!("{q}:{:.2}", quantile(finish, *q) / tmin))
        .collect();
    eprintln!("finish/T_min quantiles {}", q.join(" "));
    let kinds: Vec<String> = run.kinds.iter().map(|(k, n)| format!("{k}:{n}")).collect();
    eprintln!("events by kind: {}", kinds.join(" "));
    let cap = (downloaders as f64 + a.seeds as f64 + 1.0) * a.rate;
    let u: Vec<String> = run
        .per_second
        .chunks(5)
        .map(|c| {
            format!(
                "{:.0}",
                c.iter().sum::<f64>() / c.len() as f64 / cap * 100.0
            )
        })
        .collect();
    eprintln!("upload use % (5 s buckets): {}", u.join(" "));
    if let Some((i, n)) = run
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.trace.is_empty())
        .max_by(|a, b| {
            a.1.done_at
                .unwrap_or(f64::MAX)
                .total_cmp(&b.1.done_at.unwrap_or(f64::MAX))
        })
    {
        eprintln!("slowest traced node {i}: done {:?}", n.done_at);
        let step = (n.trace.len() / 40).max(1);
        for (t, b) in n.trace.iter().step_by(step) {
            eprintln!("  {:7.2}s {:5.1}%", t, *b as f64 * 100.0 / a.size as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(extra: &[&str]) -> (Scenario, world::Run) {
        let mut argv = vec![
            "voltool-sim",
            "--nodes",
            "6",
            "--size",
            "16MiB",
            "--files",
            "2",
        ];
        argv.extend_from_slice(extra);
        let a = Args::parse_from(argv);
        let sc = scenario(&a).expect("scenario");
        (sc.clone(), World::new(sc).run(1e4))
    }

    /// A small fleet finishes whole, near the bound, from one seed to the next the same.
    #[test]
    fn a_small_fleet_finishes_and_replays_exactly() {
        let (sc, r) = run(&[]);
        let honest: Vec<usize> = (0..sc.nodes.len())
            .filter(|i| sc.nodes[*i].role == Role::Downloader)
            .collect();
        let tmin = t_min(16.0 * 1048576.0, &sc.nodes, &honest);
        for i in &honest {
            let done = r.nodes[*i].done_at.expect("every downloader finishes");
            assert!(
                done >= tmin * 0.999 && done < tmin * 2.0,
                "{done} against {tmin}"
            );
        }
        assert!(r.origin_bytes <= 2.0 * 16.0 * 1048576.0);
        let (_, again) = run(&[]);
        assert_eq!(again.events, r.events);
    }

    /// Liars are banned and none of their bytes is taken; a leaver's downloaders go on.
    #[test]
    fn liars_and_leavers_do_not_stop_the_honest() {
        let (sc, r) = run(&["--evil", "2", "--churn-frac", "0.3", "--seed", "4"]);
        let mut bans = 0;
        for (i, s) in sc.nodes.iter().enumerate() {
            bans += r.nodes[i].bans;
            assert_eq!(r.nodes[i].corrupt_accepted, 0);
            if s.role == Role::Downloader && !s.liar && s.leaves_at.is_none() {
                assert!(r.nodes[i].done_at.is_some(), "node {i} finished");
            }
        }
        assert!(bans > 0);
    }

    /// Background downloads (follows) held back while a foreground one runs take nothing
    /// until they resume, then finish; the others are not held back by them.
    #[test]
    fn paused_background_downloads_wait_then_finish() {
        let (sc, plain) = run(&["--seed", "3"]);
        let (_, r) = run(&["--seed", "3", "--paused-frac", "0.5", "--paused-s", "5"]);
        let mut paused = 0;
        for (i, s) in sc.nodes.iter().enumerate() {
            if s.role != Role::Downloader {
                continue;
            }
            let done = r.nodes[i].done_at.expect("every downloader finishes");
            // The first half of the downloaders is paused (see `scenario`).
            if i - 2 < 3 {
                paused += 1;
                assert!(done > 5.0, "node {i} finished at {done}, before it resumed");
                assert!(
                    r.nodes[i].trace.iter().all(|&(t, b)| t >= 5.0 || b == 0),
                    "node {i} took bytes while paused: {:?}",
                    r.nodes[i].trace
                );
            } else {
                assert!(plain.nodes[i].done_at.is_some());
            }
        }
        assert_eq!(paused, 3);
    }

    /// Readers that read the files in order as the bytes arrive (a lazy mount) read their
    /// first byte long before the download ends, read everything by its end or soon after
    /// when they read fast, and no byte is read before it is here.
    #[test]
    fn readers_read_early_and_finish_with_the_download() {
        let (sc, plain) = run(&["--seed", "5"]);
        let (_, r) = run(&["--seed", "5", "--read-rate", "800Mbit"]);
        let last = |run: &world::Run| {
            sc.nodes
                .iter()
                .zip(&run.nodes)
                .filter(|(s, _)| s.role == Role::Downloader)
                .map(|(_, n)| n.done_at.expect("every downloader finishes"))
                .fold(0.0, f64::max)
        };
        let (end, plain_end) = (last(&r), last(&plain));
        for (s, n) in sc.nodes.iter().zip(&r.nodes) {
            if s.role != Role::Downloader {
                assert!(n.read_first_at.is_none());
                continue;
            }
            let first = n.read_first_at.expect("a reader read");
            let done = n.read_done_at.expect("a reader finished");
            // A piece's time or two, of 32 pieces.
            assert!(first * 3.0 < end, "first byte at {first} of {end}");
            // No reader is done before its own download, nor long after it.
            let own = n.done_at.unwrap();
            assert!(
                done >= own - 0.011 && done <= own + 0.5,
                "{done} against {own}"
            );
        }
        // What readers wait for goes first, and the fleet pays little for it.
        assert!(end <= plain_end * 1.5, "{end} against {plain_end}");
        let (_, again) = run(&["--seed", "5", "--read-rate", "800Mbit"]);
        assert_eq!(again.events, r.events);
    }

    #[test]
    fn sizes_and_rates_parse() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_rate("50Mbit"), Ok(6_250_000.0));
        assert!(parse_bytes("lots").is_err());
    }
}
