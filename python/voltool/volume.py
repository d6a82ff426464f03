"""``voltool.Volume``: Modal's Volume API over the local voltool agent.

Every method sends one request to the agent of this host (the directory of its sockets,
its ``--run-dir``, given as ``agent=``, else ``$VOLTOOL_AGENT``, else ``/run/voltool`` if it
exists, else ``~/.voltool``), exactly as the ``voltool`` CLI does; the agent verifies every byte against the coordinator's signed head.
"""

from __future__ import annotations

import enum
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, Iterator, Optional, Sequence, Union

from . import _native
from .exception import InvalidError, NotFoundError

__all__ = ["Volume", "FileEntry", "FileEntryType", "VolumeUploadContext"]

# Volume names, as the agent checks them.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Where a root agent's sockets live (`voltool agent --run-dir`'s default for root).
_SYSTEM_RUN_DIR = "/run/voltool"


def _agent_dir(agent: Union[str, os.PathLike, None]) -> str:
    if agent is not None:
        return os.fspath(agent)
    env = os.environ.get("VOLTOOL_AGENT")
    if env:
        return env
    if os.path.isdir(_SYSTEM_RUN_DIR):
        return _SYSTEM_RUN_DIR
    return os.path.join(os.path.expanduser("~"), ".voltool")


def _call(agent: str, request: Any) -> Any:
    """Sends one request (a JSON-shaped value) to the agent; returns its answer's value."""
    return json.loads(_native.call(agent, json.dumps(request)))


class FileEntryType(enum.IntEnum):
    """The kind of a volume entry (the same values as Modal's)."""

    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    FIFO = 4
    SOCKET = 5


_KINDS = {
    "file": FileEntryType.FILE,
    "dir": FileEntryType.DIRECTORY,
    "symlink": FileEntryType.SYMLINK,
}


@dataclass(frozen=True)
class FileEntry:
    """One entry of a volume listing.

    ``path`` is relative to the volume root (no leading ``/``); ``mtime`` is in seconds
    since the epoch (0 for directories and symlinks, which voltool records without one);
    ``size`` is in bytes (0 for directories and symlinks).
    """

    path: str
    type: FileEntryType
    mtime: int
    size: int

    @classmethod
    def _from_agent(cls, e: dict) -> "FileEntry":
        return cls(
            path=e["path"],
            type=_KINDS.get(e["kind"], FileEntryType.UNSPECIFIED),
            mtime=int(e["mtime_ns"]) // 1_000_000_000,
            size=int(e["size"]),
        )


class _VolumeManager:
    """``Volume.objects``: create, list and delete volumes."""

    def create(
        self,
        name: str,
        *,
        allow_existing: bool = False,
        agent: Union[str, os.PathLike, None] = None,
    ) -> None:
        """Creates an empty volume. An existing one raises
        :class:`~voltool.exception.AlreadyExistsError` unless ``allow_existing``."""
        _call(
            _agent_dir(agent),
            {"VolumeCreate": {"name": name, "allow_existing": allow_existing}},
        )

    def list(self, *, agent: Union[str, os.PathLike, None] = None) -> "list[Volume]":
        """Every volume of the fleet, newest first."""
        a = _agent_dir(agent)
        views = _call(a, "VolumeList")["Volumes"]
        views.sort(key=lambda v: v["created_ms"], reverse=True)
        return [Volume(v["name"], a) for v in views]

    def delete(
        self,
        name: str,
        *,
        allow_missing: bool = False,
        agent: Union[str, os.PathLike, None] = None,
    ) -> None:
        """Deletes a volume and all its versions. A missing one raises
        :class:`~voltool.exception.NotFoundError` unless ``allow_missing``."""
        _call(
            _agent_dir(agent),
            {"VolumeDelete": {"name": name, "allow_missing": allow_missing}},
        )


