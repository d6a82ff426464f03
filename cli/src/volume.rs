//! `voltool volume …`: the registry and files of volumes, as Modal's `modal volume`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use voltool_agent::control::{self, Event, Reply, Request};
use voltool_protocol::volume::check_volume_name;

use crate::output::{Refused, call, ok, print_json, usage};

#[derive(Debug, Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create an empty volume.
    Create {
        /// Name: up to 64 of A-Z a-z 0-9 - _ .
        name: String,
    },
    /// List volumes.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List files and directories of a volume.
    Ls {
        /// Volume.
        name: String,
        /// Directory (the root if left out).
        path: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Upload a local file or directory.
    Put {
        /// Volume.
        name: String,
        /// Local file or directory.
        local: PathBuf,
        /// Remote path; ending in '/' puts into that directory (default: the root).
        remote: Option<String>,
        /// Overwrite existing files.
        #[arg(short, long)]
        force: bool,
    },
    /// Download a file or directory ('-' as LOCAL writes a file to stdout).
    Get {
        /// Volume.
        name: String,
        /// Remote path.
        remote: String,
        /// Local destination (default: the current directory).
        local: Option<String>,
        /// Overwrite existing local files.
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

fn time_ms(ms: u64) -> String {
    // RFC 3339-ish in UTC without pulling a time crate: days since epoch to a date.
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}Z")
}

pub(crate) async fn run(agent: &Path, cmd: VolumeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCmd::Create { name } => {
            if let Err(e) = check_volume_name(&name) {
                return usage(e);
            }
            done(call(agent, Request::VolumeCreate { name }, false).await?)
        }
        VolumeCmd::List { json } => {
            let Reply::Volumes(v) = call(agent, Request::VolumeList, true).await? else {
                anyhow::bail!("unexpected answer from the agent")
            };
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{:<32} {:>8}  {:<20}  {:<20}",
                    "NAME", "VERSION", "CREATED", "UPDATED"
                );
                for x in v {
                    println!(
                        "{:<32} {:>8}  {:<20}  {:<20}",
                        x.name,
                        x.version,
                        time_ms(x.created_ms),
                        time_ms(x.updated_ms)
                    );
                }
            }
            ok()
        }
        VolumeCmd::Ls { name, path, json } => {
            let Reply::Ls(entries) = call(agent, Request::VolumeLs { name, path }, true).await?
            else {
                anyhow::bail!("unexpected answer from the agent")
            };
            if json {
                print_json(&entries)?;
            } else {
                for e in entries {
                    match e.kind.as_str() {
                        "dir" => println!("{}/", e.path),
                        "symlink" => {
                            println!("{} -> {}", e.path, e.target.as_deref().unwrap_or(""))
                        }
                        _ => println!("{}  {}", e.path, e.size),
                    }
                }
            }
            ok()
        }
        VolumeCmd::Put {
            name,
            local,
            remote,
            force,
        } => {
            let local = std::path::absolute(&local).context("local path")?;
            done(
                call(
                    agent,
                    Request::VolumePut {
                        name,
                        local,
                        remote,
                        force,
                    },
                    false,
                )
                .await?,
            )
        }
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
            done(
                call(
                    agent,
                    Request::VolumeGet {
                        name,
                        remote,
                        local: Some(local),
                        force,
                    },
                    false,
                )
                .await?,
            )
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
    let r = control::call(
        agent,
        &Request::VolumeGet {
            name,
            remote,
            local: None,
            force: false,
        },
        |ev| {
            if let Event::Data(bytes) = ev
                && write_err.is_none()
                && let Err(e) = out.write_all(&bytes)
            {
                write_err = Some(e);
            }
        },
    )
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
