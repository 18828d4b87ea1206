"""Sequences: the Open Inference Protocol's sequence extension over the chunk pipeline and the store,
free of any transport (service/transport/v2.py converts and calls).

- A sequence is a session of the caller's tenant (the transport names it); it lives in the store, so
  it survives a restart and is seen by every replica.
- `start` runs its first chunk from a fresh state and creates the session with the result: one store
  write, and a start that is refused leaves the sequence as it was (not started, or its old self).
  A start of a sequence that exists resets it.
- `end` answers, then deletes the session.
- A request's id is its replay key, kept in the session's record (`last_request`): the same id again
  is answered from the replay record without advancing the state; only a sequence's last request is
  replayable.
- A request without a sequence is one-shot: its chunk runs from a fresh state and nothing is stored.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from service.core.sessions import SessionService
from service.core.steps import checked_id, replay_key
from service.errors import InvalidInput, SessionExpired, SessionNotFound
from service.repository.models import Model
from service.store import SessionRecord
from service.types import StepInput, StepResult


@dataclass(frozen=True)
class SequenceStep:
    """One request of a sequence. `chunk` is the input (its session_id is ignored), or what makes it
    from the sequence's model, for inputs that can only be read knowing the model."""

    session_id: str  # "" for a one-shot request
    model: str
    version: int  # 0: the latest loaded
    start: bool = False
    end: bool = False
    chunk: StepInput | Callable[[Model], StepInput] = StepInput("")
    request_id: str = ""  # its replay key (or the chunk's own replay_key)
    name: str = ""  # how the caller names the sequence in messages (default: the session id)

    @property
    def key(self) -> str:
        return self.request_id or ("" if callable(self.chunk) else self.chunk.replay_key)


class Sequences:
    def __init__(self, core: SessionService) -> None:
        self.core = core

    async def infer(self, tenant: str, step: SequenceStep) -> tuple[Model, StepResult]:
        """The request's model and reply. Requests of one sequence run one at a time, in arrival order."""
        if not step.session_id:
            return await self._one_shot(tenant, step)
        core, sid = self.core, checked_id(step.session_id)
        name = step.name or sid
        async with core.calls, core.locks.hold((tenant, sid)):
            rec = await self._current(tenant, sid)
            if step.start and not (isinstance(rec, SessionRecord) and step.key
                                   and rec.last_request == replay_key(step.key)):
                model, result = await self._start(tenant, step, rec if isinstance(rec, SessionRecord) else None)
            else:
                if not isinstance(rec, SessionRecord):  # not there, or expired: say what to do
                    raise type(rec)(f"sequence {name!r} is not active ({rec}); send its first request with "
                                    "sequence_start=true")
                model = self._model_of(step, rec, name)
                _, result = await core.advance(tenant, rec, self._input(step, model, sid))
            if step.end:
                with contextlib.suppress(SessionNotFound, SessionExpired):
                    await core.store.delete(tenant, sid)
                    core.events.deleted(tenant)
        return model, result

    @staticmethod
    def _input(step: SequenceStep, model: Model, session_id: str) -> StepInput:
        c = step.chunk(model) if callable(step.chunk) else step.chunk
        return StepInput(session_id, c.tokens, c.text, c.features, c.expected_offset, c.options, c.deadline, step.key)

    async def _current(self, tenant: str, sid: str) -> SessionRecord | SessionNotFound | SessionExpired:
        """The sequence's session as stored, or why there is none."""
        try:
            return await self.core.store.fresh(tenant, sid)
        except (SessionNotFound, SessionExpired) as e:
            return e

    def _fresh(self, tenant: str, sid: str, model: Model) -> SessionRecord:
        t = self.core.store.clock()
        return SessionRecord(tenant=tenant, session_id=sid, model=model.name, version=model.version, offset=0,
                             created_at=t, updated_at=t, ttl=self.core.settings.session_ttl, state=model.zero_state())

    async def _start(self, tenant: str, step: SequenceStep, old: SessionRecord | None
                     ) -> tuple[Model, StepResult]:
        """The first chunk from a fresh state, then the session created with its result."""
        core = self.core
        model = core.models.get(step.model, step.version)
        new, result = await core.advance(tenant, self._fresh(tenant, step.session_id, model),
                                         self._input(step, model, step.session_id), write=False)
        if old is not None:
            with contextlib.suppress(SessionNotFound, SessionExpired):
                await core.store.delete(tenant, step.session_id)
        await core.store_new(tenant, new)
        core.events.created(model.name, model.version, tenant)
        return model, result

    def _model_of(self, step: SequenceStep, rec: SessionRecord, name: str) -> Model:
        """The model the sequence runs on, which the request must name."""
        if step.model != rec.model or step.version not in (0, rec.version):
            raise InvalidInput(f"sequence {name!r} runs on model {rec.model} version {rec.version}, not "
                               f"{step.model[:64]!r} version {step.version}; start a new sequence to change models")
        return self.core.models.get(rec.model, rec.version)

    async def _one_shot(self, tenant: str, step: SequenceStep) -> tuple[Model, StepResult]:
        core = self.core
        model = core.models.get(step.model, step.version)
        sid = uuid.uuid4().hex
        async with core.calls:
            _, result = await core.advance(tenant, self._fresh(tenant, sid, model), self._input(step, model, sid),
                                           write=False)
        return model, result
