//! A provider's admission and subscribers behind a lock: sending slots, the queue of
//! requests waiting for one, and the pushes of newly held pieces.

use super::*;

/// This node's provider side, sans the I/O: [`Admission`] (a few requests sent at once, a
/// few waiting, the one furthest behind first, the rest answered busy; the origin's choice
/// of piece) and [`Subscribers`] (who hears of the pieces this node newly holds).
#[derive(Debug)]
pub struct Serving {
    cfg: Config,
    /// Readers on this node waiting on pieces as they are verified.
    pub landed: crate::blobs::Landed,
    pub(super) state: std::sync::Mutex<ServeState>,
    /// Wakes the pusher when a push becomes due.
    wake: Notify,
}

/// Subscription streams one peer may hold to one blob at once.
pub(super) const FEEDS_PER_PEER: usize = 4;

/// One subscription stream: its id, the blob's pieces, and where pushes go.
type Feed = (u64, u32, mpsc::Sender<PieceSet>);

#[derive(Debug)]
pub(super) struct ServeState {
    pub(super) adm: Admission,
    next_token: u64,
    /// Requests waiting for a slot, by token: told when their turn comes (dropped when
    /// pushed out of the queue: they answer busy).
    waiters: HashMap<u64, oneshot::Sender<()>>,
    subs: Subscribers,
    /// The subscription streams of each peer and blob (a peer may run two downloads of
    /// one blob): their ids, the blob's pieces, and where pushes go.
    feeds: HashMap<(NodeId, Hash), Vec<Feed>>,
    next_feed: u64,
}

/// A sending slot, given back (to the waiting request furthest behind) when dropped.
#[derive(Debug)]
pub struct Turn(Arc<Serving>, NodeId, u16);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.release(self.1, self.2);
    }
}

/// A request waiting for a slot; if dropped while waiting (its requester went), its place
/// goes, and a slot handed to it already is given back.
struct Waiting {
    serving: Arc<Serving>,
    token: u64,
    peer: NodeId,
    rank: u16,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let queued = {
            let mut st = self.serving.state.lock().expect("not poisoned");
            let queued = st.waiters.remove(&self.token).is_some();
            if queued {
                st.adm.forget(self.token);
            }
            queued
        };
        if !queued && rx.try_recv().is_ok() {
            // Its turn came as it went: the slot passes on.
            self.serving.release(self.peer, self.rank);
        }
    }
}

impl Serving {
    /// Admission and subscriptions with the swarm's knobs.
    pub fn new(cfg: Config) -> Self {
        Serving {
            landed: Default::default(),
            state: std::sync::Mutex::new(ServeState {
                adm: Admission::new(cfg.clone(), rand::random()),
                next_token: 0,
                waiters: HashMap::new(),
                subs: Subscribers::new(cfg.clone()),
                feeds: HashMap::new(),
                next_feed: 0,
            }),
            cfg,
            wake: Notify::new(),
        }
    }

    /// The knobs.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A sending slot for a request of `peer` of `rank` (how far along its requester is):
    /// at once, or after a wait in the queue; `None` when the answer is busy (the queue is
    /// full of requests further behind, or this one was pushed out of it, or `peer` holds
    /// its share of slots and places already).
    pub async fn admit(self: &Arc<Self>, peer: NodeId, rank: u16) -> Option<Turn> {
        let (token, rx) = {
            let mut st = self.state.lock().expect("not poisoned");
            let token = st.next_token;
            st.next_token += 1;
            match st.adm.admit(token, peer, rank) {
                Admit::Now => return Some(Turn(self.clone(), peer, rank)),
                Admit::Busy => return None,
                Admit::Queued { evicted } => {
                    if let Some(e) = evicted {
                        // Dropping its sender tells it: busy.
                        st.waiters.remove(&e);
                    }
                    let (tx, rx) = oneshot::channel();
                    st.waiters.insert(token, tx);
                    (token, rx)
                }
            }
        };
        let mut wait = Waiting {
            serving: self.clone(),
            token,
            peer,
            rank,
            rx: Some(rx),
        };
        let turn = wait.rx.as_mut().expect("set above").await;
        wait.rx = None;
        turn.ok().map(|()| Turn(self.clone(), peer, rank))
    }

