//! The tracker's bookkeeping: who holds which blobs, how to rank them for an asker, when
//! entries expire, and whom the fleet reported. Sans-IO: the coordinator and the simulator
//! run this same struct.

use std::collections::{BTreeMap, HashMap};
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
    /// Members that reported it for bytes that failed verification, and when (by id: a
    /// report stands when its reporter leaves, until it expires).
    reporters: BTreeMap<NodeId, Instant>,
    /// Providers handed to it in answers, and when: a report it makes counts only against
    /// one of them.
    handed: HashMap<NodeId, Instant>,
    /// (blob, holder) entries it has in the tracker.
    held: usize,
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
    /// Members reported by a quorum, and until when they are left out of answers (also if
    /// they leave and come back meanwhile).
    distrusted: HashMap<NodeId, Instant>,
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
            reporters: BTreeMap::new(),
            handed: HashMap::new(),
            held: 0,
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

    /// A member holds `blobs` (whole, or in part); it is seen now. Past
    /// [`Config::max_held_per_member`] entries of this member, new blobs are not entered.
    /// Returns how many were left out.
    pub fn announce(
        &mut self,
        now: Instant,
        id: NodeId,
        addr: A,
        zone: Option<String>,
        blobs: &[Hash],
        complete: bool,
    ) -> usize {
        let m = self.member(now, id, addr, zone);
        let cap = self.cfg.max_held_per_member;
        let mut left_out = 0;
        for h in blobs {
            let held = self.members[m as usize].held;
            let list = self.holders.entry(*h).or_default();
            match list.iter_mut().find(|(i, _)| *i == m) {
                Some(e) => e.1 |= complete,
                None if held < cap => {
                    list.push((m, complete));
                    self.members[m as usize].held += 1;
                }
                None => {
                    left_out += 1;
                    if list.is_empty() {
                        self.holders.remove(h);
                    }
                }
            }
        }
        left_out
    }

    /// Whether `id` is a member the tracker knows (announced or sent a heartbeat, and
    /// neither expired nor forgotten since).
    pub fn knows(&self, id: &NodeId) -> bool {
        self.index.contains_key(id)
    }

    /// Leaves `id` out of answers until `until` (distrust carried over from before a
    /// restart).
    pub fn distrust_until(&mut self, id: NodeId, until: Instant) {
        self.distrusted.insert(id, until);
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
                let before = list.len();
                list.retain(|(i, _)| *i != m);
                let member = &mut self.members[m as usize];
                member.held = member.held.saturating_sub(before - list.len());
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
        let member = &mut self.members[m as usize];
        member.rtts.clear();
        member.reporters.clear();
        member.handed.clear();
        member.held = 0;
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

    /// `reporter` got bytes of `hash` from `liar` that failed verification. The report
    /// counts only with evidence the tracker can check: `liar` was handed to `reporter` in an
    /// answer within [`Config::report_ttl`], and `liar` announced `hash`. Reports expire
    /// after [`Config::report_ttl`]; once [`Config::report_quorum`] distinct members'
    /// reports stand, `liar` is left out of answers for [`Config::report_ttl`]. Returns
    /// whether it is left out now.
    pub fn report(&mut self, now: Instant, reporter: &NodeId, liar: &NodeId, hash: &Hash) -> bool {
        let ttl = self.cfg.report_ttl;
        let within = |t: &Instant| now.saturating_duration_since(*t) < ttl;
        let (Some(&r), Some(&l)) = (self.index.get(reporter), self.index.get(liar)) else {
            return self.distrusted(now, liar);
        };
        let handed = self.members[r as usize]
            .handed
            .get(liar)
            .is_some_and(within);
        let holds = self
            .holders
            .get(hash)
            .is_some_and(|list| list.iter().any(|(i, _)| *i == l));
        if reporter == liar || !handed || !holds {
            return self.distrusted(now, liar);
        }
        let m = &mut self.members[l as usize];
        m.reporters.insert(*reporter, now);
        m.reporters.retain(|_, t| within(t));
        if m.reporters.len() >= self.cfg.report_quorum {
            self.distrusted.insert(*liar, now + ttl);
        }
        self.distrusted(now, liar)
    }

    /// Whether a member is left out of answers for reports against it.
    pub fn distrusted(&self, now: Instant, id: &NodeId) -> bool {
        self.distrusted.get(id).is_some_and(|until| now < *until)
    }

    fn distrusted_at(&self, now: Instant, i: u32) -> bool {
        !self.distrusted.is_empty() && self.distrusted(now, &self.members[i as usize].id)
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
            .filter(|(m, _)| {
                Some(*m) != asker && self.live(now, *m) && !self.distrusted_at(now, *m)
            })
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
        // What the asker was handed: evidence for a report it may make.
        if let Some(a) = asker {
            let ttl = self.cfg.report_ttl;
            let ids: Vec<NodeId> = ranked
                .iter()
                .map(|(_, m, _)| self.members[*m as usize].id)
                .collect();
            let handed = &mut self.members[a as usize].handed;
            for id in ids {
                handed.insert(id, now);
            }
            // At most one entry per member; expired ones go when the map outgrows the fleet.
            if handed.len() > 2 * self.index.len() + 64 {
                handed.retain(|_, t| now.saturating_duration_since(*t) < ttl);
            }
        }
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
    /// announcing (they left, or crashed), and distrust that ran out. Returns how many
    /// members expired.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.distrusted.retain(|_, until| now < *until);
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
