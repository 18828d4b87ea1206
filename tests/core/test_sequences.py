"""The Open Inference Protocol's sequences in the core (service/core/sequences.py), on every store:
the session rules every entry point keeps (tests/core/test_entry_points.py), and a sequence's own
life: a start runs from a fresh state and creates or resets it, an end deletes it after answering, a
request id is its replay key, a one-shot request stores nothing."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.outputs import OutputOptions
from service.core.sequences import Sequences, SequenceStep
from service.core.sessions import SessionService
from service.errors import InvalidInput, ModelNotFound, OffsetMismatch, SessionNotFound
from service.repository.models import Model
from service.types import StepInput, StepResult
from tests.core.conftest import MakeCore
from tests.core.entries import (
    RULES,
    TENANT,
    Chunk,
    CountingEvents,
    Rule,
    masked,
    rule_chunk,
    snapshot,
    step_input,
    via_step,
)
from tests.helpers import TOL, another_replica

LOGITS = OutputOptions(return_logits=True)


def _close(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.shape == b.shape and float(np.abs(a - b).max()) <= TOL


def _seq(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 98, n)


async def _infer(core: SessionService, sid: str, model: str, x: np.ndarray | Chunk, *, start: bool = False,
                 end: bool = False, rid: str = "", expected: int | None = None, tenant: str = TENANT) -> StepResult:
    c = x if isinstance(x, Chunk) else Chunk(sid, x, expected=expected)
    sid = c.session_id
    _, result = await Sequences(core).infer(tenant, SequenceStep(sid, model, 0, start, end, step_input(c),
                                                                 request_id=rid))
    return result


async def _gone(core: SessionService, sid: str) -> bool:
    try:
        await core.get(TENANT, sid)
    except SessionNotFound:
        return True
    return False


# -- the rules every entry point keeps ----------------------------------------------------------------
@st.composite
def _splits(draw: st.DrawFn) -> tuple[str, list[int], bool, int]:
    model = draw(st.sampled_from(["lstm-lm", "gru-tagger", "rnn-lm", "lstm-classifier", "gru-classifier"]))
    length = draw(st.integers(1, 60))
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=6))) if length > 1 else []
    return model, [0, *cuts, length], draw(st.booleans()), draw(st.integers(0, 2**31))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_any_split_gives_one_pass(make_core: MakeCore, reference, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    model, cuts, end, seed = data.draw(_splits())
    ref = reference(model)
    rng = np.random.default_rng(seed)
    x = rng.random((cuts[-1], 8), dtype=np.float32) if ref.manifest["input"]["kind"] == "features" else \
        rng.integers(0, 98, cuts[-1])
    async with make_core() as core:
        sid = f"seq-{uuid.uuid4().hex}"  # examples share the store's file: a reused id and request id would be a replay
        logits = []
        for i, (a, b) in enumerate(itertools.pairwise(cuts)):
            last = b == cuts[-1]
            r = await _infer(core, sid, model, x[a:b], start=i == 0, end=end and last, rid=f"r{i}",
                             expected=None if i == 0 else a)
            assert (r.start_offset, r.offset, r.replayed) == (a, b, False)
            logits.append(r.logits)
        want_logits, want_state = ref.run(x)
        assert _close(np.concatenate(logits), want_logits), (model, cuts)
        if end:
            assert await _gone(core, sid)
        else:
            v = await core.get(TENANT, sid, include_state=True)
            assert v.offset == cuts[-1] and v.state is not None
            assert all(_close(got.value, want) for got, want in zip(v.state, want_state))


async def test_an_offset_mismatch_is_refused_with_the_actual_offset(make_core: MakeCore) -> None:
    events = CountingEvents()
    async with make_core(events=events) as core:
        await _infer(core, "s", "lstm-lm", _seq(5), start=True)
        before = await snapshot(core, "s")
        for offset in (0, 3, 7, 999):
            with pytest.raises(OffsetMismatch) as e:
                await _infer(core, "s", "lstm-lm", np.array([9]), expected=offset)
            assert e.value.actual == 5 and f"is at offset 5, not {offset}" in str(e.value)
            assert await snapshot(core, "s") == before
        assert events.counts == {"conflict": 4}


@pytest.mark.parametrize("store_kind", ["memory"])  # the words do not depend on the store
async def test_an_offset_mismatch_says_what_step_says(make_core: MakeCore) -> None:
    async with make_core() as core:
        await _infer(core, "s", "lstm-lm", _seq(5), start=True)
        with pytest.raises(OffsetMismatch) as step:
            await via_step(core, Chunk("s", np.array([9]), expected=2))
        with pytest.raises(OffsetMismatch) as seq:
            await _infer(core, "s", "lstm-lm", np.array([9]), expected=2)
        assert str(seq.value) == str(step.value)


async def test_a_retry_is_a_replay(make_core: MakeCore) -> None:
    """By its request id or by its offset: the same outputs, the offset not advanced, `replayed`;
    a retried start is replayed, not a reset; on another replica too. The same id with other inputs
    is refused and changes nothing."""
    events = CountingEvents()
    x = _seq(12, seed=3)
    async with make_core(events=events) as a, make_core(store=another_replica(a.store), events=events) as b:
        started = await _infer(a, "s", "gru-lm", x[:4], start=True, rid="a")
        first = await _infer(a, "s", "gru-lm", x[4:9], rid="b")
        before = await snapshot(a, "s")
        for core, retry in ((a, {"rid": "b"}), (b, {"rid": "b"}), (a, {"expected": 4}), (b, {"expected": 4})):
            again = await _infer(core, "s", "gru-lm", x[4:9], **retry)  # type: ignore[arg-type]
            assert (again.replayed, again.start_offset, again.offset) == (True, 4, 9), retry
            assert again.logits is not None and first.logits is not None
            assert np.array_equal(again.logits, first.logits)
            assert await snapshot(a, "s") == before
        other = x[4:9].copy()
        other[0] = (other[0] + 1) % 98
        with pytest.raises(OffsetMismatch) as e:
            await _infer(a, "s", "gru-lm", other, rid="b")
        assert "request id 'b' was last applied to session s at offset 4 with other inputs" in str(e.value)
        assert e.value.actual == 9 and await snapshot(a, "s") == before
        assert events.counts == {"replayed": 4, "conflict": 1}
        # a start applied, then retried: replayed, the sequence not reset
        await _infer(a, "t2", "gru-lm", x[:4], start=True, rid="s")
        again = await _infer(b, "t2", "gru-lm", x[:4], start=True, rid="s")
        assert (again.replayed, again.offset) == (True, 4) and started.logits is not None
        assert again.logits is not None and np.array_equal(again.logits, started.logits)
        assert (await _infer(a, "t2", "gru-lm", x[4:5], rid="t")).offset == 5


_RULES = [r for r in RULES if "Step" in r.entries]
# Rules whose words a sequence says its own way, on purpose: what the caller must do next.
_DIFFERENT = {
    "unknown session": "sequence '{sid}' is not active (session '{sid}' does not exist); send its first request with "
                       "sequence_start=true",
}


@pytest.mark.parametrize("rule", _RULES, ids=[r.name for r in _RULES])
async def test_an_input_rule_refuses_and_changes_nothing(make_core: MakeCore, rule: Rule) -> None:
    """On a running sequence the session stays as it was; on a start the sequence is not started."""
    async with make_core(**rule.settings) as core:
        sid = (await core.create(TENANT, rule.model, 0)).session_id
        before, count = await snapshot(core, sid), await core.store.count()
        with pytest.raises(rule.error) as e:
            await _infer(core, sid, rule.model, rule_chunk(rule, sid))
        assert await snapshot(core, sid) == before
        if rule.name not in _DIFFERENT:
            assert rule.words in str(e.value), str(e.value)
        if rule.name == "unknown session":
            return  # a start makes it
        fresh = rule.session_id or "new"
        with pytest.raises(rule.error):
            await _infer(core, fresh, rule.model, rule_chunk(rule, fresh), start=True)
        assert await core.store.count() == count
        if fresh != "bad id!":
            assert await _gone(core, fresh)


@pytest.mark.parametrize("rule", _RULES, ids=[r.name for r in _RULES])
@pytest.mark.parametrize("store_kind", ["memory"])  # the words do not depend on the store
async def test_an_input_rule_says_what_step_says(make_core: MakeCore, rule: Rule) -> None:
    """Step's words, except where a sequence says what to do next (_DIFFERENT): those words, then."""
    async with make_core(**rule.settings) as core:
        sid = (await core.create(TENANT, rule.model, 0)).session_id
        with pytest.raises(rule.error) as step:
            await via_step(core, rule_chunk(rule, sid))
        with pytest.raises(rule.error) as seq:
            await _infer(core, sid, rule.model, rule_chunk(rule, sid))
        if rule.name in _DIFFERENT:
            chunk = rule_chunk(rule, sid)
            assert _DIFFERENT[rule.name].format(sid=chunk.session_id) in str(seq.value), str(seq.value)
        else:
            assert masked(str(seq.value)) == masked(str(step.value))


