//! `voltool-testnet`: a local voltool fleet of real processes on 127.0.0.1.
//!
//! - `up --agents N --root DIR` starts a coordinator and N agents, each a process with its
//!   own data directory and log file, and prints how to point `voltool` at any node.
//! - `down --root DIR` stops them.
//! - `demo` does the main job end to end on defaults and checks every byte.
//! - `bench`, `chaos` and `failover` measure and break it.
//!
//! Nodes are this same binary run as `voltool-testnet exec -- <voltool arguments>`, so the
//! testnet needs nothing but itself.

mod bench;
mod chaos;
mod coldstart;
mod demo;
mod failover;
mod fleet;
mod ha;
mod netns;
mod torrent;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "voltool-testnet", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a coordinator and N agents.
    Up(fleet::UpArgs),
    /// Stop the fleet started in ROOT.
    Down(fleet::DownArgs),
    /// End to end: a synthetic model committed on one agent, reloaded on all others,
    /// compared byte for byte.
    Demo(demo::DemoArgs),
    /// Measure a scenario of shared/BENCH.md (B1 fan-out; B5 with --evil K).
    Bench(bench::BenchArgs),
    /// Random operations and faults on a fleet of real processes, checked against a
    /// model: nothing acknowledged lost, no mixed snapshot, no unverified byte.
    Chaos(chaos::ChaosArgs),
    /// Coordinators in failover: the leader killed again and again during commits; the
    /// time from each kill -9 to the first commit the next leader acknowledges.
    Failover(failover::FailoverArgs),
    /// Run `voltool` with the given arguments (how the testnet starts its nodes).
    #[command(hide = true)]
    Exec {
        /// Arguments for voltool.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Exec { args } = cli.cmd {
        let argv = std::iter::once("voltool".into()).chain(args);
        return voltool_cli::main_with(argv);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(a) => fleet::up_cmd(a).await,
            Cmd::Down(a) => fleet::down_cmd(a).await,
            Cmd::Demo(a) => demo::run(a).await,
            Cmd::Bench(a) => bench::run(a).await,
            Cmd::Chaos(a) => chaos::run(a).await,
            Cmd::Failover(a) => failover::run(a).await,
            Cmd::Exec { .. } => unreachable!("handled above"),
        }
    });
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
