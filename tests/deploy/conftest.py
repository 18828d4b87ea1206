"""The compose topology with local processes: redis-server (append-only file), two `recur serve`
replicas on the Redis store, and nginx rendered from the very template and settings the compose
file gives it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Nginx, Redis, Server, Topology


@pytest.fixture
def topology(tiny_models: Path, tmp_path: Path) -> Iterator[Topology]:
    (tmp_path / "redis").mkdir()
    (tmp_path / "nginx").mkdir()
    redis = Redis(tmp_path / "redis").start()
    replicas: list[Server] = []
    nginx: Nginx | None = None
    try:
        for name in ("replica1", "replica2"):
            replicas.append(Server(tiny_models, redis.url, ["--replica-id", name]).start())
        nginx = Nginx(tmp_path / "nginx", [r.port for r in replicas]).start()
        yield Topology(redis, replicas, nginx)
    finally:
        if nginx:
            nginx.stop()
        for r in replicas:
            r.kill()
        redis.kill()
