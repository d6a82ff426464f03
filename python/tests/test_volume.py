"""voltool's Python API against a real local fleet (see conftest.py)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

import voltool
from voltool import FileEntryType, Volume
from voltool.exception import (
    AgentUnavailableError,
    AlreadyExistsError,
    ConflictError,
    Error,
    InvalidError,
    NotFoundError,
    NotMountedError,
)


def vol_on(fleet, i: int, name: str) -> Volume:
    return Volume.from_name(name, agent=fleet.agents[i])


def test_from_name_objects_and_exceptions(fleet):
    name = fleet.volume_name()
    a = fleet.agents[0]
    with pytest.raises(NotFoundError) as e:
        Volume.from_name(name, agent=a)
    # What Modal's examples catch, and what Python code catches for a missing file.
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, Error)
    assert name in str(e.value)

    vol = Volume.from_name(name, create_if_missing=True, agent=a)
    assert vol.name == name
    # Again: the existing volume, no error.
    Volume.from_name(name, create_if_missing=True, agent=a)
    with pytest.raises(AlreadyExistsError) as e:
        Volume.objects.create(name, agent=a)
    assert isinstance(e.value, FileExistsError)
    Volume.objects.create(name, allow_existing=True, agent=a)
    assert name in [v.name for v in Volume.objects.list(agent=a)]
    assert vol.listdir("/") == []

    with pytest.raises(InvalidError) as e:
        Volume.objects.create("no/slashes", agent=a)
    assert isinstance(e.value, ValueError)
    with pytest.raises(InvalidError):
        Volume.from_name("bad name!", agent=a)

    Volume.objects.delete(name, agent=a)
    assert name not in [v.name for v in Volume.objects.list(agent=a)]
    with pytest.raises(NotFoundError):
        Volume.objects.delete(name, agent=a)
    Volume.objects.delete(name, allow_missing=True, agent=a)


def test_agent_unavailable_is_a_connection_error(tmp_path):
    with pytest.raises(AgentUnavailableError) as e:
        Volume.objects.list(agent=tmp_path)
    assert isinstance(e.value, ConnectionError)
    assert "voltool agent" in str(e.value)


def test_batch_upload_is_one_commit_and_reads_back(fleet, tmp_path):
    name = fleet.volume_name()
    vol = Volume.from_name(name, create_if_missing=True, agent=fleet.agents[0])
    local = tmp_path / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_bytes(b"alpha")
    (local / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(3 << 20))

    versions = [v for v in Volume.objects.list(agent=fleet.agents[0]) if v.name == name]
    assert len(versions) == 1
    with vol.batch_upload() as batch:
        batch.put_file(weights, "/models/weights.bin")
        batch.put_file(io.BytesIO(b"{}"), "models/config.json", mode=0o600)
        batch.put_directory(local, "/data")
        # Nothing is sent before the block ends.
        assert vol.listdir("/") == []

    top = {e.path: e for e in vol.listdir("/")}
    assert set(top) == {"models", "data"}
    assert top["models"].type == FileEntryType.DIRECTORY
    everything = {e.path: e for e in vol.iterdir("/")}
    assert {
        "models",
        "models/weights.bin",
        "models/config.json",
        "data",
        "data/a.txt",
        "data/sub",
        "data/sub/b.bin",
    } == set(everything)
    w = everything["models/weights.bin"]
    assert w.type == FileEntryType.FILE and w.size == 3 << 20 and w.mtime > 0
    assert [e.path for e in vol.listdir("/data", recursive=True)] == [
        "data/a.txt",
        "data/sub",
        "data/sub/b.bin",
    ]
    # A file path lists that file alone.
    assert [e.path for e in vol.listdir("/data/a.txt")] == ["data/a.txt"]

    assert b"".join(vol.read_file("/models/weights.bin")) == weights.read_bytes()
    assert b"".join(vol.read_file("models/config.json")) == b"{}"
    out = io.BytesIO()
    assert vol.read_file_into_fileobj("/data/sub/b.bin", out) == 300_000
    assert out.getvalue() == (local / "sub" / "b.bin").read_bytes()

    # The same bytes on another agent: fetched from its peers or the origin, verified.
    other = vol_on(fleet, 1, name)
    assert b"".join(other.read_file("/models/weights.bin")) == weights.read_bytes()


def test_batch_upload_overwrites_only_with_force_and_never_a_directory(fleet, tmp_path):
    vol = Volume.from_name(fleet.volume_name(), create_if_missing=True, agent=fleet.agents[0])
    with vol.batch_upload() as b:
        b.put_file(io.BytesIO(b"one"), "/f")
        b.put_file(io.BytesIO(b"x"), "/dir/inside")

    with pytest.raises(AlreadyExistsError) as e:
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"two"), "/f")
            b.put_file(io.BytesIO(b"new"), "/g")
    assert isinstance(e.value, FileExistsError) and "f" in str(e.value)
    # All or nothing: /g did not land either.
    assert sorted(e.path for e in vol.listdir("/")) == ["dir", "f"]

    with vol.batch_upload(force=True) as b:
        b.put_file(io.BytesIO(b"two"), "/f")
    assert b"".join(vol.read_file("/f")) == b"two"

    # A file never replaces a directory, force or not: its subtree stays.
    for force in (False, True):
        with pytest.raises(AlreadyExistsError) as e:
            with vol.batch_upload(force=force) as b:
                b.put_file(io.BytesIO(b"file"), "/dir")
        assert "directory" in str(e.value)
    assert b"".join(vol.read_file("/dir/inside")) == b"x"

    # Nothing at all is uploaded when the block raises.
    with pytest.raises(RuntimeError):
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"never"), "/never")
            raise RuntimeError("the job failed")
    assert "never" not in [e.path for e in vol.listdir("/")]

    with pytest.raises(ValueError):
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"x"), "/ends/in/slash/")


class _Breaks(io.RawIOBase):
    """A file object that gives ``n`` bytes and then fails, as a dying disk or network
    file would."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.left == 0:
            raise OSError(5, "the source broke")
        k = min(len(b), self.left)
        b[:k] = b"z" * k
        self.left -= k
        return k


