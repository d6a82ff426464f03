//! `voltool volume get NAME REMOTE LOCAL`: the files are written here, by the user who runs
//! the command, from what the agent sends: they belong to that user, and the agent never
//! opens a local path for anyone.

use std::path::Path;
use std::process::ExitCode;

use voltool_agent::control::Reply;
use voltool_agent::control::export::{self, destination};

use crate::output::{Refused, ok};

/// Writes what the agent sends of `name:remote` at `local` (into it, if it is a directory).
pub(crate) async fn get(
    agent: &Path,
    name: String,
    remote: String,
    local: &Path,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let dest = destination(&remote, local);
    match export::get(agent, &name, &remote, &dest, force, |_| {}).await? {
        Ok(Reply::Done(msg)) => {
            println!("downloaded {msg} to {}", dest.display());
            ok()
        }
        Ok(other) => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        Err(e) => Err(Refused(e).into()),
    }
}
