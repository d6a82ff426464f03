//! `voltool-testnet bench --scenario coldstart` (B8): a synthetic sharded safetensors model
//! is committed on agent 0; at the commit's acknowledgement every other agent switches its
//! mount to it and loads every tensor with safetensors' own loader (`safe_open`, which maps
//! the file), checking each tensor's checksum. Modes, in the same run and fleet: `eager`
//! (reload, then load), `lazy` (`reload --lazy`, then load while the fill runs), `follow`
//! (the mount follows the volume: the download starts at the commit; reload, then load).
//! Per mode: each reader's time to its first tensor and to its last, as ratios to T_min of
//! the model's bytes; the origin's bytes against F; a plot of each reader's bytes loaded
//! over time.
//!
//! The loader is Python's `safetensors` package with numpy, in the interpreter `--python`
//! names (`testnet/bench/coldstart.sh` makes a virtualenv with both). Each reader's loader
//! starts before the commit and waits for its go, so the interpreter's start is not timed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use voltool_agent::control::{Follow, ReloadMode, Reply, Request};

use crate::bench::{commit, quantile, write_svg};
use crate::fleet::{self, ask};

/// Shards of the model.
const SHARDS: u64 = 4;
/// Tensor sizes: 1 to 8 MiB, the first of each shard at least 4 MiB.
const TENSOR_MIN: u64 = 1 << 20;
const TENSOR_MAX: u64 = 8 << 20;
const FIRST_MIN: u64 = 4 << 20;
/// How long a mode may take before the bench gives up on it.
const MODE_TIMEOUT: Duration = Duration::from_secs(1800);

/// Loads the shards named on the command line once it reads a line on stdin; prints one
/// JSON line per tensor (wall time, name, bytes, checksum) as it is loaded.
const LOADER: &str = r#"
import hashlib, json, sys, time
import numpy
from safetensors import safe_open
print("ready", flush=True)
sys.stdin.readline()
for path in sys.argv[1:]:
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            b = t.tobytes()
            print(json.dumps({"t": time.time(), "name": name, "bytes": len(b),
                              "sum": hashlib.blake2b(b, digest_size=16).hexdigest()}), flush=True)
"#;

/// One mode's figures.
#[derive(Debug, Serialize)]
pub(crate) struct ModeReport {
    mode: &'static str,
    /// Each reader's time to its first tensor and to its last (seconds from the commit's
    /// acknowledgement), sorted.
    first_s: Vec<f64>,
    last_s: Vec<f64>,
    /// Each reader's switch (its reload's answer), seconds from the acknowledgement.
    switched_s: Vec<f64>,
    first_p50_ratio: f64,
    last_p50_ratio: f64,
    last_max_ratio: f64,
    /// The origin's bytes (what every reader's agent received from it) against F.
    origin_bytes: u64,
    origin_ratio: f64,
    peer_bytes: u64,
    /// Tensors loaded, and those whose checksum differed (must be 0).
    tensors: usize,
    wrong_tensors: usize,
    plot: String,
}

/// B8's figures.
#[derive(Debug, Serialize)]
pub(crate) struct ColdReport {
    volume_bytes: u64,
    readers: usize,
    t_min_s: f64,
    modes: Vec<ModeReport>,
    /// Lazy's median first tensor against eager's last (target: at most 0.05).
    lazy_first_to_eager_last: f64,
    /// Lazy's last reader done against eager's (target: at most 1.05).
    lazy_last_to_eager_last: f64,
}

/// What one mode does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Eager,
    Lazy,
    Follow,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Lazy => "lazy",
            Mode::Follow => "follow",
        }
    }
}

