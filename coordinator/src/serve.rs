//! Serving: the connections a coordinator accepts (or answers as a standby while it does not
//! lead), each member's requests under its bounds, and the answer to each request.

use super::*;

/// How long a standby looks for the leader's address before it answers without it.
const LEADER_LOOKUP: std::time::Duration = std::time::Duration::from_secs(2);

/// A coordinator that does not lead serves nobody: it answers on
/// [`coord::STANDBY_ALPN`] alone (a client that offers only the coordinator protocol fails
/// its handshake at once), and closes a member's connection with the leader's address
/// ([`coord::CLOSE_NOT_LEADER`]); a node that is no member learns nothing.
pub(crate) async fn answer_standby(ep: Endpoint, members: Membership, meta: Arc<meta::EtcdMeta>) {
    while let Some(incoming) = ep.accept().await {
        let (members, meta) = (members.clone(), meta.clone());
        tokio::spawn(async move {
            let conn = match incoming.accept() {
                Ok(a) => match a.await {
                    Ok(c) => c,
                    Err(e) => return debug!("standby: handshake failed: {e}"),
                },
                Err(e) => return debug!("standby: accept failed: {e}"),
            };
            if !members.is_member(&conn.remote_id()) {
                conn.close(coord::CLOSE_NOT_MEMBER.into(), b"not a fleet member");
                return;
            }
            let leader = tokio::time::timeout(LEADER_LOOKUP, leader::current(&meta))
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            conn.close(coord::CLOSE_NOT_LEADER.into(), leader.as_bytes());
        });
    }
}

pub(crate) async fn accept_loop(ep: Endpoint, state: Arc<State>, cancel: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            i = ep.accept() => match i { Some(i) => i, None => return },
        };
        let (state, cancel) = (state.clone(), cancel.clone());
        tokio::spawn(async move {
            let conn = match incoming.accept() {
                Ok(a) => match a.await {
                    Ok(c) => c,
                    Err(e) => return debug!("handshake failed: {e}"),
                },
                Err(e) => return debug!("accept failed: {e}"),
            };
            let peer = conn.remote_id();
            if !state.is_member(&peer) {
                warn!(peer = %peer.fmt_short(), "refused a node that is not a fleet member");
                conn.close(coord::CLOSE_NOT_MEMBER.into(), b"not a fleet member");
                return;
            }
            match conn.alpn() {
                a if a == coord::ALPN => serve_coord(conn, state, cancel).await,
                a if a == blobs::ALPN => {
                    let st = state.clone();
                    let allow: voltool_agent::blobs::Allow = Arc::new(move |id| st.is_member(id));
                    voltool_agent::blobs::serve(
                        conn,
                        state.origin.clone(),
                        allow,
                        state.serve.clone(),
                    )
                    .await
                }
                _ => conn.close(2u32.into(), b"unknown protocol"),
            }
        });
    }
}

async fn serve_coord(conn: Connection, state: Arc<State>, cancel: CancellationToken) {
    let peer = conn.remote_id();
    // Its further streams wait unread, in its connection's receive window.
    let permits = Arc::new(tokio::sync::Semaphore::new(coord::REQUESTS_PER_MEMBER));
    // Requests in flight other than watches (which last as long as the connection), until
    // their answers are received: a count, never a limit (the permits above are that).
    let busy = Arc::new(tokio::sync::Semaphore::new(BUSY_COUNT as usize));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (send, recv) = tokio::select! {
            _ = cancel.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (state, busy) = (state.clone(), busy.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_request(send, recv, state, peer, permit, busy).await {
                debug!(peer = %peer.fmt_short(), "coordinator request failed: {e}");
            }
        });
    }
    // Stopped serving (the lead lost, or a shutdown): the requests in flight answer first,
    // within a commit's deadline.
    let _ = tokio::time::timeout(state.commit_deadline, busy.acquire_many(BUSY_COUNT)).await;
    conn.close(0u32.into(), b"this coordinator stopped serving");
}

/// Requests one connection may have in flight, counted (far past the permits that bound
/// them).
const BUSY_COUNT: u32 = 1 << 20;

