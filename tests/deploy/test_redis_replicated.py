"""--redis-min-replicas through real servers on a real primary and replica: while the replica does
not answer (SIGSTOP), a chunk is UNAVAILABLE, never acknowledged, and so is a read of state the
replica may lack; once it answers, the client's retry of that chunk is answered as a replay (the
chunk was applied once, on the primary) with the chunk's outputs, on Step and on the packed batch."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from recur.client import packed_request
from tests.helpers import TOL, RedisNode, Server, logits_of, refused, wait_linked

FLAGS = ["--redis-min-replicas", "1", "--redis-wait-timeout", "0.3"]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisNode, RedisNode]]:
    primary = RedisNode(tmp_path / "primary").start()
    replica = RedisNode(tmp_path / "replica", ["--replicaof", "127.0.0.1", str(primary.port)]).start()
    wait_linked([primary, replica])
    yield primary, replica
    if replica.proc is not None and replica.proc.poll() is None:
        replica.proc.send_signal(signal.SIGCONT)
    replica.kill()
    primary.kill()


def test_unconfirmed_chunks_are_unavailable_and_their_retries_replays(tiny_models: Path, reference,  # type: ignore[no-untyped-def]
                                                                      pair: tuple[RedisNode, RedisNode]) -> None:
    primary, replica = pair
    assert replica.proc is not None
    url = f"redis://127.0.0.1:{primary.port}/0"
    servers = [Server(tiny_models, url, FLAGS), Server(tiny_models, url, FLAGS)]
    try:
        with servers[0].start().client() as c, servers[1].start().client() as other:
            sid = c.create("lstm-lm").session_id
            c.step(sid, tokens=[1, 2, 3], expected_offset=0)
            packed_ids = [c.create("gru-lm").session_id for _ in range(3)]
            replica.proc.send_signal(signal.SIGSTOP)
            refused(lambda: c.step(sid, tokens=[4, 5], expected_offset=3), grpc.StatusCode.UNAVAILABLE,
                    "did not confirm", "--redis-min-replicas")
            chunks = [np.array([7, 8]), np.array([9, 10]), np.array([11, 12])]
            req = packed_request(packed_ids, chunks, expected_offsets=[0, 0, 0], return_logits=True)
            got = c.stub.StepPacked(req)
            assert list(got.failed) == [0, 1, 2]
            assert all(s.code == grpc.StatusCode.UNAVAILABLE.value[0] and "did not confirm" in s.message
                       for s in got.statuses), got.statuses
            # a replica with no hint of the session does not answer state only the primary may hold
            refused(lambda: other.get(sid), grpc.StatusCode.UNAVAILABLE, "did not confirm")
            replica.proc.send_signal(signal.SIGCONT)
            wait_linked([primary, replica])
            assert other.get(sid).offset == 5  # applied on the primary, now on the replica too
            retry = c.step(sid, tokens=[4, 5], expected_offset=3, return_logits=True)
            assert retry.replayed and (retry.start_offset, retry.offset) == (3, 5)
            want, _ = reference("lstm-lm").run(np.array([1, 2, 3, 4, 5, 6], np.int64))
            assert np.abs(logits_of(retry) - want[3:5]).max() <= TOL
            again = other.step(sid, tokens=[6], expected_offset=5, return_logits=True)
            assert not again.replayed and again.offset == 6
            assert np.abs(logits_of(again) - want[5:6]).max() <= TOL  # the state held [4, 5] once
            got = c.stub.StepPacked(req)
            assert not got.failed and list(got.offsets) == [2, 2, 2] and list(got.replayed) == [0, 1, 2]
    finally:
        for s in servers:
            s.kill()