async def test_another_replicas_advance_is_seen(make_core: MakeCore, reference) -> None:  # type: ignore[no-untyped-def]
    """A sequence read from the store: what another replica applied is where its next request starts,
    with no conflict counted."""
    events = CountingEvents()
    x = _seq(20, seed=5)
    async with make_core(events=events) as a, make_core(store=another_replica(a.store), events=events) as b:
        r1 = await _infer(b, "s", "lstm-lm", x[:5], start=True)
        await via_step(a, Chunk("s", x[5:12], expected=5))
        r3 = await _infer(b, "s", "lstm-lm", x[12:], expected=12)
        r4 = await _infer(a, "s", "lstm-lm", x[:3])
        want, _ = reference("lstm-lm").run(np.concatenate([x, x[:3]]))
        assert _close(r1.logits, want[:5]) and _close(r3.logits, want[12:20]) and _close(r4.logits, want[20:])
        assert "conflict" not in events.counts


# -- a sequence's life ----------------------------------------------------------------------------
async def test_a_start_creates_or_resets_and_an_end_deletes(make_core: MakeCore, reference) -> None:  # type: ignore[no-untyped-def]
    ref = reference("gru-lm")
    x = _seq(10, seed=8)
    async with make_core() as core:
        await _infer(core, "s", "gru-lm", x[:6], start=True)
        reset = await _infer(core, "s", "gru-lm", x[6:], start=True)  # from a fresh state again
        assert (reset.start_offset, reset.offset) == (0, 4) and _close(reset.logits, ref.run(x[6:])[0])
        assert (await core.get(TENANT, "s")).offset == 4
        last = await _infer(core, "s", "gru-lm", x[:2], end=True)  # answered, then deleted
        assert last.offset == 6 and await _gone(core, "s")
        with pytest.raises(SessionNotFound) as e:
            await _infer(core, "s", "gru-lm", x[:2])
        assert "sequence 's' is not active" in str(e.value) and "sequence_start=true" in str(e.value)
        assert await core.store.count() == 0


