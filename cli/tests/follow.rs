//! Following a volume with real processes: kill -9 of a follower mid-download resumes from
//! what it verified; kill -9 of the coordinator, and followers catch up when it is back;
//! `voltool follow`, `prefetch`, `mount --follow` and `status` as a user types them.

mod util;

use std::time::{Duration, Instant};

use util::{Fleet, expect, stdout};

const SIZE: usize = 48 * 1024 * 1024;

/// Agent `i`'s status of followed volume `name`, once `cond` holds of it (bounded).
fn until_follow(
    f: &Fleet,
    i: usize,
    name: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let o = f.run(i, &["status", "--json"]);
        expect(&o, 0);
        let s: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        if let Some(x) = s["follows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["volume"] == name)
            && cond(x)
        {
            return x.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{what}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn data(seed: u8) -> Vec<u8> {
    let mut d = vec![0u8; SIZE];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut d);
    d
}

#[test]
fn kill_9_mid_follow_resumes_from_what_was_verified() {
    let mut f = Fleet::start(1);
    let tmp = f.dir.path().to_path_buf();
    expect(&f.run(0, &["volume", "create", "big"]), 0);
    // Agent 1 follows from its start (its config), downloading at 12 MiB/s.
    f.start_agent(1, &["--max-ingress", "12MiB/s", "--follow", "big"]);
    until_follow(&f, 1, "big", "followed from the start", |_| true);
    let m0 = tmp.join("m0");
    expect(&f.run(0, &["mount", "big", m0.to_str().unwrap()]), 0);
    let d = data(7);
    std::fs::write(m0.join("weights.bin"), &d).unwrap();
    expect(&f.run(0, &["commit"]), 0);
    let blob = blake3::hash(&d).to_hex().to_string();
    let start = Instant::now();
    // Killed once three fifths of the blob are recorded durable (the agent says so in its
    // log): what remains is fetched after the restart, what was recorded is not.
    let recorded = |log: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains("verified ranges recorded") && l.contains(&blob))
            .filter_map(|l| l.split("recorded=").nth(1)?.split(' ').next()?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    while recorded(&f.log("agent-1")) < (SIZE * 3 / 5) as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the follow's download never got going"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    f.kill9_agent(1);

    // Restarted (no rate limit): the follow goes on by itself, from what was verified.
    f.start_agent(1, &[]);
    let s = until_follow(&f, 1, "big", "held after the restart", |x| {
        x["held"].as_u64() == Some(1) && x["bytes_to_go"] == 0
    });
    assert_eq!(s["newest"], 1, "{s}");
    let log = f.log("agent-1");
    let line = log
        .lines()
        .rfind(|l| l.contains("a followed version is here"))
        .expect("the download's end logged");
    let field = |k: &str| -> u64 {
        let v = line
            .split(&format!("{k}="))
            .nth(1)
            .unwrap_or_else(|| panic!("no {k} in {line:?}"));
        v.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let fetched = field("origin_bytes") + field("peer_bytes");
    assert!(
        fetched > 0 && fetched < SIZE as u64 / 2,
        "not resumed: {line}"
    );
    // A mount now fetches nothing.
    let m1 = tmp.join("m1");
    let o = f.run(1, &["mount", "big", m1.to_str().unwrap()]);
    expect(&o, 0);
    assert!(
        stdout(&o).contains("; 0 bytes from the origin"),
        "{}",
        stdout(&o)
    );
    assert_eq!(std::fs::read(m1.join("weights.bin")).unwrap(), d);
}

#[test]
fn followers_catch_up_after_a_kill_9_of_the_coordinator() {
    let mut f = Fleet::start(2);
    let tmp = f.dir.path().to_path_buf();
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    let (m0, m1) = (tmp.join("m0"), tmp.join("m1"));
    expect(&f.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
    let o = f.run(1, &["mount", "v", m1.to_str().unwrap(), "--follow"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("following"), "{}", stdout(&o));
    // A user of the admin socket may make the host follow too; `unfollow` leaves the
    // mount's follow.
    expect(&f.run(1, &["follow", "v"]), 0);
    let o = f.run(1, &["unfollow", "v"]);
    expect(&o, 0);
    assert!(
        stdout(&o).contains("its mount still follows"),
        "{}",
        stdout(&o)
    );
    std::fs::write(m0.join("one"), b"1").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    until_follow(&f, 1, "v", "v1 held", |x| x["held"] == 1);

    f.kill9_coordinator_and_restart();
    std::fs::write(m0.join("two"), b"2").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    until_follow(&f, 1, "v", "v2 held after the coordinator's restart", |x| {
        x["held"] == 2
    });
    let o = f.run(1, &["status"]);
    assert!(stdout(&o).contains("held v2"), "{}", stdout(&o));
    let o = f.run(1, &["reload", "--json"]);
    expect(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["version"], 2, "{r}");
    assert_eq!(r["sources"]["origin_bytes"], 0, "{r}");
    assert_eq!(r["sources"]["peer_bytes"], 0, "{r}");
    assert_eq!(std::fs::read(m1.join("two")).unwrap(), b"2");
    // A preheat of a volume this host holds whole fetches nothing.
    let o = f.run(1, &["prefetch", "v"]);
    expect(&o, 0);
    assert!(
        stdout(&o).contains("0 bytes from peers, 0 from the origin"),
        "{}",
        stdout(&o)
    );
    // An older version, checked link by link from the head.
    let o = f.run(1, &["prefetch", "v", "--version", "1"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("v version 1 is here"), "{}", stdout(&o));
}
