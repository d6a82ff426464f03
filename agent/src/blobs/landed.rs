//! Pieces of large blobs verified on this node while their downloads run, for readers
//! waiting on them (a lazy mount's reads). The store records verified ranges in batches
//! (see [`super::driver::RECORD_INTERVAL`]); here a piece counts as soon as it is
//! verified and written. What the store recorded before plus what landed here is all this
//! node holds of a blob: a reader watches the blob first and reads the store's records
//! second, so that no piece falls between the two.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use voltool_protocol::Hash;
use voltool_protocol::swarm::PieceSet;

/// Pieces verified of blobs being downloaded, and the readers waiting on them.
#[derive(Debug, Default)]
pub struct Landed {
    blobs: Mutex<HashMap<Hash, Blob>>,
    changed: Condvar,
}

#[derive(Debug)]
struct Blob {
    pieces: PieceSet,
    watchers: usize,
    /// The download ended (the blob complete, or failed): the store's records say the
    /// rest.
    ended: bool,
    /// A download of it failed: a waiting reader gives up.
    failed: bool,
}

impl Blob {
    fn new(pieces: u32) -> Self {
        Blob {
            pieces: PieceSet::empty(pieces),
            watchers: 0,
            ended: false,
            failed: false,
        }
    }
}

/// A watch of one blob, ended when dropped.
#[derive(Debug)]
pub struct Watch<'a> {
    landed: &'a Landed,
    hash: Hash,
}

impl Landed {
    /// Begins a watch of `hash`, a blob of `pieces` pieces.
    pub fn watch(&self, hash: Hash, pieces: u32) -> Watch<'_> {
        let mut b = self.blobs.lock().expect("not poisoned");
        b.entry(hash).or_insert_with(|| Blob::new(pieces)).watchers += 1;
        Watch { landed: self, hash }
    }

    /// Piece `unit` of `hash`, a blob of `pieces` pieces, is verified and written.
    pub fn held(&self, hash: Hash, unit: u32, pieces: u32) {
        let mut b = self.blobs.lock().expect("not poisoned");
        let blob = b.entry(hash).or_insert_with(|| Blob::new(pieces));
        blob.ended = false;
        if blob.pieces.insert(unit) && blob.watchers > 0 {
            self.changed.notify_all();
        }
    }

    /// A download of `hash` failed; with `keep` false what it verified was dropped too.
    /// Waiting readers give up now rather than at their deadline.
    pub fn failed(&self, hash: Hash, keep: bool) {
        let mut b = self.blobs.lock().expect("not poisoned");
        if let Some(blob) = b.get_mut(&hash) {
            blob.failed = true;
            if !keep {
                blob.pieces = PieceSet::empty(blob.pieces.len());
            }
            self.changed.notify_all();
        }
    }

    /// A download of `hash` ended, what it verified recorded in the store.
    pub fn ended(&self, hash: Hash) {
        let mut b = self.blobs.lock().expect("not poisoned");
        if let Some(blob) = b.get_mut(&hash) {
            if blob.watchers == 0 {
                b.remove(&hash);
            } else {
                blob.ended = true;
                self.changed.notify_all();
            }
        }
    }
}

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// What was waited for is here.
    Here,
    /// The blob's download ended: the store's records say what is held.
    Ended,
    /// A download of the blob failed.
    Failed,
    /// The deadline passed.
    TimedOut,
}

impl Watch<'_> {
    /// Pieces verified by downloads running now.
    pub fn pieces(&self) -> PieceSet {
        let b = self.landed.blobs.lock().expect("not poisoned");
        b[&self.hash].pieces.clone()
    }

    /// Waits (blocking) until `have(pieces verified by downloads running now)` holds, the
    /// blob's download ends or fails, or `deadline` passes. An end or a failure seen is
    /// cleared for the next wait, which may find a new download.
    pub fn wait(&self, deadline: Instant, mut have: impl FnMut(&PieceSet) -> bool) -> Waited {
        let mut b = self.landed.blobs.lock().expect("not poisoned");
        loop {
            let blob = b.get_mut(&self.hash).expect("watched");
            if have(&blob.pieces) {
                return Waited::Here;
            }
            if std::mem::take(&mut blob.failed) {
                return Waited::Failed;
            }
            if std::mem::take(&mut blob.ended) {
                return Waited::Ended;
            }
            let now = Instant::now();
            if now >= deadline {
                return Waited::TimedOut;
            }
            b = self
                .landed
                .changed
                .wait_timeout(b, deadline - now)
                .expect("not poisoned")
                .0;
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut b = self.landed.blobs.lock().expect("not poisoned");
        if let Some(blob) = b.get_mut(&self.hash) {
            blob.watchers -= 1;
            // Kept while its download runs: a later reader learns what landed before.
            if blob.watchers == 0 && (blob.ended || blob.pieces.is_empty()) {
                b.remove(&self.hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_reader_learns_of_pieces_landed_before_and_after_its_watch() {
        let l = Arc::new(Landed::default());
        let h = Hash([1; 32]);
        l.held(h, 0, 4); // before any watch: kept while the download runs
        let w = l.watch(h, 4);
        assert!(w.pieces().contains(0));
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            l2.held(Hash([2; 32]), 1, 4);
            l2.held(h, 1, 4);
            l2.held(h, 2, 4);
        });
        assert_eq!(
            w.wait(far(), |p| p.contains(1) && p.contains(2)),
            Waited::Here
        );
        t.join().unwrap();
        assert!(!w.pieces().contains(3));
        drop(w);
        l.ended(h);
        l.ended(Hash([2; 32]));
        assert!(
            l.blobs.lock().unwrap().is_empty(),
            "ended downloads are let go"
        );
    }

    #[test]
    fn an_end_a_failure_and_a_deadline_each_end_a_wait() {
        let l = Landed::default();
        let h = Hash([3; 32]);
        let w = l.watch(h, 2);
        l.held(h, 0, 2);
        l.failed(h, false);
        assert_eq!(w.wait(far(), |p| p.contains(1)), Waited::Failed);
        assert!(
            w.pieces().is_empty(),
            "what a full disk dropped is not held"
        );
        l.ended(h);
        assert_eq!(w.wait(far(), |p| p.contains(1)), Waited::Ended);
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(w.wait(soon, |p| p.contains(1)), Waited::TimedOut);
        drop(w);
        assert!(l.blobs.lock().unwrap().is_empty());
    }
}
