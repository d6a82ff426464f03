//! Blobs a collection condemned, where coordinators share the fleet's records (etcd).
//!
//! A collection condemns blobs (forgets their records and marks them, fenced) before it
//! deletes their objects, and clears the marks after. A leader that lost its lease in
//! between leaves marks behind, and perhaps a DELETE still on its way to the bucket. So the
//! next leader writes no object of a blob marked by another lead (an upload of it, a page
//! of the same bytes) until that lead's lease has surely ended (its own lead's start plus
//! one lease: the old leader stops deleting a margin before its own deadline, and was
//! never elected past etcd's); then it clears the mark and writes. It also finishes what
//! the old lead left: the objects of blobs still marked go, then their marks. A mark of its
//! own lead is safe to clear whenever no collection of its own runs (the write lock held).
//!
//! The marks are read once, when the lead begins, and kept in memory: only the leader
//! writes them.

use std::collections::HashMap;

use super::volumes::{internal, meta_fail};
use super::*;

/// The marks this leader knows of: blob, and the revision of the lead that condemned it.
pub(super) type Marks = std::sync::Mutex<HashMap<Hash, i64>>;

impl State {
    /// The revision of this coordinator's lead (0 where the records are not shared).
    pub(super) fn lead_revision(&self) -> i64 {
        self.lease.as_ref().map_or(0, |(_, rev)| *rev)
    }

    /// Whether the lead holds long enough for a collection to delete another chunk.
    pub(super) fn lead_holds(&self) -> bool {
        self.lease
            .as_ref()
            .is_none_or(|(l, _)| l.holds_for(l.ttl / 3))
    }

    /// When a mark of another lead may be cleared and its blob written again.
    fn others_safe_at(&self) -> Option<tokio::time::Instant> {
        self.lease.as_ref().map(|(l, _)| l.since + l.ttl)
    }

    /// Which of `hashes` are marked condemned.
    pub(super) fn marked(&self, hashes: &[Hash]) -> Vec<Hash> {
        let marks = self.marks.lock().expect("not poisoned");
        if marks.is_empty() {
            return Vec::new();
        }
        hashes
            .iter()
            .filter(|h| marks.contains_key(h))
            .copied()
            .collect()
    }

    /// Before objects of `hashes` are written: waits until each one marked by another
    /// lead is safe to write, and clears the marks. The caller holds the write lock (no
    /// collection of this lead runs). Blocking.
    pub(super) fn unmark_for_write(&self, hashes: &[Hash]) -> Result<(), Fail> {
        let marked = self.marked(hashes);
        if marked.is_empty() {
            return Ok(());
        }
        let mine = self.lead_revision();
        let others = {
            let marks = self.marks.lock().expect("not poisoned");
            marked.iter().any(|h| marks.get(h) != Some(&mine))
        };
        if others && let Some(at) = self.others_safe_at() {
            let wait = at.saturating_duration_since(tokio::time::Instant::now());
            if !wait.is_zero() {
                info!(
                    blobs = marked.len(),
                    wait_ms = wait.as_millis() as u64,
                    "writing blobs a previous lead condemned: waiting until its lease surely ended"
                );
                std::thread::sleep(wait);
            }
        }
        if let Some(r) = self.meta.blob_records() {
            r.clear_condemned(&marked).map_err(meta_fail)?;
        }
        let mut marks = self.marks.lock().expect("not poisoned");
        for h in &marked {
            marks.remove(h);
        }
        Ok(())
    }

    /// Condemns `chunk` before a collection deletes its objects (fenced), and notes it.
    pub(super) fn condemn(&self, chunk: &[Hash]) -> Result<(), Fail> {
        let Some(r) = self.meta.blob_records() else {
            return Ok(());
        };
        r.condemn_blobs(chunk).map_err(meta_fail)?;
        let rev = self.lead_revision();
        self.marks
            .lock()
            .expect("not poisoned")
            .extend(chunk.iter().map(|h| (*h, rev)));
        Ok(())
    }

    /// After a collection deleted `chunk`'s objects: clears their marks.
    pub(super) fn deleted(&self, chunk: &[Hash]) -> Result<(), Fail> {
        let Some(r) = self.meta.blob_records() else {
            return Ok(());
        };
        r.clear_condemned(chunk).map_err(meta_fail)?;
        let mut marks = self.marks.lock().expect("not poisoned");
        for h in chunk {
            marks.remove(h);
        }
        Ok(())
    }

    /// Finishes what previous leads' collections left: once their leases surely ended,
    /// deletes the objects of blobs they marked (nothing records them any more) and clears
    /// the marks. Returns how many. The caller holds the write lock. Blocking.
    pub(super) fn finish_condemned(&self) -> Result<usize, Fail> {
        let mine = self.lead_revision();
        let left: Vec<Hash> = self
            .marks
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, by)| **by != mine)
            .map(|(h, _)| *h)
            .collect();
        if left.is_empty()
            || self
                .others_safe_at()
                .is_some_and(|at| tokio::time::Instant::now() < at)
        {
            return Ok(0);
        }
        for chunk in left.chunks(4096) {
            self.delete_condemned(chunk)?;
        }
        Ok(left.len())
    }

    /// Deletes the objects of condemned blobs and clears their marks, if the lead holds
    /// long enough (a collection stops a margin before its lease's end).
    pub(super) fn delete_condemned(&self, chunk: &[Hash]) -> Result<(), Fail> {
        if !self.lead_holds() {
            return Err(fail(
                ErrorKind::Internal,
                "collection stopped: the lead's lease is near its end",
            ));
        }
        self.origin.remove_many(chunk).map_err(internal)?;
        self.deleted(chunk)
    }
}