async def test_a_sequence_runs_on_the_model_it_started_on(make_core: MakeCore) -> None:
    async with make_core() as core:
        await _infer(core, "s", "gru-lm", _seq(3), start=True)
        before = await snapshot(core, "s")
        with pytest.raises(InvalidInput, match="sequence 's' runs on model gru-lm version 1, not 'lstm-lm'"):
            await _infer(core, "s", "lstm-lm", _seq(2))
        with pytest.raises(ModelNotFound):
            await _infer(core, "new", "no-such-model", _seq(2), start=True)
        assert await snapshot(core, "s") == before and await core.store.count() == 1


async def test_a_one_shot_request_stores_nothing(make_core: MakeCore, reference) -> None:  # type: ignore[no-untyped-def]
    x = _seq(7, seed=2)
    async with make_core() as core:
        model, r = await Sequences(core).infer(TENANT, SequenceStep("", "lstm-lm", 0, chunk=StepInput(
            "", tokens=[int(t) for t in x], options=LOGITS)))
        assert model.name == "lstm-lm" and (r.start_offset, r.offset, r.replayed) == (0, 7, False)
        assert _close(r.logits, reference("lstm-lm").run(x)[0])
        assert await core.store.count() == 0


async def test_a_chunk_made_from_the_model(make_core: MakeCore) -> None:
    """An input that can only be read knowing the sequence's model is made from it."""
    seen: list[str] = []

    def chunk(model: Model) -> StepInput:
        seen.append(model.name)
        return StepInput("", tokens=[1] * model.states[0].layers)

    async with make_core() as core:
        await Sequences(core).infer(TENANT, SequenceStep("s", "lstm-lm", 0, True, False, chunk))
        _, r = await Sequences(core).infer(TENANT, SequenceStep("s", "lstm-lm", 0, False, False, chunk))
        assert seen == ["lstm-lm", "lstm-lm"] and r.offset == 4


async def test_tenants_do_not_see_each_others_sequences(make_core: MakeCore) -> None:
    async with make_core() as core:
        await _infer(core, "s", "gru-lm", _seq(3), start=True, tenant="a")
        with pytest.raises(SessionNotFound, match="sequence_start"):
            await _infer(core, "s", "gru-lm", _seq(2), tenant="b")
        assert (await _infer(core, "s", "lstm-lm", _seq(2), start=True, tenant="b")).offset == 2
        assert (await _infer(core, "s", "gru-lm", _seq(2), tenant="a")).offset == 5


@pytest.mark.parametrize("store_kind", ["memory"])
async def test_a_retry_after_100k_sequences_of_another_tenant(make_core: MakeCore) -> None:
    """The old replay memory was one map of 100,000 sequences for all tenants: another tenant starting
    100,050 sequences evicted this one's last request id, and its retry was applied twice. The request
    id is kept in the sequence's own record now."""
    x = _seq(6, seed=4)
    async with make_core(max_sessions=120_000, memory_capacity=120_000) as core:
        await _infer(core, "keep", "gru-lm", x[:2], start=True, rid="a", tenant="mine")
        first = await _infer(core, "keep", "gru-lm", x[2:5], rid="b", tenant="mine")
        sequences, n = Sequences(core), 100_050
        for group in range(0, n, 2000):  # concurrent starts, as a stream sends them
            await asyncio.gather(*(sequences.infer("theirs", SequenceStep(
                f"o{i}", "gru-lm", 0, True, False, StepInput("", tokens=[i % 50]), request_id="x"))
                for i in range(group, min(n, group + 2000))))
        assert await core.store.count("theirs") == n
        again = await _infer(core, "keep", "gru-lm", x[2:5], rid="b", tenant="mine")
        assert (again.replayed, again.offset) == (True, 5) and again.logits is not None and first.logits is not None
        assert np.array_equal(again.logits, first.logits)
        assert (await _infer(core, "keep", "gru-lm", x[5:], rid="c", tenant="mine")).offset == 6
