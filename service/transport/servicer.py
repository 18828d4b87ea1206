"""gRPC servicer for recur.v1.Recur: parse, call the core, reply. Errors map to status codes here.

Every method first finds the caller's tenant from its API key (`Authenticator.tenant_of`), so
a session is reachable only through its own tenant's keys. Streams are flow-controlled: a chunk's
slot is released only after its reply was handed to gRPC, so a client that does not read stops
being read from, and the server's memory for one call is bounded by --max-stream-inflight."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service.auth import Authenticator
from service.config import Settings
from service.core.packed import PackedInput
from service.core.sessions import BatchPlan, SessionService
from service.errors import LimitExceeded
from service.metrics import Metrics
from service.transport import convert, streams
from service.transport.calls import (
    REPLICA_HEADER,
    Malformed,
    applied,
    deadline_of,
    open_stream,
    parsed,
    send_replica,
    status_of,
    unary,
)

log = logging.getLogger(__name__)


class RecurServicer(recur_pb2_grpc.RecurServicer):
    def __init__(self, core: SessionService, auth: Authenticator, settings: Settings, replica_id: str,
                 metrics: Metrics | None = None) -> None:
        self.core, self.auth = core, auth
        self.metrics = metrics or Metrics()
        self.max_stream_inflight, self.max_batch_chunks = settings.max_stream_inflight, settings.max_batch_chunks
        self.stream_bytes = settings.stream_buffer_bytes
        self.idle_timeout = settings.stream_idle_timeout or None
        self.metadata = ((REPLICA_HEADER, replica_id),)  # which replica answered: for operators and tests

    def _tenant(self, context: grpc.aio.ServicerContext, chunks: int = 1) -> str:
        """The caller's tenant, its call counted against its rate as `chunks` chunks."""
        tenant = self.auth.tenant_of(context.invocation_metadata() or ())
        self.auth.charge(tenant, chunks - 1)
        return tenant

    @unary
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        tenant = self._tenant(context)
        counts = await self.core.live_sessions(tenant, admin=self.auth.is_admin(context.invocation_metadata()))
        return pb.ListModelsResponse(models=[convert.model_to_pb(m, convert.live_sessions(counts, m))
                                             for m in self.core.loaded_models()])

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        tenant = self._tenant(context)
        state = [convert.tensor_from_pb(t) for t in request.initial_state]
        view = await self.core.create(tenant, request.model, request.version, request.session_id,
                                      request.ttl_seconds, state)
        return convert.session_to_pb(view)

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        view = await self.core.get(self._tenant(context), request.session_id, request.include_state)
        return convert.session_to_pb(view)

    @unary
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        await self.core.delete(self._tenant(context), request.session_id)
        return pb.DeleteSessionResponse()

    @unary
    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        view = await self.core.fork(self._tenant(context), request.session_id, request.new_session_id,
                                    request.ttl_seconds)
        return convert.session_to_pb(view)

    @unary
    async def MigrateSession(self, request: pb.MigrateSessionRequest, context: grpc.aio.ServicerContext
                             ) -> pb.Session:
        view = await self.core.migrate(self._tenant(context), request.session_id, request.version,
                                       request.expected_offset if request.HasField("expected_offset") else None)
        return convert.session_to_pb(view)

    @unary
    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepResponse:
        started, tenant = time.perf_counter(), self._tenant(context)
        result = await self.core.step(tenant, convert.step_from_pb(request, deadline_of(context)))
        self.metrics.rpc("Step", tenant).stepped(applied(result), started)
        return convert.step_to_pb(result, request.request_id)

    async def Stream(self, request_iterator: AsyncIterator[pb.StepRequest | Malformed],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepResponse]:
        """Chunks of different sessions run concurrently, each session's in arrival order
        (the core's per-session locks are FIFO). A refused chunk gets its own status."""
        tenant = await open_stream(self, "Stream", context)
        try:
            async for reply in streams.handled(request_iterator,
                                               lambda r: self._stream_chunk(tenant, r, deadline_of(context)),
                                               lambda item: self._step_or_status(tenant, *item),
                                               max_inflight=self.max_stream_inflight, max_bytes=self.stream_bytes,
                                               idle_timeout=self.idle_timeout, context=context):
                yield reply
        finally:
            self.metrics.open_streams.labels("Stream").dec()

    def _failed(self, rpc: str, request: pb.StepRequest, e: BaseException) -> pb.StepResponse:
        """A chunk's error reply on a stream, counted in recur_errors_total."""
        code, message = status_of(e)
        self.metrics.error(rpc, code.name)
        return convert.step_error_to_pb(request, code.value[0], message)

    def _batch_chunks(self, tenant: str, batch: pb.StepBatch | Malformed, deadline: float | None
                      ) -> tuple[tuple[pb.StepBatch, BatchPlan | Exception], int]:
        """A StepBatch message as the core's chunks and its reply budget (or why it is refused whole)."""
        try:
            batch = parsed(batch)
            if len(batch.steps) > self.max_batch_chunks:
                raise LimitExceeded(f"a StepBatch holds at most {self.max_batch_chunks} chunks (--max-batch-chunks); "
                                    f"this one holds {len(batch.steps)}")
            self.auth.charge(tenant, len(batch.steps))
            plan = self.core.plan_batch(tenant, [convert.step_from_pb(r, deadline) for r in batch.steps])
            return (batch, plan), plan.reply_bytes
        except Exception as e:
            return (batch if isinstance(batch, pb.StepBatch) else pb.StepBatch(steps=[pb.StepRequest()]), e), 0

    async def _batch(self, tenant: str, batch: pb.StepBatch, plan: BatchPlan | Exception) -> list[pb.StepResponse]:
        started = time.perf_counter()
        try:
            if isinstance(plan, Exception):
                raise plan
            results = await self.core.step_batch(tenant, plan)
        except Exception as e:  # the whole message refused (too large, shutting down)
            return [self._failed("StreamBatch", r, e) for r in batch.steps]
        counted = self.metrics.rpc("StreamBatch", tenant)
        for result in results:
            if not isinstance(result, Exception):
                counted.stepped(applied(result), started)
        return [self._failed("StreamBatch", request, result) if isinstance(result, Exception)
                else convert.step_to_pb(result, request.request_id) for request, result in zip(batch.steps, results)]

    def _stream_chunk(self, tenant: str, request: pb.StepRequest | Malformed, deadline: float | None
                      ) -> tuple[tuple[pb.StepRequest, BatchPlan | Exception], int]:
        """A Stream message as the core's chunk and its reply budget (or why it is refused)."""
        try:
            request = parsed(request)
            self.auth.charge(tenant, 1)
            plan = self.core.plan_batch(tenant, [convert.step_from_pb(request, deadline)])
            return (request, plan), plan.reply_bytes
        except Exception as e:
            return (request if isinstance(request, pb.StepRequest) else pb.StepRequest(), e), 0

    async def _step_or_status(self, tenant: str, request: pb.StepRequest, plan: BatchPlan | Exception
                              ) -> pb.StepResponse:
        started = time.perf_counter()
        try:
            if isinstance(plan, Exception):
                raise plan
            result = await self.core.step(tenant, plan)
            self.metrics.rpc("Stream", tenant).stepped(applied(result), started)
            return convert.step_to_pb(result, request.request_id)
        except Exception as e:
            return self._failed("Stream", request, e)

    async def StreamBatch(self, request_iterator: AsyncIterator[pb.StepBatch | Malformed],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepBatchResponse]:
        """Each message's chunks run together; messages are answered in order, and a later message
        may start while an earlier one runs (each session's chunks still apply in arrival order).
        At most max(1, --max-stream-inflight / 16) messages are read ahead of the replies sent."""
        tenant = await open_stream(self, "StreamBatch", context)
        try:
            async for steps in streams.ordered(request_iterator,
                                               lambda b: self._batch_chunks(tenant, b, deadline_of(context)),
                                               lambda item: self._batch(tenant, *item),
                                               max(1, self.max_stream_inflight // 16), self.stream_bytes,
                                               self.idle_timeout, context):
                yield pb.StepBatchResponse(steps=steps)
        finally:
            self.metrics.open_streams.labels("StreamBatch").dec()

    # -- the packed (columnar) batch ----------------------------------------------------------
    async def _packed(self, rpc: str, tenant: str, request: pb.PackedStepBatch, inp: PackedInput
                      ) -> pb.PackedStepBatchResponse:
        """One PackedStepBatch; each chunk's status is in the reply. Raises when the message as a whole
        is refused (its columns do not fit, the server is draining)."""
        started = time.perf_counter()
        result = await self.core.step_packed(tenant, inp)
        answered, steps = result.applied()
        if answered:
            self.metrics.rpc(rpc, tenant).stepped_many(answered, steps, started)
        for e in result.errors.values():
            self.metrics.error(rpc, status_of(e)[0].name)
        return convert.packed_to_pb(result, request.request_id, _code)

    def _packed_chunks(self, tenant: str, request: pb.PackedStepBatch | Malformed, deadline: float | None
                       ) -> tuple[tuple[pb.PackedStepBatch | Malformed, PackedInput | Exception], int]:
        """A StreamPacked message as the core's input and its reply budget (or why it is refused whole)."""
        try:
            r = parsed(request)
            if len(r.session_ids) > self.max_batch_chunks:
                raise LimitExceeded(f"a PackedStepBatch holds at most {self.max_batch_chunks} chunks "
                                    f"(--max-batch-chunks); this one holds {len(r.session_ids)}")
            self.auth.charge(tenant, len(r.session_ids))
            inp = convert.packed_from_pb(r, deadline)
            return (r, inp), self.core.packed_reply_bytes(inp)
        except Exception as e:
            return (request, e), 0

    async def _packed_or_status(self, tenant: str, request: pb.PackedStepBatch | Malformed,
                                inp: PackedInput | Exception) -> pb.PackedStepBatchResponse:
        """On a stream, a refused message is answered (each chunk with the same status) and the stream goes on."""
        try:
            if isinstance(inp, Exception):
                raise inp
            assert isinstance(request, pb.PackedStepBatch)
            return await self._packed("StreamPacked", tenant, request, inp)
        except Exception as e:
            code, message = status_of(e)
            self.metrics.error("StreamPacked", code.name)
            if isinstance(request, Malformed):
                return convert.packed_error_to_pb("", code.value[0], message, 0)
            return convert.packed_error_to_pb(request.request_id, code.value[0], message, len(request.session_ids))

    @unary
    async def StepPacked(self, request: pb.PackedStepBatch, context: grpc.aio.ServicerContext
                         ) -> pb.PackedStepBatchResponse:
        tenant = self._tenant(context, chunks=max(1, len(request.session_ids)))
        return await self._packed("StepPacked", tenant, request, convert.packed_from_pb(request, deadline_of(context)))

    async def StreamPacked(self, request_iterator: AsyncIterator[pb.PackedStepBatch | Malformed],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PackedStepBatchResponse]:
        """As StreamBatch: messages answered in order, a later one may start while an earlier one runs."""
        tenant = await open_stream(self, "StreamPacked", context)
        try:
            async for reply in streams.ordered(request_iterator,
                                               lambda r: self._packed_chunks(tenant, r, deadline_of(context)),
                                               lambda item: self._packed_or_status(tenant, *item),
                                               max(1, self.max_stream_inflight // 16), self.stream_bytes,
                                               self.idle_timeout, context):
                yield reply
        finally:
            self.metrics.open_streams.labels("StreamPacked").dec()

    # -- moving and listing sessions ------------------------------------------------------
    @unary
    async def ExportSession(self, request: pb.ExportSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.SessionBlob:
        return pb.SessionBlob(blob=await self.core.export_session(self._tenant(context), request.session_id))

    @unary
    async def ImportSession(self, request: pb.ImportSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        view = await self.core.import_session(self._tenant(context), request.blob, request.session_id, request.force)
        return convert.session_to_pb(view)

    @unary
    async def ListSessions(self, request: pb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        page, token = await self.core.list_sessions(self._tenant(context), request.model, request.page_size,
                                                    request.page_token)
        return convert.sessions_to_pb(page, token)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        started, made = time.perf_counter(), 0
        try:
            # aclosing: a cancelled call releases the session's lock now, not at garbage collection
            tenant, request = self._tenant(context), parsed(request)
            await send_replica(self, context)
            generated = self.metrics.generated.labels(tenant)
            async with contextlib.aclosing(self.core.generate(tenant, convert.generate_from_pb(request))) as tokens:
                async for token in tokens:
                    made += 1
                    generated.inc()
                    yield convert.generated_to_pb(token)
            self.metrics.rpc("Generate", tenant).stepped(made, started)
        except Exception as e:
            code, message = status_of(e)
            self.metrics.error("Generate", code.name)
            await context.abort(code, message)


def _code(e: BaseException) -> tuple[int, str]:
    code, message = status_of(e)
    return code.value[0], message
