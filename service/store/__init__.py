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
    """`memory:` or `sqlite:PATH`. Durability `none` keeps state in memory only, whatever the URL."""
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
    raise ValueError(f"unknown store URL {url!r}: expected memory: or sqlite:PATH")
