//! `voltool volume …`: the registry and files of volumes, as Modal's `modal volume`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use voltool_agent::control::upload::{Source, Upload};
use voltool_agent::control::{self, Event, LsEntry, Reply, Request};
use voltool_protocol::volume::check_volume_name;

use crate::output::{Refused, call, ok, print_json, usage};

#[derive(Debug, Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create an empty volume.
    Create {
        /// Name: up to 64 of A-Z a-z 0-9 - _ .
        name: String,
        /// Succeed if the volume exists already.
        #[arg(long)]
        allow_existing: bool,
    },
    /// List volumes.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List files and directories of a volume: a table on a terminal, one path a line in
    /// a pipe.
    Ls {
        /// Volume.
        name: String,
        /// Directory (the root if left out).
        path: Option<String>,
        /// Everything below the directory, not only what is directly in it.
        #[arg(short, long)]
        recursive: bool,
        /// Print as JSON (Modal's keys: filename, type, created_modified, size).
        #[arg(long)]
        json: bool,
    },
    /// Upload a local file or directory ('-' as LOCAL reads a file from stdin).
    Put {
        /// Volume.
        name: String,
        /// Local file or directory, or '-' for stdin.
        local: PathBuf,
        /// Remote path; ending in '/' puts into that directory (default: the root).
        remote: Option<String>,
        /// Overwrite existing files (a directory is never replaced by a file).
        #[arg(short, long)]
        force: bool,
    },
    /// Download a file or directory ('-' as LOCAL writes its files' bytes to stdout).
    Get {
        /// Volume.
        name: String,
        /// Remote path.
        remote: String,
        /// Local destination (default: the current directory); missing parents are made.
        local: Option<String>,
        /// Replace what exists locally where the download goes.
        #[arg(short, long)]
        force: bool,
    },
    /// Remove a file or directory.
    Rm {
        /// Volume.
        name: String,
        /// Path.
        path: String,
        /// Remove a directory and its contents.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Copy files inside a volume.
    Cp {
        /// Volume.
        name: String,
        /// Sources, then the destination.
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
        /// Copy directories.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Rename a volume.
    Rename {
        /// Current name.
        old: String,
        /// New name.
        new: String,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
    },
    /// Delete a volume and all its versions.
    Delete {
        /// Name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
        /// Succeed if the volume does not exist.
        #[arg(long)]
        allow_missing: bool,
    },
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES"))
}

fn done(reply: Reply) -> anyhow::Result<ExitCode> {
    if let Reply::Done(msg) = reply
        && !msg.is_empty()
    {
        println!("{msg}");
    }
    ok()
}

/// A time as Modal's CLI shows it: minutes, in the local time zone.
fn local_time(ms: i64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_millis_opt(ms) {
        chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
            t.format("%Y-%m-%d %H:%M %Z").to_string()
        }
        chrono::LocalResult::None => String::new(),
    }
}

/// Sizes as Modal's CLI shows them: bytes whole, larger units with one decimal, base 1024.
pub(crate) fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

pub(crate) async fn run(agent: &Path, cmd: VolumeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCmd::Create {
            name,
            allow_existing,
        } => {
            if let Err(e) = check_volume_name(&name) {
                return usage(e);
            }
            let req = Request::VolumeCreate {
                name,
                allow_existing,
            };
            done(call(agent, req, false).await?)
        }
        VolumeCmd::List { json } => {
            let Reply::Volumes(v) = call(agent, Request::VolumeList, true).await? else {
                anyhow::bail!("unexpected answer from the agent")
            };
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{:<32} {:>8}  {:<22}  {:<22}",
                    "NAME", "VERSION", "CREATED", "UPDATED"
                );
                for x in v {
                    println!(
                        "{:<32} {:>8}  {:<22}  {:<22}",
                        x.name,
                        x.version,
                        local_time(x.created_ms as i64),
                        local_time(x.updated_ms as i64)
                    );
                }
            }
            ok()
        }
        VolumeCmd::Ls {
            name,
            path,
            recursive,
            json,
        } => {
            let req = Request::VolumeLs {
                name: name.clone(),
                path: path.clone(),
                recursive,
            };
            let Reply::Ls(entries) = call(agent, req, true).await? else {
                anyhow::bail!("unexpected answer from the agent")
            };
            print_ls(&name, path.as_deref(), &entries, json)?;
            ok()
        }
        VolumeCmd::Put {
            name,
            local,
            remote,
            force,
        } => put(agent, name, local, remote, force).await,
        VolumeCmd::Get {
            name,
            remote,
            local,
            force,
        } => {
            if local.as_deref() == Some("-") {
                return get_stdout(agent, name, remote).await;
            }
            let local =
                std::path::absolute(local.as_deref().unwrap_or(".")).context("local path")?;
            crate::get::get(agent, name, remote, &local, force).await
        }
        VolumeCmd::Rm {
            name,
            path,
            recursive,
        } => done(
            call(
                agent,
                Request::VolumeRm {
                    name,
                    path,
                    recursive,
                },
                true,
            )
            .await?,
        ),
        VolumeCmd::Cp {
            name,
            mut paths,
            recursive,
        } => {
            let dst = paths.pop().expect("clap requires two paths");
            done(
                call(
                    agent,
                    Request::VolumeCp {
                        name,
                        srcs: paths,
                        dst,
                        recursive,
                    },
                    true,
                )
                .await?,
            )
        }
        VolumeCmd::Rename { old, new, yes } => {
            if let Err(e) = check_volume_name(&new) {
                return usage(e);
            }
            if !yes && !confirm(&format!("Rename volume {old} to {new}?"))? {
                anyhow::bail!("aborted (pass -y to skip the question)");
            }
            done(call(agent, Request::VolumeRename { from: old, to: new }, true).await?)
        }
        VolumeCmd::Delete {
            name,
            yes,
            allow_missing,
        } => {
            if !yes
                && !confirm(&format!(
                    "Delete volume {name} and all its versions? This cannot be undone."
                ))?
            {
                anyhow::bail!("aborted (pass -y to skip the question)");
            }
            done(
                call(
                    agent,
                    Request::VolumeDelete {
                        name,
                        allow_missing,
                    },
                    true,
                )
                .await?,
            )
        }
    }
}

