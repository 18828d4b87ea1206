"""The stores under pressure, in process: write-behind that loses nothing it acknowledged (with a
one-record cache, under backpressure, across a failed commit), atomic session limits, byte bounds,
the replay field, old files, SQLite's own limits (read-only, full), and secrets kept out of messages."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.errors import LimitExceeded, SessionExpired, Unavailable
from service.store import MemoryStore, SessionRecord, SqliteStore, Store
from service.store.base import redact_url
from service.store.write_queue import Put
from service.types import StepInput
from tests.core.conftest import MakeCore
from tests.helpers import ManualClock


def _rec(sid: str, offset: int = 0, ttl: float = 3600, t: float | None = None, tenant: str = "default",
         hidden: int = 4) -> SessionRecord:
    t = time.time() if t is None else t
    state = [np.full((2, hidden), offset, np.float32), np.ones((2, hidden), np.float32)]
    return SessionRecord(tenant=tenant, session_id=sid, model="m", version=1, offset=offset, created_at=t, updated_at=t,
                         ttl=ttl, state=state)


def _advance(rec: SessionRecord, clock: ManualClock | None = None) -> SessionRecord:
    t = time.time() if clock is None else clock()
    return rec.copy(offset=rec.offset + 1, updated_at=t, state=[np.full_like(rec.state[0], rec.offset + 1),
                                                                 rec.state[1]])


def _disk_offsets(path: Path) -> dict[str, int]:
    """What another reader of the file sees: only what was committed."""
    with sqlite3.connect(path) as c:
        return dict(c.execute("SELECT id, [offset] FROM sessions").fetchall())


async def _reopened_offsets(path: Path, sids: list[str]) -> list[int]:
    store = await SqliteStore(path).open()
    try:
        return [(await store.get("default", sid)).offset for sid in sids]
    finally:
        await store.close()


async def _until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- 1. write-behind that cannot lose what it acknowledged -----------------------------------------
async def test_async_with_a_one_record_cache_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """200 sessions read and written per window through a cache of one record: every read sees the
    acknowledged state (pinned while uncommitted), so no write-behind is refused and none is lost."""
    path = tmp_path / "a.db"
    store = await SqliteStore(path, durability="async", cache_size=1, async_window=0.05).open()
    sids = [f"s{i}" for i in range(200)]
    await asyncio.gather(*(store.create(_rec(sid)) for sid in sids))
    acked = dict.fromkeys(sids, 0)

    async def step(sid: str) -> None:
        rec = await store.get("default", sid)
        assert rec.offset == acked[sid]  # never an older state from the disk
        await store.put(_advance(rec), prev_offset=rec.offset)
        acked[sid] = rec.offset + 1

    for _ in range(5):
        await asyncio.gather(*(step(sid) for sid in sids))
    assert not store.writes.fenced_count
    await store.close()
    assert await _reopened_offsets(path, sids) == [5] * 200


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_the_core_over_async_with_a_one_record_cache_loses_nothing(make_core: MakeCore, tmp_path: Path) -> None:
    """The same through the core: 200 sessions stepped at once, three times; every chunk applied."""
    sids = [f"c{i}" for i in range(200)]
    async with make_core(durability="async", cache_size=1) as core:
        for sid in sids:
            await core.create("default", "gru-lm", 0, sid)
        for k in range(3):
            chunks = [StepInput(sid, tokens=[k + 1, 2], expected_offset=2 * k) for sid in sids]
            results = await asyncio.gather(*(core.step("default", c) for c in chunks), return_exceptions=True)
            refused = [r for r in results if isinstance(r, Exception)]
            assert not refused, f"{len(refused)} of 200 chunks refused: {refused[0]}"
    assert await _reopened_offsets(tmp_path / "core.db", sids) == [6] * 200


async def test_a_batch_of_500_sessions_under_async_stays_at_its_acknowledged_offsets(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = await SqliteStore(path, durability="async", cache_size=16, async_window=0.05).open()
    sids = [f"s{i}" for i in range(500)]
    await asyncio.gather(*(store.create(_rec(sid)) for sid in sids))
    for k in range(1, 4):
        records = await store.get_many("default", sids)
        assert all(isinstance(r, SessionRecord) and r.offset == k - 1 for r in records)
        results = await store.put_many([(_advance(r), r.offset) for r in records])  # type: ignore[arg-type]
        assert results == [None] * 500
    await store.close()
    assert await _reopened_offsets(path, sids) == [3] * 500


async def test_a_full_pending_map_slows_replies_and_drops_nothing(tmp_path: Path) -> None:
    """With room for 8 uncommitted sessions and a window of 10 s, the 9th write waits for a commit
    (which it hurries) instead of being acknowledged beyond the bound."""
    path = tmp_path / "p.db"
    store = await SqliteStore(path, durability="async", max_pending_writes=8, async_window=10.0, cache_size=4).open()
    sids = [f"s{i}" for i in range(20)]
    await asyncio.gather(*(store.create(_rec(sid)) for sid in sids))
    commits = store.commits
    for sid in sids[:8]:
        await store.put(_rec(sid, 1), prev_offset=0)
    assert store.commits == commits and store.writes.pending_count == 8  # acknowledged, held, not yet committed
    assert set(_disk_offsets(path).values()) == {0}
    started = time.monotonic()
    await store.put(_rec(sids[8], 1), prev_offset=0)
    assert store.commits > commits and time.monotonic() - started < 5  # it waited for a commit, not the window
    assert all(_disk_offsets(path)[sid] == 1 for sid in sids[:8])
    for sid in sids[9:]:
        await store.put(_rec(sid, 1), prev_offset=0)
        assert store.writes.pending_count <= 8
    await store.close()
    assert await _reopened_offsets(path, sids) == [1] * 20


async def test_a_failed_write_behind_fences_its_session_until_it_is_stored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file turns read-only (SQLite's query_only: every write refused with SQLITE_READONLY)
    after a write was acknowledged: that session answers UNAVAILABLE instead of its older state,
    other writes are refused, reads go on; once writable, the write is stored and all resumes."""
    path = tmp_path / "secret-dir" / "f.db"
    store = await SqliteStore(path, durability="async", async_window=0.05).open()
    await store.create(_rec("a"))
    await store.create(_rec("b"))
    assert store._conn is not None
    conn = store._conn
    await store._run(conn.execute, "PRAGMA query_only=ON")
    await store.put(_rec("a", 1), prev_offset=0)  # acknowledged; its commit will fail
    await _until(lambda: store.writes.is_fenced(("default", "a")))
    for call in (store.get("default", "a"), store.put(_rec("a", 2), prev_offset=1), store.delete("default", "a")):
        with pytest.raises(Unavailable, match="session 'a' is fenced: its last acknowledged write could not be "
                                              r"stored \(OperationalError\)"):
            await call
    with pytest.raises(Unavailable, match=r"the sqlite session store failed \(OperationalError\); nothing was "
                                          "applied, retry shortly") as e:
        await store.put(_rec("b", 1), prev_offset=0)  # not acknowledged while the store fails
    assert "secret-dir" not in str(e.value)
    with pytest.raises(Unavailable, match="failing"):
        await store.ping()
    assert (await store.get("default", "b")).offset == 0  # reads still served
    assert _disk_offsets(path) == {"a": 0, "b": 0}
    await store._run(conn.execute, "PRAGMA query_only=OFF")
    await _until(lambda: not store.writes.fenced_count)
    assert (await store.get("default", "a")).offset == 1
    await store.put(_rec("b", 1), prev_offset=0)
    await store.ping()
    await store.close()
    assert await _reopened_offsets(path, ["a", "b"]) == [1, 1]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("secret-dir" not in m for m in errors)


