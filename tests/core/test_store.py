"""The store interface on its real homes: compare-and-set, group commit, expiry, LRU bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.errors import AlreadyExists, LimitExceeded, SessionExpired, SessionNotFound, StoreConflict
from service.store import MemoryStore, SessionRecord, SqliteStore, Store
from service.store.record import pack_arrays, unpack_arrays
from tests.helpers import ManualClock


def _rec(sid: str, offset: int = 0, ttl: float = 3600, t: float | None = None) -> SessionRecord:
    t = time.time() if t is None else t
    state = [np.full((2, 4), offset, np.float32), np.ones((2, 4), np.float32)]
    return SessionRecord(tenant="default", session_id=sid, model="m", version=1, offset=offset, created_at=t,
                         updated_at=t, ttl=ttl, state=state)


async def _sqlite(path: Path, durability: str = "sync", clock: Callable[[], float] = time.time) -> SqliteStore:
    return await SqliteStore(path, durability=durability, clock=clock).open()


def test_pack_roundtrip() -> None:
    arrays = [np.random.default_rng(0).random((2, 3), dtype=np.float32), np.zeros((5,), np.float32)]
    back = unpack_arrays(pack_arrays(arrays))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_compare_and_set(kind: str, tmp_path: Path) -> None:
    async def go() -> None:
        store: Store = MemoryStore() if kind == "memory" else await _sqlite(tmp_path / "s.db")
        await store.create(_rec("a"))
        with pytest.raises(AlreadyExists):
            await store.create(_rec("a"))
        await store.put(_rec("a", 5), prev_offset=0)
        with pytest.raises(StoreConflict) as e:
            await store.put(_rec("a", 9), prev_offset=0)  # a stale writer loses
        assert e.value.actual == 5
        got = await store.get("default", "a")
        assert got.offset == 5 and got.state[0][0, 0] == 5
        with pytest.raises(SessionNotFound):
            await store.get("default", "b")
        with pytest.raises(SessionNotFound):
            await store.get("other-tenant", "a")  # tenants do not see each other's sessions
        await store.close()

    asyncio.run(go())


def test_sqlite_group_commit_shares_transactions(tmp_path: Path) -> None:
    async def go() -> None:
        store = await _sqlite(tmp_path / "g.db")
        await asyncio.gather(*(store.create(_rec(f"s{i}")) for i in range(200)))
        before = store.commits
        await asyncio.gather(*(store.put(_rec(f"s{i}", 1), prev_offset=0) for i in range(200)))
        commits = store.commits - before
        await store.close()
        reopened = await _sqlite(tmp_path / "g.db")
        offsets = [(await reopened.get("default", f"s{i}")).offset for i in range(200)]
        assert offsets == [1] * 200
        await reopened.close()
        assert commits < 50, commits  # 200 synchronous writes, far fewer fsyncs

    asyncio.run(go())


def test_sqlite_async_durability_flushes_on_close(tmp_path: Path) -> None:
    async def go() -> None:
        store = await _sqlite(tmp_path / "a.db", durability="async")
        await store.create(_rec("x"))
        for i in range(1, 20):
            await store.put(_rec("x", i), prev_offset=i - 1)
        await store.close()
        again = await _sqlite(tmp_path / "a.db")
        assert (await again.get("default", "x")).offset == 19
        await again.close()

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_expiry_leaves_a_tombstone(kind: str, tmp_path: Path) -> None:
    async def go() -> None:
        clock = ManualClock()
        store: Store = MemoryStore(clock=clock) if kind == "memory" else await _sqlite(tmp_path / "e.db", clock=clock)
        await store.create(_rec("old", ttl=0.05, t=clock()))
        await store.create(_rec("young", ttl=3600, t=clock()))
        clock.advance(0.1)
        assert await store.sweep() == 1
        assert await store.count() == 1
        with pytest.raises(SessionExpired, match="expired at"):
            await store.get("default", "old")
        clock.advance(3 * 86400)
        assert await store.sweep() == 1  # the young one too, days later
        with pytest.raises(SessionNotFound) as e:
            await store.get("default", "old")  # tombstones are kept two days, then forgotten
        assert not isinstance(e.value, SessionExpired)
        await store.close()

    asyncio.run(go())


def test_a_full_memory_store_refuses_rather_than_evicts() -> None:
    """Another client's session is never dropped to make room: past its capacity the memory store
    refuses new sessions, naming the limit."""
    async def go() -> None:
        store = MemoryStore(capacity=2)
        for sid in ("a", "b"):
            await store.create(_rec(sid))
        with pytest.raises(LimitExceeded, match=r"holds its limit of 2 sessions; .*--memory-capacity"):
            await store.create(_rec("c"))
        assert [(await store.get("default", s)).offset for s in ("a", "b")] == [0, 0] and await store.count() == 2
        await store.delete("default", "a")
        await store.create(_rec("c"))  # room again
        assert await store.count() == 2

    asyncio.run(go())
