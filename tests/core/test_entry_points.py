"""Every entry point of the core keeps the session rules, on every store (memory, SQLite, and a store
whose replicas read from hints that can go stale): Step, StepBatch, the packed batch and Generate
(tests/core/entries.py gives them one shape). Chunking is invisible; an offset mismatch is refused
with the actual offset; a retry of the last chunk is a replay; every input rule is refused with the
same words as Step's and changes nothing; a stale hint is read again; conflicts are counted alike."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import OffsetMismatch
from tests.core.conftest import MakeCore
from tests.core.entries import (
    ENTRIES,
    REPLAYING,
    RULES,
    TENANT,
    Chunk,
    CountingEvents,
    Rule,
    Sent,
    masked,
    rule_chunk,
    snapshot,
    via_step,
)
from tests.helpers import TOL, HintedStore, another_replica

TOKEN_MODELS, FEATURE_MODELS, LM_MODELS = ("lstm-lm", "gru-tagger", "rnn-lm"), ("lstm-classifier", "gru-classifier"), \
    ("lstm-lm", "gru-lm", "rnn-lm")


@pytest.fixture(params=list(ENTRIES))
def entry(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _close(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.shape == b.shape and float(np.abs(a - b).max()) <= TOL


def _seq(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 98, n)


# -- chunking is invisible -----------------------------------------------------------------------
@st.composite
def _splits(draw: st.DrawFn, models: tuple[str, ...]) -> tuple[str, list[int], int]:
    model = draw(st.sampled_from(models))
    length = draw(st.integers(1, 60))
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=6))) if length > 1 else []
    return model, [0, *cuts, length], draw(st.integers(0, 2**31))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_any_split_gives_one_pass(make_core: MakeCore, reference, entry: str,  # type: ignore[no-untyped-def]
                                        data: st.DataObject) -> None:
    """A sequence in random chunks through one entry point: each chunk applied at its offset, and
    the outputs and final state of one pass over the whole (for Generate, the whole is the prompts
    and the greedy tokens it made between them: each the one pass's argmax)."""
    send = ENTRIES[entry]
    model, cuts, seed = data.draw(_splits(LM_MODELS if entry == "Generate" else TOKEN_MODELS + FEATURE_MODELS))
    ref = reference(model)
    rng = np.random.default_rng(seed)
    features = ref.manifest["input"]["kind"] == "features"
    x = rng.random((cuts[-1], 8), dtype=np.float32) if features else rng.integers(0, 98, cuts[-1])
    async with make_core() as core:
        sid = (await core.create(TENANT, model, 0)).session_id
        parts: list[np.ndarray] = []
        sent: list[Sent] = []
        for a, b in itertools.pairwise(cuts):
            at = sum(len(p) for p in parts)
            r = await send(core, Chunk(sid, x[a:b], expected=at))
            assert (r.start_offset, r.offset, r.replayed) == (at, at + b - a + len(r.made), False)
            parts += [x[a:b], np.array(r.made, x.dtype)] if r.made else [x[a:b]]
            sent.append(r)
        whole = np.concatenate(parts)
        want_logits, want_state = ref.run(whole)
        if entry == "Generate":
            for r in sent:
                assert r.made == [int(np.argmax(want_logits[r.offset - 2]))], (model, cuts)
        else:
            assert _close(np.concatenate([r.logits for r in sent if r.logits is not None]), want_logits)
        v = await core.get(TENANT, sid, include_state=True)
        assert v.offset == len(whole) and v.state is not None
        assert all(_close(got.value, want) for got, want in zip(v.state, want_state)), (model, cuts)


# -- offsets, replays and retries ---------------------------------------------------------------------
async def test_an_offset_mismatch_is_refused_with_the_actual_offset(make_core: MakeCore, entry: str) -> None:
    send, events = ENTRIES[entry], CountingEvents()
    async with make_core(events=events) as core:
        sid = (await core.create(TENANT, "lstm-lm", 0)).session_id
        await send(core, Chunk(sid, _seq(5), expected=0))
        at = (await core.get(TENANT, sid)).offset  # 5 (6 after Generate's token)
        before = await snapshot(core, sid)
        for offset in (0, 3, at + 2, 999):
            with pytest.raises(OffsetMismatch) as e:
                await send(core, Chunk(sid, np.array([9]), expected=offset))
            assert e.value.actual == at and f"is at offset {at}, not {offset}" in str(e.value), str(e.value)
            assert await snapshot(core, sid) == before
        assert events.counts == {"conflict": 4}
        r = await send(core, Chunk(sid, np.array([9]), expected=at))  # at its offset it applies
        assert (r.start_offset, r.replayed) == (at, False)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e != "Step"])
