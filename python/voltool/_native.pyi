"""The compiled part of voltool: the agent's control socket, with the GIL released while
it waits."""

from typing import Iterator

def call(agent: str, request: str) -> str:
    """Sends one request (JSON) to the agent whose data directory is ``agent`` and returns
    its answer (JSON). A refusal raises the matching :mod:`voltool.exception` class."""

def read(agent: str, request: str) -> Iterator[bytes]:
    """Sends a request whose answer is a byte stream; yields the bytes as they arrive and
    raises the matching :mod:`voltool.exception` class if the agent fails it."""
