"""The state store interface and the record it keeps. Three homes share it:
memory, SQLite (the embedded durable default) and Redis (many replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from service.errors import LimitExceeded, RecurError
from service.store.record import SessionRecord
from service.store.table import Loc, RowWrite

DURABILITY_MODES = ("sync", "async", "none")
# The one source of these defaults: the stores and the server's settings both read them.
DEFAULT_CAPACITY = 100_000  # sessions a memory store keeps, or records a store caches in process
DEFAULT_TOMBSTONE_SECONDS = 2 * 86400.0  # how long an expired id is answered "expired at ..."
DEFAULT_MAX_SESSIONS = 1_000_000  # live sessions a server holds (0: no limit)
DEFAULT_MAX_PENDING_WRITES = 10_000  # sqlite, async: acknowledged records awaiting their commit
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024  # sqlite: bytes of clean records cached in process
DEFAULT_MEMORY_BYTES = 1024 * 1024 * 1024  # memory store: bytes of session records held
DEFAULT_MAX_REPLAY_BYTES = 64 * 1024  # largest last_logits kept for a replay; beyond, last_prev_state

Clock = Callable[[], float]  # seconds since the epoch; injected so tests can move time

T = TypeVar("T")


@dataclass(frozen=True)
class SessionSummary:
    """One line of ListSessions: a session without its arrays."""

    session_id: str
    model: str
    version: int
    offset: int
    created_at: float
    updated_at: float
    expires_at: float

    @classmethod
    def of(cls, r: SessionRecord) -> SessionSummary:
        return cls(r.session_id, r.model, r.version, r.offset, r.created_at, r.updated_at, r.expires_at)


@dataclass(frozen=True)
class Tombstone:
    """What remains of a session that expired, so its id is answered clearly (recur never evicts a session)."""

    tenant: str
    session_id: str
    at: float
    reason: str  # "expired"


class Events:
    """What the core and the stores report as they work (sessions created, replays, store latency...):
    no-ops here; service.metrics.Metrics turns them into Prometheus metrics. Keeps the core and the
    stores free of any metrics library."""

    def created(self, model: str, version: int, tenant: str) -> None: ...
    def deleted(self, tenant: str) -> None: ...
    def expired(self, n: int) -> None: ...
    def replayed(self, model: str, version: int, tenant: str) -> None: ...
    def conflict(self, model: str, version: int, tenant: str) -> None: ...
    def group_commit(self, writes: int) -> None: ...


NO_EVENTS = Events()


class Store(ABC):
    """Where session records live. Writes are compare-and-set on the offset.

    `put` raises StoreConflict when the stored offset is not `prev_offset`; `get`
    raises SessionNotFound or SessionExpired. Returning from `put` means the record
    is as durable as the store's durability mode promises; a cancelled `put` still
    waits for its write to settle (applied or not) before the cancellation propagates.
    `clock` is the store's time, which decides expiry; the core stamps records with it too.
    """

    clock: Clock = time.time
    events: Events = NO_EVENTS  # set by the server to count what the store does

    def write_lag(self) -> float:
        """Seconds the oldest acknowledged write has waited for its commit (0: none waits)."""
        return 0.0

    # A store whose reads may answer from a replica-local hint (redis) sets this: the core then
    # re-reads with `fresh` before refusing a chunk for its offset, so a stale hint costs one read.
    hints: bool = False

    @abstractmethod
    async def get(self, tenant: str, session_id: str) -> SessionRecord: ...

    async def fresh(self, tenant: str, session_id: str) -> SessionRecord:
        """The record as stored, never a hint."""
        return await self.get(tenant, session_id)

    async def get_many(self, tenant: str, session_ids: list[str]) -> list[SessionRecord | Exception]:
        """Several records at once (one round trip where the store allows); an error per missing one."""
        results: list[SessionRecord | Exception] = []
        for session_id in session_ids:
            try:
                results.append(await self.get(tenant, session_id))
            except RecurError as e:
                results.append(e)
        return results

    async def read_rows(self, tenant: str, session_ids: list[str]) -> list[Loc | Exception] | None:
        """Where a store keeps its sessions as rows of a columnar session table (service/store/table.py):
        each session's (block, row), or the error a read of it gives; None where it keeps records (the
        chunk pipeline then reads records)."""
        return None

    async def write_rows(self, tenant: str, w: RowWrite) -> list[Exception | None]:
        """The chunks of `w` stored (rows read by read_rows), each by compare-and-set on the row as read;
        one result per chunk (StoreConflict, or SessionNotFound/SessionExpired: gone since)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no session table")

    @abstractmethod
    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        """Store a new session. Raises AlreadyExists, or LimitExceeded when the store already holds
        `max_sessions` live sessions, or `max_tenant_sessions` of the record's tenant (0: no limit).
        The limits are checked and the record stored in one atomic step: concurrent creates never
        overshoot them. Sessions expired but not yet swept do not count."""

    @abstractmethod
    async def put(self, record: SessionRecord, prev_offset: int) -> None: ...

    async def put_many(self, writes: list[tuple[SessionRecord, int]]) -> list[Exception | None]:
        """Several compare-and-set writes (record, prev_offset); one result per write."""
        results: list[Exception | None] = []
        for record, prev_offset in writes:
            try:
                await self.put(record, prev_offset)
                results.append(None)
            except RecurError as e:
                results.append(e)
        return results

    @abstractmethod
    async def delete(self, tenant: str, session_id: str) -> None: ...

    @abstractmethod
    async def count(self, tenant: str | None = None) -> int:
        """Live sessions (of `tenant`, or of all tenants); expired ones do not count."""

    async def count_by_model(self, tenant: str | None = None) -> dict[tuple[str, int], int] | None:
        """Live sessions per (model, version), of `tenant` or of all tenants; None when the store does not count them
        (Redis: its sessions are not indexed by model). Writes still queued may be left out: flush first
        for an exact answer."""
        return None

    async def list_sessions(self, tenant: str, model: str = "", after_id: str = "",
                            limit: int = 100) -> list[SessionSummary]:
        """Up to `limit` live sessions of `tenant` with ids after `after_id`, ordered by id (of
        `model` only, unless empty)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list sessions")

    @abstractmethod
    async def ping(self) -> None:
        """Return when the store can serve; raise Unavailable (saying why) when it cannot."""

    @abstractmethod
    async def sweep(self) -> int:
        """Remove sessions idle past their TTL at `clock()` (leaving tombstones); returns how many."""

    async def flush(self) -> None:  # noqa: B027 - stores that write through have nothing to flush
        """Wait until every accepted write is stored."""

    async def close(self) -> None:
        await self.flush()


# Every public method of Store, by what it does, for whoever observes a store: service.store.timed times
# the reads and the writes (recur_store_read_duration_seconds, recur_store_write_duration_seconds) and
# forwards the rest untimed. A public method of Store in none of these stops service.store.timed loading.
READS = ("get", "fresh", "get_many", "read_rows")
WRITES = ("create", "put", "put_many", "delete", "write_rows")
UNTIMED = ("write_lag", "count", "count_by_model", "list_sessions", "ping", "sweep", "flush", "close")


async def settled(write: Awaitable[T]) -> T:
    """Await a write that must not be abandoned halfway: if the caller is cancelled, wait for the
    write to finish (applied or not) before the cancellation propagates, so that the session's lock
    is released only over a settled store and the next reader sees one state or the other."""
    future = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def server_limit(limit: int) -> LimitExceeded:
    return LimitExceeded(f"the server holds its limit of {limit} sessions; delete sessions or raise --max-sessions")


def tenant_limit(tenant: str, limit: int) -> LimitExceeded:
    return LimitExceeded(f"tenant {tenant!r} holds its limit of {limit} sessions; delete some of its sessions "
                         "or ask for a higher limit")


def redact_url(url: str) -> str:
    """`url` with any password shown as `***` (in the userinfo or a `password=` query parameter): the
    one way a store URL is formatted into a message or a log line."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable store URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"  # a lone userinfo may be a token
    items = [item.partition("=") for item in parts.query.split("&") if item]
    secret = ("password", "pass", "pwd", "sentinel_password")
    query = "&".join(f"{k}=***" if eq and k.lower() in secret else f"{k}{eq}{v}" for k, eq, v in items)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
