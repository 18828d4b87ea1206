"""One SQLite file served by two processes (`recur serve --workers`): each opens it shared, so its
record cache is a hint. Two cores in this process stand for the two workers, each with its own
SqliteStore (its own connection and cache) on one file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.core import steps
from service.core.outputs import OutputOptions
from service.errors import OffsetMismatch, SessionNotFound
from service.store import SqliteStore
from service.types import StepInput, StepResult
from tests.core.conftest import MakeCore
from tests.core.entries import CountingEvents
from tests.helpers import TOL

LOGITS = OutputOptions(return_logits=True, compact=True)


async def _shared(path: Path) -> SqliteStore:
    return await SqliteStore(path, durability="sync", shared=True).open()


async def _step(core, sid: str, tokens: np.ndarray, offset: int | None = None) -> StepResult:  # type: ignore[no-untyped-def]
    return await core.step("t", StepInput(sid, tokens=tokens.tolist(), expected_offset=offset, options=LOGITS))


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_each_worker_continues_what_the_other_applied(make_core: MakeCore, tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """Both caches go stale in turn; every chunk applies where the file says, equal to one pass, and
    no stale hint is refused or counted as a conflict."""
    x = np.random.default_rng(4).integers(0, 98, 40)
    events = CountingEvents()
    a_store, b_store = await _shared(tmp_path / "w.db"), await _shared(tmp_path / "w.db")
    try:
        async with make_core(store=a_store, events=events) as a, make_core(store=b_store, events=events) as b:
            sid = (await a.create("t", "lstm-lm", 0)).session_id
            await b.get("t", sid)  # b caches offset 0
            parts = [await _step(a, sid, x[:10], 0), await _step(b, sid, x[10:20], 10),
                     await _step(a, sid, x[20:30]), await _step(b, sid, x[30:], 30)]
            want, _ = reference("lstm-lm").run(x)
            got = np.concatenate([p.logits for p in parts])
            assert got.shape == want.shape and float(np.abs(got - want).max()) <= TOL
            assert [p.offset for p in parts] == [10, 20, 30, 40] and "conflict" not in events.counts
            # a retry of the last chunk through the other worker is a replay
            again = await _step(a, sid, x[30:], 30)
            assert again.replayed and again.offset == 40
            # deleted through one, gone through the other
            await b.delete("t", sid)
            with pytest.raises(SessionNotFound):
                await _step(a, sid, x[:1])
    finally:
        await a_store.close()
        await b_store.close()


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_two_workers_racing_one_offset_apply_once(make_core: MakeCore, tmp_path: Path) -> None:
    a_store, b_store = await _shared(tmp_path / "r.db"), await _shared(tmp_path / "r.db")
    try:
        async with make_core(store=a_store) as a, make_core(store=b_store) as b:
            sid = (await a.create("t", "lstm-lm", 0)).session_id
            await b.get("t", sid)

            results = await asyncio.gather(_step(a, sid, np.full(8, 1), 0), _step(b, sid, np.full(8, 2), 0),
                                           return_exceptions=True)
            won = [r for r in results if isinstance(r, StepResult)]
            lost = [r for r in results if isinstance(r, OffsetMismatch)]
            assert len(won) == 1 and len(lost) == 1 and lost[0].actual == 8, results
            assert (await a.get("t", sid)).offset == 8 and (await b.get("t", sid)).offset == 8
    finally:
        await a_store.close()
        await b_store.close()


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_a_batch_over_stale_cached_rows_runs_again_from_the_file(make_core: MakeCore, tmp_path: Path,
                                                                       reference) -> None:  # type: ignore[no-untyped-def]
    """A batch takes the row round from a worker's cached rows (hints); a row the other worker advanced
    fails the file's compare-and-set and that chunk runs again from a fresh read: every session ends
    equal to one pass, nothing is refused or counted as a conflict, and the rows were written as rows."""
    rng = np.random.default_rng(9)
    xs = [rng.integers(0, 98, 12) for _ in range(4)]
    events = CountingEvents()
    a_store, b_store = await _shared(tmp_path / "b.db"), await _shared(tmp_path / "b.db")
    written: list[int] = []
    put_rows = SqliteStore._put_rows

    def counting(self, c, w):  # type: ignore[no-untyped-def]
        written.append(len(w.keys))
        return put_rows(self, c, w)

    try:
        async with make_core(store=a_store, events=events) as a, make_core(store=b_store, events=events) as b:
            sids = [(await a.create("t", "lstm-lm", 0)).session_id for _ in xs]
            first = await a.step_batch("t", [StepInput(s, tokens=x[:4].tolist(), options=LOGITS)
                                             for s, x in zip(sids, xs)])
            await _step(b, sids[1], xs[1][4:8])  # a's row for sids[1] is now stale
            SqliteStore._put_rows = counting  # type: ignore[method-assign]
            second = await a.step_batch("t", [StepInput(s, tokens=(x[4:8] if k != 1 else x[8:]).tolist(),
                                                        options=LOGITS) for k, (s, x) in enumerate(zip(sids, xs))])
            assert written and written[0] == 4  # the row round wrote the batch's rows together
            for k, x in enumerate(xs):
                r1, r2 = first[k], second[k]
                assert isinstance(r1, StepResult) and isinstance(r2, StepResult)
                assert r2.offset == (12 if k == 1 else 8)
                done = x[: r2.offset]
                want, _ = reference("lstm-lm").run(done)
                assert float(np.abs(r2.logits - want[-4:]).max()) <= TOL
            assert "conflict" not in events.counts
    finally:
        SqliteStore._put_rows = put_rows  # type: ignore[method-assign]
        await a_store.close()
        await b_store.close()


@pytest.mark.parametrize("store_kind", ["sqlite"])
@pytest.mark.parametrize("row_round_min", [1, 4], ids=["row round", "record round"])
async def test_a_hint_of_a_session_deleted_and_created_again_is_never_written(
        make_core: MakeCore, tmp_path: Path, reference, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
        row_round_min: int) -> None:
    """One worker caches a session; the other deletes it, creates it again under the same id and brings it
    to the offset the cached row shows. A chunk the first worker then takes must run from the new
    session's state, not the old one's: the file's compare-and-set checks the session's creation time
    beside its offset, so the stale row's write fails and the chunk runs again from a fresh read."""
    monkeypatch.setattr(steps, "ROW_ROUND_MIN", row_round_min)
    rng = np.random.default_rng(11)
    old, new = rng.integers(0, 98, 8), rng.integers(0, 98, 8)
    events = CountingEvents()
    a_store, b_store = await _shared(tmp_path / "d.db"), await _shared(tmp_path / "d.db")
    try:
        async with make_core(store=a_store, events=events) as a, make_core(store=b_store, events=events) as b:
            await a.create("t", "lstm-lm", 0, session_id="s1")
            await _step(a, "s1", old[:4], 0)  # a caches s1 at offset 4, the old session's state
            await b.delete("t", "s1")
            await b.create("t", "lstm-lm", 0, session_id="s1")
            await _step(b, "s1", new[:4], 0)  # the new s1 is at offset 4 too
            got = await _step(a, "s1", new[4:], 4)
            want, _ = reference("lstm-lm").run(new)
            assert got.offset == 8 and float(np.abs(got.logits - want[4:]).max()) <= TOL
            assert (await b.get("t", "s1")).offset == 8 and "conflict" not in events.counts
    finally:
        await a_store.close()
        await b_store.close()
