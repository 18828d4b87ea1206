"""State stores: one interface, several homes, chosen by URL."""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path

from service.store.base import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_PENDING_WRITES,
    DEFAULT_MEMORY_BYTES,
    DURABILITY_MODES,
    SessionRecord,
    Store,
    Tombstone,
    redact_url,
)
from service.store.memory import MemoryStore
from service.store.redis_url import SCHEMES as REDIS_SCHEMES
from service.store.sqlite import SqliteStore

__all__ = ["DURABILITY_MODES", "MemoryStore", "SessionRecord", "SqliteStore", "Store", "Tombstone", "open_store",
           "redact_url"]

log = logging.getLogger(__name__)


def _sqlite_path(rest: str) -> tuple[Path, int]:
    """`PATH` or `PATH?max_pages=N` (SQLite's PRAGMA max_page_count: a real size limit, for tests)."""
    path, _, query = rest.partition("?")
    params = urllib.parse.parse_qs(query, strict_parsing=bool(query))
    unknown = set(params) - {"max_pages"}
    if unknown:
        raise ValueError(f"unknown sqlite store parameter(s) {sorted(unknown)}: expected max_pages")
    return Path(path), int(params.get("max_pages", ["0"])[-1])


async def open_store(url: str, *, durability: str, memory_capacity: int, cache_size: int,
                     async_window: float, tombstone_seconds: float, cache_bytes: int = DEFAULT_CACHE_BYTES,
                     memory_bytes: int = DEFAULT_MEMORY_BYTES,
                     max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES, redis_min_replicas: int = 0,
                     redis_wait_timeout: float = 1.0, shared: bool = False) -> Store:
    """`memory:`, `sqlite:PATH`, `redis://HOST:PORT/DB`, `redis+sentinel://HOST:PORT,.../SERVICE` or
    `redis+cluster://HOST:PORT,.../`. Durability `none` keeps state in memory only. `shared`: other
    processes serve the same SQLite file (--workers), so this one's records are hints."""
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
    if redis_min_replicas and not url.startswith(REDIS_SCHEMES):
        raise ValueError("--redis-min-replicas applies to a redis store only")
    if url == "memory:" or durability == "none":
        if url != "memory:":
            log.warning("durability none: sessions live in memory only; %s is not used", redact_url(url))
        return MemoryStore(capacity=memory_capacity, tombstone_seconds=tombstone_seconds, memory_bytes=memory_bytes)
    if url.startswith("sqlite:"):
        path, max_pages = _sqlite_path(url.removeprefix("sqlite:"))
        store = SqliteStore(path, durability=durability, cache_size=cache_size, cache_bytes=cache_bytes,
                            max_pending_writes=max_pending_writes, async_window=async_window,
                            tombstone_seconds=tombstone_seconds, max_pages=max_pages, shared=shared)
        return await store.open()
    if url.startswith(REDIS_SCHEMES):
        if durability != "sync":
            raise ValueError("the redis store replies after Redis acknowledged each write: use --durability sync")
        from service.store.redis import RedisStore
        from service.store.redis_cluster import ClusterStore

        options = dict(tombstone_seconds=tombstone_seconds, cache_size=cache_size, cache_bytes=cache_bytes,
                       min_replicas=redis_min_replicas, wait_timeout=redis_wait_timeout)
        try:
            if url.startswith("redis+cluster://"):
                return await ClusterStore(url, **options).open()  # type: ignore[arg-type]
            return RedisStore(url, **options)  # type: ignore[arg-type]
        except ValueError as e:  # the URL's own words never reach the message: it may hold a password
            raise ValueError(f"store URL {redact_url(url)!r}: {e}") from None
    raise ValueError(f"unknown store URL {redact_url(url)!r}: expected memory:, sqlite:PATH, redis://HOST:PORT/DB, "
                     "redis+sentinel://HOST:PORT,.../SERVICE or redis+cluster://HOST:PORT,.../")
