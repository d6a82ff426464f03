//! `chaos --ha`: the fleet's coordinators in failover (three over a three-member etcd
//! cluster, the origin in an S3 bucket), struck by the faults of failover: the leader
//! killed or paused past its lease, a standby killed, an etcd member killed or paused.
//! Whatever the faults, the signed heads of every volume must form one chain holding every
//! acknowledged commit (checked by [`check_chains`], in both modes).

use rustix::process::Signal;
use voltool_coordinator::meta::{EtcdMeta, EtcdUrl, Meta, RedbMeta};
use voltool_protocol::commit::verify_chain;
use voltool_protocol::{Commit, PublicKey};
use voltool_tests::etcd::EtcdCluster;

use super::*;
use crate::fleet::HaSetup;
pub(super) use crate::ha::HaRun;

/// The lead's lease: short, so that a trial sees many leaders.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(2);

/// A trial's part of the run in failover.
pub(super) struct HaTrial<'a> {
    pub(super) etcd: &'a mut EtcdCluster,
    pub(super) setup: HaSetup,
    /// Processes stopped with SIGSTOP and not yet let go on (their pids).
    pub(super) paused: Arc<std::sync::Mutex<BTreeSet<u32>>>,
}

use std::sync::Arc;

/// A fault of failover, aimed when it strikes.
#[derive(Clone, Copy, Debug)]
pub(super) enum HaFault {
    /// kill -9 of the leader (its service manager starts it again at once: a candidate).
    KillLeader,
    /// SIGSTOP of the leader for this long (past its lease), then SIGCONT.
    PauseLeader(Duration),
    /// kill -9 of a coordinator that does not lead.
    KillStandby,
    /// kill -9 of etcd member `0`; it comes back when the trial heals.
    KillEtcd(usize),
    /// SIGSTOP of etcd member `0` for this long.
    PauseEtcd(usize, Duration),
}

impl HaFault {
    /// Its name among the trial's faults.
    pub(super) fn name(self) -> &'static str {
        match self {
            HaFault::KillLeader => "leader_killed",
            HaFault::PauseLeader(_) => "leader_paused_past_lease",
            HaFault::KillStandby => "standby_killed",
            HaFault::KillEtcd(_) => "etcd_member_killed",
            HaFault::PauseEtcd(..) => "etcd_member_paused",
        }
    }

    /// One at random.
    pub(super) fn random(rng: &mut SmallRng) -> Self {
        match rng.random_range(0..100) {
            0..30 => HaFault::KillLeader,
            30..55 => HaFault::PauseLeader(LEASE_TTL.mul_f64(rng.random_range(1.2..2.5))),
            55..65 => HaFault::KillStandby,
            65..82 => HaFault::KillEtcd(rng.random_range(0..3)),
            _ => HaFault::PauseEtcd(
                rng.random_range(0..3),
                Duration::from_millis(rng.random_range(300..3000)),
            ),
        }
    }
}

