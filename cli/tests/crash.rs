//! kill -9 of an agent in the middle of a reload, then restart: the partial blob resumes,
//! from a peer. kill -9 of the coordinator: the agents' next requests go through once it
//! is back.

mod util;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use util::{Fleet, expect, stderr, stdout};

const SIZE: usize = 48 * 1024 * 1024;

#[test]
fn kill_9_mid_reload_keeps_old_snapshot_and_resumes_verified_ranges() {
    // Agent 1 downloads at 12 MiB/s, so a reload of 48 MiB takes about 4 s.
    let mut f = Fleet::start(1);
    f.start_agent(1, &["--max-ingress", "12MiB/s"]);
    let tmp = f.dir.path().to_path_buf();
    expect(&f.run(0, &["volume", "create", "big"]), 0);
    let m0 = tmp.join("m0");
    let m1 = tmp.join("m1");
    expect(&f.run(0, &["mount", "big", m0.to_str().unwrap()]), 0);
    std::fs::write(m0.join("before.txt"), b"version 1").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    expect(&f.run(1, &["mount", "big", m1.to_str().unwrap()]), 0);
    let old_target = voltool_tests::shown(&m1);

    let mut data = vec![0u8; SIZE];
    blake3::Hasher::new_keyed(&[5; 32])
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(m0.join("weights.bin"), &data).unwrap();
    expect(&f.run(0, &["commit"]), 0);
    let hash = blake3::hash(&data).to_hex().to_string();
    let partial = voltool_agent::store::Store::blob_path_in(
        &f.agent_dir(1).join("store"),
        &hash.parse().unwrap(),
    );

    // Start the reload, wait until a good part of the blob is on disk, then SIGKILL.
    // Its output is of no interest: it dies with the agent.
    let mut reload = f
        .cmd(1, &["reload", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let written = std::fs::metadata(&partial)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        // Verified ranges are recorded at least every second: by two thirds (about 2.7 s
        // at this rate) some are.
        if written >= (SIZE * 2 / 3) as u64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the reload never got going"
        );
        assert!(
            reload.try_wait().unwrap().is_none(),
            "reload ended too early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    f.kill9_agent(1);
    let _ = reload.wait();

    // The mount still shows the whole old snapshot.
    assert_eq!(voltool_tests::shown(&m1), old_target);
    assert_eq!(std::fs::read(m1.join("before.txt")).unwrap(), b"version 1");
    assert!(!m1.join("weights.bin").exists());

    // Restart (no rate limit) and reload: verified ranges are not fetched again.
    f.start_agent(1, &[]);
    assert_eq!(voltool_tests::shown(&m1), old_target);
    let o = f.run(1, &["reload", "--json"]);
    expect(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let fetched = r["sources"]["origin_bytes"].as_u64().unwrap()
        + r["sources"]["peer_bytes"].as_u64().unwrap();
    let local = r["sources"]["local_bytes"].as_u64().unwrap();
    assert!(local > 0, "nothing resumed: {r}");
    // The writer holds the blob complete: the rest comes from it as a peer.
    assert!(r["sources"]["peer_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(fetched < SIZE as u64, "re-downloaded everything: {r}");
    assert_eq!(fetched + local, SIZE as u64, "{r}\n{}", stderr(&o));
    assert_eq!(std::fs::read(m1.join("weights.bin")).unwrap(), data);
}

/// Files of a small tree: a few small ones in a directory and one of several chunk groups.
fn write_tree(root: &std::path::Path, seed: u8) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for k in 0..40u8 {
        let mut b = vec![0u8; 3000 + k as usize * 10];
        blake3::Hasher::new_keyed(&[seed ^ k; 32])
            .finalize_xof()
            .fill(&mut b);
        files.push((format!("d/f{k}"), b));
    }
    let mut big = vec![0u8; 3 << 20];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut big);
    files.push(("big.bin".to_string(), big));
    std::fs::create_dir_all(root.join("d")).unwrap();
    for (p, b) in &files {
        std::fs::write(root.join(p), b).unwrap();
    }
    files
}

fn holds(root: &std::path::Path, files: &[(String, Vec<u8>)]) -> bool {
    files
        .iter()
        .all(|(p, b)| std::fs::read(root.join(p)).is_ok_and(|got| got == *b))
}

/// Opens a stopped agent's store and checks that every blob it records as complete holds
/// exactly the bytes of its hash.
fn store_claims_only_what_it_holds(f: &Fleet, i: usize) {
    let store = voltool_agent::store::Store::open(&f.agent_dir(i).join("store")).unwrap();
    for h in store.complete_blobs().unwrap() {
        let bytes = store.read_all(&h).unwrap();
        assert_eq!(voltool_protocol::Hash::of(&bytes), h, "store of agent {i}");
    }
}

#[test]
fn kill_9_at_every_point_of_a_batched_commit_loses_nothing() {
    for point in [
        "commit-sealing",
        "commit-stored",
        "commit-uploaded",
        "commit-sent",
    ] {
        let mut f = Fleet::start(0);
        f.start_agent(0, &["--crash-at", point]);
        f.start_agent(1, &[]);
        let status: serde_json::Value =
            serde_json::from_str(&stdout(&f.run(0, &["status", "--json"]))).unwrap();
        if point == "commit-sealing" && status["snapshots"] != "overlay" {
            continue; // only overlay snapshots are sealed
        }
        let tmp = f.dir.path().to_path_buf();
        let (m0, m1) = (tmp.join("m0"), tmp.join("m1"));
        expect(&f.run(0, &["volume", "create", "v"]), 0);
        expect(&f.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
        expect(&f.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
        let files = write_tree(&m0, 1);
        let o = f.run(0, &["commit"]);
        assert_ne!(
            o.status.code(),
            Some(0),
            "{point}: the agent should have died"
        );
        f.kill9_agent(0);
        store_claims_only_what_it_holds(&f, 0);

        // After a restart the mount shows everything that was written, and the commit can
        // be made (again, or found already made).
        f.start_agent(0, &[]);
        assert!(holds(&m0, &files), "{point}: the mount lost files");
        expect(&f.run(0, &["commit"]), 0);
        expect(&f.run(1, &["reload"]), 0);
        assert!(
            holds(&m1, &files),
            "{point}: the other agent did not get them"
        );
        f.kill9_agent(0);
        store_claims_only_what_it_holds(&f, 0);
    }
}

#[test]
fn kill_9_at_every_point_of_a_batched_reload_keeps_one_whole_snapshot() {
    for point in ["reload-fetched", "reload-built", "reload-recorded"] {
        let mut f = Fleet::start(1);
        f.start_agent(1, &["--crash-at", point]);
        let tmp = f.dir.path().to_path_buf();
        let (m0, m1) = (tmp.join("m0"), tmp.join("m1"));
        expect(&f.run(0, &["volume", "create", "v"]), 0);
        expect(&f.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
        let old = write_tree(&m0, 1);
        expect(&f.run(0, &["commit"]), 0);
        expect(&f.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
        let new = write_tree(&m0, 2);
        expect(&f.run(0, &["commit"]), 0);
        let o = f.run(1, &["reload"]);
        assert_ne!(
            o.status.code(),
            Some(0),
            "{point}: the agent should have died"
        );
        f.kill9_agent(1);
        // One whole snapshot, old or new, never a mix.
        assert!(
            holds(&m1, &old) || holds(&m1, &new),
            "{point}: the mount shows neither snapshot whole"
        );
        store_claims_only_what_it_holds(&f, 1);
        f.start_agent(1, &[]);
        assert!(
            holds(&m1, &old) || holds(&m1, &new),
            "{point}: after restart"
        );
        expect(&f.run(1, &["reload"]), 0);
        assert!(holds(&m1, &new), "{point}: the retried reload");
        f.kill9_agent(1);
        store_claims_only_what_it_holds(&f, 1);
    }
}

/// The coordinator killed with SIGKILL and started again on its port: the agent's
/// connection to the old process dies silently, and its next requests still go through
/// (a read is sent again on a fresh connection once the dead one idles out).
#[test]
fn kill_9_of_the_coordinator_then_the_agents_next_requests_go_through() {
    let mut f = Fleet::start(1);
    let m = f.dir.path().join("m");
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    expect(&f.run(0, &["mount", "v", m.to_str().unwrap()]), 0);
    std::fs::write(m.join("one"), b"1").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    f.kill9_coordinator_and_restart();
    let o = f.run(0, &["volume", "ls", "v"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("one"), "{}", stdout(&o));
    std::fs::write(m.join("two"), b"2").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    let o = f.run(0, &["volume", "ls", "v"]);
    assert!(stdout(&o).contains("two"), "{}", stdout(&o));
    // Requests that must not go twice (a commit, a volume created) are not sent on the
    // dead connection: its liveness is checked first.
    f.kill9_coordinator_and_restart();
    std::fs::write(m.join("three"), b"3").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    f.kill9_coordinator_and_restart();
    expect(&f.run(0, &["volume", "create", "w"]), 0);
    let o = f.run(0, &["volume", "list"]);
    assert!(stdout(&o).contains('w'), "{}", stdout(&o));
}

/// How many times `text` is in node `name`'s log, once it is there at least `n` times.
fn wait_log_count(f: &Fleet, name: &str, text: &str, n: usize) {
    util::wait_log_count_in(f.dir.path(), name, text, n);
}

#[test]
fn after_a_kill_9_of_the_coordinator_the_tracker_rebuilds_and_peers_serve_a_new_reader() {
    const BIG: usize = 32 << 20;
    let mut f = Fleet::start(3);
    let tmp = f.dir.path().to_path_buf();
    let (m0, m1, m2) = (tmp.join("m0"), tmp.join("m1"), tmp.join("m2"));
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    expect(&f.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
    let data = voltool_tests::bytes(9, BIG);
    std::fs::write(m0.join("weights.bin"), &data).unwrap();
    expect(&f.run(0, &["commit"]), 0);
    expect(&f.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
    // Agents 0 and 1 hold the blob whole. The coordinator dies without a word and comes
    // back with an empty tracker: each agent learns so from its next heartbeat (on its
    // new connection) and announces what it holds again.
    let announced = "announcing what this node holds to the tracker";
    for a in ["agent-0", "agent-1"] {
        wait_log_count(&f, a, announced, 1);
    }
    f.kill9_coordinator_and_restart();
    for a in ["agent-0", "agent-1"] {
        wait_log_count(&f, a, announced, 2);
    }
    let o = f.run(2, &["mount", "v", m2.to_str().unwrap()]);
    expect(&o, 0);
    let out = stdout(&o);
    let from_origin = util::origin_bytes(&out);
    assert!(
        from_origin < (BIG / 2) as u64,
        "the new reader took {from_origin} of {BIG} bytes from the origin: its peers were not found"
    );
    assert_eq!(std::fs::read(m2.join("weights.bin")).unwrap(), data);
}
