"""Real `recur serve` processes on free ports: one per module for the tests that share it, and any
number of a test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recur.client import RecurClient
from tests.helpers import Server


@pytest.fixture
def start_server(tiny_models: Path, tmp_path: Path) -> Iterator:
    """start_server(store=..., extra=[...]) -> a started Server; all are killed at the end."""
    servers: list[Server] = []

    def start(store: str | None = None, extra: list[str] | None = None) -> Server:
        s = Server(tiny_models, store or f"sqlite:{tmp_path / 'recur.db'}", extra or [])
        servers.append(s)
        return s.start()

    yield start
    for s in servers:
        s.kill()


@pytest.fixture(scope="module")
def server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server (SQLite on a temp file) for a module's tests: each makes its own sessions and none
    restarts it, changes what it serves or counts every session it holds. A test that does starts its
    own (start_server)."""
    s = Server(tiny_models, f"sqlite:{tmp_path_factory.mktemp('server') / 'recur.db'}")
    try:
        yield s.start()
    finally:
        s.kill()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[RecurClient]:
    with server.client() as c:
        yield c
