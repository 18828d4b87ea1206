"""Build, bind, start and drain the gRPC server.

SIGTERM: health goes NOT_SERVING, new work is refused with UNAVAILABLE, calls in
flight get `grace` seconds to finish, then the store is flushed and closed; exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from dataclasses import dataclass

import grpc
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recur.kserve import grpc_service_pb2_grpc
from recur.v1 import recur_pb2, recur_pb2_grpc
from service.auth import DEFAULT_TENANT, Authenticator
from service.config import Settings
from service.core.lifecycle import Lifecycle, poll
from service.core.sessions import SessionService
from service.engine.engine import Engine, EngineOptions
from service.engine.runtime import ProviderUnavailable, RuntimeOptions, execution_providers
from service.metrics import Metrics
from service.repository.models import ModelRepository
from service.store import Store, open_store, redact_url
from service.tracing import OFF, ServerSpans, Tracing, wanted
from service.transport import tls
from service.transport.admin import RecurAdminServicer
from service.transport.calls import MalformedRequests
from service.transport.health import watch_store
from service.transport.servicer import RecurServicer
from service.transport.v2 import SERVICE as V2_SERVICE_NAME
from service.transport.v2 import InferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAME = recur_pb2.DESCRIPTOR.services_by_name["Recur"].full_name


@dataclass(frozen=True)
class WorkerRole:
    """This server is worker `index` of `recur serve --workers N` (service/workers.py starts it): it shares
    --port with the other workers (SO_REUSEPORT), names itself REPLICA/INDEX in x-recur-replica, and serves
    /metrics and the admin API on loopback ports of its own, printed for the supervisor, which gathers the
    one and applies the other's calls to every worker."""

    index: int


@dataclass
class Running:
    """A started server, the port it bound, and what it must drain on stop."""

    server: grpc.aio.Server
    port: int
    core: SessionService
    store: Store
    health: health.aio.HealthServicer
    background: list[asyncio.Task]  # the sweeper and the store's health watcher
    auth: Authenticator | None = None  # reloaded on SIGHUP
    tracing: Tracing = OFF
    admin: grpc.aio.Server | None = None  # --admin-port's server (the admin API only)
    metrics: Metrics | None = None  # its /metrics endpoint runs while metrics.http_port is not 0
    admin_port: int = 0  # the admin server's bound port

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        for task in self.background:
            task.cancel()  # the watcher must not turn health back to SERVING while draining
        await self.core.drain(grace)  # new calls get UNAVAILABLE with a clear message meanwhile
        await self.server.stop(1.0)
        if self.admin is not None:
            await self.admin.stop(1.0)
        await self.store.close()
        await self.core.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.tracing.shutdown()
        log.info("stopped; store flushed")


async def _sweep(store: Store, interval: float, metrics: Metrics | None = None) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            n = await store.sweep()
            if metrics is not None:
                metrics.expired(n)
            if n:
                log.info("sessions expired", extra={"count": n})
        except Exception:
            log.exception("sweep failed")


def max_message_bytes(settings: Settings, models: ModelRepository) -> int:
    """The largest message the server reads: a StepBatch of --max-batch-chunks chunks (512 bytes
    each for ids and options) holding together 4 times --max-chunk steps of the widest model input (a
    token as a 10-byte varint, a character as 4 UTF-8 bytes, a feature row as 4 bytes a value), or a
    CreateSession with a whole initial state. gRPC refuses anything larger before it is parsed
    (RESOURCE_EXHAUSTED), so no oversized message reaches Python."""
    widest = max([10, *(4 * m.feature_dim for m in models.all())])
    state = max([sum(4 * s.layers * s.hidden for s in m.states) for m in models.all()] + [0])
    steps = 4 * settings.max_chunk * widest + 512 * settings.max_batch_chunks
    return max(steps, state + 64 * 1024)


def server_options(settings: Settings, models: ModelRepository) -> list[tuple[str, int]]:
    """Message bounds and connection hygiene (documented in the README's "Security and limits")."""
    ms = 1000
    options = [
        ("grpc.max_receive_message_length", max_message_bytes(settings, models)),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        # keepalive enforcement: a client pinging more often than this is sent GOAWAY
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(settings.keepalive_min_interval * ms)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if settings.max_streams_per_connection > 0:
        options.append(("grpc.max_concurrent_streams", settings.max_streams_per_connection))
    if settings.connection_idle_timeout > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.connection_idle_timeout * ms)))
    return options


