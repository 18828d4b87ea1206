"""Per-session FIFO locks: one chunk at a time per session, in arrival order."""

from __future__ import annotations

import asyncio


class _SessionLock:
    """A FIFO lock for one session, counting its holders and waiters so it can be dropped."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Hold:
    """`async with locks.hold(key)`: a class, not a generator context manager (hot path)."""

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[tuple[str, str], _SessionLock], key: tuple[str, str]) -> None:
        self._locks, self._key = locks, key
        entry = locks.get(key)
        if entry is None:
            entry = locks[key] = _SessionLock()
        entry.users += 1
        self._entry = entry

    async def __aenter__(self) -> None:
        try:
            await self._entry.lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._entry.lock.release()
        self._release_user()

    def _release_user(self) -> None:
        self._entry.users -= 1
        if self._entry.users == 0:
            del self._locks[self._key]


class SessionLocks:
    """One FIFO lock per session, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], _SessionLock] = {}

    def hold(self, key: tuple[str, str]) -> Hold:
        return Hold(self._locks, key)
