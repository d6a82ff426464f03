"""The compiled part of voltool: the agent's control socket, with the GIL released while
it waits."""

from typing import Iterator

def call(agent: str, request: str) -> str:
    """Sends one request (JSON) to the agent whose data directory is ``agent`` and returns
    its answer (JSON). A refusal raises the matching :mod:`voltool.exception` class."""

def read(agent: str, request: str) -> Iterator[bytes]:
    """Sends a request whose answer is a byte stream; yields the bytes as they arrive and
    raises the matching :mod:`voltool.exception` class if the agent fails it."""

UPLOAD_CHUNK: int
"""Most bytes in one chunk of an upload."""

class Uploader:
    """An upload in progress: each file's bytes, in the order of the request's file
    entries, an empty chunk ending each file; then :meth:`finish`."""

    def send(self, chunk: bytes) -> bool:
        """Sends one chunk of the current file; False if the agent has closed the
        connection (:meth:`finish` then raises why)."""
    def abort(self) -> None:
        """Ends the upload early; the agent commits nothing of it."""
    def finish(self) -> str:
        """The agent's answer (JSON); a refusal raises the matching
        :mod:`voltool.exception` class."""

def upload(agent: str, request: str) -> Uploader:
    """Starts an upload (a ``VolumeUpload`` request, JSON) whose bytes the caller sends."""
