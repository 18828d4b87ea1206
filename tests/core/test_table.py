"""The columnar session table (service/store/table.py), the memory store's rows and the SQLite store's cached
rows: a record written reads back as it was; rows survive growth; a freed row cannot be written by whoever
read it before; a batched write keeps the state before and refuses rows that changed since they were read;
SQLite's row writes are in the file as the record round would have stored them; and the pipeline's rounds
over rows answer as its rounds over records do."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest

from service.core.outputs import ActivationRequest, OutputOptions
from service.errors import SessionExpired, SessionNotFound, StoreConflict, Unavailable
from service.store import MemoryStore, SessionRecord, SqliteStore
from service.store.table import Loc, Rows, RowWrite, shapes_of
from service.types import NamedTensor, StepInput
from tests.core.conftest import MakeCore
from tests.helpers import ManualClock


def _rec(sid: str, offset: int = 0, t: float = 1000.0, ttl: float = 60.0, **fields: object) -> SessionRecord:
    state = [np.full((2, 3), offset, np.float32), np.arange(6, dtype=np.float32).reshape(2, 3) + offset]
    return SessionRecord(tenant="t", session_id=sid, model="m", version=1, offset=offset, created_at=t - 5,
                         updated_at=t, ttl=ttl, state=state, **fields)  # type: ignore[arg-type]


def _same(a: SessionRecord, b: SessionRecord) -> None:
    for name in ("tenant", "session_id", "model", "version", "offset", "created_at", "updated_at", "ttl",
                 "last_digest", "last_start", "last_request"):
        assert getattr(a, name) == getattr(b, name), name
    assert all(np.array_equal(x, y) for x, y in zip(a.state, b.state, strict=True))
    assert (a.last_logits is None) == (b.last_logits is None)
    if a.last_logits is not None:
        assert np.array_equal(a.last_logits, b.last_logits)
    assert (a.last_prev_state is None) == (b.last_prev_state is None)
    for x, y in zip(a.last_prev_state or (), b.last_prev_state or (), strict=True):
        assert np.array_equal(x, y)


def test_a_record_written_reads_back_as_it_was_and_rows_survive_growth() -> None:
    first = _rec("a")
    rows = Rows("m", 1, shapes_of(first))
    written = {}
    for k in range(40):  # 8 rows at first: grown three times
        rec = _rec(f"s{k}", offset=k, last_digest=bytes([k]) * 32, last_start=max(k - 1, -1), last_request=f"r{k}",
                   last_logits=np.full((2, 5), k, np.float32) if k % 2 else None,
                   last_prev_state=[np.full((2, 3), -k, np.float32)] * 2 if k % 3 == 0 else None)
        r = rows.allocate()
        rows.write(r, rec)
        written[r] = rec
        assert rows.nbytes[r] == rec.nbytes  # counted as the record counts itself
    assert rows.capacity == 64 and rows.used == 40
    for r, rec in written.items():
        _same(rows.record(r), rec)
    out = rows.record(3)
    out.state[0][:] = 99  # a record is a copy: changing it changes no row
    assert rows.state[0][0, 3, 0] == written[3].state[0][0, 0]


def test_a_released_row_is_stale_for_whoever_read_it() -> None:
    rows = Rows("m", 1, shapes_of(_rec("a")))
    r = rows.allocate()
    rows.write(r, _rec("a", offset=4))
    gens, offsets = rows.gen[[r]].copy(), rows.offset[[r]].copy()
    assert not rows.stale(np.array([r]), gens, offsets).any()
    rows.release(r)
    again = rows.allocate()
    rows.write(again, _rec("b", offset=4))
    assert again == r and rows.stale(np.array([r]), gens, offsets).all()  # the same row, another session


def test_a_batched_write_keeps_the_state_before_and_the_final_outputs() -> None:
    rows = Rows("m", 1, shapes_of(_rec("a")))
    for k in range(3):
        rows.write(rows.allocate(), _rec(f"s{k}", offset=10 + k))
    at = np.array([2, 0])
    new = [np.full((2, 2, 3), 7, np.float32), np.full((2, 2, 3), 8, np.float32)]
    final = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    before = rows.nbytes.sum()
    delta = rows.commit(RowWrite(rows, ["s2", "s0"], at, rows.gen[at], rows.offset[at], np.array([1, 1]), new, final,
                                 [b"d" * 32, b"e" * 32], np.array([True, False]), rows.gather(at), rows.created[at],
                                 rows.ttl[at], 2000.0))
    assert rows.nbytes.sum() == before + delta
    whole, part, untouched = rows.record(2), rows.record(0), rows.record(1)
    assert (whole.offset, whole.last_start, whole.updated_at, whole.last_digest) == (13, 12, 2000.0, b"d" * 32)
    assert np.array_equal(whole.last_logits, final[:1]) and whole.last_prev_state is None  # outputs kept whole
    assert np.array_equal(part.last_logits, final[1:]) and part.last_prev_state is not None  # recomputed from before
    assert np.array_equal(part.last_prev_state[1], _rec("s0", offset=10).state[1])
    assert np.array_equal(part.state[0], np.full((2, 3), 7)) and np.array_equal(part.state[1], np.full((2, 3), 8))
    _same(untouched, _rec("s1", offset=11))


async def test_the_memory_stores_row_writes_refuse_what_changed_since_the_read() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    for sid in ("a", "b", "c", "d"):
        await store.create(_rec(sid, offset=0, t=clock(), ttl=100))
    locs = await store.read_rows("t", ["a", "b", "c", "d", "nope"])
    assert isinstance(locs[4], SessionNotFound)
    (block, _), rows = locs[0], np.array([loc[1] for loc in locs[:4]])  # type: ignore[index]
    gens, offsets = block.gen[rows].copy(), block.offset[rows].copy()
    await store.put(_rec("b", offset=1, t=clock(), ttl=100), prev_offset=0)  # advanced since the read
    await store.delete("t", "c")
    await store.create(_rec("c", offset=0, t=clock(), ttl=100))  # gone, and created again
    await store.delete("t", "d")
    new = [np.full((2, 4, 3), 5, np.float32)] * 2
    w = RowWrite(block, ["a", "b", "c", "d"], rows, gens, offsets, np.ones(4, np.int64), new,
                 np.zeros((4, 2), np.float32), [b"x" * 32] * 4, np.ones(4, bool), block.gather(rows),
                 block.created[rows], block.ttl[rows], clock())
    bytes_before = store.nbytes
    out = await store.write_rows("t", w)
    assert out[0] is None
    assert isinstance(out[1], StoreConflict) and out[1].actual == 1
    assert isinstance(out[2], StoreConflict) and out[2].actual == 0
    assert isinstance(out[3], SessionNotFound)
    a, b, c = [await store.get("t", s) for s in "abc"]
    assert a.offset == 1 and np.array_equal(a.state[0], np.full((2, 3), 5))
    assert b.offset == 1 and np.array_equal(b.state[0], np.full((2, 3), 1))  # the put's, not the row write's
    assert c.offset == 0 and np.array_equal(c.state[0], np.zeros((2, 3)))
    assert store.nbytes == bytes_before + block.nbytes[rows[0]] - _rec("a").nbytes
    store.check()
    # a session that expired between the read and the write is refused as expired, and not written
    locs = await store.read_rows("t", ["a"])
    (block, r), = locs  # type: ignore[misc]
    clock.advance(101)
    out = await store.write_rows("t", RowWrite(block, ["a"], np.array([r]), block.gen[[r]], block.offset[[r]],
                                               np.ones(1, np.int64), [np.zeros((2, 1, 3), np.float32)] * 2,
                                               np.zeros((1, 2), np.float32), [b"y" * 32], np.ones(1, bool),
                                               block.gather([r]), block.created[[r]], block.ttl[[r]], clock()))
    assert isinstance(out[0], SessionExpired)
    assert await store.count() == 0  # b and c expired with it
    store.check()


async def test_a_batch_whose_chunks_select_different_activations_answers_each_its_own(make_core: MakeCore) -> None:
    """Chunks of one model and length run as one block; each reply shows the selection its chunk asked for."""
    async with make_core() as core:
        a, b = [(await core.create("t", "lstm-lm", 0)).session_id for _ in range(2)]
        asks = [ActivationRequest(states=("h",), layers=(0,)), ActivationRequest(states=("c",), layers=(1,))]
        results = await core.step_batch("t", [StepInput(sid, tokens=[1, 2, 3], options=OutputOptions(activations=ask))
                                              for sid, ask in zip((a, b), asks)])
        names = [[t.name for t in r.activations or []] for r in results if not isinstance(r, Exception)]
        assert names == [["h_l0"], ["c_l1"]]


@pytest.mark.parametrize("steps", [1, 5])
async def test_a_retry_after_a_batched_write_is_replayed_from_the_row(make_core: MakeCore, steps: int) -> None:
    """Over the memory store (rows) and the others (records) alike: the retry of the last chunk answers
    its outputs again without advancing, and a Get shows the session as stored."""
    async with make_core() as core:
        sids = [(await core.create("t", "lstm-lm", 0)).session_id for _ in range(3)]
        inputs = [StepInput(sid, tokens=list(range(k, k + steps)), expected_offset=0,
                            options=OutputOptions(return_logits=True, return_state=True))
                  for k, sid in enumerate(sids)]
        first = await core.step_batch("t", inputs)
        again = await core.step_batch("t", inputs)
        for x, y in zip(first, again, strict=True):
            assert not isinstance(x, Exception) and not isinstance(y, Exception)
            assert y.replayed and not x.replayed and y.offset == x.offset == steps
            assert x.logits is not None and y.logits is not None and np.abs(x.logits - y.logits).max() <= 1e-5
            assert isinstance(x.state, list) and all(isinstance(t, NamedTensor) for t in x.state)
        view = await core.get("t", sids[1])
        assert view.offset == steps


def _row_write(locs: list[Loc], ids: list[str], t: float, value: float = 5.0) -> RowWrite:
    block, rows = locs[0][0], np.array([loc[1] for loc in locs])
    n = len(rows)
    return RowWrite(block, ids, rows, block.gen[rows].copy(), block.offset[rows].copy(), np.ones(n, np.int64),
                    [np.full((2, n, 3), value, np.float32)] * 2, np.full((n, 4), value, np.float32), [b"z" * 32] * n,
                    np.ones(n, bool), block.gather(rows), block.created[rows].copy(), block.ttl[rows].copy(), t)


async def test_sqlite_row_writes_are_in_the_file_as_records_would_be(tmp_path: Path) -> None:
    """Rows cached by the SQLite store are read in place and written in one transaction; what a reopened
    file holds is the record the write describes (its state, outputs for a replay, times)."""
    clock = ManualClock()
    store = await SqliteStore(tmp_path / "s.db", clock=clock).open()
    for sid in "abc":
        await store.create(_rec(sid, t=clock(), ttl=100))
    locs = await store.read_rows("t", ["a", "b", "c"])
    assert locs is not None and all(not isinstance(x, Exception) for x in locs)
    clock.advance(3)
    w = _row_write(locs, ["a", "b", "c"], clock())  # type: ignore[arg-type]
    assert await store.write_rows("t", w) == [None, None, None]
    cached = [await store.get("t", sid) for sid in "abc"]
    await store.close()
    store = await SqliteStore(tmp_path / "s.db", clock=clock).open()
    for j, sid in enumerate("abc"):
        stored = await store.get("t", sid)
        _same(stored, w.record(j, "t"))
        _same(stored, cached[j])
        assert stored.offset == 1 and stored.updated_at == clock() and stored.expires_at == clock() + 100
    await store.close()


async def test_sqlite_row_writes_refuse_what_changed_and_survive_a_row_given_up(tmp_path: Path) -> None:
    """Between the read and the write: a deleted session is refused as missing, an expired one as expired,
    and a row the cache gave up (its bound) is still written, by compare-and-set in the file."""
    clock = ManualClock()
    store = await SqliteStore(tmp_path / "s.db", clock=clock, cache_size=3).open()
    for sid, ttl in (("a", 100), ("b", 100), ("c", 10)):
        await store.create(_rec(sid, t=clock(), ttl=ttl))
    assert await store.read_rows("t", ["a", "b", "nope"]) is None  # a miss: the record round decides
    locs = await store.read_rows("t", ["a", "b", "c"])
    assert locs is not None
    w = _row_write(locs, ["a", "b", "c"], clock() + 11)  # type: ignore[arg-type]
    await store.create(_rec("d", t=clock(), ttl=100))  # the cache holds 3: "a", the oldest, is given up
    await store.delete("t", "b")
    assert store.writes.clean_row(("t", "a")) is None and store.writes.clean_row(("t", "c")) is not None
    clock.advance(11)  # "c" expired
    out = await store.write_rows("t", w)
    assert out[0] is None
    assert isinstance(out[1], SessionNotFound) and isinstance(out[2], SessionExpired)
    a = await store.get("t", "a")
    assert a.offset == 1 and np.array_equal(a.state[0], np.full((2, 3), 5))
    with pytest.raises(SessionNotFound):
        await store.get("t", "b")
    with pytest.raises(SessionExpired):
        await store.get("t", "c")
    await store.close()


async def test_a_sqlite_row_write_the_file_refuses_changes_nothing(tmp_path: Path) -> None:
    """The file turns read-only between the read and the write: every row answers UNAVAILABLE, the cached
    rows and the file keep what they had, the record round decides while the store fails, and once it
    writes again (a probe committed) the rows write."""
    clock = ManualClock()
    store = await SqliteStore(tmp_path / "s.db", clock=clock).open()
    for sid in "ab":
        await store.create(_rec(sid, t=clock(), ttl=100))
    locs = await store.read_rows("t", ["a", "b"])
    assert locs is not None
    assert store._conn is not None
    await store._run(store._conn.execute, "PRAGMA query_only=ON")
    out = await store.write_rows("t", _row_write(locs, ["a", "b"], clock()))  # type: ignore[arg-type]
    assert all(isinstance(e, Unavailable) and "nothing was applied" in str(e) for e in out)
    for sid in "ab":
        rec = await store.get("t", sid)
        assert rec.offset == 0 and np.array_equal(rec.state[0], _rec(sid).state[0])
    assert await store.read_rows("t", ["a", "b"]) is None  # while the store fails, the record round decides
    await store._run(store._conn.execute, "PRAGMA query_only=OFF")
    await store.ping()  # a probe commits: the store writes again
    locs = await store.read_rows("t", ["a", "b"])
    assert locs is not None
    assert await store.write_rows("t", _row_write(locs, ["a", "b"], clock())) == [None, None]  # type: ignore[arg-type]
    await store.close()
    store = await SqliteStore(tmp_path / "s.db", clock=clock).open()
    assert [(await store.get("t", sid)).offset for sid in "ab"] == [1, 1]
    await store.close()


async def test_redis_row_entries_are_the_records_entries_byte_for_byte() -> None:
    """A Redis row write encodes its rows a column at a time (RedisStore._row_entries); each entry of the put
    script must be what the record round's entry for that row's record is: a chunk whose outputs are its final
    step's, one whose several steps' outputs were kept whole, and one kept with the state before."""
    from service.store.redis import RedisStore

    clock = ManualClock()
    memory = MemoryStore(clock=clock)
    for sid in ("a", "b", "c"):
        await memory.create(_rec(sid, offset=4, t=clock(), ttl=90.5))
    locs = await memory.read_rows("t", ["a", "b", "c"])
    assert all(not isinstance(x, Exception) for x in locs)
    w = _row_write(typing.cast(list[Loc], locs), ["a", "b", "c"], clock() + 2.25, value=0.5)
    w.steps = np.array([1, 3, 2])
    w.kept = [None, np.arange(12, dtype=np.float32).reshape(3, 4), None]
    w.complete = np.array([True, True, False])
    store = RedisStore("redis://127.0.0.1:1/0")  # never connects: only its encoding is used
    try:
        tokens, wids = [b"t" * 8, b"", b"u" * 8], [b"w1" * 4, b"w2" * 4, b"w3" * 4]
        got = store._row_entries("t", w, [0, 1, 2], tokens, wids)
        want = [store._put_entry(w.record(j, "t"), int(w.offsets[j]), tokens[j], wids[j]) for j in range(3)]
        assert got == want
    finally:
        await store.close()
