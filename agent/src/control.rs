//! The local control socket (`DIR/agent.sock`): how the `voltool` CLI talks to its agent.
//!
//! A connection carries one request frame (same framing as the wire protocols) and gets back
//! any number of [`Event`] frames, the last of which is [`Event::Done`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use voltool_protocol::frame;

/// File name of the socket in the agent's data directory.
pub const SOCKET: &str = "agent.sock";
/// Largest control frame.
pub const MAX_FRAME: usize = 64 << 20;

/// What to do with uncommitted changes on reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReloadMode {
    /// Refuse when there are uncommitted changes.
    Refuse,
    /// Throw them away.
    Discard,
    /// Commit them, then reload.
    CommitFirst,
}

/// A request to the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Mounts and their heads.
    Status,
    /// Create a volume.
    VolumeCreate {
        /// Name.
        name: String,
    },
    /// List volumes.
    VolumeList,
    /// List a directory of a volume.
    VolumeLs {
        /// Volume.
        name: String,
        /// Directory (root if `None`).
        path: Option<String>,
    },
    /// Upload local files.
    VolumePut {
        /// Volume.
        name: String,
        /// Local file or directory (absolute).
        local: PathBuf,
        /// Remote path; ending in `/` (or `None`) puts it into that directory.
        remote: Option<String>,
        /// Overwrite existing files.
        force: bool,
    },
    /// Download files.
    VolumeGet {
        /// Volume.
        name: String,
        /// Remote path.
        remote: String,
        /// Local destination (absolute), or `None` for the byte stream (stdout).
        local: Option<PathBuf>,
        /// Overwrite existing local files.
        force: bool,
    },
    /// Remove paths.
    VolumeRm {
        /// Volume.
        name: String,
        /// Path.
        path: String,
        /// Remove directories with their contents.
        recursive: bool,
    },
    /// Copy inside a volume.
    VolumeCp {
        /// Volume.
        name: String,
        /// Sources.
        srcs: Vec<String>,
        /// Destination.
        dst: String,
        /// Copy directories.
        recursive: bool,
    },
    /// Rename a volume.
    VolumeRename {
        /// Old name.
        from: String,
        /// New name.
        to: String,
    },
    /// Delete a volume.
    VolumeDelete {
        /// Name.
        name: String,
        /// Succeed if it does not exist.
        allow_missing: bool,
    },
    /// Mount a volume at a host path.
    Mount {
        /// Volume.
        name: String,
        /// Host path (absolute); becomes a symlink to the current snapshot.
        path: PathBuf,
        /// Commit in the background every this many seconds, and at shutdown.
        background_commit_secs: Option<u64>,
    },
    /// Commit a mount.
    Commit {
        /// Volume (the only mount if `None`).
        name: Option<String>,
    },
    /// Reload a mount.
    Reload {
        /// Volume (the only mount if `None`).
        name: Option<String>,
        /// Uncommitted changes policy.
        mode: ReloadMode,
    },
}

/// One line of `volume list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeView {
    /// Name.
    pub name: String,
    /// Id.
    pub id: String,
    /// Head version.
    pub version: u64,
    /// Creation time (ms since epoch).
    pub created_ms: u64,
    /// Time of the head commit (ms since epoch).
    pub updated_ms: u64,
}

/// One line of `volume ls`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LsEntry {
    /// Path in the volume.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    pub kind: String,
    /// Size (files).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (ns since epoch), files only.
    pub mtime_ns: i64,
    /// Symlink target.
    pub target: Option<String>,
}

/// Where a reload's bytes came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sources {
    /// Bytes verified from the origin.
    pub origin_bytes: u64,
    /// Bytes verified from peers.
    pub peer_bytes: u64,
    /// Bytes already in the local store (not fetched).
    pub local_bytes: u64,
    /// Providers banned for bad bytes.
    pub banned: Vec<String>,
}

/// The outcome of a commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitReport {
    /// Volume.
    pub volume: String,
    /// Version after the commit (unchanged if nothing to commit).
    pub version: u64,
    /// Paths changed by this commit.
    pub changed: usize,
    /// Bytes uploaded to the origin.
    pub uploaded_bytes: u64,
    /// Bytes read and hashed.
    pub hashed_bytes: u64,
    /// Paths where this commit overwrote another writer's newer change.
    pub overwritten: Vec<String>,
    /// Seconds scanning and hashing (and copying changed files into the store).
    pub scan_seconds: f64,
    /// Seconds uploading to the origin.
    pub upload_seconds: f64,
    /// Seconds taken in all.
    pub seconds: f64,
}

