//! The file system of the lazy data layer: three levels of directories (the root, the
//! blob directory, 256 by first byte) and a file per blob that a lazy snapshot shows or
//! the store holds whole. Reads wait for what is not verified yet (see the module docs).

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyXattr, Request,
};
use tracing::{debug, warn};
use voltool_protocol::Hash;
use voltool_protocol::blobs::{pieces, pieces_held};
use voltool_protocol::swarm::PieceSet;

use super::{READAHEAD, Shared};
use crate::blobs::Waited;
use crate::store::BLOBS_DIR;

const BLOBS_INO: u64 = 2;
/// The directories of blobs by first byte: `PREFIX_INO + byte`.
const PREFIX_INO: u64 = 3;
/// Blob files: `FILE_INO + index` in the table of blobs looked up.
const FILE_INO: u64 = 1 << 32;
/// Blobs never change (they are named by their hash): the kernel may keep what it
/// learned of them.
const TTL: Duration = Duration::from_secs(3600);
/// Threads serving requests: a read waiting for bytes holds one.
const THREADS: usize = 16;
/// How often a waiting read asks again for what it waits on (a fill that had not yet
/// begun the blob when it asked first).
const ASK_AGAIN: Duration = Duration::from_secs(1);

/// The blobs the kernel knows, by inode: each with its size and the kernel's count of
/// lookups, and let go when the kernel forgets it.
#[derive(Default)]
struct Inodes {
    blobs: std::collections::HashMap<u64, (Hash, u64, u64)>,
    by_hash: std::collections::HashMap<Hash, u64>,
    next: u64,
}

struct LazyFs {
    shared: Arc<Shared>,
    inodes: Mutex<Inodes>,
    /// Whether the kernel passes reads of complete blobs straight to the store's files.
    passthrough: bool,
    /// Open files, by inode: a blob's opens are all read by this process (its pages
    /// cached by the kernel) or all passed through, never both (the kernel refuses).
    opens: Mutex<std::collections::HashMap<u64, Opens>>,
}

/// The opens of one blob.
#[derive(Default)]
struct Opens {
    /// Read by this process.
    served: usize,
    /// Passed through to the store's file: its backing, and how many.
    passed: Option<(fuser::BackingId, usize)>,
}

/// The file handle of opens read by this process, and of opens passed through.
const SERVED: u64 = 0;
const PASSED: u64 = 1;

/// Mounts the file system at `dir`, served by threads of its own until unmounted.
pub(super) fn mount(shared: Arc<Shared>, dir: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("voltool".into()),
        MountOption::Subtype("lazy".into()),
        MountOption::RO,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    cfg.n_threads = Some(THREADS);
    cfg.clone_fd = true;
    let fs = LazyFs {
        shared,
        inodes: Mutex::default(),
        passthrough: false,
        opens: Mutex::default(),
    };
    fuser::spawn_mount(fs, dir, &cfg)
}