@pytest.mark.parametrize("store_kind", ["memory"])  # the words do not depend on the store
async def test_an_offset_mismatch_says_what_step_says(make_core: MakeCore, entry: str) -> None:
    async with make_core() as core:
        sid = (await core.create(TENANT, "lstm-lm", 0)).session_id
        await via_step(core, Chunk(sid, _seq(5)))
        said = []
        for send in (via_step, ENTRIES[entry]):
            with pytest.raises(OffsetMismatch) as e:
                await send(core, Chunk(sid, np.array([9]), expected=2))
            said.append(str(e.value))
        assert said[1] == said[0]


@pytest.mark.parametrize("entry", REPLAYING)
async def test_a_retry_of_the_last_chunk_is_a_replay(make_core: MakeCore, entry: str) -> None:
    """Same outputs, offset not advanced, `replayed`; kept outputs and recomputed ones (past
    --max-replay-bytes) alike, and whichever entry point the retry comes through. A retry with
    other inputs is refused with the actual offset."""
    send, events = ENTRIES[entry], CountingEvents()
    async with make_core(events=events, max_replay_bytes=2048) as core:
        for n in (3, 20):  # 3 x 98 float32 logits are kept; 20 x 98 are recomputed from the state before
            sid = (await core.create(TENANT, "gru-lm", 0)).session_id
            x = _seq(5 + n, seed=n)
            await send(core, Chunk(sid, x[:5], expected=0))
            first = await send(core, Chunk(sid, x[5:], expected=5))
            before = await snapshot(core, sid)
            for retry in REPLAYING:
                again = await ENTRIES[retry](core, Chunk(sid, x[5:], expected=5))
                assert (first.replayed, again.replayed, again.start_offset, again.offset) == (False, True, 5, 5 + n)
                assert again.logits is not None and first.logits is not None
                assert np.array_equal(again.logits, first.logits), retry
                assert await snapshot(core, sid) == before
            other = x[5:].copy()
            other[-1] = (other[-1] + 1) % 98
            for wrong in (Chunk(sid, other, expected=5), Chunk(sid, x[:5], expected=0)):
                with pytest.raises(OffsetMismatch) as e:
                    await send(core, wrong)
                assert e.value.actual == 5 + n and f"is at offset {5 + n}, not {wrong.expected}" in str(e.value)
                assert await snapshot(core, sid) == before
        assert events.counts == {"replayed": 2 * len(REPLAYING), "conflict": 4}


async def test_a_retried_generate_is_refused_not_replayed(make_core: MakeCore) -> None:
    """Generate keeps no replay: its retry names an offset the session has passed."""
    async with make_core() as core:
        sid = (await core.create(TENANT, "lstm-lm", 0)).session_id
        await ENTRIES["Generate"](core, Chunk(sid, _seq(5), expected=0))
        before = await snapshot(core, sid)
        with pytest.raises(OffsetMismatch) as e:
            await ENTRIES["Generate"](core, Chunk(sid, _seq(5), expected=0))
        assert e.value.actual == 6 and await snapshot(core, sid) == before


# -- the input rules -------------------------------------------------------------------------------
_CASES = [(rule, entry) for rule in RULES for entry in rule.entries]


async def _refused(core, rule: Rule, send, sid: str) -> str:  # type: ignore[no-untyped-def]
    before = await snapshot(core, sid)
    count = await core.store.count()
    with pytest.raises(rule.error) as e:
        await send(core, rule_chunk(rule, sid))
    assert await snapshot(core, sid) == before and await core.store.count() == count
    return str(e.value)


@pytest.mark.parametrize(("rule", "entry"), _CASES, ids=[f"{r.name}-{e}" for r, e in _CASES])
async def test_an_input_rule_refuses_and_changes_nothing(make_core: MakeCore, rule: Rule, entry: str) -> None:
    async with make_core(**rule.settings) as core:
        sid = (await core.create(TENANT, rule.model, 0)).session_id
        message = await _refused(core, rule, ENTRIES[entry], sid)
        assert rule.words in message, message


