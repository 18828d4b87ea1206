"""The admin API (recur.v1.RecurAdmin): load, unload and reload model versions while serving, and the
`--model-poll` task that reloads the repository on its own.

Who may call it: with --auth-keys, only keys marked `"admin": true` (others get PERMISSION_DENIED),
on --port and on --admin-port if set; without --auth-keys, nobody on --port (the service is not
registered there) and anybody who can reach --admin-port (127.0.0.1 by default).

What loading does is the core's (service/core/lifecycle.py); this module converts and calls.
"""

from __future__ import annotations

import logging

import grpc

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service.auth import Authenticator
from service.core.lifecycle import Lifecycle
from service.metrics import Metrics
from service.repository.models import Model
from service.transport import convert
from service.transport.calls import unary

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["RecurAdmin"].full_name


class RecurAdminServicer(recur_pb2_grpc.RecurAdminServicer):
    def __init__(self, lifecycle: Lifecycle, auth: Authenticator, replica_id: str,
                 metrics: Metrics | None = None) -> None:
        self.lifecycle, self.auth = lifecycle, auth
        self.metrics = metrics or Metrics()  # `unary` counts refused calls into it
        self.metadata = (("x-recur-replica", replica_id),)

    def _admin(self, context: grpc.aio.ServicerContext) -> None:
        tenant = self.auth.admin_of(context.invocation_metadata() or ())
        log.info("admin call %s by tenant %s", context.peer(), tenant)

    async def _info(self, models: list[Model]) -> list[pb.ModelInfo]:
        counts = await self.lifecycle.core.live_sessions("", admin=True)
        return [convert.model_to_pb(m, convert.live_sessions(counts, m)) for m in models]

    @unary
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
                        ) -> pb.LoadModelResponse:
        self._admin(context)
        model, changed = await self.lifecycle.load(request.name, request.version)
        return pb.LoadModelResponse(model=(await self._info([model]))[0], changed=changed)

    @unary
    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
                          ) -> pb.UnloadModelResponse:
        self._admin(context)
        n = await self.lifecycle.unload(request.name, request.version, request.force)
        return pb.UnloadModelResponse(sessions_stranded=n)

    @unary
    async def ReloadRepository(self, request: pb.ReloadRepositoryRequest, context: grpc.aio.ServicerContext
                               ) -> pb.ReloadRepositoryResponse:
        self._admin(context)
        loaded, refused = await self.lifecycle.reload()
        return pb.ReloadRepositoryResponse(loaded=await self._info(loaded),
                                           refused=[convert.refusal_to_pb(r) for r in refused])
