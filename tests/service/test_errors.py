"""Refusals on the wire: a refused chunk on a stream does not stop the others, and a draining server
refuses new work. The rules themselves (each refusal's error, which fixes its status code, its message,
and the session unchanged) are tested in process in tests/core."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from tests.helpers import refused

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def test_a_refused_chunk_on_a_stream_does_not_stop_the_others(client: RecurClient) -> None:
    a, b = client.create("lstm-lm").session_id, client.create("gru-lm").session_id
    reqs = [
        pb.StepRequest(session_id=a, text="ab", request_id="1"),
        pb.StepRequest(session_id=b, tokens=[500], request_id="2"),
        pb.StepRequest(session_id="ghost", text="x", request_id="3"),
        pb.StepRequest(session_id=a, text="cd", expected_offset=0, request_id="4"),
        pb.StepRequest(session_id=b, text="ef", request_id="5"),
        pb.StepRequest(session_id=a, text="gh", expected_offset=2, request_id="6"),
    ]
    replies = {r.request_id: r for r in client.stub.Stream(iter(reqs))}
    assert replies["2"].status.code == INVALID.value[0] and "out of range" in replies["2"].status.message
    assert replies["3"].status.code == NOT_FOUND.value[0]
    assert replies["4"].status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "is at offset 2" in replies["4"].status.message
    assert (replies["1"].offset, replies["5"].offset, replies["6"].offset) == (2, 2, 4)
    assert not replies["6"].HasField("status")
    assert client.get(a).offset == 4 and client.get(b).offset == 2


def test_draining_server_refuses_new_work_and_finishes_what_is_in_flight(start_server) -> None:  # type: ignore[no-untyped-def]
    """While SIGTERM drains an in-flight generation, a new chunk gets UNAVAILABLE; the generation
    runs to its end and the server exits 0."""
    server = start_server(extra=["--grace", "60"])
    with server.client() as c:
        gen_sid, other = c.create("lstm-lm").session_id, c.create("lstm-lm").session_id
        stream = c.generate(gen_sid, prompt="a", max_tokens=4000, seed=1)
        next(stream)
        server.proc.send_signal(15)  # type: ignore[union-attr]
        health = health_pb2_grpc.HealthStub(c.channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.01)
        refused(lambda: c.step(other, text="a"), grpc.StatusCode.UNAVAILABLE, "shutting down")
        rest = list(stream)
        assert len(rest) == 3999 and rest[-1].finish_reason == "max_tokens" and rest[-1].offset == 4001
    assert server.proc.wait(30) == 0  # type: ignore[union-attr]
