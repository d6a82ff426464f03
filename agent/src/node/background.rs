//! The agent's loops in the background: keeping the store within its
//! budget, staying known to the tracker, and a mount's background commits.

use super::*;

/// The least time between two checks of the store's budget.
const BUDGET_CHECK_GAP: Duration = Duration::from_secs(2);

/// Keeps the store within its budget: after operations (at most every few seconds: a
/// check reads every blob's record), and every minute.
pub(super) async fn budget_loop(inner: Arc<Inner>, cancel: CancellationToken) {
    if inner.opts.store_max.is_none() {
        return;
    }
    loop {
        if let Err(e) = inner.enforce_budget(false).await {
            warn!("evicting from the store failed: {e}");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(BUDGET_CHECK_GAP) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = inner.budget.check.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

pub(super) async fn background_commits(
    inner: Arc<Inner>,
    name: String,
    secs: u64,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(secs.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let done = {
            let _op = inner.budget.ops.read().await;
            inner.commit(&name, &Events::none()).await
        };
        inner.budget.check.notify_one();
        match done {
            Ok(r) if r.changed > 0 => {
                info!(volume = name, version = r.version, "background commit")
            }
            Ok(_) => {}
            Err(e) if matches!(e.code, ErrorCode::NotMounted | ErrorCode::NotFound) => return,
            Err(e) => warn!(volume = name, "background commit failed: {e}"),
        }
    }
}

/// Registers with the tracker at once, with what the agent holds; then stays alive there
/// (what it announced expires without a heartbeat), and announces again whenever the
/// tracker no longer knows it. Each new connection to the coordinator checks the same
/// (`watch_members`).
pub(super) async fn tracked_loop(inner: Arc<Inner>, cancel: CancellationToken) {
    inner.stay_tracked().await;
    let every = inner.peers.serve.serving.config().holder_ttl / 3;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => inner.stay_tracked().await,
        }
    }
}
