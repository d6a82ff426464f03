//! kill -9 of an agent in the middle of a reload, then restart: the partial blob resumes,
//! from a peer.

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
    let old_target = std::fs::read_link(&m1).unwrap();

    let mut data = vec![0u8; SIZE];
    blake3::Hasher::new_keyed(&[5; 32])
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(m0.join("weights.bin"), &data).unwrap();
    expect(&f.run(0, &["commit"]), 0);
    let hash = blake3::hash(&data).to_hex().to_string();
    let partial = f
        .agent_dir(1)
        .join("store/blobs")
        .join(&hash[..2])
        .join(format!("{hash}.data"));

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
    assert_eq!(std::fs::read_link(&m1).unwrap(), old_target);
    assert_eq!(std::fs::read(m1.join("before.txt")).unwrap(), b"version 1");
    assert!(!m1.join("weights.bin").exists());

    // Restart (no rate limit) and reload: verified ranges are not fetched again.
    f.start_agent(1, &[]);
    assert_eq!(std::fs::read_link(&m1).unwrap(), old_target);
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
