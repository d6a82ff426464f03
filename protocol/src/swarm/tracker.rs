//! The tracker's bookkeeping: who holds which blobs, how to rank them for an asker, when
//! entries expire, and whom the fleet reported. Sans-IO: the coordinator and the simulator
//! run this same struct.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Config, NodeId};
use crate::hash::Hash;

/// Coarse band of a round-trip time, so that peers within a factor of two of each other
/// tie (and askers spread over them at random): below 1 ms is band 0, 1-2 ms band 1, 2-4 ms
/// band 2, and so on; unmeasured peers come after all measured ones.
pub fn rtt_band(micros: Option<u32>) -> u32 {
    match micros {
        Some(us) => u32::BITS - (us / 1000).leading_zeros(),
        None => u32::MAX,
    }
}

#[derive(Debug)]
struct Member<A> {
    id: NodeId,
    addr: A,
    zone: Option<String>,
    last_seen: Instant,
    /// Round-trip times it measured to others, microseconds, by member index.
    rtts: HashMap<u32, u32>,
    /// Members that reported it for bytes that failed verification (by id: a report
    /// stands when its reporter leaves).
    reporters: BTreeSet<NodeId>,
}

/// How a holder ranks for an asker: other zone, round-trip band, partial, a random draw
/// (lowest first).
type Rank = (bool, u32, bool, u32);

/// A holder in a lookup's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder<A> {
    /// Who.
    pub id: NodeId,
    /// Where it listens.
    pub addr: A,
    /// Its zone label.
    pub zone: Option<String>,
    /// Whether it holds the blob (or every blob asked) whole.
    pub complete: bool,
}

/// Who holds which blobs. `A` is where a member listens (an address; the simulator uses
/// `()`).
#[derive(Debug)]
pub struct Tracker<A> {
    cfg: Config,
    rng: SmallRng,
    members: Vec<Member<A>>,
    index: HashMap<NodeId, u32>,
    /// Holders of each blob by member index, and whether whole.
    holders: HashMap<Hash, Vec<(u32, bool)>>,
    free: Vec<u32>,
    /// Members reported by a quorum: left out of answers for as long as this tracker runs,
    /// also if they leave and come back.
    distrusted: std::collections::HashSet<NodeId>,
}

impl<A: Clone> Tracker<A> {
    /// An empty tracker; random choices from `seed`.
    pub fn new(cfg: Config, seed: u64) -> Self {
        Tracker {
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            members: Vec::new(),
            index: HashMap::new(),
            holders: HashMap::new(),
            free: Vec::new(),
            distrusted: Default::default(),
        }
    }