async def test_an_acknowledged_write_that_can_never_be_stored_fences_for_good(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another writer moved the row under the store (it must be the file's only writer): the
    write-behind's compare-and-set fails. The session is refused, never served from the disk."""
    path = tmp_path / "secret-dir" / "g.db"
    store = await SqliteStore(path, durability="async", async_window=10.0).open()
    await store.create(_rec("a"))
    await store.create(_rec("b"))
    await store.put(_rec("a", 1), prev_offset=0)  # acknowledged, waits out the window
    with sqlite3.connect(path) as other:
        other.execute("UPDATE sessions SET [offset]=7 WHERE id='a'")
    await store.flush()
    with pytest.raises(Unavailable, match=r"session 'a' is fenced: .* \(StoreConflict\); it is refused rather than "
                                          "served from an older state"):
        await store.get("default", "a")
    await store.put(_rec("b", 1), prev_offset=0)  # other sessions go on
    assert (await store.get("default", "b")).offset == 1
    await store.close()
    fenced = [r for r in caplog.records if r.levelno == logging.ERROR and "fenced" in r.getMessage()]
    assert fenced and all("secret-dir" not in r.getMessage() for r in fenced)


async def test_a_write_that_can_never_be_stored_does_not_take_its_batch_with_it(tmp_path: Path) -> None:
    path = tmp_path / "poison.db"
    store = await SqliteStore(path, durability="async", async_window=10.0).open()
    for sid in "abc":
        await store.create(_rec(sid))
    await store.put(_rec("a", 1), prev_offset=0)
    await store.put(_rec("b", 1).copy(last_start=None), prev_offset=0)  # NOT NULL: an IntegrityError at commit
    await store.put(_rec("c", 1), prev_offset=0)
    await store.flush()
    assert _disk_offsets(path) == {"a": 1, "b": 0, "c": 1}
    with pytest.raises(Unavailable, match=r"session 'b' is fenced: .*\(IntegrityError\)"):
        await store.get("default", "b")
    await store.close()


# -- 6. SQLite's own limits: a full database ---------------------------------------------------------
@pytest.mark.parametrize("durability", ["sync", "async"])
async def test_a_full_database_refuses_writes_keeps_what_it_acknowledged_and_recovers(
        tmp_path: Path, durability: str) -> None:
    """PRAGMA max_page_count: SQLite's real SQLITE_FULL. Creates fail with UNAVAILABLE; a write-behind
    that no longer fits is kept (its session fenced) while deletes of other sessions free the space."""
    path = tmp_path / "full.db"
    store = await SqliteStore(path, durability=durability, max_pages=60, async_window=0.02).open()
    made: list[str] = []
    with pytest.raises(Unavailable, match=r"failed \(OperationalError\); nothing was applied") as e:
        for i in range(100):
            await store.create(_rec(f"s{i}", hidden=1000))  # 8 KB of state: a few pages each
            made.append(f"s{i}")
    assert str(path) not in str(e.value) and 3 < len(made) < 100
    assert [(await store.get("default", s)).offset for s in made] == [0] * len(made)
    grown = _rec(made[0], 1, hidden=1000).copy(last_logits=np.ones((4000, 1), np.float32))  # 16 KB more
    with pytest.raises(Unavailable):
        await store.put(grown, prev_offset=0)  # while the last commit failed, even async waits for its commit
    await store.delete("default", made[-1])  # fits, and frees a few pages (not enough for the grown record)
    if durability == "sync":
        with pytest.raises(Unavailable):
            await store.put(grown, prev_offset=0)
    else:
        await store.put(grown, prev_offset=0)  # acknowledged; its commit cannot fit it
        await _until(lambda: store.writes.is_fenced(("default", made[0])))
        with pytest.raises(Unavailable, match="is fenced"):
            await store.get("default", made[0])
    for sid in made[1:4]:
        await store.delete("default", sid)  # these fit (and free pages)
    if durability == "sync":
        await store.put(grown, prev_offset=0)
    await _until(lambda: not store.writes.fenced_count)
    assert (await store.get("default", made[0])).offset == 1
    await store.create(_rec("after", hidden=1000))
    await store.ping()
    await store.close()
    assert await _reopened_offsets(path, [made[0], "after"]) == [1, 0]


# -- 2. atomic session limits ---------------------------------------------------------------------------
async def test_64_concurrent_creates_at_a_limit_of_100_store_exactly_100(make_core: MakeCore) -> None:
    async with make_core(max_sessions=100) as core:
        for i in range(50):
            await core.create("t", "gru-lm", 0, f"old{i}")
        results = await asyncio.gather(*(core.create("t", "gru-lm", 0, f"new{i}") for i in range(64)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(refused) == 14 and all(isinstance(r, LimitExceeded) for r in refused)
        assert "the server holds its limit of 100 sessions; delete sessions or raise --max-sessions" in str(refused[0])
        assert await core.store.count() == 100 and await core.store.count("t") == 100


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_store_limits_are_atomic_per_tenant_and_exclude_expired(kind: str, tmp_path: Path) -> None:
    clock = ManualClock()
    store: Store = (MemoryStore(clock=clock) if kind == "memory" else
                    await SqliteStore(tmp_path / "l.db", clock=clock).open())
    results = await asyncio.gather(*(store.create(_rec(f"x{i}", t=clock(), tenant="x", ttl=10), max_sessions=100,
                                                  max_tenant_sessions=5) for i in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 15 and "tenant 'x' holds its limit of 5 sessions" in str(refused[0])
    results = await asyncio.gather(*(store.create(_rec(f"y{i}", t=clock(), tenant="y", ttl=10), max_sessions=8,
                                                  max_tenant_sessions=5) for i in range(20)), return_exceptions=True)
    assert sum(r is None for r in results) == 3  # 8 in all
    assert (await store.count(), await store.count("x"), await store.count("y")) == (8, 5, 3)
    clock.advance(11)  # all expired, none swept
    assert (await store.count(), await store.count("x")) == (0, 0)
    for i in range(8):
        await store.create(_rec(f"z{i}", t=clock(), tenant="z"), max_sessions=8, max_tenant_sessions=8)
    with pytest.raises(LimitExceeded, match="limit of 8 sessions"):
        await store.create(_rec("z9", t=clock(), tenant="z"), max_sessions=8)
    with pytest.raises(SessionExpired, match="expired at"):
        await store.get("x", "x0")  # the expired ones made room and left their tombstones
    await store.delete("z", "z0")
    await store.create(_rec("z9", t=clock(), tenant="z"), max_sessions=8)
    assert (await store.count(), await store.count("z")) == (8, 8)
    await store.close()
    if kind == "sqlite":  # the counters are kept in the file: right after a reopen
        again = await SqliteStore(tmp_path / "l.db", clock=clock).open()
        assert (await again.count(), await again.count("z"), await again.count("x")) == (8, 8, 0)
        assert await again.sweep() == 0 and await again.count() == 8
        await again.close()


async def test_a_sweep_goes_a_few_thousand_rows_a_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.store.sqlite._SWEEP_AT_A_TIME", 7)
    clock = ManualClock()
    store = await SqliteStore(tmp_path / "sw.db", clock=clock).open()
    await asyncio.gather(*(store.create(_rec(f"s{i}", t=clock(), ttl=10)) for i in range(30)))
    await store.create(_rec("kept", t=clock(), ttl=100))
    clock.advance(11)
    commits = store.commits
    assert await store.sweep() == 30 and store.commits - commits == 5  # 7 + 7 + 7 + 7 + 2
    assert await store.count() == 1
    with pytest.raises(SessionExpired):
        await store.get("default", "s29")
    await store.close()


# -- 3. bounded in bytes ---------------------------------------------------------------------------------
async def test_the_sqlite_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    size = _rec("s", hidden=1000).nbytes
    store = await SqliteStore(tmp_path / "c.db", cache_bytes=5 * size + 100).open()
    for i in range(40):
        await store.create(_rec(f"s{i}", hidden=1000))
        await store.get("default", f"s{i}")
        assert store.writes.cached_bytes <= 5 * size + 100 and store.writes.cached_count <= 5
    store.writes.check()  # its byte count among them
    assert [(await store.get("default", f"s{i}")).offset for i in range(40)] == [0] * 40  # evicted ones from disk
    await store.close()


async def test_the_memory_store_refuses_creates_over_its_bounds_and_never_evicts() -> None:
    size = _rec("s", hidden=1000).nbytes
    store = MemoryStore(memory_bytes=3 * size + 10)
    for sid in ("a", "b", "c"):
        await store.create(_rec(sid, hidden=1000))
    with pytest.raises(LimitExceeded, match=r"over its limit of \d+ bytes; delete sessions or raise --memory-bytes"):
        await store.create(_rec("d", hidden=1000))
    grown = _rec("a", 1, hidden=1000).copy(last_logits=np.ones((1000, 100), np.float32))
    await store.put(grown, prev_offset=0)  # an existing session's write never fails for size
    assert store.nbytes > store.memory_bytes
    assert [(await store.get("default", s)).offset for s in "abc"] == [1, 0, 0]
    await store.delete("default", "a")
    await store.create(_rec("d", hidden=1000))
    counted = MemoryStore(capacity=2)
    await counted.create(_rec("a"))
    await counted.create(_rec("b"))
    with pytest.raises(LimitExceeded, match=r"the memory store holds its limit of 2 sessions; .* --memory-capacity"):
        await counted.create(_rec("c"))
    assert (await counted.get("default", "a")).offset == 0 and await counted.count() == 2


# -- 4. the replay field, and files from before -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_last_prev_state_is_kept(kind: str, tmp_path: Path) -> None:
    store: Store = MemoryStore() if kind == "memory" else await SqliteStore(tmp_path / "r.db").open()
    await store.create(_rec("a"))
    prev = [np.full((2, 4), 3, np.float32), np.full((2, 4), 4, np.float32)]
    await store.put(_rec("a", 5).copy(last_logits=None, last_prev_state=prev), prev_offset=0)
    await store.put(_rec("a", 6).copy(last_logits=np.ones((1, 3), np.float32)), prev_offset=5)
    await store.put(_rec("a", 7).copy(last_prev_state=prev), prev_offset=6)
    await store.close()
    if kind == "sqlite":
        store = await SqliteStore(tmp_path / "r.db").open()
    got = await store.get("default", "a")
    assert got.offset == 7 and got.last_logits is None and got.last_prev_state is not None
    assert all(np.array_equal(a, b) for a, b in zip(got.last_prev_state, prev))
    await store.close()


async def test_a_file_from_before_gets_the_new_column_and_counters(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as c:  # the schema this store wrote before last_prev_state and the counters
        c.executescript("""
            CREATE TABLE sessions (tenant TEXT NOT NULL, id TEXT NOT NULL, model TEXT NOT NULL,
                version INTEGER NOT NULL, [offset] INTEGER NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
                ttl REAL NOT NULL, expires REAL NOT NULL, state BLOB NOT NULL, last_digest BLOB NOT NULL,
                last_start INTEGER NOT NULL, last_logits BLOB, PRIMARY KEY (tenant, id)) WITHOUT ROWID;
            CREATE INDEX sessions_expires ON sessions (expires);
            CREATE TABLE tombstones (tenant TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL,
                PRIMARY KEY (tenant, id)) WITHOUT ROWID;""")
        from service.store.record import pack_arrays
        t = time.time()
        for tenant, sid in (("x", "a"), ("x", "b"), ("y", "c")):
            c.execute("INSERT INTO sessions VALUES (?, ?, 'm', 1, 3, ?, ?, 3600, ?, ?, x'', 2, NULL)",
                      (tenant, sid, t, t, t + 3600, pack_arrays([np.zeros((2, 4), np.float32)])))
    store = await SqliteStore(path).open()
    got = await store.get("x", "a")
    assert got.offset == 3 and got.last_prev_state is None
    assert (await store.count(), await store.count("x"), await store.count("y")) == (3, 2, 1)
    with pytest.raises(LimitExceeded):
        await store.create(_rec("d", tenant="y"), max_sessions=3)
    await store.put(got.copy(offset=4, last_prev_state=[np.ones((2, 4), np.float32)]), prev_offset=3)
    await store.close()
    again = await SqliteStore(path).open()
    rec = await again.get("x", "a")
    assert rec.offset == 4 and rec.last_prev_state is not None and await again.count() == 3
    await again.close()


# -- 5. secrets --------------------------------------------------------------------------------------------
def test_store_urls_are_redacted() -> None:
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:s3cret@h/1") == "rediss://user:***@h/1"
    assert redact_url("redis://h/0?password=s3cret&db=2") == "redis://h/0?password=***&db=2"
    assert redact_url("redis://s3cret@h:6379/0") == "redis://***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("sqlite:var/recur.db") == "sqlite:var/recur.db"


async def test_ping(tmp_path: Path) -> None:
    await MemoryStore().ping()
    store = await SqliteStore(tmp_path / "ping.db").open()
    await store.ping()
    await store.close()


async def test_a_write_queued_behind_a_retried_one_waits_for_it(tmp_path: Path) -> None:
    """A session's write acknowledged while its earlier write was failing (a disk full for that one
    write only) waits behind it: it is neither tried alone against the older row (a conflict that
    would fence the session for good) nor lost; both are stored once there is room."""
    path = tmp_path / "q.db"
    store = await SqliteStore(path, durability="async", async_window=0.05).open()
    await store.create(_rec("a"))
    await store.create(_rec("b"))
    real = store._apply
    full = threading.Event()
    full.set()
    failing = threading.Event()

    def apply(batch):  # type: ignore[no-untyped-def]
        if full.is_set() and any(isinstance(w, Put) and w.key == ("default", "a") and w.record.offset == 1
                                 for w in batch):
            failing.set()
            time.sleep(0.3)  # a slow failing commit: the next write of "a" is acknowledged meanwhile
            raise sqlite3.OperationalError("database or disk is full")
        return real(batch)

    store._apply = apply  # type: ignore[method-assign]
    await store.put(_rec("a", 1), prev_offset=0)
    await _until(failing.is_set)
    await store.put(_rec("a", 2), prev_offset=1)  # acknowledged before the failure is known
    await store.put(_rec("b", 1), prev_offset=0)
    await _until(lambda: _disk_offsets(path)["b"] == 1)  # other sessions go on
    full.clear()
    await _until(lambda: not store.writes.fenced_count)
    assert (await store.get("default", "a")).offset == 2
    await store.close()
    assert await _reopened_offsets(path, ["a", "b"]) == [2, 1]
