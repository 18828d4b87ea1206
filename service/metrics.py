"""Prometheus metrics: one registry per server (so servers in one test process never clash), the
metric objects, and the hooks the layers call. The core and the stores know only the no-op
`service.store.base.Events`; `Metrics` subclasses it, so nothing below the servicers imports
prometheus_client. Hot-path counters are label children bound once per (rpc, tenant) or
(model, version, tenant) and cached here. Labels never carry a session id.

Every metric name is listed, with its type, labels and meaning, in the README ("Operating recur").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from service.store.base import READS, WRITES, Events, Store
from service.store.timed import timed

disable_created_metrics()  # no `*_created` timestamp series beside each counter and histogram

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# The RPCs whose chunks are counted (recur_chunks_total, recur_tokens_total, recur_step_duration_seconds).
STEP_RPCS = ("Step", "Stream", "StreamBatch", "StepPacked", "StreamPacked", "Generate", "ModelInfer",
             "ModelStreamInfer")


class RpcMetrics:
    """The pre-bound children of one (rpc, tenant): what a chunk's reply costs to count."""

    __slots__ = ("chunks", "latency", "tokens")

    def __init__(self, m: Metrics, rpc: str, tenant: str) -> None:
        self.chunks = m.chunks.labels(rpc, tenant)
        self.tokens = m.tokens.labels(rpc, tenant)
        self.latency = m.step_seconds.labels(rpc)

    def stepped(self, steps: int, started: float) -> None:
        """One chunk answered (`steps` newly applied: 0 for a replay), begun at perf_counter `started`."""
        self.chunks.inc()
        if steps:
            self.tokens.inc(steps)
        self.latency.observe(time.perf_counter() - started)

    def stepped_many(self, chunks: int, steps: int, started: float) -> None:
        """A packed message's chunks answered: counted per chunk, its time observed once (one per message)."""
        self.chunks.inc(chunks)
        if steps:
            self.tokens.inc(steps)
        self.latency.observe(time.perf_counter() - started)


class _Live(Collector):
    """recur_sessions_live: the store's own count, asked on the server's event loop at each scrape."""

    def __init__(self) -> None:
        self.store: Store | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("recur_sessions_live", "Live (unexpired) sessions in the store, all tenants.")
        if self.store is not None and self.loop is not None and self.loop.is_running():
            try:
                n = asyncio.run_coroutine_threadsafe(self.store.count(), self.loop).result(timeout=5)
                family.add_metric([], float(n))
            except Exception:  # a failing store: no sample rather than a failed scrape
                pass
        yield family

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("recur_sessions_live", "Live (unexpired) sessions in the store, all tenants.")