def _checked_start(settings: Settings) -> tuple[grpc.ServerCredentials | None, Authenticator]:
    """TLS credentials and the key file, and the settings that cannot work together: checked first, so
    a bad flag stops the start before anything is loaded."""
    credentials = tls.server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if not 0 < settings.max_reply_bytes <= settings.stream_buffer_bytes:
        raise SystemExit(f"recur serve: --max-reply-bytes ({settings.max_reply_bytes}) must be 1 or more and at most "
                         f"--stream-buffer-bytes ({settings.stream_buffer_bytes}): a stream holds at least one reply")
    auth = Authenticator.from_setting(settings.auth_keys)
    if auth.is_open and settings.admin_port and not _loopback(settings.admin_host):
        raise SystemExit(f"recur serve: --admin-host {settings.admin_host} is not a loopback address and there is no "
                         "--auth-keys: anyone who reaches it could load and unload models. Give --auth-keys (admin "
                         "keys only), or keep --admin-host 127.0.0.1")
    if auth.is_open:
        log.warning("no --auth-keys: this server is open; every call is served as tenant %r without an API key",
                    DEFAULT_TENANT)
    else:
        log.info("API keys from %s: tenants %s", auth.source, ", ".join(auth.tenants))
    return credentials, auth


async def _admin_server(settings: Settings, models: ModelRepository, servicer: RecurAdminServicer,
                        credentials: grpc.ServerCredentials | None,
                        worker: WorkerRole | None) -> tuple[grpc.aio.Server, int]:
    """--admin-port's server: the admin API only, on --admin-host. A worker's is on any free loopback port in
    plaintext, for its supervisor alone (which serves --admin-port, with TLS if set)."""
    admin_server = grpc.aio.server(interceptors=[MalformedRequests()], options=server_options(settings, models))
    recur_pb2_grpc.add_RecurAdminServicer_to_server(servicer, admin_server)
    admin_address = f"{settings.admin_host}:{settings.admin_port}" if worker is None else "127.0.0.1:0"
    credentials = credentials if worker is None else None
    try:
        bound = (admin_server.add_secure_port(admin_address, credentials) if credentials
                 else admin_server.add_insecure_port(admin_address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise SystemExit(f"cannot bind --admin-port {admin_address} (in use, or not an address of this machine)")
    await admin_server.start()
    log.info("admin API on %s", admin_address)
    return admin_server, bound


def _bind(server: grpc.aio.Server, settings: Settings, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc raises where it once returned 0
        port = 0
    if port == 0:
        raise SystemExit(f"cannot bind {address} (in use, or not an address of this machine)")
    return port


def _serve_metrics(metrics: Metrics, settings: Settings, worker: WorkerRole | None) -> None:
    """/metrics on --metrics-port; a worker's on any free loopback port (its supervisor serves --metrics-port)."""
    if not settings.metrics_port:
        return
    host, port = ("127.0.0.1", 0) if worker is not None else (settings.host.strip("[]") or "::",
                                                              max(settings.metrics_port, 0))
    try:
        metrics.serve(host, port)
    except OSError as e:  # serving goes on: metrics are not worth refusing traffic for
        log.error("cannot serve /metrics on port %d (%s); running without it", settings.metrics_port, e)


async def create_server(settings: Settings, worker: WorkerRole | None = None) -> Running:
    """Load models, open the store and start serving; returns the bound port too."""
    credentials, auth = _checked_start(settings)
    ort.disable_telemetry_events()  # no device ids or model names written anywhere
    try:
        providers = execution_providers(settings.provider)  # refused before any model loads
    except ProviderUnavailable as e:
        raise SystemExit(f"recur serve: {e}") from None
    log.info("ONNX Runtime providers: %s", ", ".join(providers))
    models = ModelRepository.load(settings.models_dir, RuntimeOptions(
        intra_op_threads=settings.ort_threads, provider=settings.provider, large_threads=settings.ort_threads_batch,
        large_rows=settings.ort_batch_rows,
        # a worker's engine is never alone on the machine: the other workers use the other cores
        alone_rows=settings.ort_alone_rows if settings.workers <= 1 else 0))
    if not models.all():
        raise SystemExit(f"no valid model under {settings.models_dir}; see the errors above")
    store = await open_store(settings.store, durability=settings.durability,
                             memory_capacity=settings.memory_capacity, cache_size=settings.cache_size,
                             async_window=settings.async_window, tombstone_seconds=settings.tombstone_seconds,
                             cache_bytes=settings.cache_bytes, memory_bytes=settings.memory_bytes,
                             max_pending_writes=settings.max_pending_writes,
                             redis_min_replicas=settings.redis_min_replicas,
                             redis_wait_timeout=settings.redis_wait_timeout, shared=worker is not None)
    engine = Engine(EngineOptions(max_batch=settings.max_batch, slice_steps=settings.slice_steps,
                                  window=settings.batch_window, threads=settings.inference_threads,
                                  max_queue=settings.max_queue, inline_rows=settings.inline_rows))
    metrics = Metrics()
    metrics.watch(store, lambda: engine.admitted, asyncio.get_running_loop())
    engine.on_call = metrics.engine_call
    tracing = Tracing.start() if wanted(settings.tracing) else OFF
    engine.tracing = tracing
    core = SessionService(settings, models, metrics.timed(store), engine, auth.limits, events=metrics,
                          tracing=tracing)
    interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequests()]
    if tracing.on:
        interceptors.insert(0, ServerSpans(tracing))
    reuse = [("grpc.so_reuseport", 1)] if worker is not None else []  # the workers share --port
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings, models) + reuse,
                             maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None)
    port = _bind(server, settings, credentials)
    replica_id = settings.replica_id or f"{socket.gethostname()}:{port}"
    if worker is not None:
        replica_id = f"{replica_id}/{worker.index}"
    servicer = RecurServicer(core, auth, settings, replica_id, metrics)
    recur_pb2_grpc.add_RecurServicer_to_server(servicer, server)
    # the Open Inference Protocol (KServe v2 + Triton's sequences) on the same core and port
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(core, auth, settings, replica_id, metrics), server)
    # the admin API: on this port for admin keys only; without keys, only on --admin-port (docs: README)
    lifecycle = Lifecycle(core)
    admin_servicer = RecurAdminServicer(lifecycle, auth, replica_id, metrics)
    if not auth.is_open and worker is None:  # a worker's admin calls come through its supervisor, to every worker
        recur_pb2_grpc.add_RecurAdminServicer_to_server(admin_servicer, server)
    admin_server, admin_port = (await _admin_server(settings, models, admin_servicer, credentials, worker)
                                if settings.admin_port else (None, 0))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, V2_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server
    )
    for name in ("", SERVICE_NAME, V2_SERVICE_NAME):  # before start: the first connection already hears SERVING
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    _serve_metrics(metrics, settings, worker)
    background = [asyncio.create_task(_sweep(store, settings.sweep_interval, metrics), name="sweeper"),
                  asyncio.create_task(watch_store(store, health_servicer, [SERVICE_NAME, V2_SERVICE_NAME],
                                                  settings.health_interval),
                                      name="store-health")]
    if settings.model_poll > 0:
        background.append(asyncio.create_task(poll(lifecycle, settings.model_poll), name="model-poll"))
    if settings.auth_keys and settings.auth_keys_poll > 0:
        background.append(asyncio.create_task(_watch_keys(auth, settings.auth_keys_poll), name="key-poll"))
    return Running(server, port, core, store, health_servicer, background, admin=admin_server, metrics=metrics,
                   auth=auth, tracing=tracing, admin_port=admin_port)


