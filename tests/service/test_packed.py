"""The packed (columnar) batch: StepPacked and StreamPacked, over a real server.

Outputs equal one pass per session; each chunk is refused alone with its own status and leaves its
session unchanged; a message whose columns do not fit is refused whole; retries replay; a session
named twice runs in order; thousands of sessions created, deleted and reused never see each
other's state."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest

from recur.client import RecurClient, packed_request
from recur.v1 import recur_pb2 as pb
from tests.helpers import TOL, Server, state_of


def _ids(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 98, length).astype(np.int32) for _ in range(n)]


def test_equal_and_mixed_lengths_equal_one_pass(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    ref = reference("lstm-lm")
    sids = [client.create("lstm-lm").session_id for _ in range(6)]
    seqs = _ids(6, 40, seed=1)
    got: list[list[np.ndarray]] = [[] for _ in sids]
    cuts = [(0, 8), (8, 9), (9, 25), (25, 40)]
    for a, b in cuts:
        chunks = [s[a:b] for s in seqs]
        reply = client.step_packed(sids, chunks, expected_offsets=[a] * 6, return_logits=True, top_k=3)
        assert not reply.errors and list(reply.offsets) == [b] * 6 and list(reply.start_offsets) == [a] * 6
        assert reply.logits is not None and reply.logits.shape == ((b - a) * 6, 98)
        assert np.array_equal(reply.argmax, reply.logits.argmax(-1))
        assert reply.top_ids is not None and reply.top_ids.shape == ((b - a) * 6, 3)
        assert np.array_equal(reply.top_ids[:, 0], reply.argmax)
        for i in range(6):
            got[i].append(reply.logits[i * (b - a) : (i + 1) * (b - a)])
    mixed = client.step_packed(sids[:3], [seqs[0][:5], seqs[1][:1], seqs[2][:17]], return_logits=True)
    assert mixed.logits is not None and mixed.logits.shape == (23, 98) and not mixed.errors
    for i, sid in enumerate(sids):
        want_logits, want_state = ref.run(seqs[i].astype(np.int64))
        assert np.abs(np.concatenate(got[i]) - want_logits).max() <= TOL
        if i >= 3:
            for g, w in zip(state_of(client.get(sid, include_state=True)), want_state):
                assert np.abs(g - w).max() <= TOL
    for i, (a, n) in enumerate([(0, 5), (5, 1), (6, 17)]):
        want, _ = ref.run(np.concatenate([seqs[i], seqs[i][:n]]).astype(np.int64))
        assert np.abs(mixed.logits[a : a + n] - want[40:]).max() <= TOL


def test_final_only_gives_one_row_per_chunk(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    ref = reference("gru-classifier")
    rng = np.random.default_rng(3)
    xs = [rng.random((n, 8), dtype=np.float32) for n in (8, 3, 8)]
    sids = [client.create("gru-classifier").session_id for _ in xs]
    reply = client.step_packed(sids, xs, return_logits=True, final_only=True)
    assert not reply.errors and reply.logits is not None and reply.logits.shape[0] == 3
    for i, x in enumerate(xs):
        want, _ = ref.run(x)
        assert np.abs(reply.logits[i] - want[-1]).max() <= TOL


def test_each_refused_chunk_fails_alone_and_changes_nothing(server: Server, client: RecurClient) -> None:
    sids = [client.create("lstm-lm").session_id for _ in range(5)]
    client.step_packed(sids, _ids(5, 4), return_logits=False)
    before = [client.get(s, include_state=True) for s in sids]
    chunks = _ids(5, 3, seed=2)
    chunks[1] = np.array([1, 500, 2], np.int32)  # out of the vocabulary
    reply = client.step_packed([sids[0], sids[1], "no-such-session", sids[3], sids[4]], chunks,
                               expected_offsets=[4, 4, 0, 9, -1], return_logits=True)
    codes = {i: grpc.StatusCode(next(c.value for c in grpc.StatusCode if c.value[0] == code)) for i, (code, _)
             in reply.errors.items()}
    assert codes == {1: grpc.StatusCode.INVALID_ARGUMENT, 2: grpc.StatusCode.NOT_FOUND,
                     3: grpc.StatusCode.FAILED_PRECONDITION}
    assert "token id 500 at position 1" in reply.errors[1][1]
    assert "is at offset 4, not 9" in reply.errors[3][1]
    assert list(reply.offsets) == [7, -1, -1, 4, 7]
    assert reply.logits is not None
    assert list(reply.argmax[3:12]) == [-1] * 9 and not reply.logits[3:12].any()
    assert (reply.argmax[:3] >= 0).all() and (reply.argmax[12:] >= 0).all()
    for i in (1, 3):  # refused: exactly as before
        after = client.get(sids[i], include_state=True)
        assert after.offset == before[i].offset and after.state == before[i].state
    assert server.proc is not None and server.proc.poll() is None


@pytest.mark.parametrize("change, message", [
    ({"lengths": [2]}, "one length per session id"),
    ({"tokens": np.zeros(5, "<i4").tobytes()}, "sum(lengths) = 4"),
    ({"lengths": [3, -1]}, "lengths must be 1 or more"),
    ({"expected_offsets": [0]}, "expected_offsets must be empty or hold one offset"),
    ({"features": b"\0" * 16}, "tokens or features, not both"),
    ({"top_k": -1}, "top_k must be 0 or more"),
])
def test_columns_that_do_not_fit_refuse_the_message(client: RecurClient, change: dict, message: str) -> None:
    sids = [client.create("lstm-lm").session_id for _ in range(2)]
    req = packed_request(sids, [np.array([1, 2]), np.array([3, 4])])
    for field, value in change.items():
        if isinstance(value, list):
            getattr(req, field)[:] = value
        else:
            setattr(req, field, value)
    with pytest.raises(grpc.RpcError) as e:
        client.stub.StepPacked(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (e.value.details() or "")
    good = packed_request(sids, [np.array([1, 2]), np.array([3, 4])])
    replies = list(client.stub.StreamPacked(iter([req, good])))  # the stream goes on after a refused message
    assert replies[0].failed == [0, 1] and message in replies[0].statuses[0].message
    assert not replies[1].failed and list(replies[1].offsets) == [2, 2]
    assert all(client.get(s).offset == 2 for s in sids)


def test_too_many_chunks_is_resource_exhausted(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("memory:", ["--max-batch-chunks", "4"])
    with server.client() as c:
        sids = [c.create("lstm-lm").session_id for _ in range(5)]
        with pytest.raises(grpc.RpcError) as e:
            c.step_packed(sids, _ids(5, 2))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-batch-chunks" in (e.value.details() or "")
        assert all(c.get(s).offset == 0 for s in sids)


def test_max_batch_bounds_the_rows_of_every_call_of_a_packed_batch(start_server, reference) -> None:  # type: ignore[no-untyped-def]
    """--max-batch 4: a packed batch of 10 chunks runs as calls of at most 4 rows (the engine's batch
    histogram says so), and every chunk still equals one pass."""
    server = start_server("memory:", ["--max-batch", "4"])
    ref = reference("lstm-lm")
    seqs = _ids(10, 3, seed=9)
    with server.client() as c:
        sids = [c.create("lstm-lm").session_id for _ in range(10)]
        reply = c.step_packed(sids, list(seqs), return_logits=True)
    assert not reply.errors and reply.logits is not None and list(reply.offsets) == [3] * 10
    for i, seq in enumerate(seqs):
        want, _ = ref.run(seq.astype(np.int64))
        assert np.abs(reply.logits[3 * i : 3 * i + 3] - want).max() <= TOL
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    buckets = {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("recur_engine_batch_sessions_bucket")}
    assert buckets["4.0"] == buckets["+Inf"] >= 3  # every call carried 4 rows or fewer
    rows = next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("recur_engine_batch_sessions_sum"))
    assert float(rows) == 10


def test_a_retry_is_replayed_and_a_session_named_twice_runs_in_order(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    ref = reference("rnn-lm")
    a, b = client.create("rnn-lm").session_id, client.create("rnn-lm").session_id
    seq = _ids(1, 12, seed=5)[0]
    first = client.step_packed([a, b, a], [seq[:4], seq[:6], seq[4:9]], expected_offsets=[0, 0, 4],
                               return_logits=True)
    assert not first.errors and list(first.offsets) == [4, 6, 9] and list(first.start_offsets) == [0, 0, 4]
    want, _ = ref.run(seq[:9].astype(np.int64))
    assert first.logits is not None
    assert np.abs(np.concatenate([first.logits[:4], first.logits[10:15]]) - want).max() <= TOL
    again = client.step_packed([b], [seq[:6]], expected_offsets=[0], return_logits=True)
    assert again.replayed == {0} and list(again.offsets) == [6] and again.logits is not None
    assert np.abs(again.logits - first.logits[4:10]).max() <= TOL
    assert client.get(b).offset == 6


def test_thousands_of_sessions_never_see_each_others_state(start_server, reference) -> None:  # type: ignore[no-untyped-def]
    """Sessions created, fed in random packed batches, deleted and their ids reused: every one ends
    equal to its own one pass."""
    ref = reference("lstm-lm")
    server = start_server("memory:")
    rng = np.random.default_rng(11)
    n = 2000
    with server.client() as c:
        fed: dict[str, list[np.ndarray]] = {}
        for wave in range(2):
            ids = [f"s{i}" for i in range(n)]
            for k in range(0, n, 50):  # pipelined, within the server's 100 streams per connection
                group = ids[k : k + 50]
                if wave:
                    for f in [c.stub.DeleteSession.future(pb.DeleteSessionRequest(session_id=sid)) for sid in group]:
                        f.result(timeout=60)
                for f in [c.stub.CreateSession.future(pb.CreateSessionRequest(model="lstm-lm", session_id=sid))
                          for sid in group]:
                    f.result(timeout=60)
            for sid in ids:
                fed[sid] = []
            for _ in range(6):
                pick = rng.choice(n, size=400, replace=False)
                length = int(rng.integers(1, 5))
                chunks = [rng.integers(0, 98, length).astype(np.int32) for _ in pick]
                reply = c.step_packed([ids[i] for i in pick], chunks)
                assert not reply.errors
                for i, ch in zip(pick, chunks):
                    fed[ids[i]].append(ch)
        for sid in rng.choice(list(fed), size=300, replace=False).tolist():
            parts = fed[sid]
            got = state_of(c.get(sid, include_state=True))
            if not parts:
                assert all(not g.any() for g in got)
                continue
            _, want = ref.run(np.concatenate(parts).astype(np.int64))
            for g, w in zip(got, want):
                assert np.abs(g - w).max() <= TOL, sid


def test_a_features_model_rejects_tokens_per_chunk(client: RecurClient) -> None:
    sid = client.create("lstm-classifier").session_id
    reply = client.step_packed([sid], [np.array([1, 2, 3], np.int32)])
    assert reply.errors[0][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "takes features (float32 [time, 8]), not tokens" in reply.errors[0][1]  # as Step says it
    assert client.get(sid).offset == 0


def test_empty_message_is_answered_empty(client: RecurClient) -> None:
    reply = client.stub.StepPacked(pb.PackedStepBatch())
    assert not reply.failed and not reply.offsets and reply.argmax == b""


def test_sigkill_and_restart_lose_nothing_and_a_lost_reply_is_replayed(start_server, reference) -> None:  # type: ignore[no-untyped-def]
    """SQLite sync: packed chunks acknowledged before a SIGKILL are all there after the restart; the
    last message, re-sent as if its reply had been lost, is replayed (not applied twice); the rest
    of each sequence then continues to one pass's state."""
    ref = reference("gru-lm")
    rng = np.random.default_rng(21)
    seqs = [rng.integers(0, 98, 30).astype(np.int32) for _ in range(8)]
    server = start_server()
    with server.client() as c:
        sids = [c.create("gru-lm").session_id for _ in seqs]
        c.step_packed(sids, [s[:10] for s in seqs], expected_offsets=[0] * 8)
        last = c.step_packed(sids, [s[10:20] for s in seqs], expected_offsets=[10] * 8, return_logits=True)
        assert not last.errors
    server.kill()  # SIGKILL
    again = start_server(server.store)
    with again.client() as c:
        retry = c.step_packed(sids, [s[10:20] for s in seqs], expected_offsets=[10] * 8, return_logits=True)
        assert retry.replayed == set(range(8)) and list(retry.offsets) == [20] * 8
        assert retry.logits is not None and last.logits is not None
        assert np.abs(retry.logits - last.logits).max() <= TOL
        rest = c.step_packed(sids, [s[20:] for s in seqs], expected_offsets=[20] * 8)
        assert not rest.errors and list(rest.offsets) == [30] * 8
        for sid, seq in zip(sids, seqs):
            _, want = ref.run(seq.astype(np.int64))
            for g, w in zip(state_of(c.get(sid, include_state=True)), want):
                assert np.abs(g - w).max() <= TOL
