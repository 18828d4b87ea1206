"""recur.aio against real servers: the synchronous client's cases (sessions, exactly-once steps,
stream_sequence, the packed batch, generation, export and import, API keys, TLS) awaited, and its
resume through a proxy killed mid-stream and a server SIGKILLed mid-stream and restarted on the
same SQLite store, each checked against one pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from recur import aio
from recur.client import ChunkRefused, RecurClient
from recur.v1 import recur_pb2 as pb
from service.auth import add_key
from tests.helpers import TOL, Nginx, Reference, Server, free_port, logits_of, make_pki, state_of

Ref = Callable[[str], Reference]


def _tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 98, n)]


def _matches_one_pass(replies: list[pb.StepResponse], final: pb.Session, ref: Reference, tokens: list[int]) -> None:
    want_logits, want_state = ref.run(np.array(tokens))
    assert np.abs(np.concatenate([logits_of(r) for r in replies]) - want_logits).max() <= TOL
    for got, want in zip(state_of(final), want_state, strict=True):
        assert np.abs(got - want).max() <= TOL


async def _code(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    """The status an awaited call fails with."""
    with pytest.raises(grpc.RpcError) as e:
        await call
    return e.value.code(), e.value.details()


async def test_sessions_and_models(start_server: Callable[..., Server]) -> None:
    server = start_server()  # its own: it lists every session the tenant holds
    async with aio.RecurClient(server.target) as c:
        models = {m.name: m for m in await c.models()}
        assert len(models) == 9 and models["lstm-lm"].cell == "lstm"
        s = await c.create("lstm-lm", session_id="alpha", ttl_seconds=600)
        assert (s.session_id, s.offset, s.expires_at.seconds - s.updated_at.seconds) == ("alpha", 0, 600)
        await c.step("alpha", text="abc")
        got = await c.get("alpha", include_state=True)
        assert got.offset == 3 and [t.name for t in got.state] == ["state_h", "state_c"]
        branch = await c.fork("alpha", new_session_id="beta")
        assert (branch.session_id, branch.offset) == ("beta", 3)
        made = [(await c.create("gru-tagger")).session_id for _ in range(3)]
        listed = [s.session_id async for s in c.list_sessions(page_size=2)]
        assert listed == sorted(["alpha", "beta", *made])
        assert [s.session_id async for s in c.list_sessions(model="lstm-lm")] == ["alpha", "beta"]
        assert len([s async for s in c.list_sessions(page_size=2, limit=3)]) == 3
        await c.delete("alpha")
        assert (await _code(c.get("alpha")))[0] == grpc.StatusCode.NOT_FOUND


async def test_exactly_once_steps(server: Server) -> None:
    async with aio.RecurClient(server.target) as c:
        s = (await c.create("lstm-lm")).session_id
        await c.step(s, text="import ", expected_offset=0)
        first = await c.step(s, text="os", expected_offset=7, top_k=2, return_logits=True)
        before = await c.get(s, include_state=True)
        again = await c.step(s, text="os", expected_offset=7, top_k=2, return_logits=True)
        assert (first.replayed, again.replayed, again.offset, again.start_offset) == (False, True, 9, 7)
        assert list(again.outputs) == list(first.outputs) and again.logits == first.logits
        code, details = await _code(c.step(s, text="zz", expected_offset=3))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "is at offset 9" in details
        code, details = await _code(c.step(s, text="ox", expected_offset=7))  # same offset, other content
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "is at offset 9, not 7" in details
        after = await c.get(s, include_state=True)
        assert after.offset == 9 and [t.data for t in after.state] == [t.data for t in before.state]


async def test_stream_sequence_equals_one_pass_and_the_sync_client(server: Server, reference: Ref) -> None:
    tokens = _tokens(1, 203)
    seen: list[int] = []

    async def progress(reply: pb.StepResponse) -> None:  # a coroutine function is awaited
        seen.append(reply.offset)

    async with aio.RecurClient(server.target) as c:
        sid = (await c.create("gru-lm")).session_id
        replies = await c.stream_sequence(sid, tokens, chunk=16, on_reply=progress, return_logits=True)
        assert [r.start_offset for r in replies] == list(range(0, 203, 16)) and replies[-1].offset == 203
        assert seen == [r.offset for r in replies] and c.reconnects == 0
        assert not any(r.replayed for r in replies)
        _matches_one_pass(replies, await c.get(sid, include_state=True), reference("gru-lm"), tokens)
        with RecurClient(server.target) as sync:  # the same replies, field for field, as the blocking client's
            other = sync.create("gru-lm").session_id
            theirs = sync.stream_sequence(other, tokens, chunk=16, return_logits=True)
        for a, b in zip(replies, theirs, strict=True):
            b.session_id = a.session_id
            assert a == b
        # A chunk the server refuses is raised at once, not retried, and changes nothing.
        started = time.monotonic()
        with pytest.raises(ChunkRefused) as e:
            await c.stream_sequence(sid, [1, 2, 500], retry_for=60)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and time.monotonic() - started < 10
        assert (await c.get(sid)).offset == 203
        # Three sequences at once on one channel: what an asyncio gateway does.
        sids = [(await c.create(m)).session_id for m in ("rnn-lm", "lstm-lm", "gru-lm")]
        seqs = [_tokens(10 + i, 150) for i in range(3)]
        results = await asyncio.gather(*(c.stream_sequence(s, t, chunk=7, return_logits=True)
                                         for s, t in zip(sids, seqs)))
        for s, t, m, r in zip(sids, seqs, ("rnn-lm", "lstm-lm", "gru-lm"), results):
            _matches_one_pass(r, await c.get(s, include_state=True), reference(m), t)


async def test_step_packed(server: Server, reference: Ref) -> None:
    rng = np.random.default_rng(4)
    chunks = [rng.integers(0, 98, n).astype(np.int32) for n in (5, 9, 3)]
    async with aio.RecurClient(server.target) as c:
        sids = [(await c.create("lstm-lm")).session_id for _ in chunks]
        await c.step(sids[2], tokens=[7, 8], expected_offset=0)  # now at 2: its chunk at 5 is refused
        r = await c.step_packed(sids, chunks, expected_offsets=[0, -1, 5], return_logits=True, request_id="p1")
        assert r.request_id == "p1" and list(r.offsets) == [5, 9, 2] and list(r.start_offsets) == [0, 0, -1]
        assert set(r.errors) == {2} and r.errors[2][0] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert r.logits is not None and list(r.argmax[14:]) == [-1, -1, -1]
        ref = reference("lstm-lm")
        assert np.abs(r.logits[:5] - ref.run(chunks[0].astype(np.int64))[0]).max() <= TOL
        assert np.abs(r.logits[5:14] - ref.run(chunks[1].astype(np.int64))[0]).max() <= TOL
        again = await c.step_packed(sids[:1], [chunks[0]], expected_offsets=[0], return_logits=True)
        assert again.replayed == {0} and again.logits is not None and np.array_equal(again.logits, r.logits[:5])
        assert (await c.get(sids[0])).offset == 5


async def test_generate(server: Server) -> None:
    async with aio.RecurClient(server.target) as c:
        sid = (await c.create("lstm-lm")).session_id
        fork = (await c.create("lstm-lm")).session_id
        out = [g async for g in c.generate(sid, prompt="def ", max_tokens=12, temperature=0.8, seed=3)]
        assert [g.offset for g in out] == list(range(5, 17)) and out[-1].done and out[-1].finish_reason == "max_tokens"
        with RecurClient(server.target) as sync:  # same seed, same state: the same tokens from either client
            theirs = list(sync.generate(fork, prompt="def ", max_tokens=12, temperature=0.8, seed=3))
        assert [g.token for g in out] == [g.token for g in theirs]
        call = c.generate(sid, max_tokens=1000, temperature=0)
        async for _ in call:
            break
        call.cancel()  # stopped early: the session stays usable at the offset it reached
        after = (await c.get(sid)).offset
        assert 17 <= after < 17 + 1000
        assert (await c.step(sid, tokens=[1], expected_offset=after)).offset == after + 1


async def test_export_and_import_continue_exactly_once(start_server: Callable[..., Server], reference: Ref) -> None:
    tokens = _tokens(7, 40)
    src, dst = start_server(), start_server(store="memory:")
    async with aio.RecurClient(src.target) as a, aio.RecurClient(dst.target) as b:
        sid = (await a.create("lstm-lm", session_id="moving")).session_id
        first = await a.step(sid, tokens=tokens[:25], expected_offset=0, return_logits=True)
        blob = await a.export_session(sid)
        moved = await b.import_session(blob)
        assert (moved.session_id, moved.offset) == ("moving", 25)
        retry = await b.step(sid, tokens=tokens[:25], expected_offset=0, return_logits=True)
        assert retry.replayed and retry.logits == first.logits
        rest = await b.step(sid, tokens=tokens[25:], expected_offset=25, return_logits=True)
        _matches_one_pass([first, rest], await b.get(sid, include_state=True), reference("lstm-lm"), tokens)
        assert (await b.import_session(blob, session_id="copy")).offset == 25


async def test_api_keys(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.json"
    acme, globex = add_key(path, "acme"), add_key(path, "globex")
    server = Server(tiny_models, "memory:", ["--auth-keys", str(path)]).start()
    try:
        monkeypatch.setenv("RECUR_API_KEY", acme)
        async with aio.RecurClient(server.target) as c:
            sid = (await c.create("gru-lm")).session_id
            assert [r.offset for r in await c.stream_sequence(sid, list(range(1, 30)), chunk=8)] == [8, 16, 24, 29]
        async with aio.RecurClient(server.target, api_key=globex) as other:  # the argument wins over the variable
            assert (await _code(other.get(sid)))[0] == grpc.StatusCode.NOT_FOUND
        async with aio.RecurClient(server.target, api_key="wrong") as bad:
            code, details = await _code(bad.models())
            assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in details
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:  # not retried: a bad key is not a dropped connection
                await bad.stream_sequence(sid, [1, 2, 3], retry_for=60)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - started < 10
    finally:
        server.kill()


async def test_tls(tiny_models: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = Server(tiny_models, "memory:", ["--tls-cert", pki.server, "--tls-key", pki.server_key],
                    tls={"tls_ca": pki.ca}).start()
    try:
        async with aio.RecurClient(server.target, tls_ca=pki.ca) as c:
            sid = (await c.create("lstm-lm")).session_id
            assert [r.offset for r in await c.stream_sequence(sid, list(range(1, 40)), chunk=16)] == [16, 32, 39]
        async with aio.RecurClient(server.target, timeout=10) as plain:  # the handshake fails
            assert (await _code(plain.models()))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        server.kill()


async def test_a_cancelled_stream_leaves_a_session_that_continues_exactly(server: Server, reference: Ref) -> None:
    """Cancelling the task mid-sequence ends its stream; every chunk is applied whole or not at all,
    and a new stream_sequence goes on from the session's offset to one pass's outputs."""
    tokens = _tokens(5, 3000)
    async with aio.RecurClient(server.target) as c:
        sid = (await c.create("gru-lm")).session_id
        task = asyncio.create_task(c.stream_sequence(sid, tokens, chunk=8, return_logits=True))
        await _offset_past(server.target, [sid], 200, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        offset = (await c.get(sid)).offset
        assert offset % 8 == 0 and 200 <= offset < 3000
        replies = await c.stream_sequence(sid, tokens[offset:], chunk=8, return_logits=True)
        assert replies[0].start_offset == offset and replies[-1].offset == 3000
        want, _ = reference("gru-lm").run(np.array(tokens))
        assert np.abs(np.concatenate([logits_of(r) for r in replies]) - want[offset:]).max() <= TOL


# -- resuming ------------------------------------------------------------------------------------


async def _offset_past(target: str, sids: list[str], offset: int, task: asyncio.Future[object]) -> None:
    """Wait until every session is past `offset`, while `task` streams them."""
    async with aio.RecurClient(target) as watcher:
        deadline = time.monotonic() + 60
        while min([(await watcher.get(s)).offset for s in sids]) < offset:
            assert time.monotonic() < deadline and not task.done(), "the streams made no progress"
            await asyncio.sleep(0.02)


async def test_resumes_after_the_proxy_is_killed(start_server: Callable[..., Server], tmp_path: Path,
                                                 reference: Ref, caplog: pytest.LogCaptureFixture) -> None:
    """nginx in front of one server is stopped mid-stream (its connections cut) and started again on
    the same port: the stream resumes through it and nothing is lost or applied twice."""
    server = start_server()
    (tmp_path / "nginx").mkdir()
    nginx = Nginx(tmp_path / "nginx", [server.port]).start()
    tokens = _tokens(2, 6000)
    try:
        async with aio.RecurClient(nginx.target) as c:
            sid = (await c.create("lstm-lm")).session_id
            task = asyncio.create_task(c.stream_sequence(sid, tokens, chunk=8, retry_for=60, return_logits=True))
            await _offset_past(server.target, [sid], 400, task)
            await asyncio.to_thread(nginx.stop)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(nginx.start)
            replies = await asyncio.wait_for(task, 180)
            assert c.reconnects >= 1 and "resuming at offset" in caplog.text  # it really dropped mid-sequence
            assert [r.start_offset for r in replies] == list(range(0, 6000, 8))
            _matches_one_pass(replies, await c.get(sid, include_state=True), reference("lstm-lm"), tokens)
    finally:
        nginx.stop()


async def test_resumes_after_a_sigkill_and_a_restart_on_the_same_store(tiny_models: Path, tmp_path: Path,
                                                                       reference: Ref) -> None:
    """Three sequences stream at once while the server is SIGKILLed and restarted on the same port
    and SQLite file: each resumes where its acknowledged chunks left it and equals one pass."""
    server = Server(tiny_models, f"sqlite:{tmp_path / 'r.db'}", ["--port", str(free_port())]).start()
    models = ("lstm-lm", "gru-lm", "rnn-lm")
    seqs = [_tokens(20 + i, 4000) for i in range(3)]
    try:
        async with aio.RecurClient(server.target) as c:
            sids = [(await c.create(m)).session_id for m in models]
            task = asyncio.gather(*(c.stream_sequence(s, t, chunk=8, retry_for=60, return_logits=True)
                                    for s, t in zip(sids, seqs)))
            await _offset_past(server.target, sids, 400, task)
            server.kill()  # SIGKILL
            await asyncio.to_thread(server.start)
            results = await asyncio.wait_for(task, 180)
            assert c.reconnects >= 3  # each stream lost its connection and came back
            for s, t, m, replies in zip(sids, seqs, models, results):
                assert [r.start_offset for r in replies] == list(range(0, 4000, 8))
                _matches_one_pass(replies, await c.get(s, include_state=True), reference(m), t)
    finally:
        server.kill()
