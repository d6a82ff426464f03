//! The local control socket's messages: how the `voltool` CLI and the Python package talk
//! to the agent of their host (`DIR/agent.sock`, a Unix socket in the agent's data
//! directory).
//!
//! A connection carries one [`Request`] frame (the framing of [`crate::frame`], at most
//! [`MAX_FRAME`] bytes) and gets back any number of [`Event`] frames, the last of which is
//! [`Event::Done`]. The agent is local and trusted by the client; the client is trusted by
//! the agent as far as the socket it came through and its user allow (the agent's access
//! table), and every request is still checked (paths, names, sizes) before it is acted on.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// File name of the socket in the agent's run directory (`--run-dir`).
pub const SOCKET: &str = "agent.sock";
/// File name of the admin socket beside it: the same requests, with the rights of the
/// agent's admin group (whose members alone the kernel lets open it).
pub const ADMIN_SOCKET: &str = "admin.sock";

/// The sockets a client tries, in order: the admin socket (the kernel refuses it to whom
/// the admin group does not include), then the control socket.
pub fn sockets(data: &std::path::Path) -> [std::path::PathBuf; 2] {
    [data.join(ADMIN_SOCKET), data.join(SOCKET)]
}

/// Whether a failure to connect to the admin socket means "try the control socket".
pub fn try_next(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
    )
}
/// Largest control frame.
pub const MAX_FRAME: usize = 64 << 20;

/// A control connection failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Cannot reach the agent.
    #[error(
        "cannot reach the agent at {path}: {source} (is `voltool agent` running with this --run-dir?)"
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
    Frame(#[from] crate::frame::FrameError),
    /// The agent hung up without an answer.
    #[error("the agent closed the connection without an answer")]
    NoAnswer,
}

/// Whether and how a mount follows its volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Follow {
    /// It does not: versions are downloaded when a reload asks.
    #[default]
    No,
    /// Each new version is downloaded as soon as it is committed; the mount moves at
    /// `reload`, as always (Modal's rule), which then only switches.
    Prefetch,
    /// As `Prefetch`, and the mount switches to each version downloaded by itself when it
    /// holds no uncommitted change and no file open for writing (`status` says why it
    /// waits otherwise).
    Switch,
}

