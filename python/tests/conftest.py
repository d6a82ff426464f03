"""A real local fleet for the Python suite: a coordinator and two agents started with the
built binaries (``voltool-testnet up``), taken down and swept even when tests fail."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VOLTOOL_BIN_DIR", REPO / "target" / "debug"))


def _binary(name: str) -> Path:
    p = BIN / name
    if not p.exists():
        pytest.exit(f"{p} is missing: build it first (cargo build --bins)", returncode=2)
    return p


def _unmount_under(root: Path) -> None:
    """Lazily detaches whatever is still mounted under ``root`` (deepest first)."""
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", p], check=False, capture_output=True)


class Fleet:
    def __init__(self, root: Path):
        self.root = root
        self.agents = [root / "agent-0", root / "agent-1"]
        self._names = itertools.count()

    def volume_name(self) -> str:
        """A fresh volume name for one test."""
        return f"py-{os.getpid()}-{next(self._names)}"

    def mount_path(self, name: str, i: int) -> Path:
        return self.root / f"mnt-{name}-{i}"

    def cli(self, i: int, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(_binary("voltool")), "--agent", str(self.agents[i]), *args],
            input=input,
            capture_output=True,
            timeout=120,
        )


@pytest.fixture(scope="session")
def fleet():
    testnet = _binary("voltool-testnet")
    _binary("voltool")
    root = Path(tempfile.mkdtemp(prefix="voltool-py-"))
    try:
        subprocess.run(
            [str(testnet), "up", "--agents", "2", "--root", str(root)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield Fleet(root)
    finally:
        subprocess.run(
            [str(testnet), "down", "--root", str(root)], capture_output=True, timeout=120
        )
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