_OTHERS = [(rule, entry) for rule, entry in _CASES if entry != "Step"]


@pytest.mark.parametrize(("rule", "entry"), _OTHERS, ids=[f"{r.name}-{e}" for r, e in _OTHERS])
@pytest.mark.parametrize("store_kind", ["memory"])  # the words do not depend on the store
async def test_an_input_rule_says_what_step_says(make_core: MakeCore, rule: Rule, entry: str) -> None:
    async with make_core(**rule.settings) as core:
        sid = (await core.create(TENANT, rule.model, 0)).session_id
        step, other = await _refused(core, rule, via_step, sid), await _refused(core, rule, ENTRIES[entry], sid)
        assert masked(other) == masked(step)


# -- replicas: stale hints and conflicts ------------------------------------------------------------
async def test_a_stale_hint_is_read_again_and_the_chunk_applies(make_core: MakeCore, reference, entry: str) -> None:  # type: ignore[no-untyped-def]
    """Replica b's hint of a session falls behind while replica a advances it: b's next chunk, with
    the offset the client knows or with none, is decided on the stored session and applies from its
    state, with no conflict counted."""
    send = ENTRIES[entry]
    ea, eb = CountingEvents(), CountingEvents()
    x = _seq(40, seed=7)
    async with make_core(events=ea) as a, make_core(store=another_replica(a.store), events=eb) as b:
        sid = (await a.create(TENANT, "lstm-lm", 0)).session_id
        whole: list[int] = []
        outputs: list[tuple[int, Sent]] = []

        async def feed(core, part: np.ndarray, expected: bool, through=via_step) -> None:  # type: ignore[no-untyped-def]
            r = await through(core, Chunk(sid, part, expected=len(whole) if expected else None))
            assert (r.start_offset, r.replayed) == (len(whole), False)
            outputs.append((len(whole), r))
            whole.extend(int(t) for t in part)
            whole.extend(r.made)

        await feed(b, x[:5], True)  # b's hint: offset 5
        await feed(a, x[5:10], True)  # a's hint (from the create) was stale too
        await feed(b, x[10:20], True, send)  # b's hint is behind the client's offset: read again
        await feed(a, x[20:25], False)
        await feed(b, x[25:40], False, send)  # no offset: b runs from its hint, the write loses, runs again
        want, _ = reference("lstm-lm").run(np.array(whole))
        for at, r in outputs:
            if r.logits is not None:
                assert _close(r.logits, want[at : at + len(r.logits)]), at
            for k, token in enumerate(r.made):
                assert token == int(np.argmax(want[r.offset - len(r.made) + k - 1]))
        assert (await b.get(TENANT, sid)).offset == len(whole)
        assert "conflict" not in ea.counts and "conflict" not in eb.counts
        if isinstance(b.store, HintedStore) and entry != "Generate":  # Generate reads the stored session
            assert b.store.hint_reads > 0


async def test_conflicts_are_counted_alike(make_core: MakeCore, entry: str) -> None:
    """A mismatch and a retry with other inputs count one conflict each; a replay and a stale hint
    none, on every entry point."""
    send, events = ENTRIES[entry], CountingEvents()
    async with make_core(events=events) as a, make_core(store=another_replica(a.store), events=events) as b:
        sid = (await a.create(TENANT, "lstm-lm", 0)).session_id
        last = await send(a, Chunk(sid, _seq(4), expected=0))
        if entry in REPLAYING:
            assert (await send(a, Chunk(sid, _seq(4), expected=0))).replayed
        for wrong in (Chunk(sid, _seq(4, seed=1), expected=0), Chunk(sid, _seq(2), expected=last.offset + 1)):
            with pytest.raises(OffsetMismatch):
                await send(a, wrong)
        await via_step(b, Chunk(sid, _seq(3), expected=last.offset))  # a's hint is stale now
        await send(a, Chunk(sid, _seq(3), expected=last.offset + 3))
        assert events.counts == {"conflict": 2, **({"replayed": 1} if entry in REPLAYING else {})}
