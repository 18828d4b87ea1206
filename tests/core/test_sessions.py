"""Every session rule of the core, in process (no gRPC): on the memory store, on SQLite and on a store
with hints.

Each refusal asserts its error type (which fixes the gRPC code), its message, and that the
session did not change."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest

from service.auth import TenantLimits
from service.config import Settings
from service.core.outputs import OutputOptions
from service.core.sessions import SessionService
from service.engine.engine import Engine, EngineOptions
from service.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidInput,
    LimitExceeded,
    ModelNotFound,
    NoOutputYet,
    OffsetMismatch,
    SessionExpired,
    SessionNotFound,
    Unavailable,
)
from service.store import MemoryStore
from service.types import GenerateInput, NamedTensor, StepInput, StepResult
from tests.core.conftest import MakeCore
from tests.helpers import TOL, ManualClock, Reference, another_replica

LOGITS = OutputOptions(return_logits=True, return_state=True)


def _seq(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 98, n)]


async def _snapshot(core: SessionService, sid: str) -> tuple:
    v = await core.get("t", sid, include_state=True)
    return v.offset, [t.value.tobytes() for t in v.state or []]


async def _step(core: SessionService, sid: str, tokens: list[int], offset: int | None = None,
                options: OutputOptions = LOGITS) -> StepResult:
    return await core.step("t", StepInput(sid, tokens=tokens, expected_offset=offset, options=options))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).max()) <= TOL


# -- creation ------------------------------------------------------------------
async def test_create_names_ids_and_pins_the_version(make_core: MakeCore) -> None:
    async with make_core() as core:
        given = await core.create("t", "lstm-lm", 0, "my.id:1@x-y_z")
        generated = await core.create("t", "gru-lm", 1)
        assert given.session_id == "my.id:1@x-y_z" and (given.model, given.version, given.offset) == ("lstm-lm", 1, 0)
        assert len(generated.session_id) == 32 and generated.tenant == "t"
        for bad in ("bad id!", "a/b", "x" * 129, "line\n", "é"):
            with pytest.raises(InvalidInput, match="session_id must be"):
                await core.create("t", "lstm-lm", 0, bad)
        before = await _snapshot(core, "my.id:1@x-y_z")
        with pytest.raises(AlreadyExists, match=re.escape("'my.id:1@x-y_z' already exists")):
            await core.create("t", "gru-lm", 0, "my.id:1@x-y_z")
        assert (await core.get("t", "my.id:1@x-y_z")).model == "lstm-lm"
        assert await _snapshot(core, "my.id:1@x-y_z") == before
        with pytest.raises(ModelNotFound, match="model 'nomodel' is not loaded"):
            await core.create("t", "nomodel", 0)
        with pytest.raises(ModelNotFound, match=r"has no version 7 \(versions: \[1\]\)"):
            await core.create("t", "lstm-lm", 7)


async def test_ttl_bounds(make_core: MakeCore) -> None:
    async with make_core(session_ttl=100.0, max_ttl=1000.0) as core:
        assert (await core.create("t", "lstm-lm", 0, "d")).expires_at == pytest.approx(
            (await core.get("t", "d")).updated_at + 100)
        v = await core.create("t", "lstm-lm", 0, "long", ttl=1000)
        assert v.expires_at - v.updated_at == pytest.approx(1000)
        for ttl in (-1, 1001):
            with pytest.raises(InvalidInput, match="ttl_seconds must be between"):
                await core.create("t", "lstm-lm", 0, ttl=ttl)


async def test_initial_state_is_checked_and_used(make_core: MakeCore, tiny_models: Path) -> None:
    rng = np.random.default_rng(1)
    h, c = rng.standard_normal((2, 2, 16)).astype(np.float32)
    good = [NamedTensor("state_h", h), NamedTensor("state_c", c)]
    async with make_core() as core:
        cases = [
            ([good[0]], "must name each of"),
            ([good[0], good[0]], "must name each of"),
            ([good[0], NamedTensor("state_c", np.zeros((2, 15), np.float32))], "'state_c' must have shape [2, 16]"),
            ([good[0], NamedTensor("state_c", np.full((2, 16), np.nan, np.float32))], "not finite"),
        ]
        for tensors, words in cases:
            with pytest.raises(InvalidInput) as e:
                await core.create("t", "lstm-lm", 0, initial_state=tensors)
            assert words in str(e.value)
        assert await core.store.count() == 0  # nothing refused was stored
        sid = (await core.create("t", "lstm-lm", 0, initial_state=good)).session_id
        v = await core.get("t", sid, include_state=True)
        assert v.state is not None and np.array_equal(v.state[0].value, h) and np.array_equal(v.state[1].value, c)


async def test_the_session_limit_is_resource_exhausted(make_core: MakeCore) -> None:
    async with make_core(max_sessions=2) as core:
        a = (await core.create("t", "lstm-lm", 0)).session_id
        await core.create("t", "lstm-lm", 0)
        with pytest.raises(LimitExceeded, match="limit of 2 sessions"):
            await core.create("t", "lstm-lm", 0)
        with pytest.raises(LimitExceeded, match="limit of 2 sessions"):
            await core.fork("t", a)
        assert await core.store.count() == 2


# -- steps -----------------------------------------------------------------------
async def test_chunking_is_invisible(make_core: MakeCore, tiny_models: Path) -> None:
    """Any split of a sequence gives the one-pass logits and final state."""
    tokens = _seq(97)
    for model in ("rnn-lm", "lstm-lm", "gru-tagger"):
        want_logits, want_state = Reference(tiny_models / model / "1").run(np.array(tokens))
        async with make_core() as core:
            for split in ([97], [1] * 5 + [92], [13, 40, 1, 43], [64, 33]):
                sid = (await core.create("t", model, 0)).session_id
                parts, pos = [], 0
                for n in split:
                    r = await _step(core, sid, tokens[pos : pos + n], pos)
                    assert (r.start_offset, r.offset, r.replayed) == (pos, pos + n, False)
                    assert r.logits is not None and r.logits.shape == (n, want_logits.shape[1])
                    parts.append(r.logits)
                    pos += n
                assert _close(np.concatenate(parts), want_logits), (model, split)
                assert r.state is not None and all(_close(g.value, w) for g, w in zip(r.state, want_state))


async def test_text_and_features_inputs(make_core: MakeCore, tiny_models: Path) -> None:
    async with make_core() as core:
        lm = (await core.create("t", "lstm-lm", 0)).session_id
        model = core.models.get("lstm-lm")
        r = await core.step("t", StepInput(lm, text="def f():", options=LOGITS))
        want, _ = Reference(tiny_models / "lstm-lm" / "1").run(np.array(model.encode("def f():")))
        assert r.offset == 8 and r.logits is not None and _close(r.logits, want)
        assert r.text == "".join(model.decode_token(a) for a in r.argmax)
        r = await core.step("t", StepInput(lm, text="\u00e9"))  # unknown characters map to the unknown id
        assert r.offset == 9
        cls = (await core.create("t", "lstm-classifier", 0)).session_id
        image = np.random.default_rng(2).random((8, 8), dtype=np.float32)
        one = await core.step("t", StepInput(cls, features=image.tobytes(), options=OutputOptions(
            final_only=True, return_logits=True)))
        want, _ = Reference(tiny_models / "lstm-classifier" / "1").run(image)
        assert one.offset == 8 and one.logits is not None and _close(one.logits[0], want[-1])
        assert len(one.outputs) == 1 and one.outputs[0].label == core.models.get("lstm-classifier").labels[
            one.argmax[0]]


async def test_bad_chunks_are_refused_and_change_nothing(make_core: MakeCore) -> None:
    async with make_core(max_chunk=64) as core:
        lm = (await core.create("t", "lstm-lm", 0)).session_id
        cls = (await core.create("t", "lstm-classifier", 0)).session_id
        tight = (await core.create("t", "strict-lm", 0)).session_id  # its vocabulary has no unknown id
        await _step(core, lm, [1, 2, 3])
        await core.step("t", StepInput(cls, features=np.zeros((2, 8), "<f4").tobytes()))
        await core.step("t", StepInput(tight, text="ok"))
        f8 = np.zeros((1, 8), "<f4")
        cases = [
            (lm, StepInput(lm, tokens=[1, 2, 98]), "token id 98 at position 2 is out of range [0, 98)"),
            (lm, StepInput(lm, tokens=[-1]), "token id -1 at position 0"),
            (lm, StepInput(lm), "give exactly one non-empty input"),
            (lm, StepInput(lm, text="ab", tokens=[1]), "give exactly one non-empty input"),
            (lm, StepInput(lm, tokens=[5] * 65), "chunk of 65 steps is longer than the limit of 64"),
            (lm, StepInput(lm, text="a" * 65), "chunk of 65 steps is longer than the limit of 64"),
            (lm, StepInput(lm, features=f8.tobytes()), "takes tokens or text, not features"),
            (cls, StepInput(cls, tokens=[1, 2]), "takes features (float32 [time, 8]), not tokens"),
            (cls, StepInput(cls, features=b"\0" * 28), "28 bytes is not a multiple of 32"),
            (cls, StepInput(cls, features=np.full((1, 8), np.nan, "<f4").tobytes()), "not finite"),
            (cls, StepInput(cls, features=np.full((1, 8), np.inf, "<f4").tobytes()), "not finite"),
            (tight, StepInput(tight, text="caf\u00e9"),
             "character 'é' at position 3 that model strict-lm cannot encode"),
            (lm, StepInput(lm, text="a", options=OutputOptions(top_k=-1)), "top_k must be 0 or more"),
        ]
        for sid, inp, words in cases:
            before = await _snapshot(core, sid)
            with pytest.raises(InvalidInput) as e:
                await core.step("t", inp)
            assert words in str(e.value), (inp, str(e.value))
            assert await _snapshot(core, sid) == before, inp
        with pytest.raises(SessionNotFound, match="session 'ghost' does not exist"):
            await _step(core, "ghost", [1])


async def test_offsets_replays_and_refusals(make_core: MakeCore) -> None:
    """expected_offset: applied only at that offset; a retry of the last chunk is replayed with
    the recorded reply; anything else is refused with the actual offset and changes nothing."""
    async with make_core() as core:
        sid = (await core.create("t", "gru-lm", 0)).session_id
        await _step(core, sid, [1, 2, 3, 4, 5], 0)
        first = await _step(core, sid, [6, 7, 8], 5, OutputOptions(top_k=2, return_logits=True))
        before = await _snapshot(core, sid)
        again = await _step(core, sid, [6, 7, 8], 5, OutputOptions(top_k=2, return_logits=True))
        assert (first.replayed, again.replayed) == (False, True)
        assert (again.start_offset, again.offset) == (5, 8) and again.outputs == first.outputs
        assert again.logits is not None and first.logits is not None and np.array_equal(again.logits, first.logits)
        assert await _snapshot(core, sid) == before
        for offset, tokens in ((0, [9]), (3, [9]), (5, [6, 7, 9]), (10, [9]), (999, [9]), (0, [1, 2, 3, 4, 5])):
            with pytest.raises(OffsetMismatch) as e:
                await _step(core, sid, tokens, offset)
            assert f"is at offset 8, not {offset}" in str(e.value) and e.value.actual == 8
            assert await _snapshot(core, sid) == before
        without = await _step(core, sid, [6, 7, 8])  # no expected offset: always applied
        assert (without.start_offset, without.offset, without.replayed) == (8, 11, False)


async def test_one_sessions_chunks_apply_in_arrival_order(make_core: MakeCore, tiny_models: Path) -> None:
    tokens = _seq(60, seed=3)
    async with make_core() as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        results = await asyncio.gather(*(_step(core, sid, tokens[i : i + 3]) for i in range(0, 60, 3)))
        assert [r.start_offset for r in results] == list(range(0, 60, 3))
        want, _ = Reference(tiny_models / "lstm-lm" / "1").run(np.array(tokens))
        assert _close(np.concatenate([r.logits for r in results if r.logits is not None]), want)


async def test_two_replicas_on_one_store_never_both_advance(make_core: MakeCore, store_kind: str) -> None:
    """Two cores (each with its own locks) race one chunk each at offset 0 into a shared store: the
    store's compare-and-set lets exactly one apply; the other is refused with the actual offset
    (with hints, the loser reads the session again and is refused on what is stored)."""
    async with make_core() as a, make_core(store=another_replica(a.store)) as b:
        sid = (await a.create("t", "lstm-lm", 0)).session_id
        # chunks over --inline-rows: both run on the engine's thread, so both read offset 0 before either writes
        results = await asyncio.gather(_step(a, sid, [1] * 8, 0), _step(b, sid, [2] * 8, 0), return_exceptions=True)
        won = [r for r in results if isinstance(r, StepResult)]
        lost = [r for r in results if isinstance(r, OffsetMismatch)]
        assert len(won) == 1 and len(lost) == 1, results
        assert "is at offset 8" in str(lost[0]) and lost[0].actual == 8
        if store_kind != "hinted":
            assert "was advanced elsewhere; it is at offset 8" in str(lost[0])
        v = await b.get("t", sid, include_state=True)
        assert v.offset == 8 and v.state is not None and won[0].state is not None
        assert np.array_equal(v.state[0].value, won[0].state[0].value)


async def test_tenants_do_not_see_each_other(make_core: MakeCore) -> None:
    async with make_core() as core:
        sid = (await core.create("a", "lstm-lm", 0, "shared")).session_id
        await core.step("a", StepInput(sid, tokens=[1]))
        for call in (core.get("b", sid), core.step("b", StepInput(sid, tokens=[1])), core.delete("b", sid),
                     core.fork("b", sid)):
            with pytest.raises(SessionNotFound):
                await call
        assert (await core.create("b", "gru-lm", 0, "shared")).model == "gru-lm"  # the same id, another tenant
        assert (await core.get("a", sid)).offset == 1


# -- batches ---------------------------------------------------------------------
async def test_a_batch_with_repeats_and_refusals(make_core: MakeCore, tiny_models: Path) -> None:
    async with make_core() as core:
        a = (await core.create("t", "lstm-lm", 0)).session_id
        b = (await core.create("t", "gru-lm", 0)).session_id
        inputs = [
            StepInput(a, tokens=[1, 2], options=LOGITS),
            StepInput(b, tokens=[500]),
            StepInput("ghost", tokens=[1]),
            StepInput(a, tokens=[3, 4], expected_offset=0),  # a repeat: runs after the first, so it is stale
            StepInput(b, tokens=[5, 6], options=LOGITS),
            StepInput(a, tokens=[7], expected_offset=2, options=LOGITS),
        ]
        out = await core.step_batch("t", inputs)
        assert isinstance(out[1], InvalidInput) and "out of range" in str(out[1])
        assert isinstance(out[2], SessionNotFound)
        assert isinstance(out[3], OffsetMismatch) and "is at offset 2" in str(out[3])
        ok = [out[0], out[4], out[5]]
        assert all(isinstance(r, StepResult) for r in ok)
        assert [(r.start_offset, r.offset) for r in ok if isinstance(r, StepResult)] == [(0, 2), (0, 2), (2, 3)]
        want, _ = Reference(tiny_models / "lstm-lm" / "1").run(np.array([1, 2, 7]))
        got = np.concatenate([r.logits for r in (out[0], out[5]) if isinstance(r, StepResult) and r.logits is not None])
        assert _close(got, want)
        assert (await core.get("t", a)).offset == 3 and (await core.get("t", b)).offset == 2


async def test_batches_in_opposite_orders_do_not_deadlock(make_core: MakeCore) -> None:
    async with make_core() as core:
        ids = [(await core.create("t", "lstm-lm", 0)).session_id for _ in range(6)]
        one = [StepInput(s, tokens=[1]) for s in ids]
        two = [StepInput(s, tokens=[2]) for s in reversed(ids)]
        singles = [core.step("t", StepInput(s, tokens=[3])) for s in ids]
        results = await asyncio.wait_for(asyncio.gather(core.step_batch("t", one), core.step_batch("t", two),
                                                        *singles), 30)
        assert all(isinstance(r, StepResult) for batch in results[:2] for r in batch)
        assert [(await core.get("t", s)).offset for s in ids] == [3] * 6


# -- reading, forking, deleting ------------------------------------------------------
async def test_get_waits_for_the_chunk_in_flight(make_core: MakeCore) -> None:
    async with make_core() as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        step = asyncio.ensure_future(_step(core, sid, _seq(40)))
        await asyncio.sleep(0)  # the step holds the session's lock
        assert (await core.get("t", sid)).offset == 40
        await step


async def test_fork_copies_and_diverges(make_core: MakeCore, tiny_models: Path) -> None:
    ref = Reference(tiny_models / "lstm-lm" / "1")
    async with make_core() as core:
        src = (await core.create("t", "lstm-lm", 0)).session_id
        await _step(core, src, [1, 2, 3])
        fork = await core.fork("t", src, "child", ttl=50)
        assert (fork.session_id, fork.offset, fork.expires_at - fork.updated_at) == ("child", 3, pytest.approx(50))
        left, right = await _step(core, src, [4]), await _step(core, "child", [5])
        assert left.logits is not None and _close(left.logits, ref.run(np.array([1, 2, 3, 4]))[0][3:])
        assert right.logits is not None and _close(right.logits, ref.run(np.array([1, 2, 3, 5]))[0][3:])
        with pytest.raises(AlreadyExists):
            await core.fork("t", src, "child")
        with pytest.raises(SessionNotFound):
            await core.fork("t", "ghost")


async def test_delete(make_core: MakeCore) -> None:
    async with make_core() as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        await core.delete("t", sid)
        for call in (core.get("t", sid), _step(core, sid, [1]), core.delete("t", sid)):
            with pytest.raises(SessionNotFound, match="does not exist"):
                await call
        assert await core.store.count() == 0


# -- expiry, with the clock moved by hand ---------------------------------------------
async def test_idle_sessions_expire_and_activity_renews(make_core: MakeCore, clock: ManualClock) -> None:
    async with make_core(tombstone_seconds=1000.0) as core:
        busy = (await core.create("t", "lstm-lm", 0, "busy", ttl=10)).session_id
        idle = (await core.create("t", "lstm-lm", 0, "idle", ttl=10)).session_id
        clock.advance(8)
        await _step(core, busy, [1])  # renews busy's TTL from now
        clock.advance(3)
        assert (await core.get("t", busy)).offset == 1
        for call in (core.get("t", idle), _step(core, idle, [1]), core.delete("t", idle)):
            with pytest.raises(SessionExpired, match="session 'idle' expired at"):
                await call
        clock.advance(8)
        assert await core.store.sweep() == 1  # busy; idle went when it was read
        with pytest.raises(SessionExpired):
            await core.get("t", busy)
        clock.advance(1001)
        await core.store.sweep()
        with pytest.raises(SessionNotFound) as e:
            await core.get("t", idle)  # the tombstone is forgotten after tombstone_seconds
        assert not isinstance(e.value, SessionExpired)
        assert (await core.create("t", "gru-lm", 0, "idle")).model == "gru-lm"  # the id is free again


# -- generation ------------------------------------------------------------------
async def test_generation_stores_every_token(make_core: MakeCore, tiny_models: Path) -> None:
    async with make_core(max_generate_tokens=50) as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        made = [t async for t in core.generate("t", GenerateInput(sid, prompt="ab", max_tokens=10, temperature=0))]
        assert [t.offset for t in made] == list(range(3, 13)) and made[-1].done
        assert made[-1].finish_reason == "max_tokens" and not any(t.done for t in made[:-1])
        ids = [*core.models.get("lstm-lm").encode("ab"), *(t.token for t in made)]
        logits, state = Reference(tiny_models / "lstm-lm" / "1").run(np.array(ids))
        assert all(t.token == int(np.argmax(logits[i + 1])) for i, t in enumerate(made))  # greedy
        v = await core.get("t", sid, include_state=True)
        assert v.offset == 12 and v.state is not None and _close(v.state[0].value, state[0])
        twins = [(await core.fork("t", sid)).session_id for _ in range(2)]
        sampled = [[t.token async for t in core.generate("t", GenerateInput(s, max_tokens=8, seed=7))] for s in twins]
        assert sampled[0] == sampled[1] and len(sampled[0]) == 8  # a seed makes sampling repeatable


async def test_generation_stops_and_cancels_cleanly(make_core: MakeCore) -> None:
    async with make_core() as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        await core.step("t", StepInput(sid, text="a"))
        probe = (await core.fork("t", sid)).session_id
        pieces = [t.text async for t in core.generate("t", GenerateInput(probe, max_tokens=6, temperature=0))]
        stop = pieces[2]
        tokens = [t async for t in core.generate("t", GenerateInput(sid, max_tokens=6, temperature=0, stop=[stop]))]
        assert [t.text for t in tokens] == pieces[: pieces.index(stop) + 1]
        assert tokens[-1].done and tokens[-1].finish_reason == "stop"
        start = (await core.get("t", sid)).offset
        gen = core.generate("t", GenerateInput(sid, max_tokens=100, seed=1))
        got = [await anext(gen) for _ in range(4)]
        await gen.aclose()  # a cancelled generation leaves the offset of the last token sent
        assert (await core.get("t", sid)).offset == got[-1].offset == start + 4


async def test_stop_strings_are_bounded_and_matched(make_core: MakeCore) -> None:
    """At most 64 stop strings of 4,096 UTF-8 bytes together, refused before anything runs; a stop
    string that ends within the greedy output stops it there, among 60 that never match."""
    async with make_core() as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        for stop, words in ((["x"] * 65, "at most 64"), (["y" * 2049, "z" * 2048], "4096 UTF-8 bytes")):
            with pytest.raises(InvalidInput, match=words):
                _ = [t async for t in core.generate("t", GenerateInput(sid, prompt="ab", max_tokens=2, stop=stop))]
        assert (await core.get("t", sid)).offset == 0
        made = "".join([t.text async for t in core.generate("t", GenerateInput(sid, prompt="ab", max_tokens=12,
                                                                                temperature=0))])
        other = (await core.create("t", "lstm-lm", 0)).session_id
        again = [t async for t in core.generate("t", GenerateInput(
            other, prompt="ab", max_tokens=12, temperature=0, stop=[f"never{i}" for i in range(60)] + [made[3:5]]))]
        assert again[-1].finish_reason == "stop" and "".join(t.text for t in again).endswith(made[3:5])
        assert len(again) <= 5


async def test_generation_refusals(make_core: MakeCore) -> None:
    async with make_core(max_generate_tokens=50) as core:
        tag = (await core.create("t", "gru-tagger", 0)).session_id
        lm = (await core.create("t", "lstm-lm", 0)).session_id
        cases = [
            (tag, GenerateInput(tag, prompt="x"), InvalidInput, "has a tagger head"),
            (lm, GenerateInput(lm), NoOutputYet, "has consumed no token yet"),
            (lm, GenerateInput(lm, prompt="a", temperature=-1), InvalidInput, "temperature"),
            (lm, GenerateInput(lm, prompt="a", top_p=1.5), InvalidInput, "top_p"),
            (lm, GenerateInput(lm, prompt="a", top_k=-1), InvalidInput, "top_k"),
            (lm, GenerateInput(lm, prompt="a", max_tokens=0), InvalidInput, "at least 1"),
            (lm, GenerateInput(lm, prompt="a", max_tokens=51), LimitExceeded, "limit of 50"),
            (lm, GenerateInput(lm, prompt="a", prompt_tokens=[1]), InvalidInput, "not both"),
            (lm, GenerateInput(lm, prompt="a", expected_offset=3), OffsetMismatch, "is at offset 0, not 3"),
        ]
        for sid, g, error, words in cases:
            before = await _snapshot(core, sid)
            with pytest.raises(error, match=words):
                _ = [t async for t in core.generate("t", g)]
            assert await _snapshot(core, sid) == before, g


# -- draining --------------------------------------------------------------------
async def test_draining_refuses_new_work_and_waits_for_calls_in_flight(make_core: MakeCore) -> None:
    async with make_core() as core:
        a = (await core.create("t", "lstm-lm", 0)).session_id
        b = (await core.create("t", "lstm-lm", 0)).session_id
        gen = core.generate("t", GenerateInput(a, prompt="x", max_tokens=30, seed=1))
        first = await anext(gen)
        drained = asyncio.ensure_future(core.drain(30))
        await asyncio.sleep(0)
        for call in (_step(core, b, [1]), core.create("t", "lstm-lm", 0), core.delete("t", b),
                     core.step_batch("t", [StepInput(b, tokens=[1])])):
            with pytest.raises(Unavailable, match="shutting down"):
                await call
        assert not drained.done()
        rest = [t async for t in gen]
        await asyncio.wait_for(drained, 10)
        assert len(rest) == 29 and rest[-1].offset == first.offset + 29
        assert (await core.get("t", b)).offset == 0


# -- bounds ----------------------------------------------------------------------
async def test_a_large_chunks_replay_is_recomputed_not_kept(make_core: MakeCore, tiny_models: Path) -> None:
    """Past --max-replay-bytes the record keeps the state before the chunk, not its outputs; a retry
    recomputes them exactly and still does not advance the session."""
    tokens = _seq(300, seed=5)
    async with make_core(max_replay_bytes=1024) as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        await _step(core, sid, tokens[:100], 0)
        first = await _step(core, sid, tokens[100:], 100)
        rec = await core.store.get("t", sid)
        assert rec.last_prev_state is not None and rec.last_logits is not None and rec.last_logits.shape[0] == 1
        again = await _step(core, sid, tokens[100:], 100)
        assert again.replayed and again.offset == 300 and again.logits is not None and first.logits is not None
        assert np.array_equal(again.logits, first.logits)
        want, _ = Reference(tiny_models / "lstm-lm" / "1").run(np.array(tokens))
        assert _close(again.logits, want[100:])
        assert (await core.get("t", sid)).offset == 300
        small = await _step(core, sid, [1, 2], 300)  # small chunks keep their outputs
        rec = await core.store.get("t", sid)
        assert rec.last_prev_state is None and rec.last_logits is not None and rec.last_logits.shape[0] == 2
        assert small.logits is not None
        tokens_made = [t.token async for t in core.generate("t", GenerateInput(sid, max_tokens=2, temperature=0))]
        assert len(tokens_made) == 2


async def test_a_chunk_past_its_deadline_is_not_applied(make_core: MakeCore) -> None:
    async with make_core() as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        past = asyncio.get_running_loop().time() - 1
        with pytest.raises(DeadlineExceeded, match="nothing was applied"):
            await core.step("t", StepInput(sid, tokens=[1, 2], expected_offset=0, deadline=past))
        out = await core.step_batch("t", [StepInput(sid, tokens=[1, 2], expected_offset=0, deadline=past)])
        assert isinstance(out[0], DeadlineExceeded)
        assert (await core.get("t", sid)).offset == 0
        assert (await _step(core, sid, [1, 2], 0)).offset == 2  # the retry applies once


async def test_the_engine_queue_sheds_past_its_bound(repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = MemoryStore()
    core = SessionService(Settings(), repository, store, Engine(EngineOptions(max_queue=3)))
    sids = [(await core.create("t", "lstm-lm", 0)).session_id for _ in range(10)]
    out = await asyncio.gather(*(core.step("t", StepInput(s, tokens=[1] * 50)) for s in sids), return_exceptions=True)
    shed = [r for r in out if isinstance(r, LimitExceeded)]
    assert len(shed) == 7 and all("--max-queue 3" in str(e) for e in shed)
    assert sorted([(await core.get("t", s)).offset for s in sids]) == [0] * 7 + [50] * 3
    await core.close()


async def test_ids_are_checked_on_every_call_and_never_echoed(make_core: MakeCore) -> None:
    async with make_core() as core:
        huge = "x" * 16_384
        calls = [core.get("t", huge), core.delete("t", huge), core.fork("t", huge), _step(core, huge, [1]),
                 core.get("t", "ok\n"), core.fork("t", "ghost", "bad id")]
        for call in calls:
            with pytest.raises(InvalidInput) as e:
                await call
            assert huge not in str(e.value) and "session_id must be 1-128 characters" in str(e.value)
        out = await core.step_batch("t", [StepInput(huge, tokens=[1])])
        assert isinstance(out[0], InvalidInput)


async def test_tenant_limits(repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    limits = {"small": TenantLimits(max_sessions=2, max_chunk=8)}
    core = SessionService(Settings(max_chunk=64), repository, MemoryStore(), Engine(EngineOptions()),
                          lambda t: limits.get(t, TenantLimits()))
    a = (await core.create("small", "lstm-lm", 0)).session_id
    await core.create("small", "lstm-lm", 0)
    with pytest.raises(LimitExceeded, match="tenant 'small' holds its limit of 2 sessions"):
        await core.create("small", "lstm-lm", 0)
    with pytest.raises(LimitExceeded, match="limit of 2 sessions"):
        await core.fork("small", a)
    assert (await core.create("big", "lstm-lm", 0)).tenant == "big"  # other tenants are not counted
    with pytest.raises(InvalidInput, match="chunk of 9 steps is longer than the limit of 8"):
        await core.step("small", StepInput(a, tokens=[1] * 9))
    assert (await core.step("small", StepInput(a, tokens=[1] * 8))).offset == 8
    b = (await core.create("big", "lstm-lm", 0)).session_id
    assert (await core.step("big", StepInput(b, tokens=[1] * 64))).offset == 64
    await core.close()