def test_an_upload_whose_source_breaks_commits_nothing(fleet):
    vol = Volume.from_name(fleet.volume_name(), create_if_missing=True, agent=fleet.agents[0])
    with pytest.raises(OSError, match="the source broke"):
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"fine"), "/a")
            b.put_file(_Breaks(3 << 20), "/b")
    # The agent saw the stream end inside /b: nothing of the batch landed.
    assert vol.listdir("/") == []
    with vol.batch_upload() as b:
        b.put_file(io.BytesIO(b"fine"), "/a")
    assert [e.path for e in vol.listdir("/")] == ["a"]


def test_an_upload_the_agent_refuses_at_once_says_why(fleet):
    vol = Volume.from_name(fleet.volume_name(), create_if_missing=True, agent=fleet.agents[0])
    Volume.objects.delete(vol.name, agent=fleet.agents[0])
    # More bytes than the socket holds: the agent has closed before they are all sent.
    with pytest.raises(NotFoundError):
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(b"x" * (16 << 20)), "/big")


def test_read_remove_and_copy(fleet):
    vol = Volume.from_name(fleet.volume_name(), create_if_missing=True, agent=fleet.agents[0])
    with vol.batch_upload() as b:
        b.put_file(io.BytesIO(b"a" * 1000), "/d/a")
        b.put_file(io.BytesIO(b"b" * 10), "/d/e/b")
    with pytest.raises(NotFoundError):
        list(vol.read_file("/missing"))
    with pytest.raises(FileNotFoundError):
        list(vol.read_file("/missing"))
    with pytest.raises(InvalidError):
        list(vol.read_file("/d"))

    vol.copy_files(["/d/a"], "/copy-of-a")
    assert b"".join(vol.read_file("/copy-of-a")) == b"a" * 1000
    with pytest.raises(InvalidError):
        vol.copy_files(["/d"], "/d2")
    vol.copy_files(["/d"], "/d2", recursive=True)
    assert b"".join(vol.read_file("/d2/e/b")) == b"b" * 10

    with pytest.raises(InvalidError):
        vol.remove_file("/d")
    vol.remove_file("/d", recursive=True)
    vol.remove_file("/copy-of-a")
    assert [e.path for e in vol.listdir("/")] == ["d2"]
    with pytest.raises(FileNotFoundError):
        vol.remove_file("/d")


