//! `voltool mount`, `unmount`, `commit`, `reload`, `status`: operations on the local agent's
//! mounts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use voltool_agent::control::{Follow, ReloadMode, Reply, Request};

use crate::output::{call, ok, print_json};

#[derive(Debug, Args)]
pub(crate) struct MountArgs {
    /// Volume name.
    name: String,
    /// Host path: a new path or an empty directory.
    path: PathBuf,
    /// Commit changes in the background every SECS seconds, and when the agent stops.
    #[arg(long, value_name = "SECS", conflicts_with = "read_only")]
    background_commit: Option<u64>,
    /// Mount read-only: with overlay snapshots nothing can be written through the mount,
    /// not even by root; with copies, commits are refused and a reload replaces whatever
    /// was written.
    #[arg(long)]
    read_only: bool,
    /// Follow the volume: each new version is downloaded into this host's store as soon
    /// as it is committed, so that `voltool reload` only switches. `--follow=switch` also
    /// switches the mount to each version downloaded when it holds no uncommitted change
    /// and no file open for writing (`voltool status` says why it waits otherwise).
    #[arg(long, value_name = "HOW", num_args = 0..=1, default_missing_value = "prefetch", value_parser = ["prefetch", "switch"])]
    follow: Option<String>,
    /// Lazy: the mount is ready as soon as the version's manifest is here, and files read
    /// their bytes as they arrive (a read waits for what is not here yet, first in line;
    /// bytes are verified before anyone reads them) while the rest downloads behind. Needs
    /// overlay snapshots and FUSE.
    #[arg(long)]
    lazy: bool,
}

#[derive(Debug, Args)]
pub(crate) struct FollowArgs {
    /// Volume name.
    name: String,
}

