//! Coordinators in failover as an operator runs them: `voltool coordinator --meta etcd://…`
//! processes over a real three-member etcd cluster and a real S3 origin (Garage), agents
//! given every coordinator; the leader killed with SIGKILL: the next leads, agents carry on,
//! and its tracker is rebuilt by the agents' announcements; a leader stopped past its lease
//! campaigns again when it wakes, and leads again when its successor dies.

mod util;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use util::{expect, origin_bytes, stderr, stdout, voltool, wait_file, wait_log_count_in};

/// The weights every agent reads (big enough that where they come from shows).
const BIG: usize = 32 << 20;
use voltool_tests::etcd::EtcdCluster;
use voltool_tests::garage::Garage;

/// Child processes, killed (and their mounts detached) when dropped.
struct Procs {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        voltool_agent::overlay::unmount_all_under(self.dir.path());
    }
}

impl Procs {
    fn new() -> Self {
        Procs {
            dir: voltool_tests::test_dir(),
            children: Vec::new(),
        }
    }

    /// Starts agent `i` on its data and socket directories with `args`; waits until it
    /// serves.
    fn start_agent(&mut self, i: usize, args: &[&str]) {
        let d = self.dir.path().to_path_buf();
        let data = d.join(format!("agent-{i}"));
        std::fs::create_dir_all(&data).unwrap();
        let _ = std::fs::remove_file(data.join("agent.addr"));
        let mut child = voltool()
            .args(["agent", "--data"])
            .arg(&data)
            .arg("--run-dir")
            .arg(d.join(format!("run-{i}")))
            .args(args)
            .stdout(Stdio::null())
            .stderr(self.log(&format!("agent-{i}")))
            .spawn()
            .unwrap();
        wait_file(&data.join("agent.addr"), &mut child);
        self.children.push((format!("agent-{i}"), child));
    }