async def _watch_keys(auth: Authenticator, interval: float) -> None:
    """Reload the key file when it changes on disk, so a revoked key is refused without a restart."""
    while True:
        await asyncio.sleep(interval)
        if auth.changed_on_disk():
            auth.reload()


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(settings: Settings, worker: WorkerRole | None = None) -> None:
    running = await create_server(settings, worker)
    log.info("recur listening on port %d (%s; store %s, durability %s)", running.port,
             tls.describe(settings.tls_cert, settings.tls_client_ca), redact_url(settings.store), settings.durability)
    if running.metrics is not None and running.metrics.http_port:
        log.info("metrics on port %d (/metrics)", running.metrics.http_port)
        print(f"metrics on port {running.metrics.http_port}", flush=True)
    if worker is not None and running.admin_port:
        print(f"admin on port {running.admin_port}", flush=True)
    print(f"recur listening on port {running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if running.auth is not None and running.auth.source:
        loop.add_signal_handler(signal.SIGHUP, running.auth.reload)
    server_done = asyncio.create_task(running.server.wait_for_termination())
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({server_done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    log.info("draining")
    await running.stop(settings.grace)
    for t in (server_done, stop_wait):
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)
    if settings.workers != 1:  # a supervisor of worker processes (service/workers.py)
        from service.workers import supervise

        return supervise(settings, log_level=args.log_level, log_format=args.log_format)
    asyncio.run(serve(settings))
    return 0
