//! Config files of the daemons: `voltool coordinator|agent --config FILE`.
//!
//! A config file is TOML whose keys are the command's long options (`max-egress = "50mbit"`,
//! `origin-only = true`, `swarm-knob = ["serve_slots=4"]`), so every option has one name and
//! one description: `--help` and `--print-config` give both. What a file says counts for less
//! than an environment variable of the same option, and that for less than a flag.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};
use clap::{ArgAction, ArgMatches, Command};

/// The subcommands that take a config file.
const DAEMONS: [&str; 2] = ["coordinator", "agent"];

/// `args` with the options of a `--config FILE` put before the command line's own, so that
/// those given on the command line win.
pub(crate) fn expand(cli: &Command, args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(at) = daemon_at(&args) else {
        return Ok(args);
    };
    let file = args[at + 1..].iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        match a.strip_prefix("--config=") {
            Some(f) => Some(f.to_string()),
            None => (a == "--config")
                .then(|| args.get(at + 2 + i)?.to_str().map(str::to_string))
                .flatten(),
        }
    });
    let Some(file) = file else {
        return Ok(args);
    };
    let sub = cli
        .find_subcommand(args[at].to_str().unwrap_or_default())
        .expect("a daemon subcommand");
    let from_file = options_of(sub, Path::new(&file), &args[at + 1..])?;
    let mut out = args[..=at].to_vec();
    out.extend(from_file);
    out.extend_from_slice(&args[at + 1..]);
    Ok(out)
}

/// Where the daemon subcommand stands in `args`, if there is one.
fn daemon_at(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_str()?;
        if DAEMONS.contains(&a) {
            return Some(i);
        }
        if !a.starts_with('-') {
            return None;
        }
        // The one global option with a value.
        i += if a == "--agent" { 2 } else { 1 };
    }
    None
}

/// The options a config file gives, as command-line arguments, but for those `given` on the
/// command line (a repeatable option takes both: the file's first).
fn options_of(sub: &Command, file: &Path, given: &[OsString]) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: not valid TOML", file.display()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "print_config"))
        else {
            bail!(
                "{}: {key:?} is not an option of `voltool {}` (see --print-config)",
                file.display(),
                sub.get_name()
            );
        };
        // An environment variable of the same option counts for more than the file.
        if arg.get_env().is_some_and(|e| std::env::var_os(e).is_some()) {
            continue;
        }
        let flag = format!("--{key}");
        let on_command_line = given.iter().filter_map(|a| a.to_str()).any(|a| {
            a == flag
                || a.strip_prefix(flag.as_str())
                    .is_some_and(|r| r.starts_with('='))
        });
        if on_command_line && !matches!(arg.get_action(), ArgAction::Append) {
            continue;
        }
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(x) => x.to_string(),
                other => bail!(
                    "{}: {key} = {other}: expected a string or a number",
                    file.display()
                ),
            })
        };
        match (&value, arg.get_action()) {
            (toml::Value::Boolean(b), ArgAction::SetTrue) => {
                if *b {
                    out.push(flag.into());
                }
            }
            (_, ArgAction::SetTrue) => {
                bail!(
                    "{}: {key} = {value}: expected true or false",
                    file.display()
                )
            }
            (toml::Value::Array(items), ArgAction::Append) => {
                for item in items {
                    out.push(flag.clone().into());
                    out.push(scalar(item)?.into());
                }
            }
            (v, _) => {
                out.push(flag.into());
                out.push(scalar(v)?.into());
            }
        }
    }
    Ok(out)
}

/// The effective options of a daemon (file, environment, flags and defaults together) as a
/// config file, each with its description.
pub(crate) fn print(sub: &Command, m: &ArgMatches) -> String {
    let mut out = format!(
        "# voltool {}: the effective options (flags over environment over config file over\n\
         # defaults). Save as a file and start with --config FILE.\n",
        sub.get_name()
    );
    for arg in sub.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else {
            continue;
        };
        if arg.is_hide_set() && id != "swarm_knob" || matches!(id, "config" | "print_config") {
            continue;
        }
        out.push('\n');
        if let Some(help) = arg.get_long_help().or(arg.get_help()) {
            wrap(&help.to_string(), &mut out);
        }
        let raw: Vec<String> = m
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let line = match arg.get_action() {
            ArgAction::SetTrue => format!("{long} = {}", m.get_flag(id)),
            ArgAction::Append => format!(
                "{long} = [{}]",
                raw.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ")
            ),
            _ => match raw.first() {
                Some(v) => format!("{long} = {}", quote(v)),
                None => format!("# {long} = (not set)"),
            },
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `text` as comment lines of at most 90 columns.
fn wrap(text: &str, out: &mut String) {
    for para in text.lines() {
        let mut line = String::from("#");
        for word in para.split_whitespace() {
            if line.len() + 1 + word.len() > 90 && line.len() > 1 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
}

/// A value as TOML: whole numbers bare, the rest quoted.
fn quote(v: &str) -> String {
    if v.parse::<i64>().is_ok() {
        v.to_string()
    } else {
        toml::Value::String(v.to_string()).to_string()
    }
}