#[derive(Debug, Args)]
pub(crate) struct PrefetchArgs {
    /// Volume name.
    name: String,
    /// The version (default: the newest), checked link by link from the signed head.
    #[arg(long, value_name = "N")]
    version: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct UnmountArgs {
    /// Volume (the only mounted one if left out).
    name: Option<String>,
    /// Throw uncommitted changes away.
    #[arg(long, conflicts_with = "commit_first")]
    discard: bool,
    /// Commit uncommitted changes first.
    #[arg(long)]
    commit_first: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CommitArgs {
    /// Volume (the only mounted one if left out).
    name: Option<String>,
    /// Print the result as JSON; no progress bar.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ReloadArgs {
    /// Volume (the only mounted one if left out).
    name: Option<String>,
    /// Throw uncommitted changes away.
    #[arg(long, conflicts_with = "commit_first")]
    discard: bool,
    /// Commit uncommitted changes first.
    #[arg(long)]
    commit_first: bool,
    /// Lazy: switch as soon as the new version's manifest is here; files read their bytes
    /// as they arrive (see `mount --lazy`).
    #[arg(long)]
    lazy: bool,
    /// Print the result as JSON; no progress bar.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// The mount path as the agent takes it: absolute, its directory with every symbolic link
/// resolved, as this user sees it (the agent follows none).
fn mount_path(p: &Path) -> anyhow::Result<std::path::PathBuf> {
    let abs = std::path::absolute(p).context("mount path")?;
    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
        anyhow::bail!(
            "{}: a mount path names an entry in a directory",
            abs.display()
        );
    };
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("the directory of the mount path, {}", dir.display()))?;
    Ok(dir.join(name))
}

pub(crate) async fn mount(agent: &Path, a: MountArgs) -> anyhow::Result<ExitCode> {
    let path = mount_path(&a.path)?;
    let reply = call(
        agent,
        Request::Mount {
            name: a.name,
            path,
            background_commit_secs: a.background_commit,
            read_only: a.read_only,
            follow: match a.follow.as_deref() {
                None => Follow::No,
                Some(how) => how.parse().map_err(anyhow::Error::msg)?,
            },
            lazy: a.lazy,
        },
        false,
    )
    .await?;
    if let Reply::Done(msg) = reply {
        println!("{msg}");
    }
    ok()
}

/// `voltool follow` (`on`) and `unfollow`.
pub(crate) async fn follow(agent: &Path, a: FollowArgs, on: bool) -> anyhow::Result<ExitCode> {
    let reply = call(agent, Request::Follow { name: a.name, on }, false).await?;
    if let Reply::Done(msg) = reply {
        println!("{msg}");
    }
    ok()
}

pub(crate) async fn prefetch(agent: &Path, a: PrefetchArgs) -> anyhow::Result<ExitCode> {
    let req = Request::Prefetch {
        name: a.name,
        version: a.version,
    };
    let reply = call(agent, req, a.json).await?;
    if let Reply::Done(msg) = reply {
        if a.json {
            print_json(&serde_json::json!({ "message": msg }))?;
        } else {
            println!("{msg}");
        }
    }
    ok()
}

pub(crate) async fn unmount(agent: &Path, a: UnmountArgs) -> anyhow::Result<ExitCode> {
    let mode = reload_mode(a.discard, a.commit_first);
    let reply = call(agent, Request::Unmount { name: a.name, mode }, false).await?;
    if let Reply::Done(msg) = reply {
        println!("{msg}");
    }
    ok()
}

fn reload_mode(discard: bool, commit_first: bool) -> ReloadMode {
    if discard {
        ReloadMode::Discard
    } else if commit_first {
        ReloadMode::CommitFirst
    } else {
        ReloadMode::Refuse
    }
}

pub(crate) async fn commit(agent: &Path, a: CommitArgs) -> anyhow::Result<ExitCode> {
    let reply = call(agent, Request::Commit { name: a.name }, a.json).await?;
    let Reply::Committed(r) = reply else {
        anyhow::bail!("unexpected answer from the agent")
    };
    if a.json {
        print_json(&r)?;
    } else if r.changed == 0 {
        println!("nothing to commit ({} version {})", r.volume, r.version);
    } else {
        println!(
            "committed {} change(s) to {} (version {}); uploaded {} bytes in {:.2}s",
            r.changed, r.volume, r.version, r.uploaded_bytes, r.seconds
        );
        for p in &r.overwritten {
            eprintln!("warning: overwrote another writer's newer change at {p}");
        }
    }
    if !a.json {
        if let Some(re) = &r.reloaded {
            println!(
                "then moved to the merged head (version {}): {} bytes of other writers' files arrived",
                re.version, re.fetched_files_bytes
            );
        }
        if let Some(why) = &r.stayed {
            eprintln!(
                "warning: the mount stays on its own view, without other writers' changes, until a reload: {why}"
            );
        }
    }
    ok()
}

pub(crate) async fn reload(agent: &Path, a: ReloadArgs) -> anyhow::Result<ExitCode> {
    let mode = reload_mode(a.discard, a.commit_first);
    let reply = call(
        agent,
        Request::Reload {
            name: a.name,
            mode,
            lazy: a.lazy,
        },
        a.json,
    )
    .await?;
    let Reply::Reloaded(r) = reply else {
        anyhow::bail!("unexpected answer from the agent")
    };
    if a.json {
        print_json(&r)?;
    } else if !r.changed {
        println!("{} is up to date (version {})", r.volume, r.version);
    } else {
        println!(
            "reloaded {} from version {} to {} in {:.2}s: {} bytes from the origin, {} from peers, {} already here",
            r.volume,
            r.from_version,
            r.version,
            r.seconds,
            r.sources.origin_bytes,
            r.sources.peer_bytes,
            r.sources.local_bytes
        );
    }
    if !a.json {
        for p in &r.overwritten_by_others {
            eprintln!("warning: your committed change at {p} was overwritten by a later commit");
        }
    }
    ok()
}

pub(crate) async fn status(agent: &Path, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let Reply::Status(s) = call(agent, Request::Status, true).await? else {
        anyhow::bail!("unexpected answer from the agent")
    };
    if a.json {
        print_json(&s)?;
        return ok();
    }
    println!("node        {}", s.node_id);
    println!("address     {}", s.addr);
    println!("coordinator {}", s.coordinator);
    println!("snapshots   {}", s.snapshots);
    let size = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
    let budget = s
        .store
        .max
        .map(|m| format!(" of {}", size(m)))
        .unwrap_or_default();
    println!(
        "store       {}{budget} in {} blobs; {} evicted ({})",
        size(s.store.bytes),
        s.store.blobs,
        s.store.evictions,
        size(s.store.evicted_bytes)
    );
    if s.mounts.is_empty() {
        println!("no mounts");
    }
    for m in &s.mounts {
        let remote = m
            .remote_version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "unreachable".into());
        let state = match m.remote_version {
            Some(r) if r == m.local_version => "up to date",
            Some(_) => "behind (reload)",
            None => "unknown",
        };
        let lazy = match &m.lazy {
            None => String::new(),
            Some(l) => match &l.failed {
                Some(why) => format!("  lazy, fill waits: {why}"),
                None => format!("  lazy, {} of {} here", size(l.held), size(l.total)),
            },
        };
        println!(
            "{:<24} {}  local v{}  remote v{}  {}{}{lazy}",
            m.volume,
            m.path.display(),
            m.local_version,
            remote,
            state,
            if m.read_only { "  read-only" } else { "" }
        );
    }
    for f in &s.follows {
        let by = match (&f.mount, f.host) {
            (Some(p), true) => format!("host, mount {}", p.display()),
            (Some(p), false) => format!("mount {}", p.display()),
            (None, _) => "host".to_string(),
        };
        let v = |v: Option<u64>| v.map(|v| format!("v{v}")).unwrap_or_else(|| "-".into());
        let mut state = if f.bytes_to_go > 0 {
            format!("{} to go", size(f.bytes_to_go))
        } else if f.newest.is_some() && f.newest == f.held {
            "held whole".to_string()
        } else {
            String::new()
        };
        if let Some(w) = &f.waiting {
            state = format!("waiting: {w}");
        }
        if let Some(r) = &f.refused {
            state = format!("{state}  (refused a head: {r})");
        }
        println!(
            "follows {:<16} ({by})  newest {}  held {}  {state}",
            f.volume,
            v(f.newest),
            v(f.held)
        );
    }
    ok()
}
