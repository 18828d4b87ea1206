"""Bounded memory and cheap refusal against a real server: a Stream whose client never reads, an
oversized message, malformed bytes, overload shedding, deadlines, idle streams and connections."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from tests.helpers import Server, refused

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def _rss_mb(server: Server) -> float:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _wait(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_stream_that_never_reads_is_bounded(start_server) -> None:  # type: ignore[no-untyped-def]
    """3,000 chunks whose replies carry 1,024 steps of logits (about 400 kB each, 1.2 GB in all):
    the server stops reading once --max-stream-inflight replies wait, so its RSS stays bounded, and
    it frees them when the call is cancelled."""
    server = start_server(store="memory:", extra=["--max-stream-inflight", "16"])
    with server.client() as c:
        sid = c.create("lstm-lm").session_id
        chunk = [int(t) for t in np.random.default_rng(0).integers(0, 98, 1024)]
        c.step(sid, tokens=chunk)  # warm up
        before = _rss_mb(server)
        sent = 0

        def requests() -> Iterator[pb.StepRequest]:
            nonlocal sent
            for _ in range(3000):
                sent += 1
                yield pb.StepRequest(session_id=sid, tokens=chunk, return_logits=True)

        call = c.stub.Stream(requests())  # never read
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 3.0:  # until the client's sending stalls
            if sent != last:
                last, stable_since = sent, time.monotonic()
            time.sleep(0.2)
        peak = _rss_mb(server)
        with server.client() as probe:
            applied = probe.get(sid).offset // 1024 - 1
        print(f"sent {sent}, applied {applied}, rss {before:.0f} -> {peak:.0f} MB")
        assert applied < 200, "the server ran far more chunks than a client that never reads can take"
        assert peak - before < 100, (before, peak, sent)
        call.cancel()
        _wait(lambda: c.get(sid).offset % 1024 == 0 and c.step(sid, tokens=[1]).offset > 0, "the session to settle")
        after = _rss_mb(server)
        print(f"never-read stream: rss {before:.0f} MB -> {peak:.0f} MB with {sent} chunks sent -> {after:.0f} MB")
        assert after - before < 100


_OVERSIZED = """
import sys, grpc
from recur.v1 import recur_pb2 as pb, recur_pb2_grpc
stub = recur_pb2_grpc.RecurStub(grpc.insecure_channel(sys.argv[1]))
request = pb.StepRequest(session_id=sys.argv[2], text="a" * 60_000_000)
for _ in range(3):
    try:
        stub.Step(request, timeout=60)
        print("ACCEPTED")
    except grpc.RpcError as e:
        print(e.code().name, flush=True)
