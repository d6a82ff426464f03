//! Progress and data events of one operation.

use super::*;
use crate::blobs::OnBytes;

/// Progress and data sink of one operation.
#[derive(Clone, Debug)]
pub struct Events {
    pub(super) tx: Option<mpsc::Sender<Event>>,
}

impl Events {
    /// Events that go nowhere.
    pub fn none() -> Self {
        Events { tx: None }
    }

    pub(super) fn progress(&self, phase: &str, done: u64, total: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Event::Progress {
                phase: phase.to_string(),
                done,
                total,
            });
        }
    }

    pub(super) async fn data(&self, bytes: Vec<u8>) -> OpResult<()> {
        match &self.tx {
            Some(tx) => tx
                .send(Event::Data(bytes))
                .await
                .map_err(|_| failed("client went away")),
            None => Ok(()),
        }
    }

    /// One entry of an export.
    pub(super) async fn item(&self, e: LsEntry) -> OpResult<()> {
        match &self.tx {
            Some(tx) => tx
                .send(Event::Item(e))
                .await
                .map_err(|_| failed("client went away")),
            None => Ok(()),
        }
    }

    /// Sends a long listing a part at a time, all but the last part as events; returns
    /// what the final answer holds. Without a client (in-process callers) the whole
    /// listing is the answer.
    pub(super) async fn listing(&self, mut entries: Vec<LsEntry>) -> OpResult<Vec<LsEntry>> {
        let Some(tx) = &self.tx else {
            return Ok(entries);
        };
        let parts = entries.len().saturating_sub(1) / control::LS_PART;
        let last = entries.split_off(parts * control::LS_PART);
        let mut it = entries.into_iter();
        for _ in 0..parts {
            let part: Vec<LsEntry> = it.by_ref().take(control::LS_PART).collect();
            tx.send(Event::Entries(part))
                .await
                .map_err(|_| failed("client went away"))?;
        }
        Ok(last)
    }

    /// A counter of a phase of known total: what adds to what is done.
    pub(super) fn counter(&self, phase: &'static str, total: u64) -> OnBytes {
        let (grow, done) = self.growing_counter(phase);
        grow(total);
        done
    }

    /// A counter of a phase whose total grows as its work is found (a change set read a
    /// part at a time): returns what adds to the total, and what adds to what is done.
    pub(super) fn growing_counter(&self, phase: &'static str) -> (OnBytes, OnBytes) {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        self.progress(phase, 0, 0);
        let (ev, c) = (self.clone(), counts.clone());
        let grow: OnBytes = Arc::new(move |n| {
            let total = c.1.fetch_add(n, Relaxed) + n;
            ev.progress(phase, c.0.load(Relaxed), total);
        });
        let ev = self.clone();
        let done: OnBytes = Arc::new(move |n| {
            let done = counts.0.fetch_add(n, Relaxed) + n;
            ev.progress(phase, done, counts.1.load(Relaxed));
        });
        (grow, done)
    }
}
