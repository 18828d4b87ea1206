"""Fixtures for the in-process core: a SessionService over the memory store, SQLite on a temp file,
or a store with replica-local hints (tests.helpers.HintedStore), the tiny models loaded once, and a
clock the tests move by hand."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.core import steps
from service.core.sessions import SessionService
from service.engine.engine import Engine, EngineOptions
from service.engine.runtime import RuntimeOptions
from service.repository.models import ModelRepository
from service.store import MemoryStore, SqliteStore, Store
from service.store.base import NO_EVENTS, Events
from tests.helpers import HintedStore, ManualClock

MakeCore = Callable[..., AbstractAsyncContextManager[SessionService]]


@pytest.fixture(scope="session")
def repository(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """The tiny models, and strict-lm: lstm-lm with a vocabulary that has no unknown id."""
    models = tmp_path_factory.mktemp("core") / "models"
    shutil.copytree(tiny_models, models)
    strict = models / "strict-lm" / "1"
    shutil.copytree(models / "lstm-lm" / "1", strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["name"], manifest["vocabulary"]["unk_id"] = "strict-lm", None
    (strict / "manifest.json").write_text(json.dumps(manifest))
    return ModelRepository.load(models, RuntimeOptions())


@pytest.fixture(params=["memory", "sqlite", "hinted"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_core(repository: ModelRepository, tmp_path: Path, store_kind: str, clock: ManualClock,
              monkeypatch: pytest.MonkeyPatch) -> MakeCore:
    """`async with make_core(max_chunk=64) as core:` a started core; settings override the defaults.
    `store=` shares one store between cores (two replicas; `another_replica(store)` gives the second
    its own hints); `events=` receives the core's events. On "memory" and "sqlite" every round that can
    goes by the session table's rows, a round of one chunk too (a server takes rows from 4 chunks on; SQLite
    from its cache, with sync durability); "hinted" keeps a memory store behind hints, so the record round
    runs over the table's records there."""
    if store_kind in ("memory", "sqlite"):
        monkeypatch.setattr(steps, "ROW_ROUND_MIN", 1)

    @asynccontextmanager
    async def make(store: Store | None = None, events: Events = NO_EVENTS, **settings: Any
                   ) -> AsyncIterator[SessionService]:
        cfg = Settings(**settings)
        own = store is None
        if store is None:
            if store_kind in ("memory", "hinted"):
                store = MemoryStore(cfg.memory_capacity, cfg.tombstone_seconds, clock=clock,
                                    memory_bytes=cfg.memory_bytes)
                if store_kind == "hinted":
                    store = HintedStore(store)
            else:
                store = await SqliteStore(tmp_path / "core.db", durability=cfg.durability, cache_size=cfg.cache_size,
                                          tombstone_seconds=cfg.tombstone_seconds, clock=clock,
                                          cache_bytes=cfg.cache_bytes, max_pending_writes=cfg.max_pending_writes
                                          ).open()
        core = SessionService(cfg, repository, store, Engine(EngineOptions()), events=events)
        try:
            yield core
        finally:
            await core.close()
            table = store.inner if isinstance(store, HintedStore) else store
            if isinstance(table, MemoryStore):
                table.check()  # the session table's invariants after everything the test did
            if own:
                await store.close()

    return make
