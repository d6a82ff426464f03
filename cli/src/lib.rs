//! `voltool`: the agent and coordinator daemons, and the commands that talk to an agent.
//!
//! The binary is a thin `main` over [`main_with`], so other tools (the testnet) can run the
//! very same commands in their own processes.
//!
//! Exit codes: 0 success, 1 failure (including a refused operation), 2 usage error (bad
//! arguments, an invalid volume name).

mod config;
mod daemon;
mod get;
mod local;
mod migrate;
mod output;
mod volume;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use daemon::default_data_dir;

/// Moves large write-once, read-many data (model weights, datasets, checkpoints) to a
/// fleet: named, versioned volumes; commit on one worker, reload on the others, verified
/// chunks from nearby peers.
#[derive(Debug, Parser)]
#[command(name = "voltool", version, propagate_version = true)]
struct Cli {
    /// The local agent to talk to: the directory of its sockets (its --run-dir; default
    /// /run/voltool if it exists, else ~/.voltool).
    #[arg(long, global = true, env = "VOLTOOL_AGENT", value_name = "DIR")]
    agent: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the coordinator: volume registry, signed heads, origin blob store.
    Coordinator(Box<daemon::CoordinatorArgs>),
    /// Run the agent daemon of a worker host.
    Agent(Box<daemon::AgentArgs>),
    /// Print the node id of a data directory (creating its key if needed).
    NodeId(daemon::NodeIdArgs),
    /// Move a stopped coordinator's state from its redb file into etcd (and its origin's
    /// blobs into a bucket), for coordinators in failover.
    Migrate(Box<migrate::MigrateArgs>),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Mount a volume at a host path (a mount point that follows every reload; a link in copy mode).
    Mount(local::MountArgs),
    /// Remove a mount (refused with uncommitted changes unless --discard or --commit-first).
    Unmount(local::UnmountArgs),
    /// Commit the changes made in a mounted volume, then move to the merged head.
    Commit(local::CommitArgs),
    /// Bring a mounted volume to the newest committed version.
    Reload(local::ReloadArgs),
    /// Show mounts with their local and remote versions, and followed volumes.
    Status(local::StatusArgs),
    /// Keep the newest version of a volume in this host's store as soon as it is
    /// committed, and serve it to peers.
    Follow(local::FollowArgs),
    /// Stop following a volume (a mount that follows it still does).
    Unfollow(local::FollowArgs),
    /// Download a version of a volume into this host's store now (a preheat).
    #[command(disable_version_flag = true)]
    Prefetch(local::PrefetchArgs),
}

fn agent_dir(cli: Option<PathBuf>) -> PathBuf {
    cli.unwrap_or_else(daemon::default_agent_dir)
}

fn run(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let command = Cli::command();
    let args = match config::expand(&command, args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let parsed = command
        .clone()
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m).map(|c| (c, m)));
    let (cli, matches) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let _ = e.print();
            return Ok(ExitCode::from(if e.use_stderr() { 2 } else { 0 }));
        }
    };
    let print_config = match &cli.cmd {
        Cmd::Coordinator(a) => a.print_config,
        Cmd::Agent(a) => a.print_config,
        _ => false,
    };
    if print_config && let Some((name, sub)) = matches.subcommand() {
        let cmd = command.find_subcommand(name).expect("a subcommand");
        print!("{}", config::print(cmd, sub));
        return Ok(ExitCode::SUCCESS);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let agent = agent_dir(cli.agent);
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Coordinator(a) => daemon::coordinator(*a).await,
            Cmd::Agent(a) => daemon::agent(*a).await,
            Cmd::NodeId(a) => daemon::node_id(a),
            Cmd::Migrate(a) => migrate::run(*a).await,
            Cmd::Volume(c) => volume::run(&agent, c).await,
            Cmd::Mount(a) => local::mount(&agent, a).await,
            Cmd::Unmount(a) => local::unmount(&agent, a).await,
            Cmd::Commit(a) => local::commit(&agent, a).await,
            Cmd::Reload(a) => local::reload(&agent, a).await,
            Cmd::Status(a) => local::status(&agent, a).await,
            Cmd::Follow(a) => local::follow(&agent, a, true).await,
            Cmd::Unfollow(a) => local::follow(&agent, a, false).await,
            Cmd::Prefetch(a) => local::prefetch(&agent, a).await,
        }
    })
}

/// Runs `voltool` with these arguments (the first is the program name).
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    match run(args.into_iter().collect()) {
        Ok(code) => code,
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command's arguments are well formed (clap checks names and conflicts here,
    /// not at build time: a clash shows only when that command runs).
    #[test]
    fn every_command_is_well_formed() {
        Cli::command().debug_assert();
    }
}
