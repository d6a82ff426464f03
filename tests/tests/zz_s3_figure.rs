use std::time::Instant;
use voltool_agent::control::ReloadMode;
use voltool_tests::garage::Garage;
use voltool_tests::{Limits, TestFleet, bytes};

async fn run(s3: Option<voltool_agent::store::S3Options>) -> (f64, f64) {
    let mut f = TestFleet::start_on(2, Limits::default(), s3).await;
    f.create("vol").await;
    let a = f.mount(1, "vol").await;
    std::fs::write(a.join("m.bin"), bytes(5, 256 << 20)).unwrap();
    let t = Instant::now();
    f.commit(1, "vol").await.unwrap();
    let commit = t.elapsed().as_secs_f64();
    f.agents.pop().unwrap().shutdown().await;
    f.mount(0, "vol").await;
    let t = Instant::now();
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    (commit, t.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figure() {
    let g = Garage::start().unwrap();
    for _ in 0..3 {
        let d = run(None).await;
        let s = run(Some(g.origin(&format!("p{}", rand_suffix())))).await;
        eprintln!(
            "FIG dir commit {:.2}s reload {:.2}s | s3 commit {:.2}s reload {:.2}s | reload ratio {:.2}",
            d.0,
            d.1,
            s.0,
            s.1,
            s.1 / d.1
        );
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
