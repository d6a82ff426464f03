//! The coordinator role: volume registry, signed heads, commits (per-path last writer
//! wins), and the origin blob store, all behind `voltool/coord/1` and `voltool/blobs/1`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::{Endpoint, EndpointId, SecretKey};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use voltool_protocol::coord::{
    self, CoordRequest, CoordResponse, ErrorKind, MAX_HAS, MAX_REQUEST, VolumeInfo,
};
use voltool_protocol::volume::check_volume_name;
use voltool_protocol::{Change, Commit, Entry, Hash, Manifest, SignedHead, VolumeId, blobs};

use crate::net::{self, NetError, NodeAddr};
use crate::rate::{Rate, TokenBucket};
use crate::store::{Store, StoreError};

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes-0");
const HEADS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("heads-0");
const VERSIONS: TableDefinition<([u8; 16], u64), &[u8]> = TableDefinition::new("versions-0");

/// File in the data directory holding `NODE_ID@IP:PORT` once the coordinator listens.
pub const ADDR_FILE: &str = "coordinator.addr";

/// Coordinator options.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    /// Data directory (key, database, origin blobs).
    pub data: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Node ids allowed in the fleet; `None` admits any node (a warning is logged).
    pub members: Option<HashSet<EndpointId>>,
    /// Egress limit of the origin (bytes/s).
    pub max_egress: Option<Rate>,
}

/// A coordinator failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// Key trouble.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Database trouble.
    #[error("coordinator database: {0}")]
    Db(String),
    /// Transport trouble.
    #[error(transparent)]
    Net(#[from] NetError),
    /// File trouble.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn db_err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Db(e.to_string())
}

#[derive(Serialize, Deserialize)]
struct VolumeRecord {
    id: VolumeId,
    created_ms: u64,
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    state: Arc<State>,
    ep: Endpoint,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    key: SecretKey,
    db: Database,
    origin: Store,
    members: Option<HashSet<EndpointId>>,
    serve: crate::blobs::ServeOptions,
    /// Where the origin serves blobs (handed out as the last provider).
    addr: NodeAddr,
    /// Who holds what (in memory: agents announce again when they start).
    tracker: std::sync::Mutex<Tracker>,
    /// Serialises commits and registry changes.
    write_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A refused or failed request, sent back as [`CoordResponse::Error`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Fail {
    kind: ErrorKind,
    message: String,
}

impl From<Fail> for CoordResponse {
    fn from(f: Fail) -> Self {
        CoordResponse::Error {
            kind: f.kind,
            message: f.message,
        }
    }
}

fn fail(kind: ErrorKind, message: impl Into<String>) -> Fail {
    Fail {
        kind,
        message: message.into(),
    }
}

impl Coordinator {
    /// Opens the data directory, binds, writes [`ADDR_FILE`] and starts serving.
    pub async fn start(opts: CoordinatorOptions) -> Result<Self, CoordinatorError> {
        std::fs::create_dir_all(&opts.data).map_err(|source| CoordinatorError::Io {
            path: opts.data.display().to_string(),
            source,
        })?;
        let key = crate::keys::load_or_create(&opts.data)?;
        let origin = Store::open(&opts.data.join("origin"))?;
        let db = Database::create(opts.data.join("coordinator.redb")).map_err(db_err)?;
        {
            let w = db.begin_write().map_err(db_err)?;
            w.open_table(VOLUMES).map_err(db_err)?;
            w.open_table(HEADS).map_err(db_err)?;
            w.open_table(VERSIONS).map_err(db_err)?;
            w.commit().map_err(db_err)?;
        }
        if opts.members.is_none() {
            warn!("no members list: any node that can reach this coordinator may join the fleet");
        }
        let ep = net::bind(
            key.clone(),
            opts.listen,
            vec![coord::ALPN.to_vec(), blobs::ALPN.to_vec()],
        )
        .await?;
        let addr = NodeAddr {
            id: ep.id(),
            addr: net::local_addr(&ep),
        };
        let addr_file = opts.data.join(ADDR_FILE);
        let tmp = addr_file.with_extension("tmp");
        std::fs::write(&tmp, format!("{addr}\n"))
            .and_then(|_| std::fs::rename(&tmp, &addr_file))
            .map_err(|source| CoordinatorError::Io {
                path: addr_file.display().to_string(),
                source,
            })?;
        info!(%addr, "coordinator listening");
        let state = Arc::new(State {
            key,
            db,
            origin,
            members: opts.members,
            serve: crate::blobs::ServeOptions::new(
                opts.max_egress.map(|r| Arc::new(TokenBucket::new(r))),
                false,
            ),
            addr: addr.clone(),
            tracker: Default::default(),
            write_lock: Default::default(),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(ep.clone(), state.clone(), cancel.clone()));
        Ok(Coordinator {
            state,
            ep,
            cancel,
            task,
        })
    }

    /// Where the coordinator listens.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr {
            id: self.ep.id(),
            addr: net::local_addr(&self.ep),
        }
    }

    /// The origin store (tests corrupt it on purpose).
    pub fn origin(&self) -> &Store {
        &self.state.origin
    }

    /// Stops serving and closes the endpoint.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.ep.close().await;
        let _ = self.task.await;
    }
}

