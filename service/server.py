"""Build, bind, start and drain the gRPC server.

SIGTERM: health goes NOT_SERVING, new work is refused with UNAVAILABLE, calls in
flight get `grace` seconds to finish, then the store is flushed and closed; exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recur.v1 import recur_pb2, recur_pb2_grpc
from service.config import Settings
from service.engine import Engine, EngineOptions
from service.models import ModelRepository
from service.runtime import RuntimeOptions
from service.servicer import RecurServicer
from service.sessions import SessionService
from service.store import Store, open_store

log = logging.getLogger(__name__)

SERVICE_NAME = recur_pb2.DESCRIPTOR.services_by_name["Recur"].full_name


@dataclass
class Running:
    """A started server, the port it bound, and what it must drain on stop."""

    server: grpc.aio.Server
    port: int
    core: SessionService
    store: Store
    health: health.aio.HealthServicer
    sweeper: asyncio.Task

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.core.drain(grace)  # new calls get UNAVAILABLE with a clear message meanwhile
        await self.server.stop(1.0)
        self.sweeper.cancel()
        await self.store.close()
        await self.core.close()
        log.info("stopped; store flushed")


async def _sweep(store: Store, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            n = await store.sweep()
            if n:
                log.info("expired %d idle sessions", n)
        except Exception:
            log.exception("sweep failed")


async def create_server(settings: Settings) -> Running:
    """Load models, open the store and start serving; returns the bound port too."""
    models = ModelRepository.load(settings.models_dir, RuntimeOptions(intra_op_threads=settings.ort_threads))
    if not models.all():
        raise SystemExit(f"no valid model under {settings.models_dir}; see the errors above")
    store = await open_store(settings.store, durability=settings.durability,
                             memory_capacity=settings.memory_capacity, cache_size=settings.cache_size,
                             async_window=settings.async_window, tombstone_seconds=settings.tombstone_seconds)
    engine = Engine(EngineOptions(max_batch=settings.max_batch, slice_steps=settings.slice_steps,
                                  window=settings.batch_window, threads=settings.inference_threads))
    core = SessionService(settings, models, store, engine)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise SystemExit(f"cannot bind {settings.host}:{settings.port}")
    replica_id = settings.replica_id or f"{socket.gethostname()}:{port}"
    servicer = RecurServicer(core, settings.max_stream_inflight, replica_id)
    recur_pb2_grpc.add_RecurServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    sweeper = asyncio.create_task(_sweep(store, settings.sweep_interval), name="sweeper")
    return Running(server, port, core, store, health_servicer, sweeper)


async def serve(settings: Settings) -> None:
    running = await create_server(settings)
    log.info("recur listening on port %d (store %s, durability %s)", running.port, settings.store,
             settings.durability)
    print(f"recur listening on port {running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
    asyncio.run(serve(Settings.from_args(args)))
    return 0
