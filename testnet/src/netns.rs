//! `--net netns`: one network namespace per node on a bridge that lives in a namespace of its
//! own, each node with its own address, and every link capped by `tc tbf`: the node's send
//! side on its veth end, its receive side on the bridge port that feeds it.
//!
//! Every name carries the bench's process id (`vtb<PID>-…`), so concurrent runs never touch
//! each other's namespaces, and namespaces left behind by a run that was killed with SIGKILL
//! are swept away by the next run (their process id is no longer alive). Traffic stays inside
//! the namespaces made here: the bridge has no uplink and no address of the host is routed.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};
use voltool_agent::rate::Rate;

const PREFIX: &str = "vtb";

/// The namespaces of one run, deleted on drop.
#[derive(Debug)]
pub(crate) struct Netns {
    tag: String,
    nodes: usize,
    made: Vec<String>,
}

/// Runs a command to completion; its standard output, or an error naming the command and
/// quoting what it printed on standard error.
pub(crate) fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program`, to be run in node `k`'s network namespace when there are namespaces.
/// `nsenter` enters that namespace alone and then execs, so the child's pid is the program's
/// own and it shares the host's mount namespace: its overlay snapshots are visible to the
/// bench, as on loopback (`ip netns exec` would also give it a mount namespace of its own).
pub(crate) fn command(net: Option<&Netns>, k: usize, program: impl AsRef<OsStr>) -> Command {
    match net {
        Some(net) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", net.ns(k)))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn list() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The process id in a name of ours (`vtb<PID>-…`).
fn owner(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes namespaces left by runs whose process is gone (killed with SIGKILL), and kills
/// what still runs in them.
fn sweep_stale() {
    for name in list() {
        if let Some(pid) = owner(&name)
            && rustix::process::Pid::from_raw(pid)
                .is_none_or(|p| rustix::process::test_kill_process(p).is_err())
        {
            note(&format!("removing namespace {name} left by an earlier run"));
            // Its nodes outlived the run (they have process groups of their own).
            let pids = run(&["ip", "netns", "pids", &name]).unwrap_or_default();
            for pid in pids.split_whitespace() {
                if let Some(p) = pid.parse().ok().and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
            let _ = run(&["ip", "netns", "del", &name]);
        }
    }
}

fn note(msg: &str) {
    eprintln!("note: {msg}");
}

/// `tc tbf` arguments for `rate` bytes per second: a burst of 32 KiB (above rate/HZ for any
/// rate this bench uses) and at most 50 ms of queue.
fn tbf(rate: Rate) -> Vec<String> {
    [
        "root".to_string(),
        "tbf".into(),
        "rate".into(),
        format!("{}bit", rate.0 * 8),
        "burst".into(),
        "32kb".into(),
        "latency".into(),
        "50ms".into(),
    ]
    .to_vec()
}

impl Netns {
    /// Makes a bridge namespace and `nodes` node namespaces, each linked to the bridge by a
    /// veth pair capped at `rate` each way.
    pub(crate) fn create(nodes: usize, rate: Rate) -> anyhow::Result<Netns> {
        if !rustix::process::geteuid().is_root() {
            bail!("--net netns needs root (network namespaces and tc); use --net loopback");
        }
        if nodes > 250 {
            bail!("--net netns supports at most 250 nodes");
        }
        sweep_stale();
        let mut me = Netns {
            tag: format!("{PREFIX}{}", std::process::id()),
            nodes,
            made: Vec::new(),
        };
        me.build(rate)?;
        Ok(me)
    }

    fn build(&mut self, rate: Rate) -> anyhow::Result<()> {
        let br = self.bridge();
        run(&["ip", "netns", "add", &br])?;
        self.made.push(br.clone());
        run(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &br, "link", "set", "br0", "up"])?;
        let tbf = tbf(rate);
        let tbf: Vec<&str> = tbf.iter().map(String::as_str).collect();
        for k in 0..self.nodes {
            let ns = self.ns(k);
            let port = format!("p{k}");
            run(&["ip", "netns", "add", &ns])?;
            self.made.push(ns.clone());
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            run(&["ip", "-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", self.ip(k));
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            // Send side: the node's own veth end. Receive side: the bridge port toward it.
            let mut send = vec!["tc", "-n", &ns, "qdisc", "add", "dev", "eth0"];
            send.extend(&tbf);
            run(&send)?;
            let mut recv = vec!["tc", "-n", &br, "qdisc", "add", "dev", &port];
            recv.extend(&tbf);
            run(&recv)?;
        }
        Ok(())
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.tag)
    }

    /// The namespace of node `k`.
    pub(crate) fn ns(&self, k: usize) -> String {
        format!("{}-n{k}", self.tag)
    }

    /// The address of node `k`.
    pub(crate) fn ip(&self, k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, k as u8 + 2)
    }

    /// Deletes every namespace made (the veth pairs go with them).
    pub(crate) fn cleanup(&mut self) {
        for ns in self.made.drain(..).rev() {
            if let Err(e) = run(&["ip", "netns", "del", &ns]) {
                note(&format!("{e:#}"));
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_reads_the_pid_of_our_names_only() {
        assert_eq!(owner("vtb1234-n3"), Some(1234));
        assert_eq!(owner("vtb1234-br"), Some(1234));
        assert_eq!(owner("other-ns"), None);
        assert_eq!(owner("vtbx-n1"), None);
    }

    #[test]
    fn tbf_caps_in_bits() {
        let a = tbf("50mbit".parse().unwrap());
        assert!(a.contains(&"50000000bit".to_string()), "{a:?}");
    }
}