async fn accept_loop(ep: Endpoint, state: Arc<State>, cancel: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            i = ep.accept() => match i { Some(i) => i, None => return },
        };
        let state = state.clone();
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
                conn.close(1u32.into(), b"not a fleet member");
                return;
            }
            match conn.alpn() {
                a if a == coord::ALPN => serve_coord(conn, state).await,
                a if a == blobs::ALPN => {
                    let st = state.clone();
                    let allow: crate::blobs::Allow = Arc::new(move |id| st.is_member(id));
                    crate::blobs::serve(conn, state.origin.clone(), allow, state.serve.clone())
                        .await
                }
                _ => conn.close(2u32.into(), b"unknown protocol"),
            }
        });
    }
}

impl State {
    fn is_member(&self, id: &EndpointId) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains(id))
    }
}

async fn serve_coord(conn: Connection, state: Arc<State>) {
    let peer = conn.remote_id();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_request(send, recv, state, peer).await {
                debug!(peer = %peer.fmt_short(), "coordinator request failed: {e}");
            }
        });
    }
}

async fn serve_request(
    mut send: SendStream,
    mut recv: RecvStream,
    state: Arc<State>,
    peer: EndpointId,
) -> Result<(), NetError> {
    let req: CoordRequest = net::read_frame(&mut recv, MAX_REQUEST).await?;
    let resp = match req {
        CoordRequest::Upload { hash, size } => upload(&state, &mut recv, hash, size).await,
        other => {
            let state = state.clone();
            let _guard = if matches!(
                other,
                CoordRequest::CreateVolume { .. }
                    | CoordRequest::RenameVolume { .. }
                    | CoordRequest::DeleteVolume { .. }
                    | CoordRequest::Commit { .. }
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
    Ok(())
}

/// Receives exactly `size` bytes, then hashes and verifies them before storing.
async fn upload(state: &State, recv: &mut RecvStream, hash: Hash, size: u64) -> CoordResponse {
    let tmp = state.origin.tmp_path("upload");
    let r = async {
        let mut f = tokio::fs::File::create(&tmp).await?;
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match recv.read(&mut buf).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            };
            got += n as u64;
            if got > size {
                return Err(std::io::Error::other(format!(
                    "upload longer than the announced {size} bytes"
                )));
            }
            f.write_all(&buf[..n]).await?;
        }
        if got != size {
            return Err(std::io::Error::other(format!(
                "truncated upload: got {got} of {size} bytes"
            )));
        }
        f.sync_data().await?;
        Ok(())
    }
    .await;
    if let Err(e) = r {
        let _ = tokio::fs::remove_file(&tmp).await;
        return fail(ErrorKind::Corrupt, format!("blob {}: {e}", hash.short())).into();
    }
    let origin = state.origin.clone();
    match tokio::task::spawn_blocking(move || origin.adopt_tmp(&tmp, size, Some(hash))).await {
        Ok(Ok(_)) => CoordResponse::Ok,
        Ok(Err(StoreError::Corrupt { message, .. })) => fail(
            ErrorKind::Corrupt,
            format!("upload of blob {} refused: {message}", hash.short()),
        )
        .into(),
        Ok(Err(e)) => fail(ErrorKind::Internal, e.to_string()).into(),
        Err(e) => fail(ErrorKind::Internal, e.to_string()).into(),
    }
}

fn handle(state: &State, req: CoordRequest, peer: EndpointId) -> CoordResponse {
    let r = match req {
        CoordRequest::CreateVolume { name } => create(state, &name),
        CoordRequest::ListVolumes => list(state),
        CoordRequest::RenameVolume { from, to } => rename(state, &from, &to),
        CoordRequest::DeleteVolume { name } => delete(state, &name),
        CoordRequest::GetHead { name } => info(state, &name).map(CoordResponse::Volume),
        CoordRequest::HasBlobs { hashes } => {
            if hashes.len() > MAX_HAS {
                return fail(ErrorKind::Invalid, "too many hashes in one request").into();
            }
            hashes
                .iter()
                .map(|h| state.origin.has_complete(h))
                .collect::<Result<Vec<_>, _>>()
                .map(CoordResponse::Has)
                .map_err(|e| fail(ErrorKind::Internal, e.to_string()))
        }
        CoordRequest::Commit {
            name,
            volume,
            base_version,
            changes,
            priors,
        } => commit(state, &name, volume, base_version, changes, priors, peer),
        CoordRequest::Announce {
            addr,
            zone,
            blobs,
            complete,
        } => {
            let mut t = state.tracker.lock().expect("not poisoned");
            t.peers.insert(peer, (addr, zone));
            for h in blobs {
                t.holders.entry(h).or_default().insert(peer, complete);
            }
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Withdraw { blobs } => {
            let mut t = state.tracker.lock().expect("not poisoned");
            if blobs.is_empty() {
                t.forget(&peer);
            } else {
                for h in blobs {
                    if let Some(m) = t.holders.get_mut(&h) {
                        m.remove(&peer);
                    }
                }
            }
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
            let mine: HashMap<EndpointId, u32> = rtts
                .iter()
                .filter_map(|r| Some((EndpointId::from_bytes(&r.id).ok()?, r.micros)))
                .collect();
            let mut t = state.tracker.lock().expect("not poisoned");
            t.rtts.insert(peer, mine);
            Ok(CoordResponse::Ok)
        }
        CoordRequest::Lookup { hash } => Ok(CoordResponse::Providers(lookup(state, &peer, &hash))),
        CoordRequest::Members => {
            let t = state.tracker.lock().expect("not poisoned");
            let mut ids: Vec<[u8; 32]> = match &state.members {
                Some(m) => m.iter().map(|id| *id.as_bytes()).collect(),
                None => t.peers.keys().map(|id| *id.as_bytes()).collect(),
            };
            ids.push(*state.key.public().as_bytes());
            Ok(CoordResponse::Members(ids))
        }
        CoordRequest::Upload { .. } => Err(fail(ErrorKind::Invalid, "upload out of place")),
        _ => Err(fail(ErrorKind::Invalid, "unknown request")),
    };
    r.unwrap_or_else(Into::into)
}

type Reply = Result<CoordResponse, Fail>;

fn internal(e: impl std::fmt::Display) -> Fail {
    fail(ErrorKind::Internal, e.to_string())
}

fn record(state: &State, name: &str) -> Result<VolumeRecord, Fail> {
    let r = state.db.begin_read().map_err(internal)?;
    let t = r.open_table(VOLUMES).map_err(internal)?;
    let v = t
        .get(name)
        .map_err(internal)?
        .ok_or_else(|| fail(ErrorKind::NotFound, format!("no volume named {name:?}")))?;
    postcard::from_bytes(v.value()).map_err(internal)
}

fn head_of(state: &State, id: VolumeId) -> Result<SignedHead, Fail> {
    let r = state.db.begin_read().map_err(internal)?;
    let t = r.open_table(HEADS).map_err(internal)?;
    let v = t
        .get(id.0)
        .map_err(internal)?
        .ok_or_else(|| internal(format!("volume {id} has no head")))?;
    postcard::from_bytes(v.value()).map_err(internal)
}

fn info(state: &State, name: &str) -> Result<VolumeInfo, Fail> {
    let rec = record(state, name)?;
    Ok(VolumeInfo {
        name: name.to_string(),
        id: rec.id,
        created_ms: rec.created_ms,
        head: head_of(state, rec.id)?,
    })
}

fn check_name(name: &str) -> Result<(), Fail> {
    check_volume_name(name).map_err(|e| fail(ErrorKind::Invalid, e.to_string()))
}

fn create(state: &State, name: &str) -> Reply {
    check_name(name)?;
    if record(state, name).is_ok() {
        return Err(fail(
            ErrorKind::AlreadyExists,
            format!("volume {name:?} already exists"),
        ));
    }
    let manifest = Manifest::new().encode();
    let mhash = state.origin.import_bytes(&manifest).map_err(internal)?;
    let id = VolumeId(rand::random());
    let created_ms = now_ms();
    let head = Commit {
        volume: id,
        version: 0,
        parent: None,
        manifest: mhash,
        manifest_size: manifest.len() as u64,
        author: *state.key.public().as_bytes(),
        time_ms: created_ms,
    }
    .sign(&state.key);
    let w = state.db.begin_write().map_err(internal)?;
    {
        let rec = postcard::to_stdvec(&VolumeRecord { id, created_ms }).map_err(internal)?;
        w.open_table(VOLUMES)
            .map_err(internal)?
            .insert(name, rec.as_slice())
            .map_err(internal)?;
        put_head(&w, &head)?;
    }
    w.commit().map_err(internal)?;
    info!(volume = name, %id, "created volume");
    Ok(CoordResponse::Volume(VolumeInfo {
        name: name.to_string(),
        id,
        created_ms,
        head,
    }))
}

fn put_head(w: &redb::WriteTransaction, head: &SignedHead) -> Result<(), Fail> {
    let enc = postcard::to_stdvec(head).map_err(internal)?;
    let c = &head.commit;
    w.open_table(HEADS)
        .map_err(internal)?
        .insert(c.volume.0, enc.as_slice())
        .map_err(internal)?;
    w.open_table(VERSIONS)
        .map_err(internal)?
        .insert((c.volume.0, c.version), c.encode().as_slice())
        .map_err(internal)?;
    Ok(())
}

fn list(state: &State) -> Reply {
    let names: Vec<String> = {
        let r = state.db.begin_read().map_err(internal)?;
        let t = r.open_table(VOLUMES).map_err(internal)?;
        t.iter()
            .map_err(internal)?
            .map(|e| e.map(|(k, _)| k.value().to_string()).map_err(internal))
            .collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for n in names {
        out.push(info(state, &n)?);
    }
    Ok(CoordResponse::Volumes(out))
}

fn rename(state: &State, from: &str, to: &str) -> Reply {
    check_name(to)?;
    let rec = record(state, from)?;
    if record(state, to).is_ok() {
        return Err(fail(
            ErrorKind::AlreadyExists,
            format!("volume {to:?} already exists"),
        ));
    }
    let w = state.db.begin_write().map_err(internal)?;
    {
        let mut t = w.open_table(VOLUMES).map_err(internal)?;
        t.remove(from).map_err(internal)?;
        let enc = postcard::to_stdvec(&rec).map_err(internal)?;
        t.insert(to, enc.as_slice()).map_err(internal)?;
    }
    w.commit().map_err(internal)?;
    info!(from, to, "renamed volume");
    Ok(CoordResponse::Ok)
}

fn delete(state: &State, name: &str) -> Reply {
    let rec = record(state, name)?;
    let w = state.db.begin_write().map_err(internal)?;
    {
        w.open_table(VOLUMES)
            .map_err(internal)?
            .remove(name)
            .map_err(internal)?;
        w.open_table(HEADS)
            .map_err(internal)?
            .remove(rec.id.0)
            .map_err(internal)?;
        w.open_table(VERSIONS)
            .map_err(internal)?
            .retain_in((rec.id.0, 0)..=(rec.id.0, u64::MAX), |_, _| false)
            .map_err(internal)?;
    }
    w.commit().map_err(internal)?;
    info!(volume = name, "deleted volume");
    Ok(CoordResponse::Ok)
}

fn load_manifest(state: &State, head: &Commit) -> Result<Manifest, Fail> {
    let bytes = state.origin.read_all(&head.manifest).map_err(internal)?;
    Manifest::decode(&bytes).map_err(internal)
}

fn commit(
    state: &State,
    name: &str,
    volume: VolumeId,
    base_version: u64,
    changes: Vec<Change>,
    priors: Vec<Option<Entry>>,
    peer: EndpointId,
) -> Reply {
    let rec = record(state, name)?;
    if rec.id != volume {
        return Err(fail(
            ErrorKind::NotFound,
            format!("volume {name:?} was deleted and created again since this copy was made"),
        ));
    }
    if priors.len() != changes.len() {
        return Err(fail(
            ErrorKind::Invalid,
            "one prior entry per change expected",
        ));
    }
    let head = head_of(state, rec.id)?;
    if base_version > head.commit.version {
        return Err(fail(
            ErrorKind::Invalid,
            format!(
                "base version {base_version} is newer than the head ({})",
                head.commit.version
            ),
        ));
    }
    let mut missing = Vec::new();
    for c in &changes {
        if let Some((h, _)) = c.entry.as_ref().and_then(|e| e.blob())
            && !state.origin.has_complete(&h).map_err(internal)?
        {
            missing.push(h.short());
        }
    }
    if !missing.is_empty() {
        return Err(fail(
            ErrorKind::MissingBlobs,
            format!("the origin lacks blobs {}", missing.join(", ")),
        ));
    }
    let current = load_manifest(state, &head.commit)?;
    let overwritten = changes
        .iter()
        .zip(&priors)
        .filter(|(c, prior)| {
            let now = current.get(&c.path);
            match (now, prior) {
                (None, None) => false,
                (Some(a), Some(b)) => !a.same_content(b),
                _ => true,
            }
        })
        .map(|(c, _)| c.path.clone())
        .collect::<Vec<_>>();
    let mut next = current.clone();
    next.apply(&changes)
        .map_err(|e| fail(ErrorKind::Invalid, e.to_string()))?;
    if next == current {
        return Ok(CoordResponse::Committed {
            head,
            overwritten: Vec::new(),
        });
    }
    let enc = next.encode();
    let mhash = state.origin.import_bytes(&enc).map_err(internal)?;
    let new = Commit {
        volume: rec.id,
        version: head.commit.version + 1,
        parent: Some(head.commit.hash()),
        manifest: mhash,
        manifest_size: enc.len() as u64,
        author: *peer.as_bytes(),
        time_ms: now_ms(),
    }
    .sign(&state.key);
    let w = state.db.begin_write().map_err(internal)?;
    put_head(&w, &new)?;
    w.commit().map_err(internal)?;
    info!(
        volume = name,
        version = new.commit.version,
        changes = changes.len(),
        overwritten = overwritten.len(),
        author = %peer.fmt_short(),
        "committed"
    );
    Ok(CoordResponse::Committed {
        head: new,
        overwritten,
    })
}

/// Who holds which blobs, and where they listen.
#[derive(Debug, Default)]
struct Tracker {
    peers: HashMap<EndpointId, (SocketAddr, Option<String>)>,
    holders: HashMap<Hash, HashMap<EndpointId, bool>>,
    /// Round-trip times each node reported to its peers, microseconds.
    rtts: HashMap<EndpointId, HashMap<EndpointId, u32>>,
}

/// Coarse band of a round-trip time, so that peers within a factor of two of each other
/// tie (and askers spread over them at random): below 1 ms is band 0, 1-2 ms band 1,
/// 2-4 ms band 2, and so on; unmeasured peers come after all measured ones.
fn rtt_band(micros: Option<u32>) -> u32 {
    match micros {
        Some(us) => u32::BITS - (us / 1000).leading_zeros(),
        None => u32::MAX,
    }
}

impl Tracker {
    fn forget(&mut self, peer: &EndpointId) {
        self.peers.remove(peer);
        self.rtts.remove(peer);
        for m in self.holders.values_mut() {
            m.remove(peer);
        }
        self.holders.retain(|_, m| !m.is_empty());
    }
}

/// Providers of a blob for `asker`: fleet members that announced it (never the asker), those
/// in the asker's zone first, then by the round-trip time the asker measured to them (in
/// bands of a factor of two, unmeasured last), complete holders before partial ones, in
/// random order within each group so that askers spread over them; then the origin if it
/// holds the blob.
fn lookup(state: &State, asker: &EndpointId, hash: &Hash) -> Vec<coord::ProviderInfo> {
    let t = state.tracker.lock().expect("not poisoned");
    let my_zone = t.peers.get(asker).and_then(|(_, z)| z.clone());
    let my_rtts = t.rtts.get(asker);
    let mut out: Vec<((bool, u32, bool, u64), coord::ProviderInfo)> = t
        .holders
        .get(hash)
        .into_iter()
        .flatten()
        .filter(|(id, _)| *id != asker && state.is_member(id))
        .filter_map(|(id, complete)| {
            let (addr, zone) = t.peers.get(id)?;
            let same_zone = my_zone.is_some() && *zone == my_zone;
            let rtt = rtt_band(my_rtts.and_then(|m| m.get(id)).copied());
            Some((
                (!same_zone, rtt, !complete, rand::random::<u64>()),
                coord::ProviderInfo {
                    id: *id.as_bytes(),
                    addr: *addr,
                    zone: zone.clone(),
                    complete: *complete,
                    origin: false,
                },
            ))
        })
        .collect();
    out.sort_by_key(|(rank, _)| *rank);
    let mut out: Vec<coord::ProviderInfo> = out.into_iter().map(|(_, p)| p).collect();
    if state.origin.has_complete(hash).unwrap_or(false) {
        out.push(coord::ProviderInfo {
            id: *state.addr.id.as_bytes(),
            addr: state.addr.addr,
            zone: None,
            complete: true,
            origin: true,
        });
    }
    out
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
    use super::rtt_band;

    #[test]
    fn rtt_bands_double() {
        assert_eq!(rtt_band(Some(0)), 0);
        assert_eq!(rtt_band(Some(999)), 0);
        assert_eq!(rtt_band(Some(1_000)), 1);
        assert_eq!(rtt_band(Some(1_999)), 1);
        assert_eq!(rtt_band(Some(2_000)), 2);
        assert_eq!(rtt_band(Some(40_000)), 6);
        assert!(rtt_band(Some(u32::MAX)) < rtt_band(None));
    }
}