impl std::str::FromStr for Follow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(Follow::No),
            "prefetch" => Ok(Follow::Prefetch),
            "switch" => Ok(Follow::Switch),
            o => Err(format!("{o:?}: a mount follows with prefetch or switch")),
        }
    }
}

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
        /// Succeed if it exists already.
        allow_existing: bool,
    },
    /// List volumes.
    VolumeList,
    /// List a directory of a volume (a file path lists that file).
    VolumeLs {
        /// Volume.
        name: String,
        /// Directory (root if `None`).
        path: Option<String>,
        /// Everything below the directory, not only what is directly in it.
        recursive: bool,
    },
    /// The bytes of a file, or of every file below a directory in path order, one after
    /// the other, as [`Event::Data`] (`volume get … -`).
    VolumeGet {
        /// Volume.
        name: String,
        /// Remote path.
        remote: String,
    },
    /// What lies at a path, for the client to write itself (`volume get` into local
    /// files): an [`Event::Item`] for the path itself (its `path` empty), then one for each
    /// entry below it in path order (`path` relative to `remote`), each file's bytes right
    /// after its item as [`Event::Data`]; all from one verified head.
    VolumeExport {
        /// Volume.
        name: String,
        /// Remote path (a file, a symlink or a directory; `/` the root).
        remote: String,
    },
    /// Upload files the client reads itself (`volume put`): the entries, in order; after
    /// this frame, for each file entry in order, its bytes in [`UploadChunk`] frames, the
    /// last of each file empty. A later entry of a path wins over an earlier one.
    VolumeUpload {
        /// Volume.
        name: String,
        /// What goes where.
        entries: Vec<UploadEntry>,
        /// Overwrite existing files (a directory is never replaced by a file).
        force: bool,
    },
    /// The bytes of one file, as [`Event::Data`].
    VolumeRead {
        /// Volume.
        name: String,
        /// Path of a file.
        path: String,
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
        /// Nothing can be written through the mount (overlay mode: a read-only overlay;
        /// copy mode: commits are refused and a reload discards what was written).
        read_only: bool,
        /// Follow the volume while it is mounted: each new version is downloaded as soon
        /// as it is committed, so that a reload only switches (and, with
        /// [`Follow::Switch`], the mount switches to it by itself when it can).
        #[serde(default)]
        follow: Follow,
        /// Ready as soon as the manifest is here: files read their bytes as they arrive
        /// (a read of bytes not here yet waits for them, first in line), while a fill
        /// downloads the rest; then the mount switches to the whole snapshot.
        #[serde(default)]
        lazy: bool,
    },
    /// Remove a mount: its path goes, its snapshot is detached.
    Unmount {
        /// Volume (the only mount if `None`).
        name: Option<String>,
        /// Uncommitted changes policy (as for a reload).
        mode: ReloadMode,
    },
    /// Commit a mount, then bring it to the merged head.
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
        /// Switch as soon as the new manifest is here: files read their bytes as they
        /// arrive while a fill downloads the rest (see [`Request::Mount`]'s `lazy`).
        #[serde(default)]
        lazy: bool,
    },
    /// Keep the newest version of a volume in this host's store as it is committed, and
    /// serve it to peers (`on`), or stop (`voltool follow` / `unfollow`).
    Follow {
        /// Volume.
        name: String,
        /// Follow it, or no longer.
        on: bool,
    },
    /// Download a version of a volume into this host's store once (a preheat).
    Prefetch {
        /// Volume.
        name: String,
        /// The version (its newest if `None`), checked link by link from the signed head.
        #[serde(default)]
        version: Option<u64>,
    },
}

/// One entry of a [`Request::VolumeUpload`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadEntry {
    /// Its path in the volume (`/` or empty: the root, for a directory).
    pub path: String,
    /// What it is.
    pub kind: UploadKind,
}

/// What an [`UploadEntry`] is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadKind {
    /// A file, whose bytes follow in [`UploadChunk`] frames.
    File {
        /// Permission bits.
        mode: u32,
        /// Modification time, ns since the epoch.
        mtime_ns: i64,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Its target.
        target: String,
    },
}

/// Bytes of the file an upload is at; an empty chunk ends the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadChunk(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

/// Most bytes in one [`UploadChunk`].
pub const UPLOAD_CHUNK: usize = 1 << 20;

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
    /// Hash of the commit this one made (hex), as its signed head names it; `None` when
    /// there was nothing to commit.
    #[serde(default)]
    pub head: Option<String>,
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
    /// Seconds taken in all (the reload that follows included).
    pub seconds: f64,
    /// The reload to the merged head that followed, when other writers' changes arrived.
    pub reloaded: Option<Box<ReloadReport>>,
    /// Why the mount stayed on its own view instead of moving to the merged head (a file
    /// open for writing, changes written during the commit); `None` when it moved or had
    /// nothing to move to.
    pub stayed: Option<String>,
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
    /// Hash of the commit the mount shows after the switch (hex); `None` when it did not
    /// switch.
    #[serde(default)]
    pub head: Option<String>,
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
    /// The switch was prepared ahead by the mount's follow (its layer written when the
    /// version arrived): the reload only mounted and switched.
    #[serde(default)]
    pub prepared: bool,
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
    /// A compaction wrote one layer of them all, which the mount's next switch (a reload,
    /// a commit) stacks on instead.
    #[serde(default)]
    pub compacted: bool,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Over the lazy data layer (`--lazy`): how far its fill stands.
    #[serde(default)]
    pub lazy: Option<LazyStatus>,
}

/// A lazy mount's fill.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LazyStatus {
    /// Bytes of the version's files.
    pub total: u64,
    /// Bytes held so far (verified).
    pub held: u64,
    /// Why the fill waits, if it failed last (it tries again).
    pub failed: Option<String>,
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
    /// The content store.
    #[serde(default)]
    pub store: StoreStatus,
    /// Followed volumes (by the host, or by a mount).
    #[serde(default)]
    pub follows: Vec<FollowStatus>,
}

