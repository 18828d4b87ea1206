"""Health that tells the truth: NOT_SERVING while the session store cannot serve.

`watch_store` pings the store every `interval` seconds and sets the gRPC health status of ""
and of every service name: NOT_SERVING while `store.ping()` fails, SERVING again once it
succeeds. Each transition is logged once (not each ping). After the servicer entered graceful
shutdown its statuses stay NOT_SERVING (grpc's HealthServicer ignores `set` then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from grpc_health.v1 import health, health_pb2

from service.store.base import Store

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check_store(store: Store, timeout: float) -> str | None:
    """None when the store answers a ping within `timeout` seconds, else why not."""
    try:
        await asyncio.wait_for(store.ping(), timeout)
    except TimeoutError:
        return f"the session store did not answer a ping within {timeout:g} s"
    except Exception as e:  # any failure to serve is NOT_SERVING; the reason is logged
        return str(e) or e.__class__.__name__
    return None


async def watch_store(store: Store, health_servicer: health.aio.HealthServicer, service_names: Iterable[str],
                      interval: float, timeout: float | None = None) -> None:
    """Run until cancelled: keep the health of "" and `service_names` in step with `store.ping()`."""
    names = ["", *(n for n in service_names if n)]
    timeout = max(interval, 1.0) if timeout is None else timeout
    serving: bool | None = None  # unknown until the first ping: whatever the server set stays until then
    while True:
        problem = await check_store(store, timeout)
        ok = problem is None
        if ok != serving:
            for name in names:
                await health_servicer.set(name, SERVING if ok else NOT_SERVING)
            if not ok:
                log.error("health: NOT_SERVING: %s", problem)
            elif serving is not None:
                log.warning("health: SERVING again: the session store answers")
            serving = ok
        await asyncio.sleep(interval)