/// Checks that `python` can load safetensors with numpy.
pub(crate) fn check_python(python: &Path) -> anyhow::Result<()> {
    let o = std::process::Command::new(python)
        .args(["-c", "import numpy, safetensors"])
        .output()
        .with_context(|| format!("{}: cannot run it", python.display()))?;
    if !o.status.success() {
        bail!(
            "{} cannot import numpy and safetensors (testnet/bench/coldstart.sh makes a virtualenv with both): {}",
            python.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Runs B8 on the fleet `f`: `size` bytes of model, `t_min_s` its bound at the run's caps;
/// each mode's plot is `plots` with `-MODE.svg` added.
pub(crate) async fn run(
    f: &fleet::Fleet,
    python: &Path,
    size: u64,
    t_min_s: f64,
    plots: &Path,
) -> anyhow::Result<ColdReport> {
    let mounts = f.create_and_mount_all("coldstart").await?;
    let follow_mounts = f
        .create_and_mount_following("coldstart-follow", "-follow", Follow::Prefetch)
        .await?;
    let loader = f.root.join("loader.py");
    std::fs::write(&loader, LOADER)?;
    let mut modes = Vec::new();
    for (k, mode) in [Mode::Eager, Mode::Lazy, Mode::Follow]
        .into_iter()
        .enumerate()
    {
        let (volume, mounts) = match mode {
            Mode::Follow => ("coldstart-follow", &follow_mounts),
            _ => ("coldstart", &mounts),
        };
        let r = one_mode(
            f,
            python,
            &loader,
            mode,
            volume,
            mounts,
            size,
            k as u8 + 1,
            t_min_s,
            plots,
        )
        .await
        .with_context(|| format!("mode {}", mode.name()))?;
        modes.push(r);
    }
    let by = |m: &str| modes.iter().find(|r| r.mode == m).expect("run");
    let (eager, lazy) = (by("eager"), by("lazy"));
    let eager_last = eager.last_s.last().copied().unwrap_or(0.0).max(1e-9);
    Ok(ColdReport {
        volume_bytes: size,
        readers: f.agents.len() - 1,
        t_min_s,
        lazy_first_to_eager_last: quantile(&lazy.first_s, 0.5) / eager_last,
        lazy_last_to_eager_last: lazy.last_s.last().copied().unwrap_or(0.0) / eager_last,
        modes,
    })
}

/// What a reader's agent received so far, from the origin and from peers.
async fn received(agent: &Path) -> anyhow::Result<(u64, u64)> {
    let Reply::Status(s) = ask(agent, Request::Status).await? else {
        bail!("unexpected answer to status");
    };
    Ok((s.store.from_origin, s.store.from_peers))
}

/// Whether `agent`'s mount of `volume` is lazy still.
async fn lazy_still(agent: &Path, volume: &str) -> anyhow::Result<bool> {
    let Reply::Status(s) = ask(agent, Request::Status).await? else {
        bail!("unexpected answer to status");
    };
    Ok(s.mounts
        .iter()
        .any(|m| m.volume == volume && m.lazy.is_some()))
}

/// A reader's run: loaded tensors as (seconds, cumulative bytes), checksums that differed.
struct Loaded {
    trace: Vec<(f64, u64)>,
    wrong: usize,
    switched: f64,
}

#[allow(clippy::too_many_arguments)]
async fn one_mode(
    f: &fleet::Fleet,
    python: &Path,
    loader: &Path,
    mode: Mode,
    volume: &str,
    mounts: &[PathBuf],
    size: u64,
    seed: u8,
    t_min_s: f64,
    plots: &Path,
) -> anyhow::Result<ModeReport> {
    let files = write_model(&mounts[0], size, seed)?;
    // The checksums every reader must find: the writer's own files, loaded by the same
    // loader before anything is timed.
    let expected = expected_sums(python, loader, &mounts[0], &files).await?;
    let mut before = Vec::new();
    for agent in &f.agents[1..] {
        before.push(received(agent).await?);
    }
    // Every reader's loader, started and waiting for its go.
    let mut loaders = Vec::new();
    for m in &mounts[1..] {
        let mut c = tokio::process::Command::new(python);
        c.arg(loader)
            .args(files.iter().map(|n| m.join(n)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = c.spawn().context("starting a loader")?;
        let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
        match out.next_line().await? {
            Some(l) if l == "ready" => {}
            other => bail!("a loader did not start: {other:?}"),
        }
        loaders.push((child, out));
    }
    commit(&f.agents[0], volume).await?;
    let start = Instant::now();
    let wall0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let mut set = tokio::task::JoinSet::new();
    for ((i, agent), (mut child, mut out)) in f.agents.iter().enumerate().skip(1).zip(loaders) {
        let (agent, expected) = (agent.clone(), expected.clone());
        let volume = volume.to_string();
        set.spawn(async move {
            let reply = ask(
                &agent,
                Request::Reload {
                    name: Some(volume),
                    mode: ReloadMode::Refuse,
                    lazy: mode == Mode::Lazy,
                },
            )
            .await?;
            if !matches!(reply, Reply::Reloaded(_)) {
                bail!("agent-{i}: unexpected answer to reload");
            }
            let switched = start.elapsed().as_secs_f64();
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(b"go\n").await?;
            let mut loaded = Loaded {
                trace: Vec::new(),
                wrong: 0,
                switched,
            };
            let mut bytes = 0u64;
            while let Some(line) = out.next_line().await? {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("agent-{i}'s loader printed {line:?}"))?;
                bytes += v["bytes"].as_u64().unwrap_or(0);
                let name = v["name"].as_str().unwrap_or_default();
                if expected.get(name).map(String::as_str) != v["sum"].as_str() {
                    loaded.wrong += 1;
                }
                let t = v["t"].as_f64().unwrap_or(0.0) - wall0;
                loaded.trace.push((t, bytes));
            }
            let st = child.wait().await?;
            if !st.success() {
                bail!("agent-{i}'s loader failed: {st}");
            }
            Ok::<_, anyhow::Error>((i, loaded))
        });
    }
    let mut traces = BTreeMap::new();
    let (mut first, mut last, mut tensors, mut wrong) = (Vec::new(), Vec::new(), 0, 0);
    let mut switched = Vec::new();
    let all = async {
        while let Some(j) = set.join_next().await {
            let (i, l) = j??;
            first.push(l.trace.first().map_or(f64::NAN, |x| x.0));
            last.push(l.trace.last().map_or(f64::NAN, |x| x.0));
            tensors += l.trace.len();
            wrong += l.wrong;
            switched.push(l.switched);
            traces.insert(i, l.trace);
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(MODE_TIMEOUT, all)
        .await
        .context("the readers did not finish")??;
    let loaded_s = start.elapsed();
    // A lazy mount's fill goes on after its reader is done: its bytes count too.
    if mode == Mode::Lazy {
        for agent in &f.agents[1..] {
            while lazy_still(agent, volume).await? {
                if start.elapsed() > loaded_s + MODE_TIMEOUT {
                    bail!("{}: the lazy mount never settled", agent.display());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let (mut origin, mut peers) = (0, 0);
    for (agent, (o0, p0)) in f.agents[1..].iter().zip(before) {
        let (o, p) = received(agent).await?;
        origin += o - o0;
        peers += p - p0;
    }
    first.sort_by(f64::total_cmp);
    last.sort_by(f64::total_cmp);
    switched.sort_by(f64::total_cmp);
    let plot = PathBuf::from(format!("{}-{}.svg", plots.display(), mode.name()));
    write_svg(&plot, &traces, size, t_min_s)?;
    Ok(ModeReport {
        mode: mode.name(),
        first_p50_ratio: quantile(&first, 0.5) / t_min_s,
        last_p50_ratio: quantile(&last, 0.5) / t_min_s,
        last_max_ratio: last.last().copied().unwrap_or(f64::NAN) / t_min_s,
        first_s: first,
        last_s: last,
        switched_s: switched,
        origin_bytes: origin,
        origin_ratio: origin as f64 / size as f64,
        peer_bytes: peers,
        tensors,
        wrong_tensors: wrong,
        plot: plot.display().to_string(),
    })
}

/// The checksum of every tensor of `files` in `dir`, by the loader.
async fn expected_sums(
    python: &Path,
    loader: &Path,
    dir: &Path,
    files: &[String],
) -> anyhow::Result<std::sync::Arc<BTreeMap<String, String>>> {
    let mut c = tokio::process::Command::new(python);
    c.arg(loader)
        .args(files.iter().map(|n| dir.join(n)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = c.spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"go\n")
        .await?;
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("the loader failed on the writer's files");
    }
    let mut sums = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        sums.insert(
            v["name"].as_str().unwrap_or_default().to_string(),
            v["sum"].as_str().unwrap_or_default().to_string(),
        );
    }
    Ok(std::sync::Arc::new(sums))
}

/// Writes a model of `size` bytes in [`SHARDS`] safetensors files into `dir` (replacing
/// those of another seed); their names, in load order.
pub(crate) fn write_model(dir: &Path, size: u64, seed: u8) -> anyhow::Result<Vec<String>> {
    let per = size / SHARDS;
    let mut names = Vec::new();
    for s in 0..SHARDS {
        let name = format!("model-{:05}-of-{SHARDS:05}.safetensors", s + 1);
        let bytes = shard(per, seed, s as u8);
        std::fs::write(dir.join(&name), bytes).with_context(|| name.clone())?;
        names.push(name);
    }
    Ok(names)
}

/// One shard: tensors of 1 to 8 MiB (the first at least 4 MiB), float16 and float32 by
/// turns, filling about `bytes` of data; their bytes from keys of `seed` and `shard`.
fn shard(bytes: u64, seed: u8, shard: u8) -> Vec<u8> {
    let mut key = [0u8; 32];
    key[0] = seed;
    key[1] = shard;
    let mut xof = blake3::Hasher::new_keyed(&key).finalize_xof();
    let mut sizes = Vec::new();
    let (mut left, mut k) = (bytes / 4 * 4, 0u64);
    while left > 0 {
        let lo = if k == 0 { FIRST_MIN } else { TENSOR_MIN };
        let n = if left <= TENSOR_MAX {
            left
        } else {
            let mut r = [0u8; 8];
            xof.fill(&mut r);
            let n = (lo + u64::from_le_bytes(r) % (TENSOR_MAX - lo + 1)) / 4 * 4;
            // What is left is a tensor of 1 MiB at least.
            if left - n < TENSOR_MIN {
                left - TENSOR_MIN
            } else {
                n
            }
        };
        sizes.push(n);
        left -= n;
        k += 1;
    }
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for (k, n) in sizes.iter().enumerate() {
        let (dtype, width) = if k % 2 == 0 { ("F16", 2) } else { ("F32", 4) };
        header.insert(
            format!("s{shard}.t{k:03}"),
            serde_json::json!({"dtype": dtype, "shape": [n / width], "data_offsets": [at, at + n]}),
        );
        at += n;
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    // The data starts 8-byte aligned.
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + at as usize);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    let start = out.len();
    out.resize(start + at as usize, 0);
    xof.fill(&mut out[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_is_safetensors_with_tensors_of_the_sizes_asked() {
        let b = shard(32 << 20, 1, 0);
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        assert!((8 + n).is_multiple_of(8));
        let h: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&b[8..8 + n]).unwrap();
        let mut end = 0;
        let mut names: Vec<_> = h.keys().cloned().collect();
        names.sort();
        for (k, name) in names.iter().enumerate() {
            let o = h[name]["data_offsets"].as_array().unwrap();
            let (a, z) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
            assert_eq!(a, end, "{name} follows the one before");
            let len = z - a;
            assert!(
                len >= if k == 0 { FIRST_MIN } else { TENSOR_MIN },
                "{name}: {len}"
            );
            assert!(len <= TENSOR_MAX, "{name}: {len}");
            end = z;
        }
        assert_eq!(b.len() as u64, 8 + n as u64 + end);
        assert_eq!(end, 32 << 20);
    }
}
