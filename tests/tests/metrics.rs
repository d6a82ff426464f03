//! Prometheus metrics of agents and the coordinator, scraped over HTTP.

use voltool_agent::control::ReloadMode;
use voltool_tests::metrics::{scrape, value};
use voltool_tests::{TestFleet, bytes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_the_coordinator_count_bytes_commits_reloads_and_lookups() {
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let a = f.mount(0, "vol").await;
    f.mount(1, "vol").await;
    let size = 3 << 20;
    std::fs::write(a.join("model.bin"), bytes(7, size)).unwrap();
    f.commit(0, "vol").await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();

    let coord = f.coord.as_ref().unwrap().metrics_addr().unwrap();
    let (status, body) = scrape(coord, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(value(&body, "voltool_commits_total"), 1.0);
    assert_eq!(value(&body, "voltool_commit_duration_seconds_count"), 1.0);
    assert!(value(&body, "voltool_tracker_lookups_total") >= 1.0);
    assert!(value(&body, "voltool_tracker_entries") >= 1.0);
    assert!(value(&body, "voltool_store_bytes") >= size as f64);
    assert!(value(&body, "voltool_store_blobs") >= 1.0);
    assert_eq!(value(&body, "voltool_gc_freed_bytes_total"), 0.0);

    // The writer committed; the reader received the file from the origin or the writer.
    let writer = f.agents[0].metrics_addr().unwrap();
    let (_, body) = scrape(writer, "/metrics").await;
    assert_eq!(value(&body, "voltool_commits_total"), 1.0);
    assert!(value(&body, "voltool_store_bytes") >= size as f64);
    let reader = f.agents[1].metrics_addr().unwrap();
    let (_, body) = scrape(reader, "/metrics").await;
    assert_eq!(value(&body, "voltool_reloads_total"), 1.0);
    assert_eq!(value(&body, "voltool_reload_duration_seconds_count"), 1.0);
    let received = value(&body, "voltool_bytes_in_total{source=\"origin\"}")
        + body
            .lines()
            .find_map(|l| l.strip_prefix("voltool_bytes_in_total{source=\"peer\"} "))
            .map_or(0.0, |v| v.parse().unwrap());
    assert!(received >= size as f64, "{body}");
    assert_eq!(value(&body, "voltool_bans_total"), 0.0);
    assert!(value(&body, "voltool_active_peers") >= 1.0);
    // What left the origin and the writer adds up to at least what the reader received.
    let (_, c) = scrape(coord, "/metrics").await;
    let (_, w) = scrape(writer, "/metrics").await;
    let out = value(&c, "voltool_bytes_out_total") + value(&w, "voltool_bytes_out_total");
    assert!(out >= size as f64, "{out}");

    // Anything but GET /metrics is not found.
    let (status, _) = scrape(coord, "/").await;
    assert!(status.contains("404"), "{status}");
}