    /// `voltool ARGS` against agent `i`.
    fn run(&self, i: usize, args: &[&str]) -> std::process::Output {
        voltool()
            .arg("--agent")
            .arg(self.dir.path().join(format!("run-{i}")))
            .args(args)
            .output()
            .unwrap()
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    fn kill9(&mut self, name: &str) {
        let pos = self.children.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.children.remove(pos);
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_leader_killed_hands_the_fleet_to_the_next_whose_tracker_agents_rebuild_and_one_stopped_campaigns_again()
 {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let garage = Garage::start();
    let origin = garage.origin("fleet");
    let mut p = Procs::new();
    let d = p.dir.path().to_path_buf();
    let fleet_id = voltool_tests::seed_key(&d.join("fleet"), 0xF1);
    let coordinators: Vec<String> = (0..2u8)
        .map(|k| {
            let id = voltool_tests::seed_key(&d.join(format!("c{k}")), 0xC0 + k);
            format!("{id}@127.0.0.1:{}", free_port())
        })
        .collect();
    let start_coordinator = |p: &mut Procs, k: usize| {
        let port = coordinators[k].rsplit(':').next().unwrap();
        let child = voltool()
            .env("AWS_ACCESS_KEY_ID", origin.access_key_id.clone().unwrap())
            .env(
                "AWS_SECRET_ACCESS_KEY",
                origin.secret_access_key.clone().unwrap(),
            )
            .args(["coordinator", "--open", "--data"])
            .arg(d.join(format!("c{k}")))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--meta", &etcd.meta_url("fleet"), "--etcd-open"])
            .args(["--origin", &format!("s3://{}/fleet", origin.bucket)])
            .args(["--s3-endpoint", origin.endpoint.as_deref().unwrap()])
            .args(["--s3-region", origin.region.as_deref().unwrap()])
            .arg("--fleet-key")
            .arg(d.join("fleet/node.key"))
            .args(["--lease-ttl", "2s"])
            .stdout(Stdio::null())
            .stderr(p.log(&format!("c{k}")))
            .spawn()
            .unwrap();
        p.children.push((format!("c{k}"), child));
    };
    start_coordinator(&mut p, 0);
    {
        let c0 = &mut p.children.last_mut().unwrap().1;
        // A coordinator writes its address once it leads.
        assert_eq!(
            wait_file(&d.join("c0/coordinator.addr"), c0),
            coordinators[0]
        );
    }
    start_coordinator(&mut p, 1);
    let fleet_key = fleet_id.to_string();
    let agent_args = [
        "--coordinator",
        &coordinators[0],
        "--coordinator",
        &coordinators[1],
        "--fleet-key",
        &fleet_key,
    ];
    for i in 0..3 {
        p.start_agent(i, &agent_args);
    }
    expect(&p.run(0, &["volume", "create", "v"]), 0);
    let m0 = d.join("m0");
    expect(&p.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
    std::fs::write(m0.join("a.txt"), "before").unwrap();
    let weights = voltool_tests::bytes(9, BIG);
    std::fs::write(m0.join("weights.bin"), &weights).unwrap();
    expect(&p.run(0, &["commit"]), 0);
    // Agents 0 and 1 hold the weights whole, announced to the leader's tracker.
    let m1 = d.join("m1");
    expect(&p.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
    let announced = "announcing what this node holds to the tracker";
    for a in ["agent-0", "agent-1"] {
        wait_log_count_in(&d, a, announced, 1);
    }
    // The leader dies without a word: its lease runs out, the standby leads, and the
    // agent's next commit reaches it by itself.
    p.kill9("c0");
    let killed = Instant::now();
    std::fs::write(m0.join("b.txt"), "after").unwrap();
    expect(&p.run(0, &["commit"]), 0);
    let failover = killed.elapsed();
    eprintln!("from the leader's kill -9 to a commit acknowledged by the next: {failover:?}");
    assert!(failover < Duration::from_secs(30), "{failover:?}");
    let c1 = &mut p.children.iter_mut().find(|(n, _)| n == "c1").unwrap().1;
    assert_eq!(
        wait_file(&d.join("c1/coordinator.addr"), c1),
        coordinators[1]
    );
    // The new leader's tracker starts empty, under a new epoch: the agents announce what
    // they hold again, and a new reader after the change of leader is served by them, not
    // by the origin; both commits are there.
    for a in ["agent-0", "agent-1"] {
        wait_log_count_in(&d, a, announced, 2);
    }
    let m2 = d.join("m2");
    let o = p.run(2, &["mount", "v", m2.to_str().unwrap()]);
    expect(&o, 0);
    let from_origin = origin_bytes(&stdout(&o));
    assert!(
        from_origin < (BIG / 2) as u64,
        "the new reader took {from_origin} of {BIG} bytes from the origin: its peers were not found"
    );
    assert_eq!(std::fs::read(m2.join("weights.bin")).unwrap(), weights);
    assert_eq!(std::fs::read_to_string(m2.join("a.txt")).unwrap(), "before");
    assert_eq!(std::fs::read_to_string(m2.join("b.txt")).unwrap(), "after");

    // The killed coordinator comes back, a candidate; the leader is stopped past its lease
    // (SIGSTOP): the candidate takes over. The old leader, let go on, does not exit: it
    // drops all it held and campaigns again, and leads once more when the other dies.
    start_coordinator(&mut p, 0);
    let signal = |p: &Procs, name: &str, sig: &str| {
        let pid = p.children.iter().find(|(n, _)| n == name).unwrap().1.id();
        let st = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal(&p, "c1", "-STOP");
    {
        let c0 = &mut p.children.iter_mut().find(|(n, _)| n == "c0").unwrap().1;
        assert_eq!(
            wait_file(&d.join("c0/coordinator.addr"), c0),
            coordinators[0]
        );
    }
    std::fs::write(m0.join("c.txt"), "while c1 was stopped").unwrap();
    expect(&p.run(0, &["commit"]), 0);
    signal(&p, "c1", "-CONT");
    // It finds its lease gone, says so, and campaigns again (its address file goes).
    wait_log_count_in(&d, "c1", "campaigning again", 1);
    {
        let c1 = &mut p.children.iter_mut().find(|(n, _)| n == "c1").unwrap().1;
        assert!(c1.try_wait().unwrap().is_none(), "the old leader exited");
    }
    p.kill9("c0");
    {
        let c1 = &mut p.children.iter_mut().find(|(n, _)| n == "c1").unwrap().1;
        assert_eq!(
            wait_file(&d.join("c1/coordinator.addr"), c1),
            coordinators[1]
        );
    }
    std::fs::write(m0.join("d.txt"), "c1 leads again").unwrap();
    expect(&p.run(0, &["commit"]), 0);
    let o = p.run(2, &["reload"]);
    expect(&o, 0);
    for (f, text) in [
        ("c.txt", "while c1 was stopped"),
        ("d.txt", "c1 leads again"),
    ] {
        assert_eq!(std::fs::read_to_string(m2.join(f)).unwrap(), text);
    }
}

/// From one coordinator to several, as README says: a coordinator on redb with its origin
/// in its folder is stopped, `voltool migrate` moves its state into etcd and its blobs into
/// the bucket, and a coordinator on etcd signing with the old node key as the fleet key
/// serves the fleet on: the agent that mounted before keeps its mount and commits on from
/// the migrated head, a new agent mounts every byte committed before and after.
#[test]
fn a_fleet_on_one_coordinator_migrates_to_coordinators_in_failover_and_goes_on() {
    if !voltool_tests::mode_independent_pass() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let garage = Garage::start();
    let origin = garage.origin("migrated");
    let mut p = Procs::new();
    let d = p.dir.path().to_path_buf();
    let old_id = voltool_tests::seed_key(&d.join("old"), 0xC0);
    let old_addr = format!("{old_id}@127.0.0.1:{}", free_port());
    let child = voltool()
        .args(["coordinator", "--open", "--data"])
        .arg(d.join("old"))
        .args(["--listen", old_addr.split('@').nth(1).unwrap()])
        .stdout(Stdio::null())
        .stderr(p.log("old"))
        .spawn()
        .unwrap();
    p.children.push(("old".into(), child));
    {
        let c = &mut p.children.last_mut().unwrap().1;
        wait_file(&d.join("old/coordinator.addr"), c);
    }
    p.start_agent(0, &["--coordinator", &old_addr]);
    expect(&p.run(0, &["volume", "create", "v"]), 0);
    let m0 = d.join("m0");
    expect(&p.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
    let weights = voltool_tests::bytes(5, 3 << 20);
    std::fs::write(m0.join("weights.bin"), &weights).unwrap();
    std::os::unix::fs::symlink("weights.bin", m0.join("latest")).unwrap();
    expect(&p.run(0, &["commit"]), 0);
    std::fs::write(m0.join("b.txt"), "second").unwrap();
    expect(&p.run(0, &["commit"]), 0);
    // The old coordinator stops (as its service manager stops it), the agent too.
    for name in ["agent-0", "old"] {
        let c = &mut p.children.iter_mut().find(|(n, _)| n == name).unwrap().1;
        let st = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        c.wait().unwrap();
    }
    let s3_args = |c: &mut std::process::Command| {
        c.env("AWS_ACCESS_KEY_ID", origin.access_key_id.clone().unwrap())
            .env(
                "AWS_SECRET_ACCESS_KEY",
                origin.secret_access_key.clone().unwrap(),
            )
            .args(["--meta", &etcd.meta_url("fleet"), "--etcd-open"])
            .args(["--origin", &format!("s3://{}/migrated", origin.bucket)])
            .args(["--s3-endpoint", origin.endpoint.as_deref().unwrap()])
            .args(["--s3-region", origin.region.as_deref().unwrap()]);
    };
    let mut migrate = voltool();
    migrate
        .args(["migrate", "--json", "--data"])
        .arg(d.join("old"));
    s3_args(&mut migrate);
    let o = migrate.output().unwrap();
    expect(&o, 0);
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(report["volumes"], 1, "{report}");
    assert_eq!(report["versions"], 3, "{report}");
    assert_eq!(report["links"], 1, "{report}");
    assert_eq!(report["fleet_key"], old_id.to_string(), "{report}");
    assert!(
        report["copied_bytes"].as_u64().unwrap() >= 3 << 20,
        "{report}"
    );
    // Run again, it refuses: the prefix holds a fleet's state now.
    let mut again = voltool();
    again.args(["migrate", "--data"]).arg(d.join("old"));
    s3_args(&mut again);
    let o = again.output().unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("holds a fleet's state already"),
        "{}",
        stderr(&o)
    );
    // A coordinator on etcd, the old node key its fleet key.
    let c1_addr = format!(
        "{}@127.0.0.1:{}",
        voltool_tests::seed_key(&d.join("c1"), 0xC1),
        free_port()
    );
    let mut c1 = voltool();
    c1.args(["coordinator", "--open", "--data"])
        .arg(d.join("c1"))
        .args(["--listen", c1_addr.split('@').nth(1).unwrap()])
        .arg("--fleet-key")
        .arg(d.join("old/node.key"))
        .args(["--lease-ttl", "2s"])
        .stdout(Stdio::null())
        .stderr(p.log("c1"));
    s3_args(&mut c1);
    let mut child = c1.spawn().unwrap();
    wait_file(&d.join("c1/coordinator.addr"), &mut child);
    p.children.push(("c1".into(), child));
    let agent_args = [
        "--coordinator",
        &c1_addr,
        "--fleet-key",
        &old_id.to_string(),
    ];
    p.start_agent(0, &agent_args);
    std::fs::write(m0.join("c.txt"), "after the move").unwrap();
    let o = p.run(0, &["commit", "--json"]);
    expect(&o, 0);
    let c: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(c["version"], 3, "{c}");
    p.start_agent(1, &agent_args);
    let m1 = d.join("m1");
    expect(&p.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
    assert_eq!(std::fs::read(m1.join("weights.bin")).unwrap(), weights);
    assert_eq!(std::fs::read(m1.join("latest")).unwrap(), weights);
    assert_eq!(std::fs::read_to_string(m1.join("b.txt")).unwrap(), "second");
    assert_eq!(
        std::fs::read_to_string(m1.join("c.txt")).unwrap(),
        "after the move"
    );
}
