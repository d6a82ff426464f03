//! `--compare bittorrent`: the same bytes through a BitTorrent swarm at the same caps, in the
//! same run, as the reference a swarm is judged against.
//!
//! opentracker is the tracker, aria2c every peer: two seeds (standing for the origin and the
//! writer, the two seeds of the Kumar–Ross bound) and one leecher per reloading agent, all
//! started at once. Caps are aria2c's own overall limits on loopback, or the same `tbf`
//! links as the agents with `--net netns` (each peer in the namespace of the node it stands
//! for). A leecher is done when aria2c runs its completion hook; its files are then compared
//! with the seed's.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::{Child, Command};
use voltool_agent::rate::Rate;

use crate::netns::{self, Netns};

/// The figures of one BitTorrent run, against the same T_min as ours.
#[derive(Debug, Serialize)]
pub(crate) struct BtReport {
    pub(crate) tool: String,
    pub(crate) fleet_s: f64,
    pub(crate) p50_s: f64,
    pub(crate) p99_s: f64,
    pub(crate) ratio: f64,
    pub(crate) corrupt_bytes_accepted: u64,
}

/// What one comparison run needs.
pub(crate) struct BtRun<'a> {
    /// Scratch directory for the swarm (removed by the caller's temp dir).
    pub(crate) dir: PathBuf,
    /// The volume's files, as the writer has them.
    pub(crate) files: Vec<PathBuf>,
    pub(crate) leechers: usize,
    pub(crate) rate: Rate,
    pub(crate) net: Option<&'a Netns>,
    /// With namespaces: every peer's upload limit, as a fraction of `rate`.
    pub(crate) pace: Option<f64>,
    pub(crate) t_min: f64,
}

const TOOLS: [&str; 3] = ["aria2c", "opentracker", "mktorrent"];

/// Fails with the install command when a tool is missing.
pub(crate) fn check_tools() -> anyhow::Result<()> {
    for t in TOOLS {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        if !found {
            bail!(
                "--compare bittorrent needs {t} (and aria2c, opentracker, mktorrent): \
                 apt-get install -y aria2 opentracker mktorrent"
            );
        }
    }
    Ok(())
}

