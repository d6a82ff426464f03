//! The agent's side of `voltool/coord/8`: requests to the fleet's coordinator (the one
//! that leads, of several).

use std::path::{Path, PathBuf};
use std::time::Duration;

use iroh::Endpoint;
use iroh::endpoint::Connection;
use tokio::io::AsyncReadExt;
use voltool_protocol::Hash;
use voltool_protocol::coord::{
    self, CommitPart, CoordRequest, CoordResponse, ErrorKind, MAX_RESPONSE,
};

use crate::net::{self, NetError, NodeAddr};

/// A failed coordinator request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Transport failure.
    #[error("coordinator unreachable: {0}")]
    Net(#[from] NetError),
    /// The coordinator refused or failed.
    #[error("{message}")]
    Remote {
        /// Kind of failure.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
    /// An answer that does not fit the request.
    #[error("unexpected answer from the coordinator")]
    Unexpected,
    /// A commit's change set ended before its last part (its maker failed).
    #[error("the change set was cut short; nothing was committed")]
    CutShort,
    /// Reading a local file to upload failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// How long a client of several coordinators keeps trying them when none accepts: longer
/// than a lead's lease (the default is 5 s), so a leader's death is waited out.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(30);
/// The pause between two rounds of tries.
const ROUND_PAUSE: Duration = Duration::from_millis(200);
/// How long a request may go without a single packet from the coordinator before its
/// connection is taken for dead. A live coordinator acknowledges the request's packets
/// within a round trip (and sends keep-alives every second), however long the answer takes;
/// one that died (kill -9, a host gone) sends nothing, and its connection would otherwise
/// only be known dead at the idle timeout (4 s).
const SILENCE: Duration = Duration::from_secs(1);
/// How long one try to reach one of several coordinators may take: one that is gone
/// answers nothing, and the round goes on without it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client that keeps one connection to the coordinator that leads and reopens it when it
/// breaks: with several coordinators (a fleet in failover), it tries them all at once and
/// keeps the first that accepts (those that do not lead refuse at once).
#[derive(Debug)]
pub struct CoordClient {
    ep: Endpoint,
    addrs: Vec<NodeAddr>,
    /// The coordinator last connected to, an index into `addrs`.
    at: std::sync::atomic::AtomicUsize,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

/// How one try to reach one of several coordinators ended.
enum Tried {
    /// It leads: the connection to keep.
    Leader(Connection),
    /// A standby: it does not lead, and named the leader if one leads.
    Standby {
        leader: Option<NodeAddr>,
        error: NetError,
    },
    /// It could not be reached, or refused.
    Failed(NetError),
}

/// Tries to reach the coordinator at `addr`, offering the standby's protocol too: a standby
/// answers on that one and closes with the leader's address.
async fn try_one(ep: Endpoint, addr: NodeAddr) -> Tried {
    let failed = |message: String| NetError::Connect {
        peer: addr.to_string(),
        message,
    };
    let tried = tokio::time::timeout(
        ATTEMPT_TIMEOUT,
        net::connect_offering(&ep, &addr, coord::ALPN, &[coord::STANDBY_ALPN]),
    )
    .await;
    let conn = match tried {
        Err(_) => return Tried::Failed(failed(format!("no handshake within {ATTEMPT_TIMEOUT:?}"))),
        Ok(Err(e)) => return Tried::Failed(e),
        Ok(Ok(conn)) => conn,
    };
    if conn.alpn() != coord::STANDBY_ALPN {
        return Tried::Leader(conn);
    }
    let closed = tokio::time::timeout(ATTEMPT_TIMEOUT, conn.closed()).await;
    let leader = match &closed {
        Ok(iroh::endpoint::ConnectionError::ApplicationClosed(a))
            if a.error_code == coord::CLOSE_NOT_LEADER.into() =>
        {
            std::str::from_utf8(&a.reason)
                .ok()
                .and_then(|s| s.parse::<NodeAddr>().ok())
        }
        _ => None,
    };
    let error = failed(match &leader {
        Some(l) => format!("a standby: {l} leads"),
        None => "a standby: no coordinator leads now".into(),
    });
    Tried::Standby { leader, error }
}

impl CoordClient {
    /// A client for the coordinator at `addr`.
    pub fn new(ep: Endpoint, addr: NodeAddr) -> Self {
        Self::with_addrs(ep, vec![addr])
    }

    /// A client for the coordinators at `addrs` (not empty).
    pub fn with_addrs(ep: Endpoint, addrs: Vec<NodeAddr>) -> Self {
        assert!(!addrs.is_empty(), "a client needs a coordinator");
        CoordClient {
            ep,
            addrs,
            at: Default::default(),
            conn: Default::default(),
        }
    }

    /// The address of the coordinator last connected to (the first before any).
    pub fn addr(&self) -> NodeAddr {
        self.addrs[self.at.load(std::sync::atomic::Ordering::Relaxed) % self.addrs.len()].clone()
    }

    /// Drops the connection a request failed on: the next try reaches whichever
    /// coordinator leads then (the one it reached may be gone).
    async fn forget_failed(&self) {
        self.conn.lock().await.take();
    }

    async fn conn(&self) -> Result<Connection, NetError> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut c = self.conn.lock().await;
        if let Some(conn) = c.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let n = self.addrs.len();
        if n == 1 {
            // One address: it leads, or names the one that does (a fleet in failover whose
            // agent was given one of its coordinators).
            let conn = match try_one(self.ep.clone(), self.addrs[0].clone()).await {
                Tried::Leader(conn) => conn,
                Tried::Standby {
                    leader: Some(l),
                    error,
                } => match try_one(self.ep.clone(), l).await {
                    Tried::Leader(conn) => conn,
                    _ => return Err(error),
                },
                Tried::Standby { error, .. } | Tried::Failed(error) => return Err(error),
            };
            *c = Some(conn.clone());
            return Ok(conn);
        }
        // Several coordinators: all are tried at once, again every ROUND_PAUSE while none
        // accepts, and the first that accepts is kept. Those that do not lead refuse at
        // once; a try of one that is gone runs out its handshake's timeout on the side
        // while the others are tried again. None may lead for a moment (the leader died
        // and its lease has not ended yet): the tries go on for a while.
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        let mut tries: tokio::task::JoinSet<Tried> = tokio::task::JoinSet::new();
        let mut trying = std::collections::HashMap::new();
        let mut last = None;
        loop {
            for addr in &self.addrs {
                if trying.values().any(|t| t == addr) {
                    continue;
                }
                let task = tries.spawn(try_one(self.ep.clone(), addr.clone()));
                trying.insert(task.id(), addr.clone());
            }
            let round = tokio::time::sleep(ROUND_PAUSE);
            tokio::pin!(round);
            loop {
                tokio::select! {
                    Some(done) = tries.join_next_with_id() => {
                        let (id, tried) = match done {
                            Ok((id, tried)) => (id, tried),
                            Err(e) => (e.id(), Tried::Failed(NetError::Connect {
                                peer: "a coordinator".into(),
                                message: e.to_string(),
                            })),
                        };
                        let tried_addr = trying.remove(&id);
                        match tried {
                            Tried::Leader(conn) => {
                                if let Some(i) = self.addrs.iter().position(|a| Some(a) == tried_addr.as_ref()) {
                                    self.at.store(i, Relaxed);
                                }
                                *c = Some(conn.clone());
                                return Ok(conn);
                            }
                            // A standby named the leader: tried at once unless a try is in
                            // flight, listed or not (an agent may know only some of the
                            // fleet's coordinators).
                            Tried::Standby { leader: Some(l), error } => {
                                if !trying.values().any(|t| *t == l) {
                                    let task = tries.spawn(try_one(self.ep.clone(), l.clone()));
                                    trying.insert(task.id(), l);
                                }
                                last = Some(error);
                            }
                            Tried::Standby { error, .. } | Tried::Failed(error) => last = Some(error),
                        }
                    }
                    _ = &mut round => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| NetError::Connect {
                    peer: "every coordinator".into(),
                    message: format!("none accepted within {FAILOVER_WAIT:?}"),
                }));
            }
            if let Some(e) = &last {
                tracing::debug!("no coordinator accepts now: trying again ({e})");
            }
        }
    }

    /// Opens a stream, reconnecting once if the cached connection turns out dead (the
    /// coordinator restarted): nothing was sent on it yet, so the retry is safe.
    async fn open(
        &self,
    ) -> Result<
        (
            Connection,
            iroh::endpoint::SendStream,
            iroh::endpoint::RecvStream,
        ),
        ClientError,
    > {
        let conn = self.conn().await?;
        match conn.open_bi().await {
            Ok((send, recv)) => Ok((conn, send, recv)),
            Err(_) => {
                self.forget_failed().await;
                let conn = self.conn().await?;
                let (send, recv) = conn.open_bi().await.map_err(NetError::stream)?;
                Ok((conn, send, recv))
            }
        }
    }

    /// Sends a request, returns the answer; an error answer becomes [`ClientError::Remote`].
    pub async fn request(&self, req: &CoordRequest) -> Result<CoordResponse, ClientError> {
        if repeatable(req) {
            return self.request_repeatable(req).await;
        }
        self.ensure_live().await?;
        let r = self.request_once(req).await;
        self.explain(r).await
    }

    /// A request that changes nothing: when the connection dies under it (a coordinator
    /// that restarted is only known gone once the connection idles out), it goes once
    /// more, on a fresh connection.
    async fn request_repeatable(&self, req: &CoordRequest) -> Result<CoordResponse, ClientError> {
        let mut r = self.request_once(req).await;
        if matches!(r, Err(ClientError::Net(_))) {
            self.forget_failed().await;
            r = self.request_once(req).await;
        }
        self.explain(r).await
    }

    /// Before a request that must not be sent twice: makes sure the cached connection
    /// still answers. A coordinator that died (kill -9, a host gone) leaves it open here
    /// until it idles out, and a request sent on it would fail without a word of whether
    /// it landed; an empty `HasBlobs` costs one round trip, and goes once more on a fresh
    /// connection if the old one is dead (or silent: see [`SILENCE`]). Only the transport
    /// counts: a refusal is the request's own to meet.
    async fn ensure_live(&self) -> Result<(), ClientError> {
        let cached = self
            .conn
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none());
        if !cached {
            return Ok(());
        }
        let probe = CoordRequest::HasBlobs { hashes: Vec::new() };
        match self.request_repeatable(&probe).await {
            Err(e @ ClientError::Net(_)) => Err(e),
            _ => Ok(()),
        }
    }

    /// A transport failure because the coordinator refused this node (not a fleet
    /// member) says so.
    async fn explain<T>(&self, r: Result<T, ClientError>) -> Result<T, ClientError> {
        let Err(ClientError::Net(e)) = r else {
            return r;
        };
        let reason = self
            .conn
            .lock()
            .await
            .as_ref()
            .and_then(|c| c.close_reason());
        match reason {
            Some(iroh::endpoint::ConnectionError::ApplicationClosed(a))
                if a.error_code == coord::CLOSE_NOT_MEMBER.into() =>
            {
                Err(ClientError::Remote {
                    kind: ErrorKind::Forbidden,
                    message: format!(
                        "the coordinator refused this node ({}): it is not a member of the fleet",
                        self.ep.id()
                    ),
                })
            }
            _ => Err(ClientError::Net(e)),
        }
    }

    async fn request_once(&self, req: &CoordRequest) -> Result<CoordResponse, ClientError> {
        let (conn, mut send, mut recv) = self.open().await?;
        let heard = conn.stats().udp_rx.datagrams;
        let exchange = async {
            net::write_frame(&mut send, req).await?;
            send.finish().map_err(NetError::stream)?;
            net::read_frame::<CoordResponse>(&mut recv, MAX_RESPONSE).await
        };
        tokio::pin!(exchange);
        let resp = tokio::select! {
            r = &mut exchange => r?,
            _ = tokio::time::sleep(SILENCE) => {
                if conn.stats().udp_rx.datagrams == heard {
                    return Err(ClientError::Net(NetError::Stream(format!(
                        "the coordinator sent nothing for {SILENCE:?}: taken for gone"
                    ))));
                }
                exchange.await?
            }
        };
        match resp {
            CoordResponse::Error { kind, message } => Err(ClientError::Remote { kind, message }),
            r => Ok(r),
        }
    }

    /// Watches the fleet's members: the stream answers with the member ids now and after
    /// every change ([`CoordRequest::WatchMembers`]).
    pub async fn watch_members(&self) -> Result<MembersWatch, ClientError> {
        let (_, mut send, recv) = self.open().await?;
        net::write_frame(&mut send, &CoordRequest::WatchMembers).await?;
        send.finish().map_err(NetError::stream)?;
        Ok(MembersWatch { recv })
    }

    /// Watches the heads of `volumes`: the stream answers with those that exist now, then
    /// with each new one as soon as it is signed ([`CoordRequest::WatchHeads`]). The heads
    /// are as the coordinator sent them: the caller verifies them.
    pub async fn watch_heads(
        &self,
        volumes: Vec<voltool_protocol::VolumeId>,
    ) -> Result<HeadsWatch, ClientError> {
        let (_, mut send, recv) = self.open().await?;
        net::write_frame(&mut send, &CoordRequest::WatchHeads { volumes }).await?;
        send.finish().map_err(NetError::stream)?;
        Ok(HeadsWatch { recv })
    }

    /// Sends a commit: the `header` ([`CoordRequest::Commit`]), then the parts `parts`
    /// yields until the one marked last, on one stream; the coordinator answers once it
    /// has applied them all. When `parts` ends before a last part, the stream is reset and
    /// nothing is committed.
    pub async fn commit(
        &self,
        header: &CoordRequest,
        parts: &mut tokio::sync::mpsc::Receiver<CommitPart>,
    ) -> Result<CoordResponse, ClientError> {
        self.ensure_live().await?;
        let r = self.commit_once(header, parts).await;
        self.explain(r).await
    }

    async fn commit_once(
        &self,
        header: &CoordRequest,
        parts: &mut tokio::sync::mpsc::Receiver<CommitPart>,
    ) -> Result<CoordResponse, ClientError> {
        let (_, mut send, mut recv) = self.open().await?;
        net::write_frame(&mut send, header).await?;
        // Whether the last part went out; whether the coordinator stopped reading first.
        let (mut complete, mut refused) = (false, false);
        while let Some(part) = parts.recv().await {
            let last = part.last;
            if net::write_frame(&mut send, &part).await.is_err() {
                refused = true;
                break;
            }
            if last {
                complete = true;
                break;
            }
        }
        if complete {
            send.finish().map_err(NetError::stream)?;
        } else if !refused {
            // The parts ended early: whatever the coordinator answers, it is about that.
            let _ = send.reset(0u32.into());
            return Err(ClientError::CutShort);
        }
        // Complete, or refused: the answer says what came of it.
        match net::read_frame(&mut recv, MAX_RESPONSE).await? {
            CoordResponse::Error { kind, message } => Err(ClientError::Remote { kind, message }),
            r if complete => Ok(r),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Uploads blobs from the files that hold them, on one stream; the origin verifies
    /// each against its hash and answers once all are durable.
    pub async fn upload(
        &self,
        blobs: &[(Hash, u64, PathBuf)],
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), ClientError> {
        self.ensure_live().await?;
        let r = self.upload_once(blobs, on_bytes).await;
        self.explain(r).await
    }

    async fn upload_once(
        &self,
        blobs: &[(Hash, u64, PathBuf)],
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), ClientError> {
        let (_, mut send, mut recv) = self.open().await?;
        if let Err(e) = send_upload(&mut send, blobs, on_bytes).await {
            // The coordinator may have refused the upload and stopped reading: its answer
            // says why.
            if let ClientError::Net(_) = e
                && let Ok(CoordResponse::Error { kind, message }) =
                    net::read_frame(&mut recv, MAX_RESPONSE).await
            {
                return Err(ClientError::Remote { kind, message });
            }
            return Err(e);
        }
        match net::read_frame(&mut recv, MAX_RESPONSE).await? {
            CoordResponse::Ok => Ok(()),
            CoordResponse::Error { kind, message } => Err(ClientError::Remote { kind, message }),
            _ => Err(ClientError::Unexpected),
        }
    }
}

/// Sends an upload request and the blobs' bytes, and finishes the stream.
async fn send_upload(
    send: &mut iroh::endpoint::SendStream,
    blobs: &[(Hash, u64, PathBuf)],
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), ClientError> {
    let names = blobs.iter().map(|(h, s, _)| (*h, *s)).collect();
    net::write_frame(send, &CoordRequest::Upload { blobs: names }).await?;
    let mut rest = blobs;
    while !rest.is_empty() {
        // Small blobs are read a group at a time on the blocking pool, large ones
        // streamed from their file.
        let small = rest
            .iter()
            .take_while(|(_, s, _)| *s <= SMALL_UPLOAD)
            .scan(0u64, |total, b| {
                *total += b.1;
                (*total <= UPLOAD_READ_GROUP).then_some(b)
            })
            .count();
        if small > 0 {
            let group: Vec<(u64, PathBuf)> = rest[..small]
                .iter()
                .map(|(_, s, p)| (*s, p.clone()))
                .collect();
            let bufs = tokio::task::spawn_blocking(move || read_group(&group))
                .await
                .map_err(|e| ClientError::Io {
                    path: String::new(),
                    source: std::io::Error::other(e),
                })??;
            for b in bufs {
                send.write_all(&b).await.map_err(NetError::stream)?;
                on_bytes(b.len() as u64);
            }
            rest = &rest[small..];
        } else {
            let (_, size, path) = &rest[0];
            send_file(send, path, *size, on_bytes).await?;
            rest = &rest[1..];
        }
    }
    send.finish().map_err(NetError::stream)?;
    Ok(())
}

/// Blobs up to this size are read whole, a group at a time.
const SMALL_UPLOAD: u64 = 1 << 20;
/// Bytes of small blobs read at once.
const UPLOAD_READ_GROUP: u64 = 4 << 20;

/// Whether a request may be sent again after a lost answer: it reads, or it states what
/// this node holds (sending it twice is sending it once).
fn repeatable(req: &CoordRequest) -> bool {
    matches!(
        req,
        CoordRequest::ListVolumes
            | CoordRequest::GetHead { .. }
            | CoordRequest::GetVersions { .. }
            | CoordRequest::HasBlobs { .. }
            | CoordRequest::Lookup { .. }
            | CoordRequest::Members
            | CoordRequest::Rtts { .. }
            | CoordRequest::Announce { .. }
            | CoordRequest::Withdraw { .. }
    )
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads small blob files whole, each exactly its size.
fn read_group(group: &[(u64, PathBuf)]) -> Result<Vec<Vec<u8>>, ClientError> {
    group
        .iter()
        .map(|(size, path)| {
            let b = std::fs::read(path).map_err(io_err(path))?;
            if b.len() as u64 != *size {
                return Err(io_err(path)(std::io::Error::other(format!(
                    "holds {} bytes where {size} were expected",
                    b.len()
                ))));
            }
            Ok(b)
        })
        .collect()
}

/// Streams exactly `size` bytes of a file.
async fn send_file(
    send: &mut iroh::endpoint::SendStream,
    path: &Path,
    size: u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), ClientError> {
    let mut f = tokio::fs::File::open(path).await.map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < size {
        let want = buf.len().min((size - sent) as usize);
        let n = f.read(&mut buf[..want]).await.map_err(io_err(path))?;
        if n == 0 {
            return Err(io_err(path)(std::io::Error::other(format!(
                "ends after {sent} of {size} bytes"
            ))));
        }
        send.write_all(&buf[..n]).await.map_err(NetError::stream)?;
        sent += n as u64;
        on_bytes(n as u64);
    }
    Ok(())
}

/// The fleet's members as the coordinator pushes them (see [`CoordClient::watch_members`]).
#[derive(Debug)]
pub struct MembersWatch {
    recv: iroh::endpoint::RecvStream,
}

impl MembersWatch {
    /// The next member list, or `None` for a fleet that keeps none: waits until the
    /// membership changes (the first comes at once).
    pub async fn next(&mut self) -> Result<Option<Vec<[u8; 32]>>, ClientError> {
        match net::read_frame(&mut self.recv, MAX_RESPONSE).await? {
            CoordResponse::Members(ids) => Ok(Some(ids)),
            CoordResponse::OpenFleet => Ok(None),
            CoordResponse::Error { kind, message } => Err(ClientError::Remote { kind, message }),
            _ => Err(ClientError::Unexpected),
        }
    }
}

/// A stream of new heads ([`CoordClient::watch_heads`]).
#[derive(Debug)]
pub struct HeadsWatch {
    recv: iroh::endpoint::RecvStream,
}

impl HeadsWatch {
    /// The next heads pushed (unverified): the first answer comes at once.
    pub async fn next(&mut self) -> Result<Vec<voltool_protocol::SignedHead>, ClientError> {
        match net::read_frame(&mut self.recv, MAX_RESPONSE).await? {
            CoordResponse::Heads(heads) => Ok(heads),
            CoordResponse::Error { kind, message } => Err(ClientError::Remote { kind, message }),
            _ => Err(ClientError::Unexpected),
        }
    }
}
