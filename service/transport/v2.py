"""gRPC servicer for the Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) with
Triton's sequence extension, over the same core (`SessionService`) and port as recur.v1.

- A sequence (`sequence_id` parameter, int64 or string) is the recur session `v2-<sequence_id>` of
  the caller's tenant: the native API sees it under that id, and it lives in the configured store, so
  it survives a restart like any session. `sequence_start` creates it on the requested model (or
  resets it); `sequence_end` answers, then deletes it. The lifecycle is the core's
  (service/core/sequences.py); this module converts and calls. A request without
  `sequence_start` for a sequence that does not exist is NOT_FOUND, saying to send `sequence_start`.
  A request that starts a sequence and is then refused leaves the sequence not started.
- `sequence_id` 0 or "" (no sequence) is a one-shot request: its chunk runs from a fresh state and
  nothing is stored.
- The request `id` is a replay key, kept with the sequence's session in the store (its record's
  `last_request`): per tenant and sequence, across restarts and replicas, whatever other sequences do.
  The same id again for the same sequence is answered from the session's replay record without
  advancing the state (the same id with other inputs is refused). Only the last request of a sequence
  is replayable, and a sequence's end forgets it.
- Each reply carries the sequence's offset (steps consumed) as the int64 parameter `sequence_offset`.
- Requests of one sequence run one at a time in arrival order (on a stream too); different
  sequences run concurrently and are batched by the engine.
- ServerLive and ServerReady need no API key (like gRPC health); every other method does.
  On ModelStreamInfer a refused request is answered with its `error_message` and the stream goes on;
  a stream with no message for --stream-idle-timeout is ended with DEADLINE_EXCEEDED, as Stream is."""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import AsyncIterator

import grpc

from recur.kserve import grpc_service_pb2 as pb
from recur.kserve import grpc_service_pb2_grpc
from service.auth import Authenticator
from service.config import Settings
from service.core.sequences import Sequences, SequenceStep
from service.core.sessions import SessionService
from service.errors import InvalidInput, NotFound
from service.metrics import Metrics
from service.repository.models import Model
from service.transport import convert_v2, streams
from service.transport.calls import (
    REPLICA_HEADER,
    Malformed,
    applied,
    deadline_of,
    open_stream,
    parsed,
    status_of,
    unary,
)
from service.types import StepInput

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ["sequence"]


def _version() -> str:
    try:
        return importlib.metadata.version("recur")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: SessionService, auth: Authenticator, settings: Settings, replica_id: str,
                 metrics: Metrics | None = None) -> None:
        self.core, self.auth = core, auth
        self.metrics = metrics or Metrics()
        self.max_stream_inflight, self.stream_bytes = settings.max_stream_inflight, settings.stream_buffer_bytes
        self.idle_timeout = settings.stream_idle_timeout or None
        self.metadata = ((REPLICA_HEADER, replica_id),)
        self.version = _version()
        self.sequences = Sequences(core)

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return self.auth.tenant_of(context.invocation_metadata() or ())

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.core.loaded_models()))

    @unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        self._tenant(context)
        try:
            self.core.model(request.name, convert_v2.version_from_pb(request.version))
        except (NotFound, InvalidInput):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        self._tenant(context)
        return pb.ServerMetadataResponse(name="recur", version=self.version, extensions=EXTENSIONS)

    @unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        self._tenant(context)
        model = self.core.model(request.name, convert_v2.version_from_pb(request.version))
        versions = [m.version for m in self.core.loaded_models() if m.name == model.name]
        return convert_v2.model_metadata_to_pb(model, versions)

    @unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        return await self._infer(self._tenant(context), request, deadline_of(context))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently across sequences, each sequence's in arrival order; replies come
        as they are ready (match them by `id`). At most --max-stream-inflight run or wait to be sent."""
        tenant = await open_stream(self, "ModelStreamInfer", context)

        def prepare(request: pb.ModelInferRequest | Malformed
                    ) -> tuple[pb.ModelInferRequest | Malformed | Exception, int]:
            try:
                r = parsed(request)
                self.auth.charge(tenant, 1)
                return r, self._reply_bytes(tenant, r)
            except Exception as e:
                return e, 0

        async def one(request: pb.ModelInferRequest | Malformed | Exception) -> pb.ModelStreamInferResponse:
            try:
                if isinstance(request, Exception):
                    raise request
                request = parsed(request)
                return pb.ModelStreamInferResponse(infer_response=await self._infer(tenant, request,
                                                                                    deadline_of(context),
                                                                                    "ModelStreamInfer"))
            except Exception as e:
                code, message = status_of(e)
                self.metrics.error("ModelStreamInfer", code.name)
                return convert_v2.stream_error_to_pb(request if isinstance(request, pb.ModelInferRequest) else None,
                                                     message)

        try:
            async for reply in streams.handled(request_iterator, prepare, one, max_inflight=self.max_stream_inflight,
                                               max_bytes=self.stream_bytes, idle_timeout=self.idle_timeout,
                                               context=context):
                yield reply
        finally:
            self.metrics.open_streams.labels("ModelStreamInfer").dec()

    # -- one request -----------------------------------------------------------------------------
    def _reply_bytes(self, tenant: str, r: pb.ModelInferRequest) -> int:
        """The reply budget of a request from its declared shape (a stream reserves it before it runs)."""
        steps = int(r.inputs[0].shape[1]) if len(r.inputs) == 1 and len(r.inputs[0].shape) >= 2 else 0
        outputs = [o.name for o in r.outputs] or [convert_v2.LOGITS]
        return self.core.reply_bytes(tenant, [StepInput("", tokens=range(max(0, steps)),
                                                        options=convert_v2.options_of(outputs))])

    async def _infer(self, tenant: str, r: pb.ModelInferRequest, deadline: float | None,
                     rpc: str = "ModelInfer") -> pb.ModelInferResponse:
        started = time.perf_counter()
        seq = convert_v2.sequence_from_pb(r)
        chunks: list[convert_v2.Chunk] = []

        def chunk_of(model: Model) -> StepInput:
            chunk = convert_v2.chunk_from_pb(r, model)
            chunks.append(chunk)
            return StepInput("", tokens=chunk.tokens, features=chunk.features,
                             options=convert_v2.options_of(chunk.outputs), deadline=deadline)

        step = SequenceStep(seq.session_id if seq.id else "", r.model_name, convert_v2.version_from_pb(r.model_version),
                            seq.start, seq.end, chunk_of, r.id, name=seq.id)
        model, result = await self.sequences.infer(tenant, step)
        self.metrics.rpc(rpc, tenant).stepped(applied(result), started)
        return convert_v2.infer_to_pb(r, model, result, chunks[-1].outputs)
