//! `voltool-testnet demo`: the main job end to end.
//!
//! Up N agents; write a synthetic model (seeded random shards) into agent 0's mount; commit;
//! reload on every other agent at once; compare every file byte for byte with the original;
//! report where the bytes came from; tear down.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use voltool_agent::control::{ReloadMode, ReloadReport, Reply, Request};

use crate::fleet::{self, ask};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Number of agents.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Number of model shards.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Bytes per shard.
    #[arg(long, default_value_t = 64 << 20)]
    shard_bytes: u64,
    /// Seed of the synthetic model's bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the fleet's directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Print only one JSON object at the end.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Summary {
    agents: usize,
    volume_bytes: u64,
    verified_equal: bool,
    bytes_from_origin: u64,
    bytes_from_peers: u64,
    seconds: f64,
}

/// Writes `len` seeded pseudo-random bytes (BLAKE3 in XOF mode keyed by the seed and the
/// shard index): fast, and the same on every machine.
fn write_shard(path: &Path, seed: u64, index: usize, len: u64) -> anyhow::Result<()> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    let mut xof = blake3::Hasher::new_keyed(&key).finalize_xof();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Compares two files byte for byte.
fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let mut fa = std::io::BufReader::new(std::fs::File::open(a)?);
    let mut fb = std::io::BufReader::new(std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub(crate) async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    if a.agents < 2 {
        bail!("the demo needs at least 2 agents");
    }
    let tmp;
    let root = match &a.root {
        Some(r) => r.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("voltool-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let say = |msg: String| {
        if !a.json {
            eprintln!("{msg}");
        }
    };
    say(format!(
        "starting a coordinator and {} agents in {}",
        a.agents,
        root.display()
    ));
    let f = fleet::up(&root, a.agents, None, None).await?;
    let result = demo(&a, &f, &say).await;
    say("stopping the fleet".into());
    let stopped = fleet::down(&f.root).await;
    let summary = result?;
    stopped?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{} agents, {} bytes: every byte {} ({} from the origin, {} from peers) in {:.2}s",
            summary.agents,
            summary.volume_bytes,
            if summary.verified_equal {
                "equal"
            } else {
                "NOT EQUAL"
            },
            summary.bytes_from_origin,
            summary.bytes_from_peers,
            summary.seconds
        )?;
    }
    Ok(if summary.verified_equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn demo(a: &DemoArgs, f: &fleet::Fleet, say: &dyn Fn(String)) -> anyhow::Result<Summary> {
    let volume = "demo-model";
    let writer = &f.agents[0];
    let mounts = f.create_and_mount_all(volume).await?;
    say(format!(
        "writing a synthetic model: {} shards of {} bytes (seed {})",
        a.shards, a.shard_bytes, a.seed
    ));
    let model = mounts[0].join("model");
    std::fs::create_dir_all(&model)?;
    let mut files = Vec::new();
    for i in 0..a.shards {
        let name = format!("model/model-{:05}-of-{:05}.safetensors", i + 1, a.shards);
        write_shard(&mounts[0].join(&name), a.seed, i, a.shard_bytes)?;
        files.push(name);
    }
    std::fs::write(
        model.join("config.json"),
        format!("{{\"shards\":{},\"seed\":{}}}\n", a.shards, a.seed),
    )?;
    files.push("model/config.json".into());
    let volume_bytes = files
        .iter()
        .map(|f| std::fs::metadata(mounts[0].join(f)).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    let t = Instant::now();
    let Reply::Committed(c) = ask(
        writer,
        Request::Commit {
            name: Some(volume.into()),
        },
    )
    .await?
    else {
        bail!("unexpected answer to commit");
    };
    say(format!(
        "committed version {} on agent-0: {} bytes uploaded in {:.2}s",
        c.version,
        c.uploaded_bytes,
        t.elapsed().as_secs_f64()
    ));
    say(format!("reloading on {} agents at once", a.agents - 1));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, agent) in f.agents.iter().enumerate().skip(1) {
        let agent = agent.clone();
        set.spawn(async move {
            let r = ask(
                &agent,
                Request::Reload {
                    name: Some(volume.into()),
                    mode: ReloadMode::Refuse,
                    lazy: false,
                },
            )
            .await;
            (i, r)
        });
    }
    let mut reports: Vec<(usize, ReloadReport)> = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, r) = r?;
        match r? {
            Reply::Reloaded(rep) => reports.push((i, rep)),
            _ => bail!("unexpected answer to reload"),
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    reports.sort_by_key(|(i, _)| *i);
    for (i, r) in &reports {
        say(format!(
            "  agent-{i}: version {} in {:.2}s, {} bytes from the origin, {} from peers",
            r.version, r.seconds, r.sources.origin_bytes, r.sources.peer_bytes
        ));
    }
    say("comparing every file byte for byte".into());
    let mut equal = true;
    for mnt in &mounts[1..] {
        for name in &files {
            let same = same_bytes(&mounts[0].join(name), &mnt.join(name))
                .with_context(|| format!("comparing {}", mnt.join(name).display()))?;
            if !same {
                say(format!("  DIFFERENT: {}", mnt.join(name).display()));
                equal = false;
            }
        }
    }
    Ok(Summary {
        agents: a.agents,
        volume_bytes,
        verified_equal: equal,
        bytes_from_origin: reports.iter().map(|(_, r)| r.sources.origin_bytes).sum(),
        bytes_from_peers: reports.iter().map(|(_, r)| r.sources.peer_bytes).sum(),
        seconds,
    })
}
