"""Model versions while serving: load, unload and reload them, and the `--model-poll` task.

A model that fails to load is refused alone, with the reason in the reply and in the log; nothing
that is wrong with a model directory stops the server. Loading reads and checks files and builds the
ONNX Runtime session on a worker thread; the repository changes on the event loop, between calls.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from service.core.sessions import SessionService
from service.errors import ModelInvalid, ModelNotFound
from service.repository.models import Model, ModelRepository, Refusal

log = logging.getLogger(__name__)


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
