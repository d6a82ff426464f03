//! Priorities across a node's downloads. A download is foreground (a reload, a mount, a
//! `get`: someone waits for it) or background (a follow, a prefetch). While any foreground
//! download has fetches in flight, every background one holds back new requests (its
//! engine is paused: [`Engine::set_paused`]); what it has in flight finishes and counts.
//! A background download can be raised to foreground at any time (a reload that needs the
//! version a follow is downloading joins it): it then goes on at once, nothing restarted.

use std::sync::Arc;

use tokio::sync::watch;

/// The node's count of foreground downloads with fetches in flight, which every download
/// watches. One per node; clones share it.
#[derive(Clone, Debug)]
pub struct Arbiter {
    foreground: Arc<watch::Sender<usize>>,
}

impl Default for Arbiter {
    fn default() -> Self {
        Arbiter {
            foreground: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Arbiter {
    /// Foreground downloads with fetches in flight now.
    pub fn foreground(&self) -> usize {
        *self.foreground.borrow()
    }

    pub(super) fn watch(&self) -> watch::Receiver<usize> {
        self.foreground.subscribe()
    }

    pub(super) fn enter(&self) {
        self.foreground.send_modify(|n| *n += 1);
    }

    pub(super) fn leave(&self) {
        self.foreground.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A download's priority, which its owner may raise.
#[derive(Clone, Debug)]
pub struct Rank {
    background: Arc<watch::Sender<bool>>,
}

impl Rank {
    /// A foreground download's.
    pub fn foreground() -> Self {
        Rank {
            background: Arc::new(watch::Sender::new(false)),
        }
    }

    /// A background download's.
    pub fn background() -> Self {
        Rank {
            background: Arc::new(watch::Sender::new(true)),
        }
    }

    /// Makes the download foreground from now on.
    pub fn raise(&self) {
        self.background
            .send_if_modified(|b| std::mem::replace(b, false));
    }

    /// Whether the download is background now.
    pub fn is_background(&self) -> bool {
        *self.background.borrow()
    }

    pub(super) fn watch(&self) -> watch::Receiver<bool> {
        self.background.subscribe()
    }
}

/// What a download's actor keeps of its priority: whether it counts among the node's
/// foreground downloads, and whether its engine must hold back.
#[derive(Debug)]
pub(super) struct Standing {
    arbiter: Arbiter,
    foreground: watch::Receiver<usize>,
    background: watch::Receiver<bool>,
    /// Counted in the arbiter now.
    counted: bool,
}

impl Standing {
    pub(super) fn new(arbiter: Arbiter, rank: &Rank) -> Self {
        Standing {
            foreground: arbiter.watch(),
            background: rank.watch(),
            arbiter,
            counted: false,
        }
    }

    /// Whether the download is background now.
    pub(super) fn is_background(&self) -> bool {
        *self.background.borrow()
    }

    /// Counts the download among the foreground ones while it is foreground and `busy`
    /// (fetches in flight); returns whether its engine must hold back new requests.
    pub(super) fn update(&mut self, busy: bool) -> bool {
        let background = *self.background.borrow_and_update();
        let count = busy && !background;
        if count != self.counted {
            self.counted = count;
            if count {
                self.arbiter.enter();
            } else {
                self.arbiter.leave();
            }
        }
        let others = *self.foreground.borrow_and_update() - usize::from(self.counted);
        background && others > 0
    }

    /// Waits until the node's foreground count or this download's rank changes.
    pub(super) async fn changed(&mut self) {
        tokio::select! {
            r = self.foreground.changed() => if r.is_err() { std::future::pending::<()>().await },
            r = self.background.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
}

impl Drop for Standing {
    fn drop(&mut self) {
        if self.counted {
            self.arbiter.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_holds_back_only_while_another_foreground_download_is_busy() {
        let arbiter = Arbiter::default();
        let (fg, bg) = (Rank::foreground(), Rank::background());
        let mut f = Standing::new(arbiter.clone(), &fg);
        let mut b = Standing::new(arbiter.clone(), &bg);
        assert!(!b.update(true), "alone, a background download goes on");
        assert!(!f.update(true));
        assert_eq!(arbiter.foreground(), 1);
        assert!(b.update(true), "a busy foreground download holds it back");
        assert!(!f.update(false), "a foreground download never holds back");
        assert_eq!(arbiter.foreground(), 0);
        assert!(
            !b.update(true),
            "an idle foreground download holds nothing back"
        );
        f.update(true);
        assert!(b.update(true));
        bg.raise();
        assert!(!bg.is_background());
        assert!(!b.update(true), "raised, it goes on at once");
        assert_eq!(arbiter.foreground(), 2, "and counts as foreground");
        drop(f);
        drop(b);
        assert_eq!(arbiter.foreground(), 0, "a download gone counts no more");
    }
}
