"""The batching engine on real ONNX Runtime sessions: exact results for mixed lengths, long chunks
sliced fairly, a failing chunk isolated from its batch, per-session order through the server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from recur.v1 import recur_pb2 as pb
from service.engine.engine import Engine, EngineOptions
from service.engine.runtime import ModelRuntime, RuntimeOptions
from service.repository.models import Model, load_model
from tests.helpers import TOL, Server, logits_of, state_of


@pytest.fixture(scope="module")
def lstm(tiny_models: Path) -> Model:
    return load_model(tiny_models / "lstm-lm" / "1", RuntimeOptions())


def _one_pass(model: Model, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    logits, new = model.runtime.run(x[None], [s[:, None] for s in states])
    return logits[0], [s[:, 0] for s in new]


async def _one(engine: Engine, runtime: ModelRuntime, x: np.ndarray, states: list[np.ndarray]
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """One chunk (T,) from states each (L, H), as a block of one."""
    logits, new, _ = await engine.submit(runtime, x[None], [s[:, None] for s in states])
    return logits[0], [s[:, 0] for s in new]


def _random_state(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal((2, 16)).astype(np.float32) for _ in range(2)]


def test_mixed_lengths_batch_together_and_stay_exact(lstm: Model) -> None:
    rng = np.random.default_rng(0)
    jobs = [(rng.integers(0, 98, int(n)), _random_state(rng)) for n in rng.integers(1, 200, 40)]

    async def go() -> tuple[list, Engine]:
        engine = Engine(EngineOptions(slice_steps=16, threads=1))
        results = await asyncio.gather(*(_one(engine, lstm.runtime, x, s) for x, s in jobs))
        await engine.close()
        return results, engine

    results, engine = asyncio.run(go())
    for (x, s), (logits, states) in zip(jobs, results):
        want_logits, want_states = _one_pass(lstm, x, s)
        assert logits.shape == want_logits.shape
        assert np.abs(logits - want_logits).max() <= TOL
        for a, b in zip(states, want_states):
            assert np.abs(a - b).max() <= TOL
    slices = sum(-(-len(x) // 16) for x, _ in jobs)
    assert engine.stats.slices == slices and engine.stats.calls < slices / 3  # really batched


def test_a_long_chunk_does_not_starve_short_ones(lstm: Model) -> None:
    rng = np.random.default_rng(1)

    async def go() -> list[str]:
        engine = Engine(EngineOptions(slice_steps=32, threads=1))
        finished: list[str] = []

        async def one(name: str, n: int) -> None:
            await _one(engine, lstm.runtime, rng.integers(0, 98, n), _random_state(rng))
            finished.append(name)

        long = asyncio.create_task(one("long", 4096))
        await asyncio.sleep(0)
        shorts = [asyncio.create_task(one(f"short{i}", 3)) for i in range(5)]
        await asyncio.gather(long, *shorts)
        await engine.close()
        return finished

    finished = asyncio.run(go())
    assert finished[-1] == "long" and len(finished) == 6


class _Recording:
    """The model's real runtime, recording the batch size of every call made to it."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.batches: list[int] = []

    def run(self, x: np.ndarray, states: list[np.ndarray], alone: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        self.batches.append(x.shape[0])
        return self.runtime.run(x, states, alone)


def test_a_failing_chunk_does_not_poison_its_batch(lstm: Model) -> None:
    rng = np.random.default_rng(2)
    good = [(rng.integers(0, 98, 8), _random_state(rng)) for _ in range(6)]
    bad = (np.array([1, 2, 10_000, 3, 4, 5, 6, 7]), _random_state(rng))  # out of the embedding's range
    runtime = _Recording(lstm.runtime)

    async def go() -> list:
        engine = Engine(EngineOptions(threads=1))
        jobs = [_one(engine, runtime, x, s) for x, s in [*good[:3], bad, *good[3:]]]  # type: ignore[arg-type]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await engine.close()
        return results

    results = asyncio.run(go())
    assert runtime.batches == [7] + [1] * 7  # one call for all seven, which failed; then each alone
    assert isinstance(results[3], Exception)
    for (x, s), r in zip(good, results[:3] + results[4:]):
        assert np.abs(r[0] - _one_pass(lstm, x, s)[0]).max() <= TOL


def test_one_sessions_chunks_apply_in_arrival_order(server: Server, reference) -> None:  # type: ignore[no-untyped-def]
    """Fifty chunks of one session and fifty of another interleaved on one stream, no offsets given."""
    rng = np.random.default_rng(3)
    with server.client() as c:
        a, b = c.create("lstm-lm").session_id, c.create("gru-lm").session_id
        seq = {a: rng.integers(0, 98, 300), b: rng.integers(0, 98, 300)}
        cuts = sorted(rng.choice(np.arange(1, 300), 49, replace=False))
        reqs = [pb.StepRequest(session_id=sid, tokens=[int(t) for t in seq[sid][x:y]], return_logits=True,
                               return_state=True) for x, y in zip([0, *cuts], [*cuts, 300]) for sid in (a, b)]
        replies = list(c.stub.Stream(iter(reqs)))
    for sid, model in ((a, "lstm-lm"), (b, "gru-lm")):
        mine = [r for r in replies if r.session_id == sid]
        assert [r.start_offset for r in mine] == [0, *cuts]
        want_logits, want_state = reference(model).run(seq[sid])
        assert np.abs(np.concatenate([logits_of(r) for r in mine]) - want_logits).max() <= TOL
        for x, y in zip(state_of(mine[-1]), want_state):
            assert np.abs(x - y).max() <= TOL


def test_a_batch_message_with_repeats_and_refusals(server: Server, reference) -> None:  # type: ignore[no-untyped-def]
    """StreamBatch: a session named twice in one message runs both chunks in order; a refused chunk
    gets its own status and changes nothing; the rest of the message applies."""
    rng = np.random.default_rng(4)
    with server.client() as c:
        a, b, d = (c.create(m).session_id for m in ("lstm-lm", "gru-lm", "lstm-lm"))
        seq_a, seq_b = rng.integers(0, 98, 30), rng.integers(0, 98, 12)
        msg = pb.StepBatch(steps=[
            pb.StepRequest(session_id=a, tokens=seq_a[:10].tolist(), expected_offset=0, return_logits=True),
            pb.StepRequest(session_id=b, tokens=seq_b.tolist(), return_logits=True, return_state=True),
            pb.StepRequest(session_id=a, tokens=seq_a[10:].tolist(), expected_offset=10, return_logits=True,
                           return_state=True),
            pb.StepRequest(session_id=d, tokens=[1, 500]),
            pb.StepRequest(session_id="ghost", tokens=[1]),
            pb.StepRequest(session_id=d, tokens=[1], expected_offset=3),
        ])
        replies = next(c.stub.StreamBatch(iter([msg]))).steps
        assert [r.status.code for r in replies] == [0, 0, 0, 3, 5, 9]
        assert "out of range" in replies[3].status.message and "is at offset 0" in replies[5].status.message
        assert c.get(d).offset == 0
    got_a = np.concatenate([logits_of(replies[0]), logits_of(replies[2])])
    want_a, state_a = reference("lstm-lm").run(seq_a)
    assert np.abs(got_a - want_a).max() <= TOL
    assert all(np.abs(x - y).max() <= TOL for x, y in zip(state_of(replies[2]), state_a))
    want_b, state_b = reference("gru-lm").run(seq_b)
    assert np.abs(logits_of(replies[1]) - want_b).max() <= TOL
    assert np.abs(state_of(replies[1])[0] - state_b[0]).max() <= TOL


def test_max_batch_bounds_the_rows_of_every_call_blocks_included(lstm: Model) -> None:
    """A packed block of 10 rows with --max-batch 4 runs as calls of at most 4 rows; single chunks queued
    beside it fill calls up to the bound too; every result equals one pass."""
    rng = np.random.default_rng(3)
    block_x = rng.integers(0, 98, (10, 6))
    block_states = [rng.standard_normal((2, 10, 16)).astype(np.float32) for _ in range(2)]
    singles = [(rng.integers(0, 98, 6), _random_state(rng)) for _ in range(5)]
    runtime = _Recording(lstm.runtime)

    async def go() -> tuple[tuple, list]:
        engine = Engine(EngineOptions(max_batch=4, threads=1))
        block = engine.submit(runtime, block_x, block_states)  # type: ignore[arg-type]
        ones = [_one(engine, runtime, x, s) for x, s in singles]  # type: ignore[arg-type]
        results = await asyncio.gather(block, *ones)
        await engine.close()
        return results[0], results[1:]

    (logits, states, acts), ones = asyncio.run(go())
    assert acts is None and max(runtime.batches) <= 4 and sum(runtime.batches) == 15
    want, want_states = lstm.runtime.run(block_x, block_states)
    assert logits.shape == want.shape and np.abs(logits - want).max() <= TOL
    for a, b in zip(states, want_states):
        assert a.shape == b.shape and np.abs(a - b).max() <= TOL
    for (x, s), (got, got_states) in zip(singles, ones):
        one, one_states = _one_pass(lstm, x, s)
        assert np.abs(got - one).max() <= TOL
        for a, b in zip(got_states, one_states):
            assert np.abs(a - b).max() <= TOL


class _Counting:
    """An ONNX Runtime session that counts its calls (and runs them)."""

    def __init__(self, session: object) -> None:
        self.session, self.calls = session, 0

    def run(self, *args: object) -> object:
        self.calls += 1
        return self.session.run(*args)  # type: ignore[attr-defined]


def test_the_engines_only_call_takes_the_wide_session_from_ort_alone_rows(tiny_models: Path) -> None:
    """A call of at least alone_rows rows x steps that is the engine's only call, of callers' blocks, runs on
    the many-thread session; under alone_rows, with alone_rows 0, or batching many callers' single rows, on
    the one-thread session; the results are the same."""
    rng = np.random.default_rng(5)

    async def go(alone_rows: int) -> tuple[int, int]:
        model = load_model(tiny_models / "lstm-lm" / "1", RuntimeOptions(large_threads=2, large_rows=512,
                                                                          alone_rows=alone_rows))
        rt = model.runtime
        small, wide = _Counting(rt._session), _Counting(rt._large)
        rt._session, rt._large = small, wide  # type: ignore[assignment]
        engine = Engine(EngineOptions(threads=1, window=0.05))  # the window: the 8 rows below are one call
        blocks = [(rng.integers(0, 98, (8, 1)), [rng.standard_normal((2, 8, 16)).astype(np.float32)] * 2)
                  for _ in range(2)]
        out = [await engine.submit(rt, x, s) for x, s in blocks]  # one after the other: each alone
        # callers' single rows batched into one call (many streams' tokens): the one-thread session
        out += await asyncio.gather(*(engine.submit(rt, x[k : k + 1], [a[:, k : k + 1] for a in s])
                                      for x, s in blocks for k in range(4)))
        await engine.close()
        assert engine.stats.calls == 3
        calls = small.calls, wide.calls
        for (x, s), (logits, _, _) in zip(blocks, out):
            want, _ = rt.run(x, s)
            assert np.abs(logits - want).max() <= TOL
        return calls

    assert asyncio.run(go(8)) == (1, 2)
    assert asyncio.run(go(0)) == (3, 0)
    assert asyncio.run(go(16)) == (3, 0)