    /// A slot `peer` held for a request of `rank` is free: free slots go to the waiting
    /// requests furthest behind (whose peers may take one more; a foreground one first)
    /// that are still there.
    pub(super) fn release(&self, peer: NodeId, rank: u16) {
        let mut st = self.state.lock().expect("not poisoned");
        let mut next = st.adm.finished(&peer, rank);
        while let Some((token, p, r)) = next.pop() {
            if let Some(w) = st.waiters.remove(&token)
                && w.send(()).is_ok()
            {
                continue;
            }
            // Its requester went meanwhile: the slot taken for it is free again.
            next.extend(st.adm.finished(&p, r));
        }
    }

    /// The origin's choice for a `Pick` of `rank`: the piece of `among` it has sent least,
    /// or `None` (answer busy) when it would not admit the request or would only send a
    /// second copy while its slots are full.
    pub(super) fn choose(
        &self,
        hash: Hash,
        units: u32,
        among: &PieceSet,
        peer: &NodeId,
        rank: u16,
    ) -> Option<u32> {
        let mut st = self.state.lock().expect("not poisoned");
        if !st.adm.would_admit(peer, rank) {
            return None;
        }
        st.adm.choose(hash, units, among)
    }

    /// A piece [`Serving::choose`] chose is not sent after all.
    pub(super) fn unchoose(&self, hash: Hash, unit: u32) {
        self.state
            .lock()
            .expect("not poisoned")
            .adm
            .unchoose(hash, unit);
    }

    /// `peer` subscribes to `hash` (of `units` pieces); its pushes go to `tx`. The
    /// subscription's id, or `None` when the blob has as many subscribers as this node takes.
    pub(super) fn subscribe(
        &self,
        peer: NodeId,
        hash: Hash,
        units: u32,
        tx: mpsc::Sender<PieceSet>,
    ) -> Option<u64> {
        let mut st = self.state.lock().expect("not poisoned");
        // A few downloads of one peer may follow one blob at once; more is a peer tying up
        // this node's memory.
        if st
            .feeds
            .get(&(peer, hash))
            .is_some_and(|l| l.len() >= FEEDS_PER_PEER)
        {
            return None;
        }
        if !st.subs.subscribe(peer, hash) {
            return None;
        }
        let id = st.next_feed;
        st.next_feed += 1;
        st.feeds
            .entry((peer, hash))
            .or_default()
            .push((id, units, tx));
        Some(id)
    }

    /// Subscription `id` ends; the peer stops hearing of the blob once its last one has.
    pub(super) fn unsubscribe(&self, peer: NodeId, hash: Hash, id: u64) {
        let mut st = self.state.lock().expect("not poisoned");
        let key = (peer, hash);
        let Some(list) = st.feeds.get_mut(&key) else {
            return;
        };
        list.retain(|(f, _, _)| *f != id);
        if list.is_empty() {
            st.feeds.remove(&key);
            st.subs.unsubscribe(&peer, &hash);
        }
    }

    /// This node now holds piece `unit` of `hash`, verified: its subscribers hear of it
    /// (coalesced over [`Config::have_interval`]).
    pub fn held(&self, hash: Hash, unit: u32) {
        let mut st = self.state.lock().expect("not poisoned");
        let idle = st.subs.poll_timeout().is_none();
        st.subs.held(Instant::now(), hash, unit);
        if idle && st.subs.poll_timeout().is_some() {
            self.wake.notify_one();
        }
    }

    /// Sends the pushes as they fall due, until `cancel`.
    pub async fn run_pushes(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let due = self.state.lock().expect("not poisoned").subs.poll_timeout();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => continue,
                _ = sleep_until(due), if due.is_some() => {}
            }
            let mut st = self.state.lock().expect("not poisoned");
            let now = Instant::now();
            while let Some(push) = st.subs.poll_push(now) {
                // One set per push (per piece count a subscriber gave), cloned to each feed.
                let mut built: Option<PieceSet> = None;
                for peer in push.to {
                    for (_, units, tx) in st.feeds.get(&(peer, push.hash)).into_iter().flatten() {
                        let set = match &built {
                            Some(b) if b.len() == *units => b.clone(),
                            _ => {
                                let b = PieceSet::from_iter(*units, push.units.iter().copied());
                                built = Some(b.clone());
                                b
                            }
                        };
                        // A subscriber too slow to take pushes misses some; the tracker's
                        // answers and its next lookups still tell it.
                        let _ = tx.try_send(set);
                    }
                }
            }
        }
    }
}
