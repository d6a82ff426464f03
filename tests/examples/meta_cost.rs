//! What keeping the fleet's state in etcd costs a commit: the same commits through a
//! coordinator on redb and through one on a three-member etcd cluster (on the same disk),
//! both with their origin in the same Garage bucket (under prefixes of their own), in the
//! same run. Prints one JSON object.
//!
//! `cargo run --release -p voltool-tests --example meta_cost -- [FILES] [RUNS]` (defaults
//! 10,000 files and 9 one-file commits); needs Garage and etcd (scripts/garage.sh,
//! scripts/etcd.sh).

use std::time::{Duration, Instant};

use voltool_coordinator::MetaOptions;
use voltool_tests::TestFleet;
use voltool_tests::etcd::EtcdCluster;
use voltool_tests::garage::Garage;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One-file commits (the median of `runs`), then a commit of `files` new files of 4 KiB;
/// seconds.
async fn commits(f: &TestFleet, files: usize, runs: usize) -> (f64, f64) {
    f.create("v").await;
    let m = f.mount(0, "v").await;
    let mut one = Vec::new();
    for r in 0..runs {
        std::fs::write(m.join(format!("one-{r}.txt")), format!("change {r}")).unwrap();
        let t = Instant::now();
        f.commit(0, "v").await.unwrap();
        one.push(t.elapsed().as_secs_f64());
    }
    for d in 0..files.div_ceil(1000) {
        let dir = m.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in d * 1000..((d + 1) * 1000).min(files) {
            // Every file's bytes its own: each is a blob to upload and record.
            let mut b = voltool_tests::bytes(i as u8, 4096);
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            std::fs::write(dir.join(format!("f{i}")), b).unwrap();
        }
    }
    let t = Instant::now();
    f.commit(0, "v").await.unwrap();
    (median(one), t.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let files: usize = args.next().map_or(10_000, |a| a.parse().expect("FILES"));
    let runs: usize = args.next().map_or(9, |a| a.parse().expect("RUNS"));
    let garage = Garage::start();
    let redb = {
        let f = TestFleet::start_on(1, Default::default(), Some(garage.origin("redb"))).await;
        commits(&f, files, runs).await
    };
    let etcd = EtcdCluster::start(3);
    let etcd_figures = {
        let meta = MetaOptions::Etcd {
            url: etcd.meta_url("fleet").parse().unwrap(),
            tls: None,
            lease_ttl: Duration::from_secs(5),
        };
        let f = TestFleet::start_ha(
            1,
            garage.origin("etcd"),
            meta,
            0,
            Default::default(),
            Default::default(),
        )
        .await;
        commits(&f, files, runs).await
    };
    println!(
        "{}",
        serde_json::json!({
            "files": files,
            "one_file_commit_s": {"redb": redb.0, "etcd": etcd_figures.0, "ratio": etcd_figures.0 / redb.0},
            "many_files_commit_s": {"redb": redb.1, "etcd": etcd_figures.1, "ratio": etcd_figures.1 / redb.1},
        })
    );
}
