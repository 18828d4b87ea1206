"""OpenTelemetry traces: a server span per RPC that continues the caller's W3C `traceparent`, and
child spans for the core's stages (store read, plan, engine, store write). Off by default: on with
`--tracing` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
exported over OTLP gRPC by the SDK (the `tracing` extra), which reads the other standard `OTEL_*`
variables itself (service name, sampler, headers, insecure). The sampler is parent-based: a caller's
sampling decision is kept.

Attributes name the model, version, tenant and rows; a session is named only by `recur.session_hash`
(as in the logs), never by its id. When tracing is off every hook is a shared no-op: the hot path
pays one attribute check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from service.logs import session_hash

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_NOOP = contextlib.nullcontext()


def wanted(switch: bool) -> bool:
    """Tracing is on with --tracing or an OTLP endpoint in the environment (and not OTEL_SDK_DISABLED)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return switch or any(os.environ.get(v) for v in ENDPOINT_VARIABLES)


class Tracing:
    """The spans recur makes. `Tracing()` is off: its spans are one shared no-op context."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self.tracer, self.provider = tracer, provider
        self.on = tracer is not None
        if self.on:
            from opentelemetry import trace

            self._current_span = trace.get_current_span

    @classmethod
    def start(cls, service_name: str = "recur") -> Tracing:
        """The SDK with an OTLP gRPC exporter behind a batch processor (spans leave off the event loop)."""
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise SystemExit("recur serve: tracing is on (--tracing or OTEL_EXPORTER_OTLP_ENDPOINT) but the "
                             "OpenTelemetry SDK is not installed: pip install 'recur[tracing]'") from None
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
        provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER, parent-based by default
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("tracing on: OTLP gRPC spans to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                 or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "localhost:4317")
        return cls(trace.get_tracer("recur", tracer_provider=provider), provider)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what the batch processor holds

    # -- the core's stages ---------------------------------------------------------------------------
    def span(self, name: str, tenant: str = "", model: str = "", version: int = 0, rows: int = 0,
             session: str = "") -> contextlib.AbstractContextManager:
        if not self.on or not self._current_span().is_recording():
            return _NOOP  # outside a sampled call: no span at all (a child of an unsampled one is not sampled)
        attrs: dict[str, Any] = {}
        if tenant:
            attrs["recur.tenant"] = tenant
        if model:
            attrs["recur.model"], attrs["recur.version"] = model, version
        if rows:
            attrs["recur.rows"] = rows
        if session:
            attrs["recur.session_hash"] = session_hash(session)
        return self.tracer.start_as_current_span(name, attributes=attrs)

    def current(self) -> Any:
        """The current span's context, for an engine call to link to (None when off)."""
        if not self.on:
            return None
        span = self._current_span()
        return span.get_span_context() if span.is_recording() else None

    def engine_call(self, links: list[Any], sessions: int, rows: int, started_ns: int, ended_ns: int) -> None:
        """One ONNX Runtime call, which serves chunks of many calls: a span linking each of them, under
        the first one's trace."""
        if not self.on or not any(links):
            return
        from opentelemetry import trace

        contexts = [c for c in links if c is not None]
        parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0]))
        span = self.tracer.start_span("recur.engine.call", context=parent, start_time=started_ns,
                                      links=[trace.Link(c) for c in contexts],
                                      attributes={"recur.batch_size": sessions, "recur.rows": rows})
        span.end(end_time=ended_ns)


OFF = Tracing()


def now_ns() -> int:
    return time.time_ns()


class ServerSpans(grpc.aio.ServerInterceptor):
    """A SERVER span per RPC, continuing the caller's `traceparent` (W3C trace context in the metadata).
    Streams keep theirs open while they run; a call that fails records its error."""

    def __init__(self, tracing: Tracing) -> None:
        from opentelemetry import propagate, trace

        self.tracing, self.propagate, self.trace = tracing, propagate, trace

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.lstrip("/")
        carrier = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        parent = self.propagate.extract(carrier)
        service, _, name = method.partition("/")
        attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        tracer, kind = self.tracing.tracer, self.trace.SpanKind.SERVER

        @contextlib.contextmanager
        def span() -> Iterator[Any]:
            with tracer.start_as_current_span(method, context=parent, kind=kind, attributes=attrs) as s:
                yield s

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with span():
                    return await inner_uu(request, context)

            return handler._replace(unary_unary=unary_unary)
        def streamed(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def replies(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with span():
                    async for reply in inner(request, context):
                        yield reply

            return replies

        if handler.unary_stream is not None:
            return handler._replace(unary_stream=streamed(handler.unary_stream))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=streamed(handler.stream_stream))
        return handler