async fn get_stdout(agent: &Path, name: String, remote: String) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let r = control::call(agent, &Request::VolumeGet { name, remote }, |ev| {
        if let Event::Data(bytes) = ev
            && write_err.is_none()
            && let Err(e) = out.write_all(&bytes)
        {
            write_err = Some(e);
        }
    })
    .await?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    out.flush()?;
    match r {
        Ok(_) => ok(),
        Err(e) => Err(Refused(e).into()),
    }
}

/// `volume put`: one local file or directory (or stdin, as it comes) to the remote path it
/// names. The files are read here, as this user, and their bytes sent to the agent: it
/// never opens a local path for anyone.
async fn put(
    agent: &Path,
    name: String,
    local: PathBuf,
    remote: Option<String>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let from_stdin = local.as_os_str() == "-";
    let into_dir = remote.as_deref().is_none_or(|r| r.ends_with('/'));
    let mut up = Upload::new();
    if from_stdin {
        let remote = match remote {
            Some(r) if !into_dir => r,
            _ => return usage("put from stdin ('-') needs a remote file path (not ending in '/')"),
        };
        up.add_file(&remote, 0o644, now_ns(), Source::Stdin);
    } else {
        let base = local
            .file_name()
            .and_then(|n| n.to_str())
            .context("the local path has no usable file name")?;
        let remote = match remote {
            Some(r) if !into_dir => r,
            Some(r) => format!("{r}{base}"),
            None => format!("/{base}"),
        };
        let local = std::path::absolute(&local).context("local path")?;
        up.add_local(&local, &remote, None)?;
        for s in up.skipped() {
            eprintln!("skipping {}: not a file, directory or symlink", s.display());
        }
    }
    let mut progress = crate::output::Progress::new(false);
    let r = up.send(agent, &name, force, |ev| progress.on(ev)).await;
    progress.finish();
    match r? {
        Ok(reply) => done(reply),
        Err(e) => Err(Refused(e).into()),
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// `volume ls` as Modal prints it: a table on a terminal, the paths alone in a pipe, and
/// with `--json` one array of objects with Modal's keys.
fn print_ls(name: &str, path: Option<&str>, entries: &[LsEntry], json: bool) -> anyhow::Result<()> {
    let kind = |e: &LsEntry| match e.kind.as_str() {
        "dir" => "dir",
        "symlink" => "link",
        _ => "file",
    };
    let time = |e: &LsEntry| (e.mtime_ns > 0).then(|| local_time(e.mtime_ns / 1_000_000));
    if json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "filename": e.path,
                    "type": kind(e),
                    "created_modified": time(e),
                    "size": human_size(e.size),
                })
            })
            .collect();
        return print_json(&rows);
    }
    let mut out = std::io::stdout().lock();
    if !std::io::stdout().is_terminal() {
        for e in entries {
            writeln!(out, "{}", e.path)?;
        }
        return Ok(());
    }
    let rows: Vec<[String; 4]> = entries
        .iter()
        .map(|e| {
            let shown = match &e.target {
                Some(t) => format!("{} -> {t}", e.path),
                None => e.path.clone(),
            };
            [
                shown,
                kind(e).to_string(),
                time(e).unwrap_or_default(),
                human_size(e.size),
            ]
        })
        .collect();
    let head = ["Filename", "Type", "Created/Modified", "Size"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let dir = path.unwrap_or("/");
    writeln!(out, "Directory listing of '{dir}' in '{name}'")?;
    let line = |out: &mut std::io::StdoutLock<'_>, cells: [&str; 4]| {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        )
    };
    line(&mut out, head)?;
    for r in &rows {
        line(&mut out, [&r[0], &r[1], &r[2], &r[3]])?;
    }
    Ok(())
}