class Volume:
    """A named, versioned directory tree shared by a fleet.

    Get one with :meth:`Volume.from_name`. Reading methods (``listdir``, ``read_file``, …)
    act on the newest committed version; writing methods (``remove_file``, ``copy_files``,
    ``batch_upload``) each make one commit. ``mount``, ``commit`` and ``reload`` act on this
    host's mount of the volume.
    """

    objects = _VolumeManager()

    def __init__(self, name: str, agent: Union[str, os.PathLike, None] = None):
        self._name = name
        self._agent = _agent_dir(agent)

    def __repr__(self) -> str:
        return f"Volume({self._name!r})"

    @property
    def name(self) -> str:
        """The volume's name."""
        return self._name

    @staticmethod
    def from_name(
        name: str,
        *,
        create_if_missing: bool = False,
        agent: Union[str, os.PathLike, None] = None,
    ) -> "Volume":
        """The volume called ``name``; created empty if it is missing and
        ``create_if_missing``, else :class:`~voltool.exception.NotFoundError`.

        Unlike Modal's lazy handles, the volume is looked up at once, so a missing volume
        is reported here rather than at first use."""
        a = _agent_dir(agent)
        if not _NAME.fullmatch(name):
            raise InvalidError(
                f"invalid volume name {name!r}: 1 to 64 of A-Z a-z 0-9 - _ ."
            )
        if create_if_missing:
            _call(a, {"VolumeCreate": {"name": name, "allow_existing": True}})
        elif name not in (v["name"] for v in _call(a, "VolumeList")["Volumes"]):
            raise NotFoundError(f"no such volume: {name!r}")
        return Volume(name, a)

    @staticmethod
    def rename(
        old_name: str, new_name: str, *, agent: Union[str, os.PathLike, None] = None
    ) -> None:
        """Renames a volume; mounts of it follow."""
        _call(_agent_dir(agent), {"VolumeRename": {"from": old_name, "to": new_name}})

    # --- this host's mount ---------------------------------------------------------

    def mount(
        self,
        path: Union[str, os.PathLike],
        *,
        read_only: bool = False,
        background_commit_secs: Optional[int] = None,
        follow: Union[bool, str] = False,
        lazy: bool = False,
    ) -> str:
        """Mounts the volume at ``path`` on this host (a new path or an empty directory,
        which becomes a mount point that shows each version reloaded; a link to the current
        snapshot where the agent makes copies). With ``follow=True``, each new version is
        downloaded as soon as it is committed, so that :meth:`reload` only switches; with
        ``follow="switch"`` the mount also moves to each downloaded version by itself when
        it holds no uncommitted change and no file open for writing. With ``lazy=True``
        the mount is ready as soon as the version's manifest is here: files read their
        bytes as they arrive, verified, while the rest downloads behind (overlay snapshots
        and FUSE are needed).
        Returns the agent's message."""
        how = {False: "No", True: "Prefetch", "prefetch": "Prefetch", "switch": "Switch"}.get(follow)
        if how is None:
            raise ValueError(f"follow is True, False or 'switch', not {follow!r}")
        # The agent follows no symbolic link on the way: resolve the directory's here.
        path = os.path.abspath(os.fspath(path))
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        return _call(
            self._agent,
            {
                "Mount": {
                    "name": self._name,
                    "path": path,
                    "background_commit_secs": background_commit_secs,
                    "read_only": read_only,
                    "follow": how,
                    "lazy": lazy,
                }
            },
        )["Done"]

    def prefetch(self, version: Optional[int] = None) -> str:
        """Downloads a version (the newest by default) into this host's store now (a
        preheat), so that a later mount or reload of it fetches nothing. Returns the
        agent's message."""
        return _call(
            self._agent, {"Prefetch": {"name": self._name, "version": version}}
        )["Done"]

    def unmount(self, *, discard: bool = False, commit_first: bool = False) -> str:
        """Removes this host's mount of the volume. Uncommitted changes raise
        :class:`~voltool.exception.ConflictError` unless ``discard`` or ``commit_first``."""
        return _call(
            self._agent,
            {"Unmount": {"name": self._name, "mode": _mode(discard, commit_first)}},
        )["Done"]

    def commit(self) -> dict:
        """Commits the changes made in this host's mount, then brings the mount to the
        merged head (other writers' changes arrive, as with Modal's ``commit()``).
        Returns the agent's report (``version``, ``changed``, ``reloaded``, …).

        Raises :class:`~voltool.exception.NotMountedError` when the volume is not mounted
        here."""
        return _call(self._agent, {"Commit": {"name": self._name}})["Committed"]

    def reload(self, *, lazy: bool = False) -> dict:
        """Brings this host's mount to the newest committed version (with ``lazy=True``,
        as soon as its manifest is here: files read their bytes as they arrive). Raises
        :class:`~voltool.exception.ConflictError` while the mount holds uncommitted
        changes or a file in it is open for writing (Modal's ``reload()`` fails while files
        are open too), :class:`~voltool.exception.NotMountedError` when the volume is not
        mounted here."""
        return _call(
            self._agent, {"Reload": {"name": self._name, "mode": "Refuse", "lazy": lazy}}
        )["Reloaded"]

    # --- the committed tree --------------------------------------------------------

    def iterdir(self, path: str = "/", *, recursive: bool = True) -> Iterator[FileEntry]:
        """The entries under ``path`` (everything below it when ``recursive``); for a file,
        that file alone. A missing path raises :class:`~voltool.exception.NotFoundError`."""
        entries = _call(
            self._agent,
            {"VolumeLs": {"name": self._name, "path": path, "recursive": recursive}},
        )["Ls"]
        for e in entries:
            yield FileEntry._from_agent(e)

    def listdir(self, path: str = "/", *, recursive: bool = False) -> "list[FileEntry]":
        """The entries directly in ``path`` (or everything below it when ``recursive``)."""
        return list(self.iterdir(path, recursive=recursive))

    def read_file(self, path: str) -> Iterator[bytes]:
        """The bytes of a file, in pieces as they arrive, verified. A missing file raises
        :class:`~voltool.exception.NotFoundError` (a :class:`FileNotFoundError`)."""
        yield from _native.read(
            self._agent, json.dumps({"VolumeRead": {"name": self._name, "path": path}})
        )

    def read_file_into_fileobj(self, path: str, fileobj: IO[bytes]) -> int:
        """Writes a file's bytes into ``fileobj``; returns how many were written."""
        n = 0
        for piece in self.read_file(path):
            fileobj.write(piece)
            n += len(piece)
        return n

    def remove_file(self, path: str, recursive: bool = False) -> None:
        """Removes a file, or a directory with everything in it when ``recursive``
        (one commit)."""
        _call(
            self._agent,
            {"VolumeRm": {"name": self._name, "path": path, "recursive": recursive}},
        )

    def copy_files(
        self, src_paths: Sequence[str], dst_path: str, recursive: bool = False
    ) -> None:
        """Copies files inside the volume, as ``cp`` does (several sources go into the
        directory ``dst_path``; directories need ``recursive``). No bytes move: the copies
        name the same blobs. One commit."""
        if isinstance(src_paths, (str, bytes)):
            raise TypeError("src_paths must be a sequence of paths, not one string")
        _call(
            self._agent,
            {
                "VolumeCp": {
                    "name": self._name,
                    "srcs": list(src_paths),
                    "dst": dst_path,
                    "recursive": recursive,
                }
            },
        )

    def batch_upload(self, force: bool = False) -> "VolumeUploadContext":
        """A context manager that collects ``put_file`` and ``put_directory`` calls and
        applies them as one commit when the block exits without an exception (nothing is
        uploaded if it raises). Existing files raise
        :class:`~voltool.exception.AlreadyExistsError` unless ``force``; a directory is
        never replaced by a file."""
        return VolumeUploadContext(self, force)