/// Serves one request; `permit` is the member's, held until the answer is sent.
async fn serve_request(
    mut send: SendStream,
    mut recv: RecvStream,
    state: Arc<State>,
    peer: EndpointId,
    permit: tokio::sync::OwnedSemaphorePermit,
    busy: Arc<tokio::sync::Semaphore>,
) -> Result<(), NetError> {
    let req: CoordRequest = net::read_frame(&mut recv, MAX_REQUEST).await?;
    let _busy = match req {
        CoordRequest::WatchMembers | CoordRequest::WatchHeads { .. } => None,
        _ => busy.acquire_owned().await.ok(),
    };
    // Checked at every request: a node removed from the fleet is refused at once.
    if let Err(refused) = state.admit(&peer, &req) {
        net::write_frame(&mut send, &CoordResponse::from(refused)).await?;
        send.finish().map_err(NetError::stream)?;
        return Ok(());
    }
    let resp = match req {
        CoordRequest::WatchMembers => return members::watch(&mut send, &state, &peer).await,
        CoordRequest::WatchHeads { volumes } => {
            return follow::watch(&mut send, &state, volumes).await;
        }
        CoordRequest::Upload { blobs } => upload(&state, &mut recv, blobs).await,
        CoordRequest::Commit {
            name,
            volume,
            base_version,
        } => {
            let _guard = state.write_lock.lock().await;
            let started = std::time::Instant::now();
            let r = commit::commit(&state, &mut recv, name, volume, base_version, peer).await;
            if matches!(r, Ok(CoordResponse::Committed { .. })) {
                state.heads_moved.moved();
                state.metrics.commits.inc();
                observe(&state.metrics.commit_seconds, started.elapsed());
            }
            r.unwrap_or_else(Into::into)
        }
        other => {
            let state = state.clone();
            let _guard = if matches!(
                other,
                CoordRequest::CreateVolume { .. }
                    | CoordRequest::RenameVolume { .. }
                    | CoordRequest::DeleteVolume { .. }
            ) {
                Some(state.write_lock.lock().await)
            } else {
                None
            };
            let st = state.clone();
            tokio::task::spawn_blocking(move || handle(&st, other, peer))
                .await
                .unwrap_or_else(|e| fail(ErrorKind::Internal, e.to_string()).into())
        }
    };
    net::write_frame(&mut send, &resp).await?;
    send.finish().map_err(NetError::stream)?;
    drop(permit);
    // The request counts as in flight until its answer is received (bounded): a
    // connection closed as this coordinator stops serving must not drop an answer.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
    Ok(())
}