impl Trial<'_> {
    /// Strikes with `fault` now.
    pub(super) async fn strike_ha(&mut self, fault: HaFault) -> anyhow::Result<()> {
        let coordinators = self.fleet.coordinators();
        let leading = self.fleet.leading();
        let paused = self
            .ha
            .as_ref()
            .map(|h| h.paused.clone())
            .unwrap_or_default();
        let not_paused = |k: usize, f: &Fleet| {
            f.is_running(k) && !paused.lock().expect("not poisoned").contains(&f.pid(k))
        };
        let leader = leading
            .iter()
            .copied()
            .find(|&k| not_paused(k, &self.fleet))
            .or_else(|| (0..coordinators).find(|&k| not_paused(k, &self.fleet)));
        match fault {
            HaFault::KillLeader | HaFault::KillStandby => {
                let target = match fault {
                    HaFault::KillLeader => leader,
                    _ => {
                        (0..coordinators).find(|&k| Some(k) != leader && not_paused(k, &self.fleet))
                    }
                };
                if let Some(k) = target {
                    self.fleet.kill(k).await?;
                    // As its service manager would: back at once, a candidate.
                    self.fleet.restart(k).await?;
                }
            }
            HaFault::PauseLeader(d) => {
                if let Some(k) = leader {
                    self.pause_for(self.fleet.pid(k), d);
                }
            }
            HaFault::KillEtcd(m) => {
                let ha = self.ha.as_mut().expect("in failover");
                // One member at a time: the cluster keeps its quorum.
                if (0..ha.etcd.len()).all(|i| ha.etcd.pid(i).is_some()) {
                    ha.etcd.kill(m);
                }
            }
            HaFault::PauseEtcd(m, d) => {
                let ha = self.ha.as_ref().expect("in failover");
                if let Some(pid) = ha.etcd.pid(m) {
                    self.pause_for(pid, d);
                }
            }
        }
        Ok(())
    }

    /// Stops the process `pid` for `d`, then lets it go on (or sooner, when the trial
    /// heals).
    fn pause_for(&self, pid: u32, d: Duration) {
        let Some(ha) = &self.ha else { return };
        ha.paused.lock().expect("not poisoned").insert(pid);
        fleet::signal(pid, Signal::STOP);
        let paused = ha.paused.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            if paused.lock().expect("not poisoned").remove(&pid) {
                fleet::signal(pid, Signal::CONT);
            }
        });
    }

    /// Waits until every paused process went on, starts every etcd member that is down,
    /// and waits until one coordinator leads.
    pub(super) async fn heal_ha(&mut self) -> anyhow::Result<()> {
        let Some(ha) = self.ha.as_mut() else {
            return Ok(());
        };
        // A pause lasts as long as it was drawn (past the lease, for a leader): waited out,
        // within bounds.
        let start = Instant::now();
        while !ha.paused.lock().expect("not poisoned").is_empty()
            && start.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for pid in std::mem::take(&mut *ha.paused.lock().expect("not poisoned")) {
            fleet::signal(pid, Signal::CONT);
        }
        let etcd = &mut *ha.etcd;
        tokio::task::block_in_place(|| {
            for i in 0..etcd.len() {
                etcd.restart_if_down(i);
            }
        });
        // The fault's aftermath is its own: a lead lost to it has passed to another (or
        // back) before the next operation (bounded: the operations' retries wait past it).
        let start = Instant::now();
        while self.fleet.leading().len() != 1 && start.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Records the heads an acknowledged commit or reload of `vol` reported.
    pub(super) fn saw_reply(&mut self, vol: &str, reply: &Reply) {
        match reply {
            Reply::Committed(c) => {
                self.saw_head(vol, c.version, c.head.as_deref());
                if let Some(r) = &c.reloaded {
                    self.saw_head(vol, r.version, r.head.as_deref());
                }
            }
            Reply::Reloaded(r) => {
                self.saw_head(vol, r.version, r.head.as_deref());
                if let Some(c) = &r.committed {
                    self.saw_head(vol, c.version, c.head.as_deref());
                }
            }
            _ => {}
        }
    }

    /// Records the head an acknowledged commit or reload of `vol` reported: a version
    /// with two commits is a fork.
    fn saw_head(&mut self, vol: &str, version: u64, head: Option<&str>) {
        let Some(head) = head else { return };
        let seen = self.heads.entry(vol.to_string()).or_default();
        match seen.get(&version) {
            Some(h) if h != head => {
                self.out.forks += 1;
                self.out.problem(format!(
                    "volume {vol}: version {version} reported as commit {h} and as commit {head}"
                ));
            }
            Some(_) => {}
            None => {
                seen.insert(version, head.to_string());
            }
        }
    }
}

/// Opens the fleet's state once its coordinators stopped: the etcd prefix of the trial in
/// failover, the coordinator's redb file otherwise.
pub(super) async fn open_meta(root: &Path, ha: Option<&HaSetup>) -> anyhow::Result<Box<dyn Meta>> {
    let meta: Box<dyn Meta> = match ha {
        Some(h) => {
            let url: EtcdUrl = h.meta.parse()?;
            Box::new(tokio::task::spawn_blocking(move || EtcdMeta::connect(&url, None)).await??)
        }
        None => Box::new(RedbMeta::open(
            &root.join("coordinator").join("coordinator.redb"),
        )?),
    };
    Ok(meta)
}

/// What [`check_chains`] found.
#[derive(Debug, Default)]
pub(super) struct Chains {
    pub(super) forks: u64,
    pub(super) lost: u64,
    pub(super) problems: Vec<String>,
}

