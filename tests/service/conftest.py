"""Real `recur serve` processes on free ports, started and stopped by the tests."""

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


@pytest.fixture
def server(start_server) -> Server:  # type: ignore[no-untyped-def]
    return start_server()


@pytest.fixture
def client(server: Server) -> Iterator[RecurClient]:
    with server.client() as c:
        yield c