"""


def test_an_oversized_message_is_refused_while_others_are_served(start_server) -> None:  # type: ignore[no-untyped-def]
    """Three 60 MB messages from another process (so that building them does not stall this one):
    each refused by gRPC before it is parsed, while this client keeps being served."""
    server = start_server(store="memory:")
    with server.client() as c, server.client() as other:
        sid, busy = c.create("lstm-lm").session_id, other.create("lstm-lm").session_id
        sender = subprocess.Popen([sys.executable, "-c", _OVERSIZED, server.target, sid], stdout=subprocess.PIPE,
                                  text=True)
        latencies: list[float] = []
        while sender.poll() is None:
            t0 = time.perf_counter()
            other.step(busy, tokens=[1, 2, 3])
            latencies.append(time.perf_counter() - t0)
        out = sender.stdout.read().split() if sender.stdout else []
        assert out == ["RESOURCE_EXHAUSTED"] * 3, out
        assert len(latencies) > 10 and c.get(sid).offset == 0
        print(f"other client during 3 x 60 MB messages: {len(latencies)} steps, "
              f"p50 {np.percentile(latencies, 50) * 1e3:.1f} ms, p99 {np.percentile(latencies, 99) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms")


def _raw(channel: grpc.Channel, method: str, response: type) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/recur.v1.Recur/{method}", request_serializer=lambda b: b,
                               response_deserializer=response.FromString)


def test_malformed_and_oversized_fields_are_invalid_argument(server: Server) -> None:
    with server.client() as c:
        sid = c.create("lstm-lm").session_id
        c.step(sid, text="ab")
        bad_utf8 = b"\x0a" + bytes([len(sid)]) + sid.encode() + b"\x1a\x02\xff\xfe"  # session_id, text
        refused(lambda: _raw(c.channel, "Step", pb.StepResponse)(bad_utf8, timeout=10), INVALID, "UTF-8")
        refused(lambda: _raw(c.channel, "Step", pb.StepResponse)(b"\xff\xff\xff", timeout=10), INVALID)
        huge_id = "x" * 16_384
        message = refused(lambda: c.stub.Step(pb.StepRequest(session_id=huge_id, text="a"), timeout=10), INVALID,
                          "session_id must be 1-128 characters")
        assert huge_id not in message
        refused(lambda: c.stub.Step(pb.StepRequest(session_id=sid + "\n", text="a"), timeout=10), INVALID)
        for empty_but_huge in ([0, 2**61], [2**40, 0]):  # zero elements, a shape numpy cannot allocate
            tensors = [pb.Tensor(name="state_h", shape=empty_but_huge), pb.Tensor(name="state_c", shape=[2])]
            refused(lambda t=tensors: c.stub.CreateSession(pb.CreateSessionRequest(model="lstm-lm", initial_state=t),
                                                           timeout=10), INVALID)
        short = [pb.Tensor(name="state_h", shape=[2, 16], data=b"\0" * 12), pb.Tensor(name="state_c", shape=[2])]
        refused(lambda: c.stub.CreateSession(pb.CreateSessionRequest(model="lstm-lm", initial_state=short),
                                             timeout=10), INVALID, "do not hold float32 of shape [2, 16]")
        huge_shape = [pb.Tensor(name="state_h", shape=[2**40, 2**40, 2**40]), pb.Tensor(name="state_c", shape=[2])]
        refused(lambda: c.stub.CreateSession(pb.CreateSessionRequest(model="lstm-lm", initial_state=huge_shape),
                                             timeout=10), INVALID, "do not hold float32")
        replies = list(c.stub.Stream(iter([pb.StepRequest(session_id=huge_id, text="a"),
                                           pb.StepRequest(session_id=sid, text="c")]), timeout=10))
        assert replies[0].status.code == INVALID.value[0] and replies[1].offset == 3
        assert c.get(sid).offset == 3


def test_overload_is_shed_while_health_and_admitted_sessions_answer(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:", extra=["--max-queue", "4", "--max-batch", "1"])
    with server.client() as c:
        sids = [c.create("lstm-lm").session_id for _ in range(64)]
        long = [1] * 4000
        futures = [c.stub.Step.future(pb.StepRequest(session_id=s, tokens=long), timeout=60) for s in sids]
        health = health_pb2_grpc.HealthStub(c.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                assert e.code() == EXHAUSTED and "--max-queue 4" in e.details(), e.details()
        shed = codes.count(EXHAUSTED)
        assert shed > 0 and codes.count(grpc.StatusCode.OK) >= 4, codes
        for s, code in zip(sids, codes):  # a shed chunk changed nothing; an applied one applied once
            assert c.get(s).offset == (4000 if code == grpc.StatusCode.OK else 0)
        assert c.step(sids[0], tokens=[1]).offset in (1, 4001)


def test_a_chunk_past_its_deadline_is_not_applied(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:", extra=["--max-batch", "1", "--slice-steps", "4096"])
    with server.client() as c:
        blockers = [c.create("lstm-lm").session_id for _ in range(6)]
        sid = c.create("lstm-lm").session_id
        busy = [c.stub.Step.future(pb.StepRequest(session_id=s, tokens=[1] * 4096), timeout=60) for s in blockers]
        time.sleep(0.05)  # the engine is busy with the long chunks
        refused(lambda: c.stub.Step(pb.StepRequest(session_id=sid, tokens=[5, 6], expected_offset=0), timeout=0.02),
                grpc.StatusCode.DEADLINE_EXCEEDED)
        for f in busy:
            f.result()
        assert c.get(sid).offset == 0  # the late chunk was dropped, not applied behind the client's back
        again = c.step(sid, tokens=[5, 6], expected_offset=0)
        assert (again.offset, again.replayed) == (2, False)


def test_idle_streams_and_connections_are_closed(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:", extra=["--stream-idle-timeout", "1", "--connection-idle-timeout", "1"])
    channel = grpc.insecure_channel(server.target)
    stub = recur_pb2_grpc.RecurStub(channel)
    quiet = threading.Event()

    def nothing() -> Iterator[pb.StepRequest]:
        quiet.wait(30)
        return
        yield

    t0 = time.monotonic()
    refused(lambda: list(stub.Stream(nothing(), timeout=30)), grpc.StatusCode.DEADLINE_EXCEEDED,
            "--stream-idle-timeout")
    assert time.monotonic() - t0 < 10
    quiet.set()
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append)
    stub.ListModels(pb.ListModelsRequest(), timeout=10)
    _wait(lambda: states and states[-1] == grpc.ChannelConnectivity.IDLE, "the idle connection to be closed", 20)
    channel.close()


def test_concurrent_calls_are_capped(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:", extra=["--max-concurrent-rpcs", "2"])
    with server.client() as c:
        sid = c.create("lstm-lm").session_id
        hold = threading.Event()

        def slow() -> Iterator[pb.StepRequest]:
            yield pb.StepRequest(session_id=sid, text="a")
            hold.wait(30)

        open_calls = [c.stub.Stream(slow()) for _ in range(2)]
        for call in open_calls:
            next(call)  # both are running
        refused(lambda: c.stub.ListModels(pb.ListModelsRequest(), timeout=10), EXHAUSTED)
        hold.set()
        for call in open_calls:
            assert list(call) == []
        assert c.models()


def test_streams_per_connection_and_keepalive_are_enforced(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:", extra=["--max-streams-per-connection", "1",
                                                  "--keepalive-min-interval", "60"])
    with server.client() as c:
        sid = c.create("lstm-lm").session_id
        hold = threading.Event()

        def slow() -> Iterator[pb.StepRequest]:
            yield pb.StepRequest(session_id=sid, text="a")
            hold.wait(30)

        first = c.stub.Stream(slow())
        next(first)
        # the connection's one stream is taken: a second call on it waits for a slot
        refused(lambda: c.stub.ListModels(pb.ListModelsRequest(), timeout=1), grpc.StatusCode.DEADLINE_EXCEEDED)
        hold.set()
        assert list(first) == []
        assert c.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    # a client that pings every 100 ms, far more often than allowed, is sent away (GOAWAY too_many_pings)
    eager = grpc.insecure_channel(server.target, options=[("grpc.keepalive_time_ms", 100),
                                                          ("grpc.keepalive_permit_without_calls", 1),
                                                          ("grpc.http2.max_pings_without_data", 0)])
    stub = recur_pb2_grpc.RecurStub(eager)
    hold2 = threading.Event()

    def quiet() -> Iterator[pb.StepRequest]:
        hold2.wait(20)
        return
        yield

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Stream(quiet(), timeout=20))
    hold2.set()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "too many pings" in e.value.details().lower()
    assert time.monotonic() - t0 < 15
    eager.close()
