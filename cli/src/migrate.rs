//! `voltool migrate`: from one coordinator to several. The state of a stopped coordinator
//! on redb goes into etcd, and its origin's blobs into the fleet's bucket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::daemon::{EtcdArgs, OriginArgs};
use crate::output::{Progress, print_json};

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The data directory of the coordinator whose state moves (stopped: it holds its
    /// database while it runs). It is left as it was; its node.key may serve as the
    /// fleet key (--fleet-key), so agents keep trusting the heads it signed.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    origin: OriginArgs,
    /// Print one JSON object, no progress.
    #[arg(long)]
    json: bool,
}

/// What `migrate` prints.
#[derive(Debug, Serialize)]
struct Report {
    volumes: usize,
    versions: usize,
    links: usize,
    blob_records: usize,
    copied_blobs: usize,
    copied_bytes: u64,
    fleet_key: String,
}

pub(crate) async fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    crate::daemon::init_logs();
    let Some((url, tls)) = a.etcd.etcd()? else {
        anyhow::bail!(
            "migrate needs --meta etcd://HOST:PORT[,…]/PREFIX: where the fleet's state goes"
        );
    };
    let Some(s3) = a.origin.s3() else {
        anyhow::bail!(
            "migrate needs --origin s3://BUCKET/PREFIX: coordinators in failover share their origin in a bucket"
        );
    };
    let fleet_key = voltool_agent::keys::load(&a.data.join("node.key"))
        .with_context(|| format!("the node key of {}", a.data.display()))?
        .public()
        .to_string();
    let data = a.data.clone();
    let progress = std::sync::Mutex::new(Progress::new(a.json));
    let done = tokio::task::block_in_place(|| {
        voltool_coordinator::migrate_to_etcd(&data, &url, tls.as_ref(), &s3, &|done, total| {
            progress
                .lock()
                .expect("not poisoned")
                .update("copy", done, total)
        })
    })
    .context("migrating to etcd")?;
    progress.lock().expect("not poisoned").finish();
    let r = Report {
        volumes: done.imported.volumes,
        versions: done.imported.versions,
        links: done.imported.links,
        blob_records: done.imported.blobs,
        copied_blobs: done.copied_blobs,
        copied_bytes: done.copied_bytes,
        fleet_key,
    };
    if a.json {
        print_json(&r)?;
    } else {
        println!(
            "moved {} volume(s), {} version record(s), {} link(s) and {} blob record(s) into {}",
            r.volumes, r.versions, r.links, r.blob_records, url
        );
        if r.copied_blobs > 0 {
            println!(
                "copied {} blob(s), {} bytes, from the origin's folder into {}",
                r.copied_blobs,
                r.copied_bytes,
                s3.url()
            );
        }
        println!(
            "start every coordinator with --meta {url} --origin {} --fleet-key {}/node.key (a copy of it, mode 0600), and give agents --fleet-key {} and every coordinator's address",
            s3.url(),
            a.data.display(),
            r.fleet_key
        );
    }
    Ok(ExitCode::SUCCESS)
}
