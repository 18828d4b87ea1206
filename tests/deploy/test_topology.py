"""Replicas behind nginx on a shared Redis store: failover, racing replicas, a Redis restart."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from tests.helpers import TOL, Topology, logits_of, race, state_of


def _stream_all(target: str, sids: list[str], seqs: list[np.ndarray], chunk: int) -> tuple[list, dict, list]:
    """Each session streamed by its own client thread; returns replies, reply times and clients."""
    results: list = [None] * len(sids)
    times: dict[int, list[float]] = {i: [] for i in range(len(sids))}
    clients = [RecurClient(target) for _ in sids]

    def run(i: int) -> None:
        def stamp(_: pb.StepResponse) -> None:
            times[i].append(time.monotonic())

        results[i] = clients[i].stream_sequence(sids[i], [int(t) for t in seqs[i]], chunk, retry_for=60,
                                                return_logits=True, on_reply=stamp)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sids))]
    for t in threads:
        t.start()
    return results, times, [threads, clients]


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _check_exact(results: list, seqs: list[np.ndarray], chunk: int, reference, model: str) -> None:  # type: ignore[no-untyped-def]
    for replies, seq in zip(results, seqs):
        assert [r.start_offset for r in replies] == list(range(0, len(seq), chunk))  # none lost, none twice
        want, _ = reference(model).run(seq)
        assert np.abs(np.concatenate([logits_of(r) for r in replies]) - want).max() <= TOL


def test_failover_to_the_other_replica(topology: Topology, reference) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 98, 3000) for _ in range(20)]
    owner: dict[str, str] = {}
    with RecurClient(topology.nginx.target) as c:
        sids = []
        for _ in range(20):
            sid = f"s-{rng.integers(1 << 40):x}"
            _, call = c.stub.CreateSession.with_call(pb.CreateSessionRequest(model="lstm-lm", session_id=sid),
                                                     metadata=[("x-session-id", sid)])
            owner[sid] = dict(call.initial_metadata())["x-recur-replica"]
            sids.append(sid)
    counts = Counter(owner.values())
    assert set(counts) == {"replica1", "replica2"}, counts  # the hash spreads sessions over both
    victim_name = counts.most_common(1)[0][0]
    victim = topology.replicas[0 if victim_name == "replica1" else 1]
    results, times, (threads, clients) = _stream_all(topology.nginx.target, sids, seqs, chunk=8)
    _wait_for(lambda: min(len(t) for t in times.values()) >= 30, "every session to make progress")
    killed_at = time.monotonic()
    victim.proc.kill()  # type: ignore[union-attr]
    for t in threads:
        t.join(180)
    _check_exact(results, seqs, 8, reference, "lstm-lm")
    moved = [i for i, sid in enumerate(sids) if owner[sid] == victim_name]
    resume = [min(x for x in times[i] if x > killed_at) - killed_at for i in moved if times[i][-1] > killed_at]
    replayed = sum(r.replayed for replies in results for r in replies)
    reconnects = sum(c.reconnects for c in clients)
    figures = {"sessions_moved": len(moved), "resume_s_median": float(np.median(resume)),
               "resume_s_max": float(max(resume)), "replayed_chunks": replayed, "reconnects": reconnects}
    print("failover:", figures)
    assert reconnects >= 1 and len(resume) >= 1  # the kill really interrupted streams
    with RecurClient(topology.nginx.target) as c:
        for sid, seq in zip(sids, seqs):
            final = c.get(sid, include_state=True)
            assert final.offset == len(seq)
            for a, b in zip(state_of(final), reference("lstm-lm").run(seq)[1]):
                assert np.abs(a - b).max() <= TOL
    for c in clients:
        c.close()


def test_racing_replicas_apply_each_offset_once(topology: Topology, reference) -> None:  # type: ignore[no-untyped-def]
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 98, 400)]
    with RecurClient(topology.replicas[0].target) as c:
        sid = c.create("gru-lm").session_id
    applied, refusals = race([r.target for r in topology.replicas], sid, tokens, 5)
    assert sorted(applied) == list(range(0, 400, 5))
    assert refusals  # the two replicas really raced
    with RecurClient(topology.nginx.target) as c:
        final = c.get(sid, include_state=True)
    assert final.offset == 400
    assert np.abs(state_of(final)[0] - reference("gru-lm").run(np.array(tokens))[1][0]).max() <= TOL


def test_a_redis_restart_mid_stream(topology: Topology, reference) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 98, 2000) for _ in range(4)]
    with RecurClient(topology.nginx.target) as c:
        sids = [c.create("lstm-lm").session_id for _ in seqs]
        spare = c.create("lstm-lm").session_id
    results, times, (threads, clients) = _stream_all(topology.nginx.target, sids, seqs, chunk=8)
    _wait_for(lambda: min(len(t) for t in times.values()) >= 20, "every session to make progress")
    topology.redis.kill()  # SIGKILL: only what is in the append-only file survives
    with RecurClient(topology.replicas[0].target) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.step(spare, text="a")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "session store" in e.value.details()
        # every stream has had a chunk refused UNAVAILABLE (and retries it) while Redis is down
        _wait_for(lambda: all(s.reconnects >= 1 for s in clients), "every stream to hit the outage")
        topology.redis.start()  # same port, same directory: the append-only file is replayed
        for t in threads:
            t.join(180)
        assert c.get(spare).offset == 0  # the refused step changed nothing
    _check_exact(results, seqs, 8, reference, "lstm-lm")
    for c in clients:
        c.close()


def test_batched_messages_on_the_redis_store(topology: Topology, reference) -> None:  # type: ignore[no-untyped-def]
    """StreamBatch reads and writes a message's sessions in one pipelined round trip each; a stale
    offset, an unknown id and a session advanced by the other replica are refused one by one."""
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 98, 40) for _ in range(6)]
    with RecurClient(topology.replicas[0].target) as c:
        sids = [c.create("lstm-lm").session_id for _ in seqs]
        with RecurClient(topology.replicas[1].target) as other:
            other.step(sids[5], tokens=[1, 2, 3], expected_offset=0)  # advanced behind replica 1's back
        replies = []
        for start in (0, 20):
            msg = pb.StepBatch(steps=[pb.StepRequest(session_id=s, tokens=q[start : start + 20].tolist(),
                                                     expected_offset=start, return_logits=True, return_state=True)
                                      for s, q in zip(sids[:5], seqs[:5])]
                               + [pb.StepRequest(session_id="ghost", tokens=[1]),
                                  pb.StepRequest(session_id=sids[5], tokens=[4], expected_offset=0)])
            replies.append(next(c.stub.StreamBatch(iter([msg]))).steps)
        for batch in replies:
            assert [r.status.code for r in batch[5:]] == [grpc.StatusCode.NOT_FOUND.value[0],
                                                         grpc.StatusCode.FAILED_PRECONDITION.value[0]]
            assert "is at offset 3" in batch[6].status.message
        for k, seq in enumerate(seqs[:5]):
            want, state = reference("lstm-lm").run(seq)
            got = np.concatenate([logits_of(replies[0][k]), logits_of(replies[1][k])])
            assert np.abs(got - want).max() <= TOL
            assert all(np.abs(a - b).max() <= TOL for a, b in zip(state_of(replies[1][k]), state))
        assert c.get(sids[5]).offset == 3