fn attr(ino: u64, kind: FileType, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: if kind == FileType::Directory {
            0o555
        } else {
            0o444
        },
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn dir_attr(ino: u64) -> FileAttr {
    attr(ino, FileType::Directory, 0)
}

impl LazyFs {
    /// The blob named `name` in the directory of first byte `prefix`: its hash and size,
    /// if a lazy snapshot shows it or the store holds it whole.
    fn find(&self, prefix: u8, name: &OsStr) -> Option<(Hash, u64)> {
        let hash: Hash = name.to_str()?.strip_suffix(".data")?.parse().ok()?;
        if hash.0[0] != prefix {
            return None;
        }
        if let Some((size, _)) = self.shared.shown(&hash) {
            return Some((hash, size));
        }
        match self.shared.store.meta(&hash) {
            Ok(Some(m)) if m.is_complete() => Some((hash, m.size)),
            _ => None,
        }
    }

    /// Whether the store holds blob `hash` whole.
    fn complete(&self, hash: &Hash) -> bool {
        matches!(self.shared.store.meta(hash), Ok(Some(m)) if m.is_complete())
    }

    /// The inode of blob `hash`, for a lookup the kernel counts.
    fn looked_up(&self, hash: Hash, size: u64) -> u64 {
        let mut t = self.inodes.lock().expect("not poisoned");
        let ino = match t.by_hash.get(&hash) {
            Some(i) => *i,
            None => {
                let ino = FILE_INO + t.next;
                t.next += 1;
                t.by_hash.insert(hash, ino);
                ino
            }
        };
        t.blobs.entry(ino).or_insert((hash, size, 0)).2 += 1;
        ino
    }

    fn blob(&self, ino: u64) -> Option<(Hash, u64)> {
        let t = self.inodes.lock().expect("not poisoned");
        t.blobs.get(&ino).map(|(h, s, _)| (*h, *s))
    }
}

impl Shared {
    /// Reads `len` bytes at `offset` of blob `hash` (of `size` bytes) once they are
    /// verified here; `EIO` when they do not come.
    fn read_blob(&self, hash: Hash, size: u64, offset: u64, len: u32) -> Result<Vec<u8>, Errno> {
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + len as u64).min(size);
        self.ready(hash, size, offset, end)?;
        let path = self.store.data_path(&hash);
        let f = std::fs::File::open(&path).map_err(|e| {
            warn!(blob = %hash, "a lazy read cannot open {}: {e}", path.display());
            Errno::EIO
        })?;
        let mut buf = vec![0; (end - offset) as usize];
        f.read_exact_at(&mut buf, offset).map_err(|e| {
            warn!(blob = %hash, "a lazy read of {}: {e}", path.display());
            Errno::EIO
        })?;
        Ok(buf)
    }

    /// Returns once bytes `offset..end` of blob `hash` are verified here.
    fn ready(&self, hash: Hash, size: u64, offset: u64, end: u64) -> Result<(), Errno> {
        let io = |what: &dyn std::fmt::Display| {
            warn!(blob = %hash, offset, len = end - offset, "a lazy read fails: {what}");
            Errno::EIO
        };
        let meta = self.store.meta(&hash).map_err(|e| io(&e))?;
        if meta.as_ref().is_some_and(|m| m.is_complete()) {
            return Ok(());
        }
        let Some((_, Some(fill))) = self.shown(&hash) else {
            return Err(io(
                &"no lazy snapshot shows it and the store does not hold it",
            ));
        };
        if size <= self.small_max {
            return fill.fetch_now(hash, size).map_err(|e| io(&e));
        }
        let pb = self.piece_bytes;
        let n = pieces(size, pb);
        let unit = |at: u64| (at / pb) as u32;
        let need = PieceSet::from_iter(n, unit(offset)..=unit(end - 1));
        let ahead = PieceSet::from_iter(n, unit(offset)..=unit((end + READAHEAD).min(size) - 1));
        let deadline = Instant::now() + self.deadline;
        let watch = self.serving.landed.watch(hash, n);
        loop {
            let held = match self.store.meta(&hash).map_err(|e| io(&e))? {
                Some(m) if m.is_complete() => return Ok(()),
                Some(m) => pieces_held(size, pb, &m.ranges()),
                None => PieceSet::empty(n),
            };
            let have =
                |landed: &PieceSet| need.iter().all(|u| held.contains(u) || landed.contains(u));
            let landed = watch.pieces();
            if have(&landed) {
                return Ok(());
            }
            let mut want = ahead.clone();
            want.subtract(&held);
            want.subtract(&landed);
            debug!(blob = %hash, pieces = want.count(), "a lazy read waits");
            fill.want_now(hash, size, want);
            let until = deadline.min(Instant::now() + ASK_AGAIN);
            match watch.wait(until, have) {
                Waited::Here => return Ok(()),
                // The download ended: the store's records say whether it is all here.
                Waited::Ended => continue,
                Waited::Failed => return Err(io(&"its download failed")),
                Waited::TimedOut if Instant::now() < deadline => continue,
                Waited::TimedOut => {
                    return Err(io(&format_args!("not here within {:?}", self.deadline)));
                }
            }
        }
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large reads: the kernel's readahead asks for what a sequential reader reads
        // next in one request rather than many.
        let _ = config.set_max_readahead(4 << 20);
        // Complete blobs by passthrough: the kernel reads the store's file itself. This
        // file system then counts as stacked once (the overlay over it is the second and
        // last level), and a backing file must not be on a stacked one itself: a store on
        // an overlay gets no passthrough, its blobs are read here.
        self.passthrough = config
            .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
            .is_ok()
            && config.set_max_stack_depth(1).is_ok();
        debug!(passthrough = self.passthrough, "the lazy data layer is up");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = match parent.0 {
            1 if name == BLOBS_DIR => Some(dir_attr(BLOBS_INO)),
            BLOBS_INO => name
                .to_str()
                .filter(|s| s.len() == 2)
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .filter(|_| name.to_str().is_some_and(|s| s == s.to_lowercase()))
                .map(|b| dir_attr(PREFIX_INO + b as u64)),
            p if (PREFIX_INO..PREFIX_INO + 256).contains(&p) => self
                .find((p - PREFIX_INO) as u8, name)
                .map(|(hash, size)| attr(self.looked_up(hash, size), FileType::RegularFile, size)),
            _ => None,
        };
        match found {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut t = self.inodes.lock().expect("not poisoned");
        if let Some(b) = t.blobs.get_mut(&ino.0) {
            b.2 = b.2.saturating_sub(nlookup);
            if b.2 == 0 {
                let hash = b.0;
                t.blobs.remove(&ino.0);
                t.by_hash.remove(&hash);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 | BLOBS_INO => reply.attr(&TTL, &dir_attr(ino.0)),
            i if (PREFIX_INO..PREFIX_INO + 256).contains(&i) => reply.attr(&TTL, &dir_attr(i)),
            i => match self.blob(i) {
                Some((_, size)) => reply.attr(&TTL, &attr(i, FileType::RegularFile, size)),
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc_accmode() != 0 {
            return reply.error(Errno::EROFS);
        }
        let Some((hash, _)) = self.blob(ino.0) else {
            return reply.error(Errno::EISDIR);
        };
        let mut opens = self.opens.lock().expect("not poisoned");
        let o = opens.entry(ino.0).or_default();
        if o.passed.is_none() && self.passthrough && o.served == 0 && self.complete(&hash) {
            let backing = std::fs::File::open(self.shared.store.data_path(&hash))
                .and_then(|f| reply.open_backing(&f));
            match backing {
                Ok(id) => o.passed = Some((id, 0)),
                Err(e) => debug!(blob = %hash, "no passthrough: {e}"),
            }
        }
        // Once passed through, every open of it is (the kernel has one mode per file).
        if let Some((id, n)) = &mut o.passed {
            *n += 1;
            return reply.opened_passthrough(FileHandle(PASSED), FopenFlags::empty(), id);
        }
        o.served += 1;
        // Bytes never change under a name: what the page cache holds stays good.
        reply.opened(FileHandle(SERVED), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let mut opens = self.opens.lock().expect("not poisoned");
        if let Some(o) = opens.get_mut(&ino.0) {
            if fh.0 == PASSED {
                if let Some((_, n)) = &mut o.passed {
                    *n -= 1;
                    if *n == 0 {
                        o.passed = None;
                    }
                }
            } else {
                o.served = o.served.saturating_sub(1);
            }
            if o.served == 0 && o.passed.is_none() {
                opens.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some((hash, blob_size)) = self.blob(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match self.shared.read_blob(hash, blob_size, offset, size) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // Overlay never lists a data-only layer; a person looking sees the two levels.
        let mut entries = vec![(ino.0, FileType::Directory, ".".to_string())];
        entries.push((1, FileType::Directory, "..".to_string()));
        if ino.0 == 1 {
            entries.push((BLOBS_INO, FileType::Directory, BLOBS_DIR.to_string()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }
}

/// The access-mode bits of open flags that ask for writing (`O_WRONLY | O_RDWR`).
fn libc_accmode() -> i32 {
    rustix::fs::OFlags::WRONLY.bits() as i32 | rustix::fs::OFlags::RDWR.bits() as i32
}
