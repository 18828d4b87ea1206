"""State stores: one interface, several homes, chosen by URL."""

from __future__ import annotations

import logging
from pathlib import Path

from service.store.base import DURABILITY_MODES, SessionRecord, Store, Tombstone
from service.store.memory import MemoryStore
from service.store.sqlite import SqliteStore

__all__ = ["DURABILITY_MODES", "MemoryStore", "SessionRecord", "SqliteStore", "Store", "Tombstone", "open_store"]

log = logging.getLogger(__name__)


async def open_store(url: str, *, durability: str, memory_capacity: int, cache_size: int,
                     async_window: float, tombstone_seconds: float) -> Store:
    """`memory:`, `sqlite:PATH` or `redis://HOST:PORT/DB`. Durability `none` keeps state in memory only."""
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
    if url == "memory:" or durability == "none":
        if url != "memory:":
            log.warning("durability none: sessions live in memory only; %s is not used", url)
        return MemoryStore(capacity=memory_capacity, tombstone_seconds=tombstone_seconds)
    if url.startswith("sqlite:"):
        store = SqliteStore(Path(url.removeprefix("sqlite:")), durability=durability, cache_size=cache_size,
                            async_window=async_window, tombstone_seconds=tombstone_seconds)
        return await store.open()
    if url.startswith("redis://"):
        if durability != "sync":
            raise ValueError("the redis store replies after Redis acknowledged each write: use --durability sync")
        from service.store.redis import RedisStore

        return RedisStore(url, tombstone_seconds=tombstone_seconds)
    raise ValueError(f"unknown store URL {url!r}: expected memory:, sqlite:PATH or redis://HOST:PORT/DB")
