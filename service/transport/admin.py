"""The admin API (recur.v1.RecurAdmin): load, unload and reload model versions while serving, and the
`--model-poll` task that reloads the repository on its own.

Who may call it: with --auth-keys, only keys marked `"admin": true` (others get PERMISSION_DENIED),
on --port and on --admin-port if set; without --auth-keys, nobody on --port (the service is not
registered there) and anybody who can reach --admin-port (127.0.0.1 by default).

A model that fails to load is refused alone, with the reason in the reply and in the log; nothing
that is wrong with a model directory stops the server. Loading reads and checks files and builds the
ONNX Runtime session on a worker thread; the repository changes on the event loop, between calls.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service.auth import Authenticator
from service.core.sessions import SessionService
from service.errors import ModelInvalid, ModelNotFound
from service.metrics import Metrics
from service.repository.models import Model, ModelRepository, Refusal
from service.transport import convert
from service.transport.servicer import unary

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["RecurAdmin"].full_name


class Lifecycle:
    """Loads, unloads and reloads versions, one change at a time."""

    def __init__(self, core: SessionService) -> None:
        self.core = core
        self.models: ModelRepository = core.models
        self._lock = asyncio.Lock()
        self._logged: dict[str, str] = {}  # path -> the refusal last logged (the poll logs each once)

    def _relative(self, directory: Path) -> str:
        root = self.models.root
        return str(directory.relative_to(root)) if root is not None else str(directory)

    def _check_states(self, model: Model) -> None:
        """A version loaded again must keep its state tensors: sessions on it carry them."""
        try:
            before = self.models.state_specs(model.name, model.version)
        except ModelNotFound:
            return
        if [(s.name, s.layers, s.hidden) for s in before] != [(s.name, s.layers, s.hidden) for s in model.states]:
            raise ModelInvalid(f"{model.name}/{model.version}: its state tensors differ from those of the version "
                               "already known under that number; give it a new version number")

    async def _read(self, directory: Path) -> Model:
        model = await asyncio.to_thread(self.models.read, directory)
        self._check_states(model)
        return model

    async def load(self, name: str, version: int) -> tuple[Model, bool]:
        """Load models/NAME/VERSION (again when its graph changed, or after an unload); the model and
        whether anything changed. Raises ModelInvalid (logged) naming the defect."""
        directory = self.models.directory(name, version)
        async with self._lock:
            if not self.models.retired(name, version) and self.models.unchanged(directory):
                return self.models.get(name, version), False
            if not directory.is_dir():
                raise ModelNotFound(f"the model repository has no directory {name}/{version}")
            try:
                model = await self._read(directory)
            except ModelInvalid as e:
                log.error("refusing model: %s", e)
                raise
            self.models.add(model)
            return model, True

    async def reload(self) -> tuple[list[Model], list[Refusal]]:
        """Load every new or changed version under the repository (versions unloaded on purpose stay
        unloaded); the versions loaded and the ones refused, each refusal logged once."""
        loaded: list[Model] = []
        refused: list[Refusal] = []
        async with self._lock:
            for directory in await asyncio.to_thread(self.models.candidates):
                name, version, path = directory.parent.name, int(directory.name), self._relative(directory)
                if self.models.retired(name, version) or self.models.unchanged(directory):
                    continue
                try:
                    model = await self._read(directory)
                except ModelInvalid as e:
                    refused.append(Refusal(path, name, version, str(e)))
                    continue
                self.models.add(model)
                loaded.append(model)
                self._logged.pop(path, None)
        for r in refused:
            if self._logged.get(r.path) != r.reason:
                log.error("refusing model: %s", r.reason)
                self._logged[r.path] = r.reason
        return loaded, refused

    async def unload(self, name: str, version: int, force: bool) -> int:
        async with self._lock:
            return await self.core.unload_model(name, version, force)


async def poll(lifecycle: Lifecycle, interval: float) -> None:
    """--model-poll: reload the repository every `interval` seconds; never ends the server."""
    while True:
        await asyncio.sleep(interval)
        try:
            await lifecycle.reload()
        except Exception:
            log.exception("model poll failed; trying again in %.1f s", interval)


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
        counts = await self.lifecycle.core.store.count_by_model()
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