class Metrics(Events):
    """The registry and every metric; the hooks the servicers, core, engine and stores call."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        mvt = ["model", "version", "tenant"]
        self.created_total = Counter("recur_sessions_created", "Sessions created (forks included).", mvt, registry=r)
        self.deleted_total = Counter("recur_sessions_deleted", "Sessions deleted by a client.", ["tenant"], registry=r)
        self.expired_total = Counter("recur_sessions_expired", "Idle sessions removed by the sweeper.", registry=r)
        self.chunks = Counter("recur_chunks", "Chunks answered (replays included).", ["rpc", "tenant"], registry=r)
        self.tokens = Counter("recur_tokens", "Steps (tokens or feature rows) newly applied.", ["rpc", "tenant"],
                              registry=r)
        self.generated = Counter("recur_generated_tokens", "Tokens sampled by Generate.", ["tenant"], registry=r)
        self.replays = Counter("recur_replays", "Retries of a session's last chunk answered from its record.", mvt,
                               registry=r)
        self.conflicts = Counter("recur_offset_conflicts", "Chunks refused because the session is at another "
                                 "offset (FAILED_PRECONDITION).", mvt, registry=r)
        self.errors = Counter("recur_errors", "Calls (or stream items) answered with an error, by gRPC code.",
                              ["rpc", "code"], registry=r)
        self.step_seconds = Histogram("recur_step_duration_seconds", "Time to answer one chunk (one stream "
                                      "message, one unary call, one Generate call).", ["rpc"], buckets=_LATENCY,
                                      registry=r)
        self.batch = Histogram("recur_engine_batch_sessions", "Sessions per ONNX Runtime call.", buckets=_SIZES,
                               registry=r)
        self.call_cpu = Counter("recur_engine_cpu_seconds", "CPU time of the ONNX Runtime calls (in their own "
                                "threads; with --ort-threads 1, all of ONNX Runtime's).", registry=r)
        self.call_seconds = Histogram("recur_engine_call_duration_seconds", "Time of one ONNX Runtime call (in "
                                      "its thread).",
                                      buckets=_LATENCY, registry=r)
        self.queue_depth = Gauge("recur_engine_queue_depth", "Chunks queued or running in the engine.", registry=r)
        self.read_seconds = Histogram("recur_store_read_duration_seconds", "Time of one store read "
                                      f"({', '.join(READS)}).", buckets=_LATENCY, registry=r)
        self.write_seconds = Histogram("recur_store_write_duration_seconds", "Time of one store write as the "
                                       f"caller waits for it ({', '.join(WRITES)}).", buckets=_LATENCY, registry=r)
        self.commit_writes = Histogram("recur_store_group_commit_writes", "Writes committed in one SQLite "
                                       "transaction (group commit).", buckets=_SIZES, registry=r)
        self.write_lag = Gauge("recur_store_write_behind_lag_seconds", "Age of the oldest acknowledged write not "
                               "yet committed (sqlite, --durability async; else 0).", registry=r)
        self.open_streams = Gauge("recur_open_streams", "Streaming calls open.", ["rpc"], registry=r)
        self._live = _Live()
        r.register(self._live)
        ProcessCollector(namespace="recur", registry=r)  # recur_process_resident_memory_bytes and friends
        self._rpc: dict[tuple[str, str], RpcMetrics] = {}
        self._mvt: dict[tuple[Any, ...], Any] = {}
        self._deleted: dict[str, Any] = {}
        self.http_port = 0
        self._http: Any = None

    # -- wiring ---------------------------------------------------------------------------------
    def watch(self, store: Store, admitted: Callable[[], int], loop: asyncio.AbstractEventLoop) -> None:
        """Gauges read at scrape time: live sessions (store.count on `loop`), queue depth, write lag."""
        store.events = self
        self._live.store, self._live.loop = store, loop
        self.queue_depth.set_function(lambda: float(admitted()))
        self.write_lag.set_function(store.write_lag)

    def timed(self, store: Store) -> Store:
        """`store` with its reads and writes timed into recur_store_read/write_duration_seconds."""
        return timed(store, read=self.read_seconds.observe, write=self.write_seconds.observe)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on its own thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.http_port = int(self._http.server_port)
        return self.http_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- servicer hooks -------------------------------------------------------------------------
    def rpc(self, rpc: str, tenant: str) -> RpcMetrics:
        key = (rpc, tenant)
        m = self._rpc.get(key)
        if m is None:
            m = self._rpc[key] = RpcMetrics(self, rpc, tenant)
        return m

    def error(self, rpc: str, code: str) -> None:
        self.errors.labels(rpc, code).inc()

    # -- engine hook ----------------------------------------------------------------------------
    def engine_call(self, sessions: int, seconds: float, cpu: float) -> None:
        self.batch.observe(sessions)
        self.call_seconds.observe(seconds)
        self.call_cpu.inc(cpu)

    # -- Events (core and stores) ---------------------------------------------------------------
    def _child(self, counter: Counter, model: str, version: int, tenant: str) -> Any:
        key = (id(counter), model, version, tenant)
        c = self._mvt.get(key)
        if c is None:
            c = self._mvt[key] = counter.labels(model, str(version), tenant)
        return c

    def created(self, model: str, version: int, tenant: str) -> None:
        self._child(self.created_total, model, version, tenant).inc()

    def deleted(self, tenant: str) -> None:
        c = self._deleted.get(tenant)
        if c is None:
            c = self._deleted[tenant] = self.deleted_total.labels(tenant)
        c.inc()

    def expired(self, n: int) -> None:
        self.expired_total.inc(n)

    def replayed(self, model: str, version: int, tenant: str) -> None:
        self._child(self.replays, model, version, tenant).inc()

    def conflict(self, model: str, version: int, tenant: str) -> None:
        self._child(self.conflicts, model, version, tenant).inc()

    def group_commit(self, writes: int) -> None:
        self.commit_writes.observe(writes)