/// Checks that every volume's version records form one chain up to its head, signed by
/// `signer`, and that every acknowledged head (`acked`: volume, version, commit hash) is
/// in it. Blocking.
pub(super) fn check_chains(
    meta: &dyn Meta,
    signer: &PublicKey,
    acked: &BTreeMap<String, BTreeMap<u64, String>>,
) -> anyhow::Result<Chains> {
    let mut found = Chains::default();
    let mut chains: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();
    for (name, rec) in meta.volumes()? {
        let Some(head) = meta.head(rec.id)? else {
            found.forks += 1;
            found.problems.push(format!("volume {name}: no head"));
            continue;
        };
        if let Err(e) = head.verify(signer) {
            found.forks += 1;
            found.problems.push(format!("volume {name}: its head: {e}"));
            continue;
        }
        let v = head.commit.version;
        let older: Vec<Commit> = meta
            .commits(rec.id, 0..v)?
            .into_iter()
            // Versions dropped by retention leave the oldest records out.
            .skip_while(Option::is_none)
            .collect::<Option<Vec<_>>>()
            .unwrap_or_else(|| {
                found.forks += 1;
                found.problems.push(format!(
                    "volume {name}: a version record is missing between kept ones"
                ));
                Vec::new()
            });
        if let Err(e) = verify_chain(&head.commit, &older) {
            found.forks += 1;
            found
                .problems
                .push(format!("volume {name}: its version records: {e}"));
        }
        let chain = chains.entry(name).or_default();
        for c in older.iter().chain(std::iter::once(&head.commit)) {
            chain.insert(c.version, c.hash().to_string());
        }
    }
    for (vol, heads) in acked {
        let chain = chains.get(vol);
        let newest = chain.and_then(|c| c.keys().next_back().copied());
        let oldest = chain.and_then(|c| c.keys().next().copied());
        for (version, hash) in heads {
            match chain.and_then(|c| c.get(version)) {
                Some(h) if h == hash => {}
                Some(h) => {
                    found.forks += 1;
                    found.problems.push(format!(
                        "volume {vol}: version {version} acknowledged as commit {hash}, recorded as {h}"
                    ));
                }
                // Dropped by retention: older than every kept record.
                None if oldest.is_some_and(|o| *version < o) => {}
                None => {
                    found.lost += 1;
                    found.problems.push(format!(
                        "volume {vol}: acknowledged version {version} (commit {hash}) is not in its chain (head {newest:?})"
                    ));
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use voltool_coordinator::meta::{LinkUpdate, VolumeRecord};
    use voltool_protocol::{Hash, SecretKey, VolumeId};

    use super::*;

    fn commit(id: VolumeId, version: u64, parent: Option<&Commit>, seq: u8) -> Commit {
        Commit {
            volume: id,
            version,
            parent: parent.map(Commit::hash),
            manifest: Hash::of(&[seq]),
            manifest_size: 1,
            author: [1; 32],
            time_ms: u64::from(seq),
        }
    }

    /// A volume `v` with versions 0..=2 signed by `key`, each the parent of the next;
    /// returns them.
    fn chain(meta: &dyn Meta, key: &SecretKey) -> Vec<Commit> {
        let id = VolumeId([7; 16]);
        let c0 = commit(id, 0, None, 0);
        let rec = VolumeRecord { id, created_ms: 0 };
        meta.create("v", rec, &c0.clone().sign(key)).unwrap();
        let c1 = commit(id, 1, Some(&c0), 1);
        let c2 = commit(id, 2, Some(&c1), 2);
        for c in [&c1, &c2] {
            meta.move_head(&c.clone().sign(key), &LinkUpdate::default(), &[])
                .unwrap();
        }
        vec![c0, c1, c2]
    }

    fn acked(pairs: &[(u64, Hash)]) -> BTreeMap<String, BTreeMap<u64, String>> {
        let mut m = BTreeMap::new();
        m.insert(
            "v".to_string(),
            pairs.iter().map(|(v, h)| (*v, h.to_string())).collect(),
        );
        m
    }

    #[test]
    fn one_chain_holding_every_acknowledged_head_passes_and_a_fork_or_a_lost_head_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let meta = RedbMeta::open(&dir.path().join("m.redb")).unwrap();
        let key = SecretKey::from_bytes(&[3; 32]);
        let c = chain(&meta, &key);
        let ok = check_chains(
            &meta,
            &key.public(),
            &acked(&[(1, c[1].hash()), (2, c[2].hash())]),
        )
        .unwrap();
        assert_eq!((ok.forks, ok.lost), (0, 0), "{:?}", ok.problems);
        // Version 2 acknowledged with another commit: two heads with one version.
        let other = commit(c[2].volume, 2, Some(&c[1]), 9);
        let fork = check_chains(&meta, &key.public(), &acked(&[(2, other.hash())])).unwrap();
        assert_eq!((fork.forks, fork.lost), (1, 0), "{:?}", fork.problems);
        // Version 3 acknowledged, and the chain ends at 2: a lost commit.
        let lost = check_chains(&meta, &key.public(), &acked(&[(3, other.hash())])).unwrap();
        assert_eq!((lost.forks, lost.lost), (0, 1), "{:?}", lost.problems);
        // Heads signed by another key than the fleet's.
        let stranger = SecretKey::from_bytes(&[4; 32]).public();
        let forged = check_chains(&meta, &stranger, &BTreeMap::new()).unwrap();
        assert_eq!(forged.forks, 1, "{:?}", forged.problems);
    }

    #[test]
    fn a_version_whose_parent_is_not_its_predecessor_is_a_fork() {
        let dir = tempfile::tempdir().unwrap();
        let meta = RedbMeta::open(&dir.path().join("m.redb")).unwrap();
        let key = SecretKey::from_bytes(&[3; 32]);
        let c = chain(&meta, &key);
        // Version 3 names a parent that is not version 2 (a leader that wrote from an old
        // read): the records no longer chain.
        let stray = commit(c[0].volume, 3, Some(&c[1]), 3);
        meta.move_head(&stray.sign(&key), &LinkUpdate::default(), &[])
            .unwrap();
        let found = check_chains(&meta, &key.public(), &BTreeMap::new()).unwrap();
        assert_eq!(found.forks, 1, "{:?}", found.problems);
    }
}
