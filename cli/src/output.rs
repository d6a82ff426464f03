//! Progress bars (on a terminal, without `--json`) and sending requests to the agent.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use voltool_agent::control::{self, Event, Reply, Request};

/// Renders progress events as a bar on stderr, when it is a terminal.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    phase: String,
}

impl Progress {
    /// Draws the progress an agent's event reports (other events are not its business).
    pub(crate) fn on(&mut self, ev: Event) {
        if let Event::Progress { phase, done, total } = ev {
            self.update(&phase, done, total);
        }
    }

    pub(crate) fn new(quiet: bool) -> Self {
        let show = !quiet && std::io::stderr().is_terminal();
        Progress {
            bar: show.then(|| {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:>9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b
            }),
            phase: String::new(),
        }
    }

    pub(crate) fn update(&mut self, phase: &str, done: u64, total: u64) {
        let Some(b) = &self.bar else { return };
        if phase != self.phase {
            self.phase = phase.to_string();
            b.set_message(phase.to_string());
            b.reset();
        }
        b.set_length(total);
        b.set_position(done.min(total));
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// An operation the agent refused or failed, with the exit code it maps to.
#[derive(Debug)]
pub(crate) struct Refused(pub(crate) control::ErrorReply);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for Refused {}

/// Sends a request, drawing progress, and returns the reply or an error.
pub(crate) async fn call(agent: &Path, req: Request, quiet: bool) -> anyhow::Result<Reply> {
    let mut progress = Progress::new(quiet);
    let r = control::call(agent, &req, |ev| progress.on(ev)).await;
    progress.finish();
    match r? {
        Ok(reply) => Ok(reply),
        Err(e) => Err(Refused(e).into()),
    }
}

/// Exit code for a finished command.
pub(crate) fn ok() -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}

/// Exit code 2 with a message: bad usage found after parsing.
pub(crate) fn usage(msg: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("error: {msg}");
    Ok(ExitCode::from(2))
}

/// Prints a value as one line of JSON.
pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}
