"""What the supervisor of `recur serve --workers N` (service/workers.py) serves itself: one /metrics for
every worker, and one admin API that reaches every worker.

Metrics: each worker serves its own registry on a loopback port; a scrape of --metrics-port reads every
serving worker's and answers all of their series, each with a `worker` label (its index), beside the
supervisor's own `recur_worker_restarts_total` and `recur_workers_serving`. One scrape target per
machine, as with one process, and per-worker series for what differs between workers (CPU, queue
depth); `sum without (worker)` is the machine. (prometheus_client's multiprocess mode would sum
counters itself, but it cannot carry the process collector or the store's session count, which are
callbacks, not values in shared files.) A worker that does not answer in time is left out of that scrape.

Admin: a call on --admin-port (recur.v1.RecurAdmin) is made, unchanged, on every worker's loopback admin
port at once, with the caller's metadata (its API key: each worker checks it). The reply is worker 0's
when every worker succeeded; otherwise the first refusal, naming its worker. A worker that is restarting
is UNAVAILABLE (retry); it loads the repository as it is on disk when it comes back.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from recur.v1 import recur_pb2
from service.config import Settings
from service.transport import tls

if TYPE_CHECKING:
    from service.workers import Worker

log = logging.getLogger(__name__)

ADMIN_SERVICE = recur_pb2.DESCRIPTOR.services_by_name["RecurAdmin"].full_name
SCRAPE_SECONDS = 5.0  # the longest a scrape waits for one worker
ADMIN_SECONDS = 300.0  # an admin call's deadline on the workers when its caller gave none (a load builds sessions)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_SECONDS) as reply:
        return str(reply.read().decode())


class GatheredMetrics(Collector):
    """Every serving worker's series with a `worker` label, and the supervisor's own."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self._http: object | None = None

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for w in self.workers:
            port = w.metrics_port
            if not (w.serving and port):
                continue
            try:
                text = _scrape(port)
            except OSError as e:
                log.warning("worker %d's metrics did not answer (%s); left out of this scrape", w.index, e)
                continue
            for family in text_string_to_metric_families(text):
                into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                into.samples += [Sample(s.name, {**s.labels, "worker": str(w.index)}, s.value, s.timestamp)
                                 for s in family.samples]
        yield from families.values()
        restarts = CounterMetricFamily("recur_worker_restarts", "Workers restarted after they died.",
                                       labels=["worker"])
        for w in self.workers:
            restarts.add_metric([str(w.index)], w.restarts)
        yield restarts
        yield GaugeMetricFamily("recur_workers_serving", "Workers serving now (of --workers).",
                                value=sum(w.serving for w in self.workers))

    @classmethod
    def serve(cls, workers: list[Worker], settings: Settings) -> GatheredMetrics | None:
        """On --metrics-port (None when it is 0, or cannot be bound: serving goes on without it)."""
        if not settings.metrics_port:
            return None
        gathered = cls(workers)
        registry = CollectorRegistry()
        registry.register(gathered)
        try:
            gathered._http, _ = start_http_server(max(settings.metrics_port, 0), addr=settings.host.strip("[]") or "::",
                                                  registry=registry)
        except OSError as e:
            log.error("cannot serve /metrics on port %d (%s); running without it", settings.metrics_port, e)
            return None
        port = gathered._http.server_port  # type: ignore[attr-defined]
        log.info("metrics of every worker on port %d (/metrics)", port)
        print(f"metrics on port {port}", flush=True)
        return gathered

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
            self._http.server_close()  # type: ignore[attr-defined]
            self._http = None


def _forwarded(metadata: tuple[tuple[str, str | bytes], ...]) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata, less what gRPC sets itself on the next hop."""
    return tuple((k, v) for k, v in metadata if not k.startswith((":", "grpc-")) and k != "user-agent")


class AdminFanOut(grpc.GenericRpcHandler):
    """recur.v1.RecurAdmin on --admin-port, each call made on every worker (bytes in, bytes out)."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        if not method.startswith(f"/{ADMIN_SERVICE}/"):
            return None

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self.fan_out(method, request, context)

        return grpc.unary_unary_rpc_method_handler(call)

    async def _one(self, w: Worker, method: str, request: bytes, metadata: tuple, timeout: float) -> bytes:
        if not (w.serving and w.admin_port):
            raise ConnectionError
        async with grpc.aio.insecure_channel(f"127.0.0.1:{w.admin_port}") as channel:
            return bytes(await channel.unary_unary(method)(request, metadata=metadata, timeout=timeout))

    async def fan_out(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = _forwarded(tuple(context.invocation_metadata() or ()))
        timeout = context.time_remaining() or ADMIN_SECONDS
        replies = await asyncio.gather(*(self._one(w, method, request, metadata, timeout) for w in self.workers),
                                       return_exceptions=True)
        for w, reply in zip(self.workers, replies):
            if isinstance(reply, grpc.aio.AioRpcError):
                await context.abort(reply.code(), f"worker {w.index}: {reply.details()}")
            if isinstance(reply, BaseException):
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {w.index} is restarting; retry shortly")
        return replies[0]  # type: ignore[return-value]

    @classmethod
    async def serve(cls, workers: list[Worker], settings: Settings) -> grpc.aio.Server | None:
        """On --admin-host:--admin-port, with --tls-* as a single server's (None when --admin-port is 0)."""
        if not settings.admin_port:
            return None
        credentials = tls.server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([cls(workers)])
        address = f"{settings.admin_host}:{settings.admin_port}"
        try:
            bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise SystemExit(f"cannot bind --admin-port {address} (in use, or not an address of this machine)")
        await server.start()
        log.info("admin API of every worker on %s", address)
        return server