fn handle(state: &State, req: CoordRequest, peer: EndpointId) -> CoordResponse {
    let r = match req {
        CoordRequest::CreateVolume { name } => create(state, &name),
        CoordRequest::ListVolumes => list(state),
        CoordRequest::RenameVolume { from, to } => rename(state, &from, &to),
        CoordRequest::DeleteVolume { name } => delete(state, &name),
        CoordRequest::GetHead { name } => info(state, &name).map(CoordResponse::Volume),
        CoordRequest::GetVersions { name, from } => volumes::versions(state, &name, from),
        CoordRequest::HasBlobs { hashes } => {
            if hashes.len() > MAX_HAS {
                return fail(ErrorKind::Invalid, "too many hashes in one request").into();
            }
            let held = state
                .origin
                .has_complete_many(&hashes)
                .map_err(|e| fail(ErrorKind::Internal, e.to_string()));
            // A blob found held is kept a while for the commit that will name it (only a
            // writer's: a reader cannot keep garbage alive by asking).
            if let Ok(held) = &held
                && state.roster.get().may_write(&peer)
            {
                let found = hashes.iter().zip(held).filter(|(_, h)| **h);
                let mut recent = state.recent.lock().expect("not poisoned");
                recent.touch(found.map(|(h, _)| *h));
            }
            held.map(CoordResponse::Has)
        }
        CoordRequest::Announce {
            addr,
            zone,
            blobs,
            complete,
        } => {
            if let Err(f) = check_zone(zone.as_deref()) {
                return f.into();
            }
            if blobs.len() > MAX_HAS {
                return fail(ErrorKind::Invalid, "too many blobs in one announcement").into();
            }
            // Only blobs the origin holds (uploaded, or named by a kept version) enter the
            // tracker: random hashes cost nothing here.
            let known = match state.origin.has_complete_many(&blobs) {
                Ok(k) => k,
                Err(e) => return fail(ErrorKind::Internal, e.to_string()).into(),
            };
            let blobs: Vec<Hash> = blobs
                .into_iter()
                .zip(known)
                .filter_map(|(h, k)| k.then_some(h))
                .collect();
            let mut t = state.tracker.lock().expect("not poisoned");
            let now = std::time::Instant::now();
            let left_out = t.announce(now, node_id(&peer), addr, zone, &blobs, complete);
            if left_out > 0 {
                warn!(peer = %peer.fmt_short(), left_out, "tracker: a member announced more blobs than it may enter");
            }
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Heartbeat { addr, zone } => {
            if let Err(f) = check_zone(zone.as_deref()) {
                return f.into();
            }
            let mut t = state.tracker.lock().expect("not poisoned");
            let now = std::time::Instant::now();
            let id = node_id(&peer);
            let known = t.knows(&id);
            t.announce(now, id, addr, zone, &[], false);
            Ok(CoordResponse::Tracked {
                epoch: state.epoch,
                known,
            })
        }
        CoordRequest::Withdraw { blobs } if blobs.len() > MAX_HAS => {
            Err(fail(ErrorKind::Invalid, "too many blobs in one withdrawal"))
        }
        CoordRequest::Withdraw { blobs } => {
            let mut t = state.tracker.lock().expect("not poisoned");
            if blobs.is_empty() {
                t.forget(&node_id(&peer));
            } else {
                t.withdraw(&node_id(&peer), &blobs);
            }
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Report { provider, hash } => {
            let liar = voltool_protocol::swarm::NodeId(provider);
            tracker::report(state, &node_id(&peer), liar, &hash);
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Rtts { rtts } => {
            if rtts.len() > coord::MAX_RTTS {
                return fail(
                    ErrorKind::Invalid,
                    format!(
                        "{} round-trip times; at most {}",
                        rtts.len(),
                        coord::MAX_RTTS
                    ),
                )
                .into();
            }
            let mine: Vec<(voltool_protocol::swarm::NodeId, u32)> = rtts
                .iter()
                .map(|r| (voltool_protocol::swarm::NodeId(r.id), r.micros))
                .collect();
            let mut t = state.tracker.lock().expect("not poisoned");
            t.rtts(&node_id(&peer), &mine);
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Lookup { hash } => Ok(CoordResponse::Providers(lookup(state, &peer, &hash))),
        CoordRequest::LookupAll { hashes } => {
            if hashes.len() > coord::MAX_LOOKUP_ALL {
                return fail(ErrorKind::Invalid, "too many hashes in one lookup").into();
            }
            Ok(CoordResponse::Providers(lookup_all(state, &peer, &hashes)))
        }
        CoordRequest::Members => Ok(CoordResponse::Members(state.member_ids())),
        CoordRequest::Upload { .. } | CoordRequest::Commit { .. } => {
            Err(fail(ErrorKind::Invalid, "request out of place"))
        }
        _ => Err(fail(ErrorKind::Invalid, "unknown request")),
    };
    r.unwrap_or_else(Into::into)
}

/// Refuses a zone label longer than [`coord::MAX_ZONE`] bytes: every lookup answer that
/// names its member carries it.
fn check_zone(zone: Option<&str>) -> Result<(), Fail> {
    match zone {
        Some(z) if z.len() > coord::MAX_ZONE => Err(fail(
            ErrorKind::Invalid,
            format!(
                "a zone label of {} bytes; at most {}",
                z.len(),
                coord::MAX_ZONE
            ),
        )),
        _ => Ok(()),
    }
}
