"""Two replicas (two in-process cores, each with its own RedisStore and its replica-local hints) on
one real redis-server: a session fed alternately through both, deleted and created again, moved
to another version, or retried after the other replica applied more, always ends equal to one
pass; a stale hint costs a re-read, never a wrong state or a wrong refusal. Scripts run by EVALSHA
and survive a SCRIPT FLUSH."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import redis as sync_redis

from service.config import Settings
from service.core import steps
from service.core.outputs import OutputOptions
from service.core.packed import PackedInput
from service.core.sessions import SessionService
from service.engine.engine import Engine, EngineOptions
from service.engine.runtime import RuntimeOptions
from service.errors import OffsetMismatch
from service.repository.models import ModelRepository
from service.store.redis import RedisStore
from service.store.table import RowWrite
from service.types import GenerateInput, StepInput, StepResult
from tests.core.entries import CountingEvents
from tests.helpers import TOL, Redis, Reference


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    r = Redis(tmp_path).start()
    yield r
    r.kill()


@pytest.fixture(scope="module")
def repository(tiny_models: Path) -> ModelRepository:
    return ModelRepository.load(tiny_models, RuntimeOptions())


@asynccontextmanager
async def _replicas(url: str, repository: ModelRepository) -> AsyncIterator[tuple[SessionService, SessionService]]:
    cores = [SessionService(Settings(), repository, RedisStore(url), Engine(EngineOptions())) for _ in range(2)]
    try:
        yield cores[0], cores[1]
    finally:
        for core in cores:
            await core.store.close()
            await core.close()


def _step(sid: str, tokens: np.ndarray, at: int) -> StepInput:
    return StepInput(sid, tokens=[int(t) for t in tokens], expected_offset=at)


async def test_alternating_replicas_equal_one_pass(redis: Redis, repository: ModelRepository,
                                                   reference: Callable[[str], Reference]) -> None:
    seq = np.random.default_rng(1).integers(0, 98, 60)
    async with _replicas(redis.url, repository) as (a, b):
        await a.create("t", "lstm-lm", 1, "s1")
        offset = 0
        for k, n in enumerate([5, 7, 1, 9, 3, 11, 4, 20]):
            core = (a, b)[k % 2]
            r = await core.step("t", _step("s1", seq[offset : offset + n], offset))
            assert r.offset == offset + n
            offset += n
        # both replicas read the session from hints at some point, the script judging every write
        assert isinstance(a.store, RedisStore) and isinstance(b.store, RedisStore)
        assert a.store.hint_hits + b.store.hint_hits > 0
        _, want = reference("lstm-lm").run(seq.astype(np.int64))
        got = (await a.get("t", "s1", include_state=True)).state
        assert got is not None
        for g, w in zip(got, want):
            assert np.abs(g.value - w).max() <= TOL


async def test_a_retry_on_the_first_replica_after_the_second_moved_on(redis: Redis,
                                                                      repository: ModelRepository) -> None:
    seq = np.random.default_rng(2).integers(0, 98, 12)
    async with _replicas(redis.url, repository) as (a, b):
        await a.create("t", "gru-lm", 1, "s")
        await a.step("t", _step("s", seq[:4], 0))  # a's hint: offset 4
        await b.step("t", _step("s", seq[4:8], 4))  # the session moves on at b
        # a retry of b's chunk at a: a's hint says offset 4, the store says the chunk was applied: replayed
        r = await a.step("t", _step("s", seq[4:8], 4))
        assert r.replayed and r.offset == 8
        # a chunk for offset 8 at a: the hint is stale, the store agrees with the client: applied
        r = await a.step("t", _step("s", seq[8:12], 8))
        assert not r.replayed and r.offset == 12
        # a truly stale chunk is refused with the stored offset
        with pytest.raises(OffsetMismatch, match="at offset 12"):
            await b.step("t", _step("s", seq[:4], 4))


@pytest.mark.parametrize("row_round_min", [4, 1], ids=["record round", "row round"])
async def test_deleted_and_created_again_is_never_written_from_the_old_state(
        redis: Redis, repository: ModelRepository, reference: Callable[[str], Reference],
        monkeypatch: pytest.MonkeyPatch, row_round_min: int) -> None:
    """A's hint (a record, or a row the row round writes by the write id it was read with) of a session
    that b deleted and created again at the same offset is never written over the new session."""
    monkeypatch.setattr(steps, "ROW_ROUND_MIN", row_round_min)  # 1: a lone Step takes the row round too
    seq = np.random.default_rng(3).integers(0, 98, 10)
    async with _replicas(redis.url, repository) as (a, b):
        await a.create("t", "rnn-lm", 1, "s")
        await a.step("t", _step("s", seq[:5], 0))  # a's hint: offset 5, that state
        await b.delete("t", "s")
        await b.create("t", "rnn-lm", 1, "s")
        await b.step("t", _step("s", seq[5:10], 0))  # the new session at offset 5 too, another state
        fresh = np.random.default_rng(4).integers(0, 98, 3)
        r = await a.step("t", StepInput("s", tokens=[int(t) for t in fresh]))  # no offset named: runs on the hint
        assert r.offset == 8
        _, want = reference("rnn-lm").run(np.concatenate([seq[5:10], fresh]).astype(np.int64))
        got = (await b.get("t", "s", include_state=True)).state
        assert got is not None
        for g, w in zip(got, want):
            assert np.abs(g.value - w).max() <= TOL


async def test_packed_batches_across_replicas(redis: Redis, repository: ModelRepository,
                                              reference: Callable[[str], Reference]) -> None:
    rng = np.random.default_rng(5)
    seqs = rng.integers(0, 98, (6, 24))
    sids = [f"p{i}" for i in range(6)]
    async with _replicas(redis.url, repository) as (a, b):
        for sid in sids:
            await a.create("t", "lstm-lm", 1, sid)
        for k in range(6):
            core = (a, b)[k % 2]
            chunk = seqs[:, 4 * k : 4 * k + 4].astype("<i4")
            res = await core.step_packed("t", PackedInput(sids, [4] * 6, chunk.tobytes(), expected_offsets=[4 * k] * 6))
            assert not res.errors and list(res.offsets) == [4 * k + 4] * 6
        ref = reference("lstm-lm")
        for i, sid in enumerate(sids):
            _, want = ref.run(seqs[i].astype(np.int64))
            got = (await b.get("t", sid, include_state=True)).state
            assert got is not None
            for g, w in zip(got, want):
                assert np.abs(g.value - w).max() <= TOL


@pytest.mark.parametrize("cache_size", [100, 0])
async def test_generate_chains_its_writes_on_redis(redis: Redis, repository: ModelRepository,
                                                   reference: Callable[[str], Reference], cache_size: int) -> None:
    """Generate writes each token without reading the session again: each write is compared with
    the one before it (the store remembers its last write's id), hints or none. Greedy tokens are
    the one-pass reference's argmax fed back."""
    core = SessionService(Settings(cache_size=cache_size), repository, RedisStore(redis.url, cache_size=cache_size),
                          Engine(EngineOptions()))
    try:
        await core.create("t", "gru-lm", 1, "g")
        made = [t.token async for t in core.generate("t", GenerateInput("g", prompt_tokens=[1, 2, 3], max_tokens=6,
                                                                          temperature=0.0))]
        tokens = [1, 2, 3]
        for _ in range(6):
            logits, _ = reference("gru-lm").run(np.array(tokens, np.int64))
            tokens.append(int(np.argmax(logits[-1])))
        assert made == tokens[3:]
        assert (await core.get("t", "g")).offset == 9
    finally:
        await core.store.close()
        await core.close()


async def test_scripts_survive_a_script_flush(redis: Redis, repository: ModelRepository) -> None:
    async with _replicas(redis.url, repository) as (a, _):
        await a.create("t", "gru-lm", 1, "s")
        sync_redis.Redis(port=redis.port).script_flush()
        r = await a.step("t", _step("s", np.arange(3), 0))
        assert r.offset == 3
        sync_redis.Redis(port=redis.port).script_flush()
        res = await a.step_packed("t", PackedInput(["s"], [2], np.arange(2, dtype="<i4").tobytes()))
        assert not res.errors and list(res.offsets) == [5]


async def test_a_batch_takes_the_row_round_over_hints_and_a_stale_row_runs_again(
        redis: Redis, repository: ModelRepository, reference: Callable[[str], Reference]) -> None:
    """A replica's hints are rows of a session table: a batch over sessions it holds takes the row round
    (one write_rows, the put scripts written from the rows). A row the other replica advanced meanwhile
    fails its put script's compare-and-set, and that chunk runs again from a fresh read: every session ends
    equal to one pass, and nothing is refused or counted as a conflict."""
    rng = np.random.default_rng(12)
    xs = [rng.integers(0, 98, 12) for _ in range(5)]
    events = CountingEvents()
    cores = [SessionService(Settings(), repository, RedisStore(redis.url), Engine(EngineOptions()), events=events)
             for _ in range(2)]
    a, b = cores
    written: list[int] = []
    write_rows = a.store.write_rows

    async def counting(tenant: str, w: RowWrite) -> list[Exception | None]:
        written.append(len(w.rows))
        return await write_rows(tenant, w)

    try:
        sids = [f"r{k}" for k in range(5)]
        for sid in sids:
            await a.create("t", "lstm-lm", 1, sid)
        await a.step_batch("t", [StepInput(s, tokens=x[:4].tolist(), expected_offset=0) for s, x in zip(sids, xs)])
        await b.step("t", _step("r1", xs[1][4:8], 4))  # a's row for r1 is stale now
        a.store.write_rows = counting  # type: ignore[method-assign]
        second = await a.step_batch("t", [StepInput(s, tokens=(x[4:8] if k != 1 else x[8:]).tolist(),
                                                    options=OutputOptions(return_logits=True))
                                          for k, (s, x) in enumerate(zip(sids, xs))])
        assert written == [5]  # the row round wrote the batch's rows together
        for k, x in enumerate(xs):
            got = second[k]
            assert isinstance(got, StepResult), got
            assert got.offset == (12 if k == 1 else 8)
            want, _ = reference("lstm-lm").run(x[: got.offset])
            assert got.logits is not None and float(np.abs(got.logits - want[-4:]).max()) <= TOL
        assert (await b.get("t", "r1")).offset == 12 and "conflict" not in events.counts
        # the hints took the rows' writes: the next batch reads them in place, each at its new offset
        assert await a.store.read_rows("t", sids) is not None and (await a.store.get("t", "r0")).offset == 8
    finally:
        for core in cores:
            await core.store.close()
            await core.close()