def test_mount_commit_reload_across_hosts(fleet):
    name = fleet.volume_name()
    writer = Volume.from_name(name, create_if_missing=True, agent=fleet.agents[0])
    reader = vol_on(fleet, 1, name)
    with pytest.raises(NotMountedError) as e:
        writer.commit()
    assert isinstance(e.value, RuntimeError) and name in str(e.value)
    with pytest.raises(NotMountedError):
        reader.reload()

    wpath, rpath = fleet.mount_path(name, 0), fleet.mount_path(name, 1)
    writer.mount(wpath)
    reader.mount(rpath)
    (wpath / "ckpt").mkdir()
    (wpath / "ckpt" / "step-1.pt").write_bytes(b"weights-1")
    report = writer.commit()
    assert report["changed"] == 2

    assert not (rpath / "ckpt").exists()
    reader.reload()
    assert (rpath / "ckpt" / "step-1.pt").read_bytes() == b"weights-1"

    # Uncommitted changes block a reload, as in Modal; nothing is lost.
    (rpath / "local-note").write_text("mine")
    (wpath / "ckpt" / "step-2.pt").write_bytes(b"weights-2")
    writer.commit()
    with pytest.raises(ConflictError) as e:
        reader.reload()
    assert isinstance(e.value, RuntimeError)
    assert (rpath / "local-note").read_text() == "mine"

    # commit() ends on the merged head: the reader's commit brings the writer's step-2.
    reader.commit()
    assert (rpath / "ckpt" / "step-2.pt").read_bytes() == b"weights-2"
    assert (rpath / "local-note").read_text() == "mine"
    writer.reload()
    assert (wpath / "local-note").read_text() == "mine"

    with pytest.raises(ConflictError):
        (rpath / "more").write_text("uncommitted")
        reader.unmount()
    reader.unmount(discard=True)
    assert not rpath.exists()
    writer.unmount()


def _held(fleet, i: int, name: str):
    """The version agent ``i`` holds whole of followed volume ``name``, if any."""
    out = fleet.cli(i, "status", "--json")
    assert out.returncode == 0, out.stderr
    for f in json.loads(out.stdout)["follows"]:
        if f["volume"] == name and f["bytes_to_go"] == 0:
            return f["held"]
    return None


def test_a_following_mount_reloads_by_switching_only(fleet):
    name = fleet.volume_name()
    writer = Volume.from_name(name, create_if_missing=True, agent=fleet.agents[0])
    reader = vol_on(fleet, 1, name)
    wpath, rpath = fleet.mount_path(name, 0), fleet.mount_path(name, 1)
    writer.mount(wpath)
    with pytest.raises(ValueError):
        reader.mount(rpath, follow="sometimes")
    assert "following" in reader.mount(rpath, follow=True)
    (wpath / "weights.bin").write_bytes(os.urandom(1 << 20))
    version = writer.commit()["version"]
    deadline = time.monotonic() + 60
    while _held(fleet, 1, name) != version:
        assert time.monotonic() < deadline, "the follower never held the new version"
        time.sleep(0.05)
    report = reader.reload()
    assert report["version"] == version
    assert report["sources"]["origin_bytes"] == 0 and report["sources"]["peer_bytes"] == 0
    assert (rpath / "weights.bin").read_bytes() == (wpath / "weights.bin").read_bytes()
    # A preheat of a version held already fetches nothing.
    assert "0 bytes from peers, 0 from the origin" in reader.prefetch()
    reader.unmount()
    writer.unmount()


