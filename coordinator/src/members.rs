//! Who is in the fleet and who may write. Set at start, replaced while running (the daemon
//! re-reads its members and writers files on SIGHUP), checked on every request, and pushed
//! to the agents that watch it, so that a removed node is refused at once by the
//! coordinator and by its peers.

use super::*;

/// The fleet's members and writers. A writer is a member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Node ids that may join (fetch, read, serve); `None` admits any node.
    pub members: Option<HashSet<EndpointId>>,
    /// Node ids that may also write (commit, put, rm, cp, upload; create, rename and
    /// delete volumes); `None`: every member may.
    pub writers: Option<HashSet<EndpointId>>,
}

impl Membership {
    /// Whether `id` may join the fleet.
    pub fn is_member(&self, id: &EndpointId) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains(id))
            || self.writers.as_ref().is_some_and(|w| w.contains(id))
    }

    /// Whether `id` may write.
    pub fn may_write(&self, id: &EndpointId) -> bool {
        match &self.writers {
            Some(w) => w.contains(id),
            None => self.is_member(id),
        }
    }
}

/// The membership now, and a counter that moves at every change.
#[derive(Debug)]
pub(super) struct Roster {
    now: std::sync::RwLock<Membership>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Roster {
    pub(super) fn new(m: Membership) -> Self {
        Roster {
            now: std::sync::RwLock::new(m),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    pub(super) fn get(&self) -> std::sync::RwLockReadGuard<'_, Membership> {
        self.now.read().expect("not poisoned")
    }

    pub(super) fn set(&self, m: Membership) {
        *self.now.write().expect("not poisoned") = m;
        self.changed.send_modify(|n| *n += 1);
    }
}

impl State {
    pub(super) fn is_member(&self, id: &EndpointId) -> bool {
        self.roster.get().is_member(id)
    }

    /// The node ids agents may serve: the listed members and writers, or (with no list)
    /// every node the tracker knows; and the coordinator.
    pub(super) fn member_ids(&self) -> Vec<[u8; 32]> {
        let mut ids: Vec<[u8; 32]> = {
            let m = self.roster.get();
            match &m.members {
                Some(members) => members
                    .iter()
                    .chain(m.writers.iter().flatten())
                    .map(|id| *id.as_bytes())
                    .collect(),
                None => {
                    let t = self.tracker.lock().expect("not poisoned");
                    t.members().map(|id| id.0).collect()
                }
            }
        };
        ids.push(*self.key.public().as_bytes());
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Refuses a request of a node outside the fleet, and a write of a node that may only
    /// read.
    pub(super) fn admit(&self, peer: &EndpointId, req: &CoordRequest) -> Result<(), Fail> {
        let m = self.roster.get();
        if !m.is_member(peer) {
            return Err(fail(
                ErrorKind::Forbidden,
                format!("node {peer} is not a member of this fleet"),
            ));
        }
        let writes = matches!(
            req,
            CoordRequest::Upload { .. }
                | CoordRequest::Commit { .. }
                | CoordRequest::CreateVolume { .. }
                | CoordRequest::RenameVolume { .. }
                | CoordRequest::DeleteVolume { .. }
        );
        if writes && !m.may_write(peer) {
            return Err(fail(
                ErrorKind::Forbidden,
                format!(
                    "node {peer} may read but not write: it is not in the coordinator's writers list"
                ),
            ));
        }
        Ok(())
    }
}

/// Answers [`CoordRequest::WatchMembers`]: the member ids now and after every change, until
/// the watcher goes, the coordinator stops, or the watcher is no member any more.
pub(super) async fn watch(
    send: &mut SendStream,
    state: &State,
    peer: &EndpointId,
) -> Result<(), NetError> {
    let mut changed = state.roster.changed.subscribe();
    loop {
        changed.mark_unchanged();
        if !state.is_member(peer) {
            let refused: CoordResponse =
                fail(ErrorKind::Forbidden, "no longer a member of this fleet").into();
            net::write_frame(send, &refused).await?;
            return Ok(());
        }
        let listed = state.roster.get().members.is_some();
        let now = if listed {
            CoordResponse::Members(state.member_ids())
        } else {
            CoordResponse::OpenFleet
        };
        net::write_frame(send, &now).await?;
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Ok(()) },
            _ = send.stopped() => return Ok(()),
        }
    }
}

/// Reads the members file: one node id per line, `#` comments.
pub fn read_members(path: &Path) -> Result<HashSet<EndpointId>, CoordinatorError> {
    let text = std::fs::read_to_string(path).map_err(|source| CoordinatorError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let id = line.parse().map_err(|_| CoordinatorError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(format!("line {}: not a node id: {line:?}", i + 1)),
        })?;
        out.insert(id);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seed: u8) -> EndpointId {
        SecretKey::from_bytes(&[seed; 32]).public()
    }

    #[test]
    fn writers_are_members_and_readers_may_not_write() {
        let open = Membership::default();
        assert!(open.is_member(&id(1)) && open.may_write(&id(1)));
        let m = Membership {
            members: Some([id(1)].into()),
            writers: Some([id(2)].into()),
        };
        assert!(m.is_member(&id(1)) && !m.may_write(&id(1)));
        assert!(m.is_member(&id(2)) && m.may_write(&id(2)));
        assert!(!m.is_member(&id(3)) && !m.may_write(&id(3)));
        let members_only = Membership {
            members: Some([id(1)].into()),
            writers: None,
        };
        assert!(members_only.may_write(&id(1)) && !members_only.may_write(&id(3)));
    }
}