    fn member(&mut self, now: Instant, id: NodeId, addr: A, zone: Option<String>) -> u32 {
        if let Some(&i) = self.index.get(&id) {
            let m = &mut self.members[i as usize];
            m.addr = addr;
            m.zone = zone;
            m.last_seen = now;
            return i;
        }
        let m = Member {
            id,
            addr,
            zone,
            last_seen: now,
            rtts: HashMap::new(),
            reporters: BTreeSet::new(),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.members[i as usize] = m;
                i
            }
            None => {
                self.members.push(m);
                self.members.len() as u32 - 1
            }
        };
        self.index.insert(id, i);
        i
    }

    /// A member holds `blobs` (whole, or in part); it is seen now.
    pub fn announce(
        &mut self,
        now: Instant,
        id: NodeId,
        addr: A,
        zone: Option<String>,
        blobs: &[Hash],
        complete: bool,
    ) {
        let m = self.member(now, id, addr, zone);
        for h in blobs {
            let list = self.holders.entry(*h).or_default();
            match list.iter_mut().find(|(i, _)| *i == m) {
                Some(e) => e.1 |= complete,
                None => list.push((m, complete)),
            }
        }
    }

    /// A member is alive (it holds what it announced before).
    pub fn heartbeat(&mut self, now: Instant, id: &NodeId) {
        if let Some(&i) = self.index.get(id) {
            self.members[i as usize].last_seen = now;
        }
    }

    /// A member no longer holds `blobs`.
    pub fn withdraw(&mut self, id: &NodeId, blobs: &[Hash]) {
        let Some(&m) = self.index.get(id) else {
            return;
        };
        for h in blobs {
            if let Some(list) = self.holders.get_mut(h) {
                list.retain(|(i, _)| *i != m);
                if list.is_empty() {
                    self.holders.remove(h);
                }
            }
        }
    }

    /// A member left the fleet: everything of it goes.
    pub fn forget(&mut self, id: &NodeId) {
        let Some(m) = self.index.remove(id) else {
            return;
        };
        self.holders.retain(|_, list| {
            list.retain(|(i, _)| *i != m);
            !list.is_empty()
        });
        for other in &mut self.members {
            other.rtts.remove(&m);
        }
        self.members[m as usize].rtts.clear();
        self.members[m as usize].reporters.clear();
        self.free.push(m);
    }

    /// Round-trip times `asker` measured to other members, microseconds.
    pub fn rtts(&mut self, asker: &NodeId, rtts: &[(NodeId, u32)]) {
        let Some(&a) = self.index.get(asker) else {
            return;
        };
        for (peer, us) in rtts {
            if let Some(&p) = self.index.get(peer) {
                self.members[a as usize].rtts.insert(p, *us);
            }
        }
    }

    /// `reporter` got bytes from `liar` that failed verification. Returns whether `liar` is
    /// now left out of answers ([`Config::report_quorum`] distinct members reported it).
    pub fn report(&mut self, reporter: &NodeId, liar: &NodeId) -> bool {
        let (Some(_), Some(&l)) = (self.index.get(reporter), self.index.get(liar)) else {
            return false;
        };
        if reporter == liar {
            return false;
        }
        let m = &mut self.members[l as usize];
        m.reporters.insert(*reporter);
        if m.reporters.len() >= self.cfg.report_quorum {
            self.distrusted.insert(*liar);
        }
        self.distrusted.contains(liar)
    }

    /// Whether a member is left out of answers for reports against it.
    pub fn distrusted(&self, id: &NodeId) -> bool {
        self.distrusted.contains(id)
    }

    fn distrusted_at(&self, i: u32) -> bool {
        !self.distrusted.is_empty() && self.distrusted.contains(&self.members[i as usize].id)
    }

    fn live(&self, now: Instant, i: u32) -> bool {
        now.saturating_duration_since(self.members[i as usize].last_seen) < self.cfg.holder_ttl
    }

    /// Providers of a blob for `asker`: at most [`Config::lookup_answer`], drawn at random
    /// among live, trusted holders (never the asker), then ranked: the asker's zone first,
    /// then the round-trip time it measured (bands of a factor of two), whole holders before
    /// partial ones, at random within each rank.
    pub fn lookup(&mut self, now: Instant, asker: &NodeId, hash: &Hash) -> Vec<Holder<A>> {
        let asker_i = self.index.get(asker).copied();
        let Some(list) = self.holders.get_mut(hash) else {
            return Vec::new();
        };
        // A partial shuffle draws the sample; the order of a holder list means nothing.
        let want = self.cfg.lookup_answer * self.cfg.lookup_sample.max(1);
        let n = list.len();
        let take = want.min(n);
        for k in 0..take {
            let j = self.rng.random_range(k..n);
            list.swap(k, j);
        }
        let sample: Vec<(u32, bool)> = list[..take].to_vec();
        self.rank(now, asker_i, sample)
    }

    /// Providers that hold every one of `hashes` whole, ranked for `asker` as
    /// [`Tracker::lookup`] ranks them: one lookup for a batch of small blobs.
    pub fn lookup_all(&mut self, now: Instant, asker: &NodeId, hashes: &[Hash]) -> Vec<Holder<A>> {
        let asker_i = self.index.get(asker).copied();
        let Some((first, rest)) = hashes.split_first() else {
            return Vec::new();
        };
        let holds = |h: &Hash, m: u32| {
            self.holders
                .get(h)
                .is_some_and(|l| l.iter().any(|(i, c)| *i == m && *c))
        };
        let all: Vec<(u32, bool)> = self
            .holders
            .get(first)
            .into_iter()
            .flatten()
            .filter(|(m, complete)| *complete && rest.iter().all(|h| holds(h, *m)))
            .copied()
            .collect();
        self.rank(now, asker_i, all)
    }

    fn rank(
        &mut self,
        now: Instant,
        asker: Option<u32>,
        cands: Vec<(u32, bool)>,
    ) -> Vec<Holder<A>> {
        let my_zone = asker.and_then(|a| self.members[a as usize].zone.clone());
        let cands: Vec<(u32, bool)> = cands
            .into_iter()
            .filter(|(m, _)| Some(*m) != asker && self.live(now, *m) && !self.distrusted_at(*m))
            .collect();
        let mut ranked: Vec<(Rank, u32, bool)> = cands
            .into_iter()
            .map(|(m, complete)| {
                let member = &self.members[m as usize];
                let same_zone = my_zone.is_some() && member.zone == my_zone;
                let rtt = asker.and_then(|a| self.members[a as usize].rtts.get(&m).copied());
                let key = (
                    !same_zone,
                    rtt_band(rtt),
                    !complete,
                    self.rng.random::<u32>(),
                );
                (key, m, complete)
            })
            .collect();
        ranked.sort_unstable_by_key(|(k, _, _)| *k);
        ranked.truncate(self.cfg.lookup_answer);
        ranked
            .into_iter()
            .map(|(_, m, complete)| {
                let member = &self.members[m as usize];
                Holder {
                    id: member.id,
                    addr: member.addr.clone(),
                    zone: member.zone.clone(),
                    complete,
                }
            })
            .collect()
    }

    /// Drops the holdings of members not seen within [`Config::holder_ttl`]: they stopped
    /// announcing (they left, or crashed). Returns how many members expired.
    pub fn expire(&mut self, now: Instant) -> usize {
        let dead: Vec<NodeId> = self
            .index
            .iter()
            .filter(|(_, i)| !self.live(now, **i))
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            self.forget(id);
        }
        dead.len()
    }

    /// (blob, holder) entries held, for reports.
    pub fn entries(&self) -> usize {
        self.holders.values().map(|l| l.len()).sum()
    }

    /// Every member (announced or sent a heartbeat, not expired or forgotten).
    pub fn members(&self) -> impl Iterator<Item = &NodeId> {
        self.index.keys()
    }

    /// Where a member listens, and its zone.
    pub fn member_addr(&self, id: &NodeId) -> Option<(&A, Option<&str>)> {
        let m = &self.members[*self.index.get(id)? as usize];
        Some((&m.addr, m.zone.as_deref()))
    }
}
