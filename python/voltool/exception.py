"""Exceptions raised by voltool, named as a Modal user expects them.

Every error the agent reports is an instance of :class:`Error`, and also of the built-in
exception a Python programmer would catch for it: a missing volume or path is a
:class:`FileNotFoundError`, an existing one a :class:`FileExistsError`, bad input a
:class:`ValueError`, a refused reload or commit a :class:`RuntimeError` (as Modal's
``reload()`` raises when files are open), an unreachable agent a :class:`ConnectionError`.
"""

from __future__ import annotations

__all__ = [
    "Error",
    "NotFoundError",
    "AlreadyExistsError",
    "InvalidError",
    "ConflictError",
    "NotMountedError",
    "VerificationError",
    "HeadRefusedError",
    "AgentUnavailableError",
    "ForbiddenError",
]


class Error(Exception):
    """Base class of every voltool error."""


class NotFoundError(Error, FileNotFoundError):
    """No such volume, path or mount (also a :class:`FileNotFoundError`)."""


class AlreadyExistsError(Error, FileExistsError):
    """The volume, remote path or local path exists already, and would be overwritten
    (pass ``force=True``, or ``allow_existing=True`` when creating a volume). A directory is
    never overwritten by a file, even with ``force``."""


class InvalidError(Error, ValueError):
    """Bad input: an invalid volume name or path, a directory where a file is needed."""


class ConflictError(Error, RuntimeError):
    """A reload, unmount or commit was refused: the mount holds uncommitted changes, or a
    file in it is open for writing (the message names it)."""


class NotMountedError(Error, RuntimeError):
    """``commit()`` or ``reload()`` of a volume that is not mounted on this host."""


class VerificationError(Error):
    """Bytes failed BLAKE3 verification, or the agent refused a head."""


class HeadRefusedError(VerificationError):
    """A head from the coordinator was refused: its signature does not verify, or its
    version is older than one this agent has seen (a rollback)."""


class ForbiddenError(Error, PermissionError):
    """The agent refused the caller: another user's mount, or a change of volumes without
    the agent's admin group."""


class AgentUnavailableError(Error, ConnectionError):
    """The local agent cannot be reached (is ``voltool agent`` running with this data
    directory?)."""