/// The outcome of a reload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Volume.
    pub volume: String,
    /// Version before.
    pub from_version: u64,
    /// Version after.
    pub version: u64,
    /// Whether anything changed.
    pub changed: bool,
    /// Bytes of the files fetched.
    pub fetched_files_bytes: u64,
    /// Where bytes came from.
    pub sources: Sources,
    /// A commit made first (`--commit-first`).
    pub committed: Option<CommitReport>,
    /// Paths this mount committed that another writer overwrote since (last writer won).
    pub overwritten_by_others: Vec<String>,
    /// Seconds fetching blobs.
    pub download_seconds: f64,
    /// Seconds building and switching the snapshot.
    pub build_seconds: f64,
    /// Seconds taken in all.
    pub seconds: f64,
}

/// One mount in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountStatus {
    /// Volume.
    pub volume: String,
    /// Host path.
    pub path: PathBuf,
    /// Version of the mounted snapshot.
    pub local_version: u64,
    /// Version of the coordinator's head, if reachable.
    pub remote_version: Option<u64>,
    /// Background commit interval.
    pub background_commit_secs: Option<u64>,
    /// The last reload's figures, if any.
    pub last_reload: Option<ReloadReport>,
    /// Metadata layers under the mount (overlay mode; 0 in copy mode).
    #[serde(default)]
    pub layers: usize,
}

/// The agent's status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// Node id.
    pub node_id: String,
    /// Listening address.
    pub addr: String,
    /// Coordinator.
    pub coordinator: String,
    /// Zone label.
    pub zone: Option<String>,
    /// How snapshots are made here: `overlay` (layers over the store, one write per byte)
    /// or `copy` (copies or reflinks, and a scan to find changes).
    pub snapshots: String,
    /// Mounts.
    pub mounts: Vec<MountStatus>,
}

/// A successful answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Reply {
    /// Done, with a message for people.
    Done(String),
    /// Volumes.
    Volumes(Vec<VolumeView>),
    /// Directory listing.
    Ls(Vec<LsEntry>),
    /// A commit.
    Committed(CommitReport),
    /// A reload.
    Reloaded(ReloadReport),
    /// Status.
    Status(StatusReport),
}

/// Classes of failure, for exit codes and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// No such volume, path or mount.
    NotFound,
    /// Exists already (use `--force`).
    Exists,
    /// Bad input.
    Invalid,
    /// Uncommitted changes block a reload.
    Dirty,
    /// Verification failed (corrupt bytes, forged or old head).
    Verify,
    /// Anything else.
    Failed,
}

/// A failed answer.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorReply {
    /// Class.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

/// What the agent sends back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Event {
    /// Progress of the current phase.
    Progress {
        /// Phase (`hash`, `upload`, `download`, …).
        phase: String,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
    /// Bytes of a file streamed to the client (`get -`).
    Data(#[serde(with = "serde_bytes_vec")] Vec<u8>),
    /// The end.
    Done(Box<Result<Reply, ErrorReply>>),
}

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(<std::borrow::Cow<'de, [u8]>>::deserialize(d)?.into_owned())
    }
}

/// A control connection failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Cannot reach the agent.
    #[error(
        "cannot reach the agent at {path}: {source} (is `voltool agent` running with this --data?)"
    )]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// A bad frame.
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    /// The agent hung up without an answer.
    #[error("the agent closed the connection without an answer")]
    NoAnswer,
}

/// Writes one frame to a Unix stream.
pub async fn write_msg<T: Serialize>(s: &mut UnixStream, msg: &T) -> std::io::Result<()> {
    s.write_all(&frame::encode(msg)).await
}

/// Reads one frame, `None` at a clean end.
pub async fn read_msg<T: serde::de::DeserializeOwned>(
    s: &mut UnixStream,
) -> Result<Option<T>, ControlError> {
    let mut prefix = [0u8; frame::PREFIX_LEN];
    match s.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(prefix, MAX_FRAME)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok(Some(frame::decode(&body)?))
}

/// Sends a request to the agent whose data directory is `data`; calls `on_event` for every
/// event before the last and returns the final answer.
pub async fn call(
    data: &Path,
    req: &Request,
    mut on_event: impl FnMut(Event),
) -> Result<Result<Reply, ErrorReply>, ControlError> {
    let path = data.join(SOCKET);
    let mut s = UnixStream::connect(&path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    write_msg(&mut s, req).await?;
    loop {
        match read_msg::<Event>(&mut s).await? {
            Some(Event::Done(r)) => return Ok(*r),
            Some(e) => on_event(e),
            None => return Err(ControlError::NoAnswer),
        }
    }
}
