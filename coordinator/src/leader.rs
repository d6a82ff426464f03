//! Leadership among coordinators sharing one etcd cluster: etcd's own election (v3election)
//! on a lease. The leader key it wins is the fence of every write ([`Fence`]): once its
//! lease ends, the key is gone and no write of this coordinator can land, whatever it
//! believes. It also counts itself out before that: when a keep-alive has not been answered
//! within the lease's time, less a margin, its leadership is lost and it stops serving.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::ResignOptions;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::meta::{EtcdMeta, Fence, MetaError};

/// What a coordinator holds while it leads.
#[derive(Debug)]
pub(crate) struct Leadership {
    /// Cancelled when the lead is lost (a keep-alive unanswered in time, the lease gone).
    pub(crate) lost: CancellationToken,
    /// How long the lead holds, as this coordinator knows it.
    pub(crate) lease: Lease,
    /// Cancel to step down (resign and revoke the lease, so another takes over at once).
    step_down: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Steps down: resigns, revokes the lease, and waits for that (bounded).
    pub(crate) async fn step_down(self) {
        self.step_down.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// The lead's lease as its holder sees it: until when the last renewal holds, and when the
/// lead began. Another coordinator can lead only once the lease ended at etcd, which is
/// never before this holder's `valid_until` (it counts from when it asked).
#[derive(Clone, Debug)]
pub(crate) struct Lease {
    pub(crate) ttl: Duration,
    pub(crate) since: Instant,
    valid_until: Arc<std::sync::Mutex<Instant>>,
}

impl Lease {
    /// Whether the lead surely holds for `margin` more.
    pub(crate) fn holds_for(&self, margin: Duration) -> bool {
        Instant::now() + margin < *self.valid_until.lock().expect("not poisoned")
    }
}

fn etcd_err(e: etcd_client::Error) -> MetaError {
    MetaError::Engine(format!("etcd: {e}"))
}

/// The election's name: one leader per fleet prefix.
fn election(meta: &EtcdMeta) -> Vec<u8> {
    format!("{}/leader", meta.url().prefix).into_bytes()
}

/// Where the coordinator that leads now serves (the value it campaigned with), as etcd's
/// election says; `None` while none leads or etcd does not answer.
pub(crate) async fn current(meta: &Arc<EtcdMeta>) -> Option<String> {
    let mut el = meta.client().election_client();
    let name = election(meta);
    let r = meta
        .spawn(async move { el.leader(name).await })
        .await
        .ok()?
        .ok()?;
    let kv = r.kv()?;
    String::from_utf8(kv.value().to_vec()).ok()
}

/// Whether `leader` (what a campaign returned) is first in line: the election's key with
/// the lowest creation revision, at the revision it was won with. Only then is it the
/// fence of every write; two candidates can otherwise both believe they lead (each fence
/// holding on a key of its own).
async fn first_in_line(
    meta: &Arc<EtcdMeta>,
    name: &[u8],
    leader: &etcd_client::LeaderKey,
) -> Result<bool, MetaError> {
    let mut kv = meta.client().kv_client();
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_sort(
            etcd_client::SortTarget::Create,
            etcd_client::SortOrder::Ascend,
        )
        .with_limit(1);
    let r = meta
        .spawn(async move { kv.get(prefix, Some(opts)).await })
        .await
        .map_err(|e| MetaError::Engine(e.to_string()))?
        .map_err(etcd_err)?;
    Ok(r.kvs()
        .first()
        .is_some_and(|kv| kv.key() == leader.key() && kv.create_revision() == leader.rev()))
}

/// Campaigns for the lead with `value` (where this coordinator serves) on a lease of `ttl`;
/// returns once it leads, with the fence set on `meta`. Dropped while campaigning, it leaves
/// its lease to end with `meta`.
pub(crate) async fn campaign(
    meta: Arc<EtcdMeta>,
    ttl: Duration,
    value: String,
) -> Result<Leadership, MetaError> {
    let secs = ttl.as_secs().max(1) as i64;
    let mut lease = meta.client().lease_client();
    let id = meta
        .spawn(async move { lease.grant(secs, None).await })
        .await
        .map_err(|e| MetaError::Engine(e.to_string()))?
        .map_err(etcd_err)?
        .id();
    // Keep the lease alive while campaigning too: a wait longer than the lease would
    // otherwise lose the candidacy it waits with.
    let lost = CancellationToken::new();
    let step_down = CancellationToken::new();
    let won = Arc::new(tokio::sync::OnceCell::<Fence>::new());
    let valid_until = Arc::new(std::sync::Mutex::new(Instant::now() + ttl));
    let task = meta.spawn(keep(
        meta.clone(),
        id,
        ttl,
        lost.clone(),
        step_down.clone(),
        won.clone(),
        valid_until.clone(),
    ));
    let name = election(&meta);
    let leader = loop {
        let member = meta.member();
        let mut el = meta.client().election_client();
        let (n, v) = (name.clone(), value.clone());
        let attempt = meta.spawn(async move { el.campaign(n, v, id).await });
        tokio::select! {
            _ = lost.cancelled() => {
                return Err(MetaError::Engine("the campaign's lease ended".into()));
            }
            r = attempt => match r.map_err(|e| MetaError::Engine(e.to_string()))? {
                Ok(mut r) => match r.take_leader() {
                    Some(l) if first_in_line(&meta, &name, &l).await? => break l,
                    Some(l) => {
                        // A campaign that ran out of its call's deadline resigned at etcd
                        // (etcd deletes the key of a cancelled campaign) while the next
                        // went on with the key it found: named leader with a key that is
                        // not first in line. Its key goes, and it campaigns again, last.
                        warn!(revision = l.rev(), "elected with a key that is not first in line: campaigning again");
                        let mut el = meta.client().election_client();
                        let resign = ResignOptions::new().with_leader(l);
                        let _ = meta.spawn(async move { el.resign(Some(resign)).await }).await;
                    }
                    None => return Err(MetaError::Engine("etcd elected no leader key".into())),
                },
                // A campaign waits within one call's deadline: campaign again, on the same
                // lease (the candidacy stays); a member that does not answer is left.
                Err(e) => {
                    tracing::debug!("campaign: {e}");
                    if crate::meta::unreachable(&e, false) {
                        let m = meta.clone();
                        let _ = meta.spawn(async move { m.move_on_async(member).await }).await;
                    }
                }
            }
        }
    };
    let fence = Fence {
        key: leader.key().to_vec(),
        revision: leader.rev(),
    };
    meta.set_fence(Some(fence.clone()));
    // A write that finds the fence gone ends the lead at once.
    meta.on_fenced(lost.clone());
    let _ = won.set(fence);
    info!(lease = id, revision = leader.rev(), "leading the fleet");
    Ok(Leadership {
        lost,
        lease: Lease {
            ttl,
            since: Instant::now(),
            valid_until,
        },
        step_down,
        task,
    })
}

/// Keeps the lease `id` alive until asked to step down (then resigns once elected, and
/// revokes it) or until a keep-alive goes unanswered past the lease's end less a margin
/// (then `lost`).
async fn keep(
    meta: Arc<EtcdMeta>,
    id: i64,
    ttl: Duration,
    lost: CancellationToken,
    step_down: CancellationToken,
    won: Arc<tokio::sync::OnceCell<Fence>>,
    shared_until: Arc<std::sync::Mutex<Instant>>,
) {
    // The lead counts as lost a third of the lease before etcd would end it.
    let margin = ttl / 3;
    let mut valid_until = Instant::now() + ttl;
    loop {
        let sent = Instant::now();
        let member = meta.member();
        let mut lease = meta.client().lease_client();
        // A stream per keep-alive: every call has a deadline, a long-lived stream would meet it.
        let answer = tokio::time::timeout(ttl / 3, async move {
            let (mut keeper, mut stream) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        tokio::select! {
            _ = step_down.cancelled() => break,
            r = answer => match r {
                Ok(Ok(Some(a))) if a.ttl() > 0 => {
                    valid_until = sent + Duration::from_secs(a.ttl() as u64);
                    *shared_until.lock().expect("not poisoned") = valid_until;
                }
                Ok(Ok(_)) => {
                    warn!("the lease is gone: this coordinator no longer leads");
                    *shared_until.lock().expect("not poisoned") = Instant::now();
                    lost.cancel();
                    return;
                }
                Ok(Err(e)) => {
                    warn!("lease keep-alive failed: {e}");
                    meta.move_on_async(member).await;
                }
                Err(_) => {
                    warn!("lease keep-alive unanswered");
                    meta.move_on_async(member).await;
                }
            }
        }
        if Instant::now() + margin >= valid_until {
            warn!("the lease was not renewed in time: this coordinator no longer leads");
            *shared_until.lock().expect("not poisoned") = Instant::now();
            lost.cancel();
            return;
        }
        tokio::select! {
            _ = step_down.cancelled() => break,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    }
    // Stepping down: resign the lead (if won) and revoke the lease, so another candidate
    // takes over now rather than when the lease ends.
    if let Some(fence) = won.get() {
        let mut el = meta.client().election_client();
        let leader = etcd_client::LeaderKey::new()
            .with_name(election(&meta))
            .with_key(fence.key.clone())
            .with_rev(fence.revision)
            .with_lease(id);
        let _ = el
            .resign(Some(ResignOptions::new().with_leader(leader)))
            .await;
    }
    let mut lease = meta.client().lease_client();
    let _ = lease.revoke(id).await;
    // The fence stays: its key is gone, so any write still on its way is refused.
    *shared_until.lock().expect("not poisoned") = Instant::now();
    lost.cancel();
    info!("stepped down");
}
