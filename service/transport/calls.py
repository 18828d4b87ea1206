"""What both gRPC servicers share: status mapping, tolerant parsing, the unary wrapper, a stream's
opening, the replica header, deadlines."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from recur.v1 import recur_pb2 as pb
from service.errors import InvalidInput, RecurError
from service.types import StepResult

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Recur"].full_name
REPLICA_HEADER = "x-recur-replica"
T = TypeVar("T")


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a client sees; unexpected errors never leak their text."""
    if isinstance(e, RecurError):
        return getattr(grpc.StatusCode, e.code), str(e)
    log.error("unexpected error", exc_info=e)
    return grpc.StatusCode.INTERNAL, "internal error (logged on the server)"


class Malformed:
    """What a request that does not parse (invalid UTF-8, bad wire bytes) becomes, so that it is
    answered INVALID_ARGUMENT by the method rather than UNKNOWN by the framework."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError and friends
            return Malformed(e)

    return parse


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Parses recur.v1 requests tolerantly (see Malformed)."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        ours = details.method.startswith((f"/{SERVICE}/", f"/{SERVICE}Admin/", "/inference.GRPCInferenceService/"))
        if handler is None or not ours or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))


def parsed(request: T | Malformed) -> T:
    if isinstance(request, Malformed):
        raise InvalidInput(f"the request message does not parse ({request.error.__class__.__name__}): "
                           "strings must be valid UTF-8")
    return request


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        started = time.perf_counter()
        try:
            await send_replica(self, context)
            return await fn(self, parsed(request), context)
        except Exception as e:
            code, message = status_of(e)
            self.metrics.error(fn.__name__, code.name)
            ms = round(1000 * (time.perf_counter() - started), 3)
            log.debug("call refused: %s", message, extra={"rpc": fn.__name__, "code": code.name, "duration_ms": ms})
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


async def send_replica(servicer: Any, context: grpc.aio.ServicerContext) -> None:
    """The replica header, to callers with a key this server knows only (it names a host and port)."""
    if servicer.auth.identifies(context.invocation_metadata()):
        await context.send_initial_metadata(servicer.metadata)


def applied(result: StepResult) -> int:
    """Steps a chunk's reply newly applied (0 for a replay): what recur_tokens_total counts."""
    return 0 if result.replayed else result.offset - result.start_offset


async def open_stream(servicer: Any, rpc: str, context: grpc.aio.ServicerContext) -> str:
    """A stream's start: its caller's tenant (or the call ends UNAUTHENTICATED), the replica header,
    and one more open stream counted; the caller counts it closed."""
    try:
        tenant: str = servicer.auth.tenant_of(context.invocation_metadata() or ())
    except RecurError as e:
        servicer.metrics.error(rpc, status_of(e)[0].name)
        await context.abort(*status_of(e))
    await send_replica(servicer, context)
    servicer.metrics.open_streams.labels(rpc).inc()
    return tenant


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining
