"""gRPC servicer for recur.v1.Recur: parse, call the core, reply. Errors map to status codes here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service import convert
from service.errors import RecurError
from service.sessions import SessionService

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-recur-replica"
TENANT = "default"  # until authentication exists, every request belongs to one tenant

T = TypeVar("T")


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a client sees; unexpected errors never leak their text."""
    if isinstance(e, RecurError):
        return getattr(grpc.StatusCode, e.code), str(e)
    log.error("unexpected error", exc_info=e)
    return grpc.StatusCode.INTERNAL, "internal error (logged on the server)"


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            await context.send_initial_metadata(self.metadata)
            return await fn(self, request, context)
        except Exception as e:
            code, message = status_of(e)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


class RecurServicer(recur_pb2_grpc.RecurServicer):
    def __init__(self, core: SessionService, max_stream_inflight: int, replica_id: str) -> None:
        self.core = core
        self.max_stream_inflight = max_stream_inflight
        self.metadata = ((REPLICA_HEADER, replica_id),)  # which replica answered: for operators and tests

    @unary
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_to_pb(m) for m in self.core.models.all()])

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        state = [convert.tensor_from_pb(t) for t in request.initial_state]
        view = await self.core.create(TENANT, request.model, request.version, request.session_id,
                                      request.ttl_seconds, state)
        return convert.session_to_pb(view)

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return convert.session_to_pb(await self.core.get(TENANT, request.session_id, request.include_state))

    @unary
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        await self.core.delete(TENANT, request.session_id)
        return pb.DeleteSessionResponse()

    @unary
    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        view = await self.core.fork(TENANT, request.session_id, request.new_session_id, request.ttl_seconds)
        return convert.session_to_pb(view)

    @unary
    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepResponse:
        result = await self.core.step(TENANT, convert.step_from_pb(request))
        return convert.step_to_pb(result, request.request_id)

    async def Stream(self, request_iterator: AsyncIterator[pb.StepRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepResponse]:
        """Chunks of different sessions run concurrently, each session's in arrival order
        (the core's per-session locks are FIFO). A refused chunk gets its own status."""
        await context.send_initial_metadata(self.metadata)
        replies: asyncio.Queue[pb.StepResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_stream_inflight)

        async def one(request: pb.StepRequest) -> None:
            try:
                reply = await self._step_or_status(request)
            finally:
                slots.release()
            await replies.put(reply)

        async def read() -> None:
            tasks: set[asyncio.Task] = set()
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(tasks)  # unlike gather, a cancelled wait leaves the chunks running
            finally:
                await replies.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()

    async def _batch(self, batch: pb.StepBatch) -> list[pb.StepResponse]:
        try:
            results = await self.core.step_batch(TENANT, [convert.step_from_pb(r) for r in batch.steps])
        except Exception as e:  # the whole message refused (shutting down)
            code, message = status_of(e)
            return [convert.step_error_to_pb(r, code.value[0], message) for r in batch.steps]
        replies = []
        for request, result in zip(batch.steps, results):
            if isinstance(result, Exception):
                code, message = status_of(result)
                replies.append(convert.step_error_to_pb(request, code.value[0], message))
            else:
                replies.append(convert.step_to_pb(result, request.request_id))
        return replies

    async def _step_or_status(self, request: pb.StepRequest) -> pb.StepResponse:
        try:
            return convert.step_to_pb(await self.core.step(TENANT, convert.step_from_pb(request)), request.request_id)
        except Exception as e:
            code, message = status_of(e)
            return convert.step_error_to_pb(request, code.value[0], message)

    async def StreamBatch(self, request_iterator: AsyncIterator[pb.StepBatch],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepBatchResponse]:
        """Each message's chunks run together; messages are answered in order, and a later message
        may start while an earlier one runs (each session's chunks still apply in arrival order)."""
        await context.send_initial_metadata(self.metadata)
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=max(1, self.max_stream_inflight // 16))

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    await pending.put(asyncio.ensure_future(self._batch(batch)))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield pb.StepBatchResponse(steps=await task)
        finally:
            reader.cancel()

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            await context.send_initial_metadata(self.metadata)
            # aclosing: a cancelled call releases the session's lock now, not at garbage collection
            async with contextlib.aclosing(self.core.generate(TENANT, convert.generate_from_pb(request))) as tokens:
                async for token in tokens:
                    yield convert.generated_to_pb(token)
        except Exception as e:
            code, message = status_of(e)
            await context.abort(code, message)
