"""What tracing costs: the same cells against a server with tracing off, on with every span sampled,
and on with none sampled (OTEL_TRACES_SAMPLER=always_off), alternately in one run, spans exported over
OTLP gRPC to a receiver in this process that keeps only a count. Memory store, pylm.

    python -m bench.tracing
"""

from __future__ import annotations

import os
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.run import _sequences, over_grpc, recur_server

CELLS = [(1, 1, "step"), (1, 1, "stream"), (64, 1, "stream"), (64, 16, "batch"), (64, 16, "packed")]
MODES = {"off": {}, "on, sampled": {"OTEL_TRACES_SAMPLER": "always_on"},
         "on, not sampled": {"OTEL_TRACES_SAMPLER": "always_off"}}


class _Count(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans, self.lock = 0, threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main(rounds: int = 2) -> None:
    receiver = _Count()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    results: dict[tuple[str, str], list[str]] = {}
    try:
        for _ in range(rounds):
            for mode, env in MODES.items():
                saved = dict(os.environ)
                if mode != "off":
                    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                       "OTEL_EXPORTER_OTLP_INSECURE": "true", **env})
                recur = recur_server("memory:")
                os.environ.clear()
                os.environ.update(saved)
                try:
                    for s, c, api in CELLS:
                        r = over_grpc(recur, api, _sequences(s, 256, seed=s * 100 + c), c, api, 8)
                        cell = f"S = {s}, C = {c}, {api}"
                        results.setdefault((cell, mode), []).append(
                            f"{r.p(50):.3f} ms" if s == 1 else f"{r.rate:,.0f} tok/s")
                        print(f"{mode:16} {cell:22} {r.rate:9,.0f} tok/s p50 {r.p(50):7.3f} ms", flush=True)
                finally:
                    recur.stop()
    finally:
        server.stop(None)
    print(f"\n| cell | {' | '.join(MODES)} |\n|---|{'---|' * len(MODES)}")
    for cell in dict.fromkeys(c for c, _ in results):
        print(f"| {cell} | " + " | ".join(" / ".join(results[(cell, m)]) for m in MODES) + " |")
    print(f"\nspans received: {receiver.spans:,}")


if __name__ == "__main__":
    main()