/// A followed volume in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FollowStatus {
    /// Volume (its name when it was followed).
    pub volume: String,
    /// The mount that follows it, if one does.
    pub mount: Option<PathBuf>,
    /// Followed by the host (`voltool follow`).
    pub host: bool,
    /// The mount switches to each version held by itself (`--follow=switch`).
    pub switch: bool,
    /// The newest version the coordinator pushed (verified), if heard yet.
    pub newest: Option<u64>,
    /// The newest version held whole in the store.
    pub held: Option<u64>,
    /// Bytes of the newest version still to download.
    pub bytes_to_go: u64,
    /// Why its download waits, if it does (no room in the store, a failure).
    pub waiting: Option<String>,
    /// Why the last head pushed for it was refused, if one was (forged, rolled back).
    pub refused: Option<String>,
    /// Providers its downloads banned for bytes that failed verification.
    pub banned: Vec<String>,
    /// Verified bytes its downloads received from the origin since the agent started.
    pub origin_bytes: u64,
    /// And from peers.
    pub peer_bytes: u64,
}

/// What the agent's content store holds, and what its budget evicted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreStatus {
    /// Bytes held (blob data and outboards).
    pub bytes: u64,
    /// Blobs held, complete or in part.
    pub blobs: u64,
    /// The budget's high watermark (`--store-max`), if any.
    pub max: Option<u64>,
    /// Blobs evicted since the agent started.
    pub evictions: u64,
    /// Bytes those evictions freed.
    pub evicted_bytes: u64,
    /// Verified bytes this host's downloads received from the origin since the agent
    /// started (every download: reloads, mounts, follows, lazy mounts' fills and reads).
    #[serde(default)]
    pub from_origin: u64,
    /// The same, from peers.
    #[serde(default)]
    pub from_peers: u64,
}

/// A successful answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Reply {
    /// Done, with a message for people.
    Done(String),
    /// Volumes.
    Volumes(Vec<VolumeView>),
    /// A listing, or its last part: a listing of more than [`LS_PART`] entries comes as
    /// [`Event::Entries`] parts first (each frame stays small, whatever the count), and a
    /// client joins them in order.
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
    /// No such volume or path.
    NotFound,
    /// The volume is not mounted on this host.
    NotMounted,
    /// Exists already (use `--force`).
    Exists,
    /// Bad input.
    Invalid,
    /// Uncommitted changes block a reload.
    Dirty,
    /// Verification failed (corrupt bytes, a refused manifest).
    Verify,
    /// A head was refused: its signature does not verify, or it rolls back.
    HeadRefused,
    /// The caller may not ask for this (another user's mount, a change of volumes without
    /// the admin group).
    Forbidden,
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
    /// A part of a long listing (see [`Reply::Ls`]).
    Entries(Vec<LsEntry>),
    /// One entry of a [`Request::VolumeExport`]; a file's bytes follow as [`Event::Data`].
    Item(LsEntry),
}

/// Entries of a listing in one frame: a longer listing comes in parts of this many.
pub const LS_PART: usize = 8_192;

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(<std::borrow::Cow<'de, [u8]>>::deserialize(d)?.into_owned())
    }
}

impl From<crate::HeadError> for ErrorReply {
    fn from(e: crate::HeadError) -> Self {
        ErrorReply {
            code: ErrorCode::HeadRefused,
            message: format!("refused head: {e}"),
        }
    }
}

/// The whole listing: the parts that came as [`Event::Entries`], then the final answer's.
pub fn join_listing(
    mut parts: Vec<LsEntry>,
    answer: Result<Reply, ErrorReply>,
) -> Result<Reply, ErrorReply> {
    match answer {
        Ok(Reply::Ls(last)) if !parts.is_empty() => {
            parts.extend(last);
            Ok(Reply::Ls(parts))
        }
        other => other,
    }
}
