//! What the coordinator's symlink check costs: commits on a volume of N symbolic links
//! beside the same commits on a volume of N empty files (the reference, in the same run).
//! Prints one JSON object.
//!
//! `cargo run --release -p voltool-tests --example links_cost -- [N]` (default 100,000).

use std::path::Path;
use std::time::Instant;

use voltool_agent::control::{Reply, Request};
use voltool_tests::TestFleet;

/// Puts the local tree `dir` at the root of `vol`; seconds taken.
async fn put(f: &TestFleet, vol: &str, dir: &Path) -> f64 {
    let t = Instant::now();
    let r = f.put(0, vol, dir, "/", true).await;
    assert!(matches!(r, Ok(Reply::Done(_))), "{r:?}");
    t.elapsed().as_secs_f64()
}

/// A tree of `n` entries under `top/` (links to `t/f<k>` when `links`, else empty files),
/// and the 100 files `t/f<k>` they lead to.
fn tree(root: &Path, n: usize, links: bool) {
    std::fs::create_dir_all(root.join("t")).unwrap();
    for k in 0..100 {
        std::fs::write(root.join(format!("t/f{k}")), format!("{k}")).unwrap();
    }
    for d in 0..n.div_ceil(1000) {
        let dir = root.join(format!("top/d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in d * 1000..((d + 1) * 1000).min(n) {
            let p = dir.join(format!("e{i}"));
            if links {
                std::os::unix::fs::symlink(format!("../../t/f{}", i % 100), p).unwrap();
            } else {
                std::fs::write(p, b"").unwrap();
            }
        }
    }
}

/// A one-entry tree for a commit of one change.
fn one(root: &Path, name: &str, link: bool) {
    std::fs::create_dir_all(root.join("top")).unwrap();
    let p = root.join("top").join(name);
    if link {
        std::os::unix::fs::symlink("../t/f1", p).unwrap();
    } else {
        std::fs::write(p, b"").unwrap();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N, a number"))
        .unwrap_or(100_000);
    let f = TestFleet::start(1).await;
    let mut figures = serde_json::Map::new();
    let mut secs = std::collections::HashMap::new();
    figures.insert("entries".into(), n.into());
    for (vol, links) in [("files", false), ("links", true)] {
        f.req(
            0,
            Request::VolumeCreate {
                name: vol.into(),
                allow_existing: false,
            },
        )
        .await
        .unwrap();
        let src = f.dir.path().join(format!("src-{vol}"));
        tree(&src, n, links);
        secs.insert(format!("{vol}_first_commit_s"), put(&f, vol, &src).await);
        let add = f.dir.path().join(format!("add-{vol}"));
        one(&add, "new", links);
        secs.insert(format!("{vol}_one_more_s"), put(&f, vol, &add).await);
        // Replacing what every entry leads to: every link is checked again.
        let t = f.dir.path().join(format!("retarget-{vol}"));
        std::fs::create_dir_all(t.join("t")).unwrap();
        for k in 0..100 {
            std::fs::write(t.join(format!("t/f{k}")), format!("new {k}")).unwrap();
        }
        secs.insert(format!("{vol}_change_targets_s"), put(&f, vol, &t).await);
    }
    for what in ["first_commit", "one_more", "change_targets"] {
        let (l, r) = (
            secs[&format!("links_{what}_s")],
            secs[&format!("files_{what}_s")],
        );
        figures.insert(format!("links_{what}_s"), l.into());
        figures.insert(format!("files_{what}_s"), r.into());
        figures.insert(format!("{what}_links_vs_files"), (l / r).into());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    figures.insert("loadavg".into(), load.trim().into());
    println!("{}", serde_json::Value::Object(figures));
}