/// A port nothing listens on now (the kernel's pick; free again once the probe closes).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `f` on a thread that lives in namespace `ns` (or in ours).
fn in_ns<T: Send + 'static>(
    ns: Option<String>,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let fd = std::fs::File::open(Path::new("/var/run/netns").join(&ns))
                .with_context(|| format!("namespace {ns}"))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&fd),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("entering namespace {ns}"))?;
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// How many seeds the tracker knows for `info_hash` (its scrape answer), or an error if it
/// does not answer.
fn scrape_complete(tracker: SocketAddr, info_hash: [u8; 20]) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect_timeout(&tracker, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let q: String = info_hash.iter().map(|b| format!("%{b:02X}")).collect();
    write!(
        s,
        "GET /scrape?info_hash={q} HTTP/1.0\r\nHost: {tracker}\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body);
    let n = text
        .split("8:completei")
        .nth(1)
        .and_then(|rest| rest.split('e').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(n)
}

fn hex20(s: &str) -> Option<[u8; 20]> {
    if s.len() != 40 {
        return None;
    }
    let mut out = [0u8; 20];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Starts `program args` in node `k`'s namespace (if any), killed when dropped.
fn spawn(
    net: Option<&Netns>,
    k: usize,
    log: &Path,
    program: &str,
    args: &[String],
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::from(netns::command(net, k, program))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {program}"))
}

/// Runs the swarm and returns its figures.
pub(crate) async fn run(r: BtRun<'_>) -> anyhow::Result<BtReport> {
    check_tools()?;
    let dir = &r.dir;
    std::fs::create_dir_all(dir)?;
    // Node k of the namespaces: 0 is the coordinator's, agent i is i + 1.
    let ip = |k: usize| -> IpAddr {
        r.net
            .map(|n| IpAddr::V4(n.ip(k)))
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    };
    let ns = |k: usize| r.net.map(|n| n.ns(k));
    let tracker = SocketAddr::new(ip(0), if r.net.is_some() { 6969 } else { free_port()? });

    // Two seeds with their own hard-linked copies, so neither writes beside the other.
    let seeds = [dir.join("seed-0"), dir.join("seed-1")];
    for s in &seeds {
        let d = s.join("bench");
        std::fs::create_dir_all(&d)?;
        for f in &r.files {
            let name = f.file_name().context("a file name")?;
            std::fs::hard_link(f, d.join(name))
                .or_else(|_| std::fs::copy(f, d.join(name)).map(|_| ()))
                .with_context(|| format!("seeding {}", f.display()))?;
        }
    }
    let torrent = dir.join("bench.torrent");
    let announce = format!("http://{tracker}/announce");
    netns::run(&[
        "mktorrent",
        "-a",
        &announce,
        "-l",
        // 2^19: 512 KiB pieces, as the swarm's own (`piece_bytes`).
        "19",
        "-n",
        "bench",
        "-o",
        &torrent.display().to_string(),
        &seeds[0].join("bench").display().to_string(),
    ])?;
    let shown = netns::run(&["aria2c", "-S", &torrent.display().to_string()])?;
    let info_hash = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("Info Hash: "))
        .and_then(|h| hex20(h.trim()))
        .context("aria2c -S showed no info hash")?;

    let tdir = dir.join("tracker");
    std::fs::create_dir_all(&tdir)?;
    let whitelist = tdir.join("whitelist.txt");
    let hex: String = info_hash.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&whitelist, format!("{hex}\n"))?;
    let mut procs = vec![spawn(
        r.net,
        0,
        &tdir.join("log"),
        "opentracker",
        &[
            "-i".into(),
            tracker.ip().to_string(),
            "-p".into(),
            tracker.port().to_string(),
            "-P".into(),
            tracker.port().to_string(),
            "-d".into(),
            tdir.display().to_string(),
            // opentracker chroots into -d before reading the whitelist.
            "-w".into(),
            "/whitelist.txt".into(),
        ],
    )?];

    let limits = |args: &mut Vec<String>| {
        if let (Some(_), Some(f)) = (r.net, r.pace) {
            // Paced below the link, as the agents are.
            args.push(format!(
                "--max-overall-upload-limit={}",
                (r.rate.0 as f64 * f) as u64
            ));
        }
        if r.net.is_none() {
            args.push(format!("--max-overall-upload-limit={}", r.rate.0));
            args.push(format!("--max-overall-download-limit={}", r.rate.0));
        }
    };
    let common = |d: &Path, port: u16| -> Vec<String> {
        vec![
            format!("--dir={}", d.display()),
            "--enable-dht=false".into(),
            "--enable-dht6=false".into(),
            "--bt-enable-lpd=false".into(),
            "--seed-ratio=0.0".into(),
            "--file-allocation=none".into(),
            "--summary-interval=0".into(),
            "--console-log-level=warn".into(),
            format!("--listen-port={port}"),
            "--bt-tracker-connect-timeout=5".into(),
            "--bt-tracker-timeout=5".into(),
        ]
    };
    let port = |k: usize| -> anyhow::Result<u16> {
        if r.net.is_some() {
            Ok(6881 + k as u16)
        } else {
            free_port()
        }
    };
    // Seeds: the origin's place (node 0) and the writer's (node 1).
    for (k, s) in seeds.iter().enumerate() {
        let mut args = common(s, port(k)?);
        args.push("--bt-seed-unverified=true".into());
        limits(&mut args);
        args.push(torrent.display().to_string());
        procs.push(spawn(r.net, k, &s.join("log"), "aria2c", &args)?);
    }
    // Both seeds known to the tracker before any leecher starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = in_ns(ns(0), move || scrape_complete(tracker, info_hash));
        if matches!(seen, Ok(n) if n >= 2) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the BitTorrent seeds did not reach the tracker within 30 s: {seen:?}; see {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let start = Instant::now();
    let mut leechers = Vec::new();
    for j in 0..r.leechers {
        let d = dir.join(format!("leech-{j}"));
        std::fs::create_dir_all(&d)?;
        let done = d.join("done");
        let hook = d.join("hook.sh");
        std::fs::write(&hook, format!("#!/bin/sh\ntouch '{}'\n", done.display()))?;
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        // Leecher j stands for agent j + 1, node j + 2.
        let k = j + 2;
        let mut args = common(&d, port(k)?);
        args.push(format!("--on-bt-download-complete={}", hook.display()));
        limits(&mut args);
        args.push(torrent.display().to_string());
        procs.push(spawn(r.net, k, &d.join("log"), "aria2c", &args)?);
        leechers.push((d, done));
    }
    let limit = Duration::from_secs_f64((r.t_min * 10.0).max(120.0));
    let mut finish = vec![None; r.leechers];
    while finish.iter().any(Option::is_none) {
        for (j, (_, done)) in leechers.iter().enumerate() {
            if finish[j].is_none() && done.exists() {
                finish[j] = Some(start.elapsed().as_secs_f64());
            }
        }
        if start.elapsed() > limit {
            bail!(
                "the BitTorrent swarm did not finish within {limit:?}; logs under {}",
                dir.display()
            );
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.try_wait()? {
                bail!(
                    "a BitTorrent process exited early ({status}); logs under {}",
                    dir.display()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for mut p in procs {
        let _ = p.kill().await;
    }
    let mut corrupt = 0u64;
    for (d, _) in &leechers {
        for f in &r.files {
            let name = f.file_name().context("a file name")?;
            corrupt += crate::bench::differing_bytes(f, &d.join("bench").join(name))?;
        }
    }
    let mut times: Vec<f64> = finish.into_iter().flatten().collect();
    times.sort_by(f64::total_cmp);
    let fleet_s = *times.last().unwrap_or(&0.0);
    Ok(BtReport {
        tool: "aria2c + opentracker".into(),
        fleet_s,
        p50_s: crate::bench::quantile(&times, 0.5),
        p99_s: crate::bench::quantile(&times, 0.99),
        ratio: fleet_s / r.t_min,
        corrupt_bytes_accepted: corrupt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex20_reads_an_info_hash() {
        let h = hex20("00112233445566778899aabbccddeeff00112233").unwrap();
        assert_eq!(h[0], 0x00);
        assert_eq!(h[5], 0x55);
        assert_eq!(h[19], 0x33);
        assert_eq!(hex20("0011"), None);
        assert_eq!(hex20("zz112233445566778899aabbccddeeff00112233"), None);
    }
}