def test_lazy_mount_and_lazy_reload(fleet):
    name = fleet.volume_name()
    writer = Volume.from_name(name, create_if_missing=True, agent=fleet.agents[0])
    reader = vol_on(fleet, 1, name)
    wpath, rpath = fleet.mount_path(name, 0), fleet.mount_path(name, 1)
    writer.mount(wpath)
    (wpath / "a.bin").write_bytes(os.urandom(3 << 20))
    writer.commit()
    if os.environ.get("VOLTOOL_SNAPSHOTS") == "copy":
        with pytest.raises(InvalidError, match="lazy mounts need overlay snapshots"):
            reader.mount(rpath, lazy=True)
        writer.unmount()
        return
    assert "lazy" in reader.mount(rpath, lazy=True)
    assert (rpath / "a.bin").read_bytes() == (wpath / "a.bin").read_bytes()
    (wpath / "b.bin").write_bytes(os.urandom(3 << 20))
    version = writer.commit()["version"]
    assert reader.reload(lazy=True)["version"] == version
    assert (rpath / "b.bin").read_bytes() == (wpath / "b.bin").read_bytes()
    reader.unmount()
    writer.unmount()


def test_model_store_example(fleet):
    """Modal's model-store example: training commits a checkpoint; inference reloads when
    the model is not there yet."""
    name = fleet.volume_name()
    train_vol = Volume.from_name(name, create_if_missing=True, agent=fleet.agents[0])
    serve_vol = Volume.from_name(name, agent=fleet.agents[1])
    train_path, serve_path = fleet.mount_path(name, 0), fleet.mount_path(name, 1)
    train_vol.mount(train_path)
    serve_vol.mount(serve_path)

    def load_model(store: Path, model_id: str) -> bytes:
        return (store / "models" / model_id / "model.bin").read_bytes()

    # The training job.
    (train_path / "models" / "m1").mkdir(parents=True)
    (train_path / "models" / "m1" / "model.bin").write_bytes(b"trained")
    train_vol.commit()

    # The inference job.
    try:
        model = load_model(serve_path, "m1")
    except FileNotFoundError:
        serve_vol.reload()
        model = load_model(serve_path, "m1")
    assert model == b"trained"
    train_vol.unmount()
    serve_vol.unmount()


def test_package_exports():
    assert voltool.Volume is Volume
    assert issubclass(voltool.exception.NotFoundError, FileNotFoundError)
    assert voltool.FileEntry.__dataclass_fields__.keys() == {"path", "type", "mtime", "size"}


def test_a_long_listing_arrives_whole(fleet, tmp_path):
    vol = Volume.from_name(fleet.volume_name(), create_if_missing=True, agent=fleet.agents[0])
    n = 8_192 + 50  # more than one part of a listing
    for k in range(n):
        (tmp_path / f"{k:05}").write_bytes(b"")
    with vol.batch_upload() as b:
        b.put_directory(tmp_path, "/many")
    names = [e.path for e in vol.iterdir("/many")]
    assert names == [f"many/{k:05}" for k in range(n)]


def test_a_later_put_in_a_batch_wins(fleet, tmp_path):
    vol = Volume.from_name(fleet.volume_name(), create_if_missing=True, agent=fleet.agents[0])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_bytes(b"x")
    with vol.batch_upload() as b:
        b.put_directory(tmp_path, "/d")
        b.put_file(io.BytesIO(b"first"), "/f")
        b.put_file(io.BytesIO(b"a file now"), "/d")
        b.put_file(io.BytesIO(b"second"), "/f")
    assert sorted((e.path, e.type) for e in vol.iterdir("/")) == [
        ("d", FileEntryType.FILE),
        ("f", FileEntryType.FILE),
    ]
    assert b"".join(vol.read_file("/d")) == b"a file now"
    assert b"".join(vol.read_file("/f")) == b"second"