def _mode(discard: bool, commit_first: bool) -> str:
    if discard and commit_first:
        raise ValueError("discard and commit_first exclude each other")
    return "Discard" if discard else "CommitFirst" if commit_first else "Refuse"


def _remote_file(remote_path: Union[str, PurePosixPath]) -> str:
    r = str(remote_path)
    if r.endswith("/"):
        raise ValueError(f"remote_path ({r}) must refer to a file - cannot end with /")
    return PurePosixPath(r).as_posix()


class VolumeUploadContext:
    """What :meth:`Volume.batch_upload` returns. The files are read by this process, as
    its user, and their bytes streamed to the agent when the block exits: the agent never
    opens a local path for anyone."""

    def __init__(self, volume: Volume, force: bool):
        self._volume = volume
        self._force = force
        self._entries: "list[dict]" = []
        # The source of each file entry's bytes, in order: a local path or a file object.
        self._sources: "list[Union[str, BinaryIO]]" = []

    def __enter__(self) -> "VolumeUploadContext":
        return self

    def _file(self, remote: str, mode: int, mtime_ns: int, source: Union[str, BinaryIO]) -> None:
        self._entries.append(
            {"path": remote, "kind": {"File": {"mode": mode & 0o7777, "mtime_ns": mtime_ns}}}
        )
        self._sources.append(source)

    def _walk(self, local: str, remote: str) -> None:
        """``local`` (a directory and everything below it, in name order; symlinks as
        symlinks) at ``remote``."""
        st = os.lstat(local)
        if stat.S_ISDIR(st.st_mode):
            self._entries.append(
                {"path": remote, "kind": {"Dir": {"mode": stat.S_IMODE(st.st_mode)}}}
            )
            for name in sorted(os.listdir(local)):
                _utf8(os.path.join(local, name))
                self._walk(os.path.join(local, name), f"{remote.rstrip('/')}/{name}")
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(local)
            _utf8(target)
            self._entries.append({"path": remote, "kind": {"Symlink": {"target": target}}})
        elif stat.S_ISREG(st.st_mode):
            self._file(remote, stat.S_IMODE(st.st_mode), st.st_mtime_ns, local)
        # Anything else (a socket, a device, a FIFO) is no volume entry.

    def put_file(
        self,
        local_file: Union[str, os.PathLike, BinaryIO],
        remote_path: Union[str, PurePosixPath],
        mode: Optional[int] = None,
    ) -> None:
        """Uploads a local file (a path, or a readable binary file object, which must stay
        readable until the block exits) to ``remote_path``; parent directories are made as
        needed. ``mode`` sets the permission bits (default: the local file's, or 0o644 for
        a file object)."""
        remote = _remote_file(remote_path)
        if isinstance(local_file, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(local_file))
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(f"{path} is not a regular file")
            own = stat.S_IMODE(st.st_mode)
            self._file(remote, own if mode is None else mode, st.st_mtime_ns, path)
        elif hasattr(local_file, "read"):
            self._file(remote, 0o644 if mode is None else mode, time.time_ns(), local_file)
        else:
            raise TypeError("local_file must be a path or a binary file object")

    def put_directory(
        self,
        local_path: Union[str, os.PathLike],
        remote_path: Union[str, PurePosixPath],
        recursive: bool = True,
    ) -> None:
        """Uploads the files of a local directory to the directory ``remote_path`` (with
        its subdirectories when ``recursive``)."""
        local = Path(local_path)
        if not local.is_dir():
            raise NotADirectoryError(f"{local_path} is not a directory")
        remote = PurePosixPath(str(remote_path)).as_posix()
        if recursive:
            self._walk(os.path.abspath(local), remote)
        else:
            for child in sorted(local.iterdir()):
                if child.is_file():
                    st = child.stat()
                    self._file(
                        f"{remote.rstrip('/')}/{child.name}",
                        stat.S_IMODE(st.st_mode),
                        st.st_mtime_ns,
                        os.path.abspath(child),
                    )

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._entries:
            return
        request = {
            "VolumeUpload": {
                "name": self._volume.name,
                "entries": self._entries,
                "force": self._force,
            }
        }
        up = _native.upload(self._volume._agent, json.dumps(request))
        try:
            for source in self._sources:
                if isinstance(source, str):
                    with open(source, "rb") as f:
                        open_ = _send(up, f)
                else:
                    open_ = _send(up, source)
                if not open_ or not up.send(b""):
                    break
        except BaseException:
            up.abort()
            raise
        json.loads(up.finish())


def _send(up: "_native.Uploader", f: BinaryIO) -> bool:
    """Sends a file's bytes; False if the agent closed the connection (it refused)."""
    while True:
        chunk = f.read(_native.UPLOAD_CHUNK)
        if not chunk:
            return True
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        if not up.send(chunk):
            return False


def _utf8(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidError(f"{name!r}: names and link targets must be UTF-8") from None
