"""Per-session FIFO locks (one chunk at a time per session, in arrival order) and the gate
that counts calls in flight for draining."""

from __future__ import annotations

import asyncio

from service.errors import Unavailable


class _SessionLock:
    """A FIFO lock for one session, counting its holders and waiters so it can be dropped."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


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
        try:
            await entry.lock.acquire()
        except BaseException:
            self._release_user(entry)
            raise

    async def __aexit__(self, *exc: object) -> None:
        entry = self._entry
        assert entry is not None
        entry.lock.release()
        self._release_user(entry)

    def _release_user(self, entry: _SessionLock) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._locks[self._key]


class SessionLocks:
    """One FIFO lock per session, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], _SessionLock] = {}

    def hold(self, key: tuple[str, str]) -> Hold:
        return Hold(self._locks, key)


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
