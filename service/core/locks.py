"""Per-session FIFO locks (one chunk at a time per session, in arrival order) and the gate
that counts calls in flight for draining."""

from __future__ import annotations

import asyncio
from collections import deque

from service.errors import Unavailable


class _SessionLock:
    """A FIFO lock for one session, counting its holders and waiters so it can be dropped. Joining
    its queue (`enqueue`) is synchronous, so a batch joins all its sessions' queues in one step:
    batches and single chunks are served in arrival order on every session, and two batches
    cannot deadlock (whoever joined first is ahead on every lock they share)."""

    __slots__ = ("held", "users", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: deque[asyncio.Future] = deque()
        self.users = 0

    def enqueue(self) -> asyncio.Future | None:
        """None: acquired now; else a future that completes when the lock passes to its caller."""
        if not self.held:
            self.held = True
            return None
        f = asyncio.get_running_loop().create_future()
        self.waiters.append(f)
        return f

    def release(self) -> None:
        while self.waiters:
            f = self.waiters.popleft()
            if not f.done():  # a cancelled waiter is skipped
                f.set_result(None)  # the lock passes on, still held
                return
        self.held = False

    def abandon(self, f: asyncio.Future | None) -> None:
        """Give up a place taken by enqueue (the caller was cancelled): release the lock if it had
        passed to us already, else leave the queue."""
        if f is None or (f.done() and not f.cancelled()):
            self.release()
        else:
            f.cancel()


class Hold:
    """`async with locks.hold(key)`: a class, not a generator context manager (hot path).
    Nothing happens until it is entered."""

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[tuple[str, str], _SessionLock], key: tuple[str, str]) -> None:
        self._locks, self._key = locks, key
        self._entry: _SessionLock | None = None

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._key)
        if entry is None:
            entry = self._locks[self._key] = _SessionLock()
        entry.users += 1
        self._entry = entry
        f = entry.enqueue()
        if f is not None:
            try:
                await f
            except BaseException:
                entry.abandon(f)
                _drop_user(self._locks, self._key, entry)
                raise

    async def __aexit__(self, *exc: object) -> None:
        entry = self._entry
        assert entry is not None
        entry.release()
        _drop_user(self._locks, self._key, entry)


def _drop_user(locks: dict[tuple[str, str], _SessionLock], key: tuple[str, str], entry: _SessionLock) -> None:
    entry.users -= 1
    if entry.users == 0:
        del locks[key]


class HoldMany:
    """`async with locks.hold_many(keys)`: every key's lock (distinct keys), its queues all joined
    at once (see _SessionLock); one object for a whole batch."""

    __slots__ = ("_entries", "_keys", "_locks")

    def __init__(self, locks: dict[tuple[str, str], _SessionLock], keys: list[tuple[str, str]]) -> None:
        self._locks, self._keys = locks, keys
        self._entries: list[_SessionLock] = []

    async def __aenter__(self) -> None:
        locks, entries = self._locks, self._entries
        waits: list[asyncio.Future | None] = []
        for key in self._keys:
            entry = locks.get(key)
            if entry is None:
                entry = locks[key] = _SessionLock()
            entry.users += 1
            entries.append(entry)
            waits.append(entry.enqueue())
        try:
            for f in waits:
                if f is not None:
                    await f
        except BaseException:
            for entry, f in zip(entries, waits):
                entry.abandon(f)
            self._drop_users()
            raise

    async def __aexit__(self, *exc: object) -> None:
        for entry in self._entries:
            entry.release()
        self._drop_users()

    def _drop_users(self) -> None:
        for key, entry in zip(self._keys, self._entries):
            _drop_user(self._locks, key, entry)
        self._entries = []


class SessionLocks:
    """One FIFO lock per session, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], _SessionLock] = {}

    def hold(self, key: tuple[str, str]) -> Hold:
        return Hold(self._locks, key)

    def hold_many(self, keys: list[tuple[str, str]]) -> HoldMany:
        """Keys must be distinct (a batch naming a session twice runs it in rounds)."""
        return HoldMany(self._locks, keys)


class CallGate:
    """`async with gate:` counts a call in flight, so draining can wait for it; once the gate
    is closed, entering it is refused with UNAVAILABLE."""

    def __init__(self) -> None:
        self.open = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __aenter__(self) -> None:
        if not self.open:
            raise Unavailable("the server is shutting down; retry on another replica")
        self.in_flight += 1
        self._idle.clear()

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def close(self, timeout: float) -> bool:
        """Refuse new calls and wait up to `timeout` seconds for those in flight; True if all ended."""
        self.open = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
