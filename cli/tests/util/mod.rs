//! Runs the real `voltool` binary: a coordinator and agents as child processes on
//! 127.0.0.1, in a temp dir, killed when the fleet is dropped.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_voltool");
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub coordinator: String,
    children: Vec<(String, Child)>,
}

/// Waits for a file a starting node writes, failing early if the node died.
pub fn wait_file(path: &Path, child: &mut Child) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return s.trim().to_string();
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("node exited during start-up: {st}");
        }
        assert!(
            start.elapsed() < START_TIMEOUT,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn voltool() -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // How much of a download is durable is an event tests wait on.
        .env(
            "RUST_LOG",
            "info,voltool_agent::blobs::driver::record=debug",
        )
        .envs(std::env::var_os("VOLTOOL_SNAPSHOTS").map(|v| ("VOLTOOL_SNAPSHOTS", v)))
        .stdin(Stdio::null());
    c
}

impl Fleet {
    pub fn start(agents: usize) -> Fleet {
        Self::start_with(agents, &[])
    }

    pub fn start_with(agents: usize, agent_args: &[&str]) -> Fleet {
        Self::start_in(voltool_tests::test_dir(), agents, &[], agent_args)
    }

    /// Starts a fleet in `dir` (where the coordinator's extra arguments may name files).
    pub fn start_in(
        dir: tempfile::TempDir,
        agents: usize,
        coordinator_args: &[&str],
        agent_args: &[&str],
    ) -> Fleet {
        let cdir = dir.path().join("coordinator");
        std::fs::create_dir_all(&cdir).unwrap();
        // A fleet of the tests' own, on loopback: open unless the test gives members.
        let open = !coordinator_args.contains(&"--members");
        let mut c = voltool()
            .args(["coordinator", "--data"])
            .arg(&cdir)
            .args(coordinator_args)
            .args(open.then_some("--open"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("coordinator.log")).unwrap())
            .spawn()
            .unwrap();
        let coordinator = wait_file(&cdir.join("coordinator.addr"), &mut c);
        let mut f = Fleet {
            dir,
            coordinator,
            children: vec![("coordinator".into(), c)],
        };
        for i in 0..agents {
            f.start_agent(i, agent_args);
        }
        f
    }

    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    /// Where agent `i`'s sockets are (what `--agent` names).
    pub fn run_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("run-{i}"))
    }

    pub fn start_agent(&mut self, i: usize, extra: &[&str]) {
        self.start_agent_umask(i, extra, None)
    }

    /// Starts agent `i` with the file mode creation mask `umask` (e.g. "000"), if given.
    pub fn start_agent_umask(&mut self, i: usize, extra: &[&str], umask: Option<&str>) {
        let r = self.run_dir(i);
        self.start_agent_in(i, extra, umask, Some(&r))
    }

    /// Starts agent `i` with its sockets in `run_dir` (`None`: the agent's default).
    pub fn start_agent_in(
        &mut self,
        i: usize,
        extra: &[&str],
        umask: Option<&str>,
        run_dir: Option<&Path>,
    ) {
        let d = self.agent_dir(i);
        // With a umask given, the agent makes its data directory itself.
        if umask.is_none() {
            std::fs::create_dir_all(&d).unwrap();
        }
        let _ = std::fs::remove_file(d.join("agent.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent-{i}.log")))
            .unwrap();
        let mut cmd = match umask {
            Some(m) => {
                let mut c = voltool();
                c.env_remove("PATH");
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("umask {m}; exec \"$0\" \"$@\""), BIN])
                    .env_clear()
                    .envs(c.get_envs().filter_map(|(k, v)| Some((k, v?))))
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .stdin(Stdio::null());
                sh
            }
            None => voltool(),
        };
        let mut child = cmd
            .args(["agent", "--data"])
            .arg(&d)
            .args(
                run_dir
                    .map(|r| [Path::new("--run-dir"), r])
                    .into_iter()
                    .flatten(),
            )
            .args(["--coordinator", &self.coordinator])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_file(&d.join("agent.addr"), &mut child);
        self.children.push((format!("agent-{i}"), child));
    }

    /// SIGKILL an agent (no clean shutdown).
    pub fn kill9_agent(&mut self, i: usize) {
        let name = format!("agent-{i}");
        let pos = self.children.iter().position(|(n, _)| *n == name).unwrap();
        let (_, mut c) = self.children.remove(pos);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGKILL the coordinator (no clean shutdown: its connections die silently), then
    /// start it again on its data directory and port.
    pub fn kill9_coordinator_and_restart(&mut self) {
        let pos = self
            .children
            .iter()
            .position(|(n, _)| n == "coordinator")
            .unwrap();
        let (_, mut c) = self.children.remove(pos);
        c.kill().unwrap();
        c.wait().unwrap();
        let cdir = self.dir.path().join("coordinator");
        let _ = std::fs::remove_file(cdir.join("coordinator.addr"));
        let port = self.coordinator.rsplit(':').next().unwrap().to_string();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .unwrap();
        let mut c = voltool()
            .args(["coordinator", "--open", "--data"])
            .arg(&cdir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        assert_eq!(
            wait_file(&cdir.join("coordinator.addr"), &mut c),
            self.coordinator
        );
        self.children.push(("coordinator".into(), c));
    }

    /// `voltool --agent <agent i> args…`
    pub fn cmd(&self, i: usize, args: &[&str]) -> Command {
        let mut c = voltool();
        c.arg("--agent").arg(self.run_dir(i)).args(args);
        c
    }

    pub fn run(&self, i: usize, args: &[&str]) -> Output {
        self.cmd(i, args).output().unwrap()
    }

    /// The process id of a node ("coordinator", "agent-0", …).
    pub fn pid(&self, name: &str) -> u32 {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .id()
    }

    /// Waits (bounded) until a node's log holds `text`.
    pub fn wait_log(&self, name: &str, text: &str) {
        let start = Instant::now();
        while !self.log(name).contains(text) {
            assert!(
                start.elapsed() < START_TIMEOUT,
                "{name} never logged {text:?}: {}",
                self.log(name)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        voltool_agent::overlay::unmount_all_under(self.dir.path());
    }
}

/// Waits (bounded) until the log `dir/NAME.log` holds `text` at least `n` times.
pub fn wait_log_count_in(dir: &Path, name: &str, text: &str, n: usize) {
    let start = Instant::now();
    let log = || std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    while log().matches(text).count() < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} did not log {text:?} {n} times: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a mount or reload's answer says it took from the origin, in bytes.
pub fn origin_bytes(out: &str) -> u64 {
    out.trim_end()
        .split("; ")
        .find_map(|p| p.strip_suffix(" bytes from the origin"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no origin bytes in {out:?}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts an exit code, showing output when it differs.
#[track_caller]
pub fn expect(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}
