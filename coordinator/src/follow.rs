//! Pushing new heads to followers ([`CoordRequest::WatchHeads`]): a follower keeps one
//! stream open for the volumes it follows and hears of each new head as soon as it is
//! signed, so its download starts at the commit, not at its next reload.

use std::collections::HashMap;

use iroh::endpoint::SendStream;
use voltool_agent::net::{self, NetError};
use voltool_protocol::coord::{CoordResponse, ErrorKind, MAX_WATCHED};
use voltool_protocol::{SignedHead, VolumeId};

use super::volumes::meta_fail;
use super::{Fail, State, fail};

/// Counts the heads signed since the start: every watch wakes at each and sends what moved.
#[derive(Debug)]
pub(super) struct HeadsMoved(tokio::sync::watch::Sender<u64>);

impl Default for HeadsMoved {
    fn default() -> Self {
        HeadsMoved(tokio::sync::watch::Sender::new(0))
    }
}

impl HeadsMoved {
    /// A head was signed (a commit, a new volume).
    pub(super) fn moved(&self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// Answers [`CoordRequest::WatchHeads`](voltool_protocol::coord::CoordRequest::WatchHeads):
/// the heads of `volumes` that exist now, then each head that moved, until the watcher
/// goes or the coordinator stops.
pub(super) async fn watch(
    send: &mut SendStream,
    state: &std::sync::Arc<State>,
    volumes: Vec<VolumeId>,
) -> Result<(), NetError> {
    if volumes.len() > MAX_WATCHED {
        let refused: CoordResponse = fail(
            ErrorKind::Invalid,
            format!("at most {MAX_WATCHED} volumes on one watch"),
        )
        .into();
        return net::write_frame(send, &refused).await;
    }
    let mut moved = state.heads_moved.0.subscribe();
    let mut sent: HashMap<VolumeId, u64> = HashMap::new();
    loop {
        moved.mark_unchanged();
        let (st, ids) = (state.clone(), volumes.clone());
        let heads = tokio::task::spawn_blocking(move || heads_of(&st, &ids))
            .await
            .map_err(|e| NetError::Stream(e.to_string()))?;
        let fresh: Vec<SignedHead> = match heads {
            Ok(h) => h
                .into_iter()
                .filter(|h| sent.get(&h.commit.volume) != Some(&h.commit.version))
                .collect(),
            Err(f) => return net::write_frame(send, &CoordResponse::from(f)).await,
        };
        // The first answer goes out even when empty: the follower then knows it is heard.
        if !fresh.is_empty() || sent.is_empty() {
            for h in &fresh {
                sent.insert(h.commit.volume, h.commit.version);
            }
            net::write_frame(send, &CoordResponse::Heads(fresh)).await?;
        }
        tokio::select! {
            r = moved.changed() => if r.is_err() { return Ok(()) },
            _ = send.stopped() => return Ok(()),
        }
    }
}

/// The heads of those of `ids` that exist (a deleted volume has none).
fn heads_of(state: &State, ids: &[VolumeId]) -> Result<Vec<SignedHead>, Fail> {
    let mut out = Vec::new();
    for id in ids {
        if let Some(h) = state.meta.head(*id).map_err(meta_fail)? {
            out.push(h);
        }
    }
    Ok(out)
}
