"""OpenTelemetry traces from a real server to a real OTLP receiver (the collector's gRPC service, run
in this process): the server span continues the caller's traceparent, the core's stages are its
children, an engine call links the calls it served, a caller's "not sampled" is kept, and no span
carries a session id."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from recur.v1 import recur_pb2 as pb
from tests.helpers import Server, until


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    r = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield r, port
    server.stop(None)


@pytest.fixture
def traced(tiny_models: Path, receiver: tuple[Receiver, int], monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver[1]}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: spans leave soon
    server = Server(tiny_models, "memory:").start()
    yield server
    server.kill()


def _traceparent(sampled: bool = True) -> tuple[bytes, bytes, tuple[tuple[str, str], ...]]:
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    header = f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"
    return trace_id, span_id, (("traceparent", header),)


def _values(span) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(getattr(a.value, a.value.WhichOneof("value") or "string_value")) for a in span.attributes]


def test_a_callers_trace_holds_the_server_and_stage_spans(traced: Server, receiver: tuple[Receiver, int]) -> None:
    r, _ = receiver
    with traced.client() as c:
        sid = c.create("lstm-lm", session_id="very-secret-session").session_id
        trace_id, caller, md = _traceparent()
        c.stub.Step(pb.StepRequest(session_id=sid, tokens=[1, 2, 3]), metadata=md, timeout=10)
        names = {"recur.v1.Recur/Step", "recur.plan", "recur.store.read", "recur.engine", "recur.store.write",
                 "recur.engine.call"}
        until(lambda: names <= {s.name for s in r.of_trace(trace_id)}, 15, "the step's spans exported")
        spans = {s.name: s for s in r.of_trace(trace_id)}
        server = spans["recur.v1.Recur/Step"]
        assert server.parent_span_id == caller and server.kind == server.SPAN_KIND_SERVER
        assert spans["recur.plan"].parent_span_id == server.span_id
        assert spans["recur.store.read"].parent_span_id == spans["recur.plan"].span_id
        assert spans["recur.engine"].parent_span_id == server.span_id
        assert spans["recur.store.write"].parent_span_id == server.span_id
        call = spans["recur.engine.call"]
        assert any(link.span_id == spans["recur.engine"].span_id for link in call.links)
        attrs = {a.key: a.value for a in spans["recur.plan"].attributes}
        assert attrs["recur.tenant"].string_value == "default" and attrs["recur.session_hash"].string_value
        assert {a.key for a in spans["recur.engine"].attributes} >= {"recur.rows"}
        assert {a.key for a in call.attributes} >= {"recur.batch_size", "recur.rows"}
        # a Stream: its chunks' stages under the stream's span
        trace2, _, md2 = _traceparent()
        list(c.stub.Stream(iter([pb.StepRequest(session_id=sid, tokens=[4]) for _ in range(3)]), metadata=md2,
                           timeout=10))
        until(lambda: sum(s.name == "recur.plan" for s in r.of_trace(trace2)) == 3, 15, "the stream's spans")
        stream = next(s for s in r.of_trace(trace2) if s.name == "recur.v1.Recur/Stream")
        assert all(s.parent_span_id == stream.span_id for s in r.of_trace(trace2) if s.name == "recur.plan")
        # the caller did not sample: nothing of that trace is exported
        trace3, _, md3 = _traceparent(sampled=False)
        c.stub.Step(pb.StepRequest(session_id=sid, tokens=[5]), metadata=md3, timeout=10)
        trace4, _, md4 = _traceparent()
        c.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md4, timeout=10)
        until(lambda: bool(r.of_trace(trace4)), 15, "a later sampled call exported")
        time.sleep(0.3)
        assert r.of_trace(trace3) == []
    with r.lock:
        assert r.spans and not any("very-secret-session" in v for s in r.spans for v in _values(s))


def test_tracing_off_exports_nothing(tiny_models: Path, receiver: tuple[Receiver, int]) -> None:
    r, _ = receiver
    server = Server(tiny_models, "memory:").start()  # no OTEL_* variables, no --tracing
    try:
        with server.client() as c:
            sid = c.create("lstm-lm").session_id
            c.step(sid, tokens=[1])
        time.sleep(0.5)
        assert r.spans == []
    finally:
        server.kill()
