"""The transport-free core: sessions and their rules.

Invariants (docs/architecture.md, "A session"): chunking is invisible; a chunk with expected_offset applies
only at that offset and a retry of the last applied chunk is replayed; one chunk at a
time per session, in arrival order; a reply only after the state is as durable as the
store promises; a refused request changes nothing.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import numpy as np

from service import blob
from service.auth import NO_LIMITS, TenantLimits
from service.config import Settings
from service.core import budget, packed
from service.core.locks import CallGate, SessionLocks
from service.core.outputs import OutputOptions, StopStrings, sample
from service.core.packed import PackedInput, PackedResult
from service.core.replies import PackedReplies, StepReplies
from service.core.steps import (
    Chunks,
    PackedColumns,
    Pipeline,
    conflict_error,
    kind_error,
    offset_mismatch,
    replay_key,
)
from service.core.steps import checked_id as _checked
from service.engine.engine import Engine
from service.errors import (
    InvalidInput,
    LimitExceeded,
    NoOutputYet,
    OffsetMismatch,
    StoreConflict,
    VersionInUse,
    VersionMismatch,
)
from service.repository.models import Model, ModelRepository, StateSpec
from service.store import SessionRecord, Store
from service.store.base import NO_EVENTS, Events, SessionSummary
from service.tracing import OFF, Tracing
from service.types import GeneratedToken, GenerateInput, NamedTensor, SessionView, StepInput, StepResult

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # ListSessions
_COMPACT = OutputOptions(compact=True)  # what Generate asks of its chunks: nothing to shape
__all__ = ["BatchPlan", "SessionService", "replay_key"]


@dataclass(frozen=True)
class BatchPlan:
    """A StepBatch planned: its chunks and the bytes its reply can hold (within --max-reply-bytes)."""

    inputs: list[StepInput]
    reply_bytes: int


def _specs_str(specs: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{n} [{layers}, {hidden}]" for n, layers, hidden in specs) or "none"


class SessionService:
    """Owns sessions: creates, steps, generates, forks and deletes them over a Store.
    Records are stamped with the store's clock, which also decides their expiry."""

    def __init__(self, settings: Settings, models: ModelRepository, store: Store, engine: Engine,
                 tenant_limits: Callable[[str], TenantLimits] | None = None, events: Events = NO_EVENTS,
                 tracing: Tracing = OFF) -> None:
        self.settings, self.models, self.store, self.engine = settings, models, store, engine
        self.tenant_limits = tenant_limits
        self.events = events  # sessions created/deleted, replays, conflicts (metrics; no-ops by default)
        self.tracing = tracing  # spans of the stages (service/tracing.py; a no-op when off)
        self.locks = SessionLocks()
        self.calls = CallGate()
        self._widest: tuple[list[Model], budget.Widths] = ([], budget.Widths())
        self.pipeline = Pipeline(settings, models, store, engine, self._max_chunk, events, tracing, self.locks,
                                 self.calls)

    # -- the reply budget (service/core/budget.py) ---------------------------------
    def _widest_widths(self) -> budget.Widths:
        """The widest loaded model's widths: a bound for requests whose sessions are not read yet."""
        models = self.models.all()
        if len(models) != len(self._widest[0]) or any(a is not b for a, b in zip(models, self._widest[0])):
            self._widest = (models, budget.Widths.widest(models))
        return self._widest[1]

    def _declared_steps(self, inp: StepInput, w: budget.Widths, max_chunk: int) -> int:
        """A chunk's steps from its sizes alone (one over the chunk limit is refused, its reply tiny)."""
        steps = len(inp.tokens) or len(inp.text) or len(inp.features) // (4 * (w.feature_dim or 1))
        return steps if steps <= max_chunk else 0

    def reply_bytes(self, tenant: str, inputs: list[StepInput]) -> int:
        """The most bytes the replies to these chunks can hold, before any session is read (a stream
        reserves it; service/transport/streams.py)."""
        w, max_chunk = self._widest_widths(), self._max_chunk(tenant)
        return sum(budget.reply_budget(w, budget.Shape(1, self._declared_steps(inp, w, max_chunk), inp.options)).bytes
                   for inp in inputs)

    def plan_batch(self, tenant: str, inputs: list[StepInput]) -> BatchPlan:
        """Chunks with their reply budget from the widest loaded model (a bound: their sessions are not
        read yet). A message of several is refused whole (RESOURCE_EXHAUSTED) when over it; each chunk is
        also checked against its own model's widths in the pipeline (steps.InputColumns), which is all a
        single chunk is refused by."""
        size = self.reply_bytes(tenant, inputs)
        if len(inputs) > 1:
            budget.check(budget.Budget(sum(len(i.tokens) or len(i.text) or len(i.features) // 4 for i in inputs),
                                       size), self.settings.max_reply_bytes)
        return BatchPlan(inputs, size)

    def packed_reply_bytes(self, p: PackedInput) -> int:
        """As reply_bytes, for a packed batch (one columnar reply)."""
        return self._packed_budget(p, sum(p.lengths)).bytes

    def _packed_budget(self, p: PackedInput, steps: int) -> budget.Budget:
        options = OutputOptions(top_k=p.top_k, return_logits=p.return_logits, final_only=p.final_only, compact=True,
                                activations=p.activations)
        return budget.reply_budget(self._widest_widths(), budget.Shape(len(p.session_ids), steps, options,
                                                                       columnar=True))

    # -- models, as the transports see them -------------------------------------------------------
    def loaded_models(self) -> list[Model]:
        return self.models.all()

    def model(self, name: str, version: int = 0) -> Model:
        """A loaded version of a model (0: its latest); ModelNotFound otherwise."""
        return self.models.get(name, version)

    async def close(self) -> None:
        await self.engine.close()

    async def drain(self, timeout: float) -> None:
        """Refuse new work and wait up to `timeout` seconds for calls in flight."""
        if not await self.calls.close(timeout):
            log.warning("%d calls still in flight after %.0f s", self.calls.in_flight, timeout)

    # -- sessions ------------------------------------------------------------
    def _view(self, rec: SessionRecord, specs: list[StateSpec] | None = None, with_state: bool = False
              ) -> SessionView:
        state = None
        if with_state and specs is not None:
            state = [NamedTensor(s.name, v) for s, v in zip(specs, rec.state)]
        return SessionView(rec.session_id, rec.tenant, rec.model, rec.version, rec.offset, rec.created_at,
                           rec.updated_at, rec.expires_at, state, rec.last_request)

    def _ttl(self, ttl: float) -> float:
        if ttl < 0 or ttl > self.settings.max_ttl:
            raise InvalidInput(f"ttl_seconds must be between 0 (the default, {self.settings.session_ttl:.0f}) "
                               f"and {self.settings.max_ttl:.0f}")
        return ttl or self.settings.session_ttl

    def _new_id(self, requested: str) -> str:
        return _checked(requested) if requested else uuid.uuid4().hex

    def _limits(self, tenant: str) -> TenantLimits:
        return self.tenant_limits(tenant) if self.tenant_limits else NO_LIMITS

    def _max_chunk(self, tenant: str) -> int:
        own = self._limits(tenant).max_chunk
        return min(own, self.settings.max_chunk) if own else self.settings.max_chunk

    async def store_new(self, tenant: str, rec: SessionRecord) -> None:
        """Create atomically within the server's and the tenant's session limits."""
        await self.store.create(rec, max_sessions=self.settings.max_sessions,
                                max_tenant_sessions=self._limits(tenant).max_sessions)

    async def create(self, tenant: str, model_name: str, version: int, session_id: str = "", ttl: float = 0,
                     initial_state: list[NamedTensor] | None = None) -> SessionView:
        model = self.models.get(model_name, version)
        sid, ttl = self._new_id(session_id), self._ttl(ttl)
        state = self._initial_state(model, initial_state) if initial_state else model.zero_state()
        t = self.store.clock()
        rec = SessionRecord(tenant=tenant, session_id=sid, model=model.name, version=model.version, offset=0,
                            created_at=t, updated_at=t, ttl=ttl, state=state)
        async with self.calls:
            await self.store_new(tenant, rec)
        self.events.created(model.name, model.version, tenant)
        log.info("session created", extra={"session": sid, "model": model.name, "version": model.version,
                                           "tenant": tenant})
        return self._view(rec)

    def _initial_state(self, model: Model, tensors: list[NamedTensor]) -> list[np.ndarray]:
        given = {t.name: t.value for t in tensors}
        names = [s.name for s in model.states]
        if sorted(given) != sorted(names) or len(given) != len(tensors):
            raise InvalidInput(f"initial_state must name each of {names} once; got {[t.name for t in tensors]}")
        out = []
        for s in model.states:
            v = given[s.name]
            if v.shape != (s.layers, s.hidden):
                raise InvalidInput(f"initial_state {s.name!r} must have shape [{s.layers}, {s.hidden}] "
                                   f"(float32, little-endian), got {list(v.shape)}")
            if not np.isfinite(v).all():
                raise InvalidInput(f"initial_state {s.name!r} has values that are not finite")
            out.append(v.astype(np.float32))
        return out

    async def get(self, tenant: str, session_id: str, include_state: bool = False) -> SessionView:
        async with self.locks.hold((tenant, _checked(session_id))):  # after the chunks in flight: settled
            rec = await self.store.fresh(tenant, session_id)
        # the state's names: of the version, even one unloaded since (its shapes are kept)
        specs = self.models.state_specs(rec.model, rec.version) if include_state else None
        return self._view(rec, specs, include_state)

    async def delete(self, tenant: str, session_id: str) -> None:
        async with self.calls, self.locks.hold((tenant, _checked(session_id))):
            await self.store.delete(tenant, session_id)
        self.events.deleted(tenant)
        log.info("session deleted", extra={"session": session_id, "tenant": tenant})

    async def fork(self, tenant: str, session_id: str, new_id: str = "", ttl: float = 0) -> SessionView:
        sid, ttl = self._new_id(new_id), self._ttl(ttl)
        async with self.calls, self.locks.hold((tenant, _checked(session_id))):
            src = await self.store.fresh(tenant, session_id)
            self.models.get(src.model, src.version)  # refused when that version was unloaded
            t = self.store.clock()
            rec = src.copy(session_id=sid, created_at=t, updated_at=t, ttl=ttl,
                           state=[s.copy() for s in src.state])
            await self.store_new(tenant, rec)
        self.events.created(rec.model, rec.version, tenant)
        log.info("session forked", extra={"session": sid, "model": rec.model, "version": rec.version,
                                          "tenant": tenant})
        return self._view(rec)

    # -- model versions ------------------------------------------------------
    async def migrate(self, tenant: str, session_id: str, version: int, expected_offset: int | None = None
                      ) -> SessionView:
        """Move a session to another version of its model (0: the latest loaded) whose state tensors
        have the same names and shapes; offset and state are kept, the next chunk runs on the new
        weights. The last chunk's replay is forgotten (its outputs came from the old weights)."""
        async with self.calls, self.locks.hold((tenant, _checked(session_id))):
            rec = await self.store.fresh(tenant, session_id)
            if expected_offset is not None and expected_offset != rec.offset:
                raise OffsetMismatch(f"session {session_id} is at offset {rec.offset}, not {expected_offset}",
                                     rec.offset)
            target = self.models.get(rec.model, version)
            if target.version == rec.version:
                return self._view(rec)
            have = [(s.name, s.layers, s.hidden) for s in self.models.state_specs(rec.model, rec.version)]
            want = [(s.name, s.layers, s.hidden) for s in target.states]
            shapes = [tuple(a.shape) for a in rec.state]
            if have != want or shapes != [(s.layers, s.hidden) for s in target.states]:
                raise VersionMismatch(f"session {session_id} cannot move from version {rec.version} to version "
                                      f"{target.version} of model {rec.model}: its state is "
                                      f"{_specs_str(have)} and that version's is {_specs_str(want)}")
            last = None if rec.last_logits is None else rec.last_logits[-1:].copy()  # Generate samples from it
            new = rec.copy(version=target.version, updated_at=self.store.clock(), last_digest=b"", last_start=-1,
                           last_logits=last, last_prev_state=None, last_request="")
            try:
                await self.store.put(new, prev_offset=rec.offset)
            except StoreConflict as e:
                raise conflict_error(e, session_id) from e
        log.info("session migrated", extra={"session": session_id, "model": rec.model, "version": target.version,
                                            "from_version": rec.version, "offset": rec.offset, "tenant": tenant})
        return self._view(new)

    async def live_sessions(self, tenant: str, admin: bool) -> dict[tuple[str, int], int] | None:
        """Live sessions per (model, version): the caller's tenant's, or every tenant's for an admin."""
        return await self.store.count_by_model(None if admin else tenant)

    async def unload_model(self, name: str, version: int, force: bool = False) -> int:
        """Stop serving a version. Refused while live sessions use it, unless `force`: those sessions
        then answer FAILED_PRECONDITION on every call that runs the model, until migrated. Returns how
        many live sessions were left on it (-1: the store does not count them)."""
        if version < 1:
            raise InvalidInput("give the version to unload (1 or more)")
        self.models.get(name, version)
        await self.store.flush()
        counts = await self.store.count_by_model()
        n = -1 if counts is None else counts.get((name, version), 0)
        if not force and n != 0:
            raise VersionInUse(f"version {version} of model {name} is used by {n} live sessions; migrate or "
                               "delete them, or unload with force" if n > 0 else
                               f"this store cannot count the sessions on version {version} of model {name}; "
                               "unload with force if none uses it")
        self.models.unload(name, version)
        if n:
            log.warning("version %d of model %s unloaded with force: %s sessions left on it fail until migrated",
                        version, name, n if n > 0 else "an unknown number of")
        return n

    # -- steps: through the chunk pipeline (service/core/steps.py) -----------------------------
    async def step(self, tenant: str, inp: StepInput | BatchPlan) -> StepResult:
        """One chunk (or a plan of one: a stream planned it to reserve its reply's bytes)."""
        result = (await self.step_batch(tenant, inp if isinstance(inp, BatchPlan) else [inp]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def step_batch(self, tenant: str, batch: BatchPlan | list[StepInput]) -> list[StepResult | Exception]:
        """Many sessions' chunks as one message: each session locked once per round, one engine job per
        block of equal chunks, one store write batch. A session named again later in the batch runs
        those chunks afterwards, in order. Each chunk succeeds or fails alone: the list holds a
        StepResult or the error for each input."""
        if isinstance(batch, BatchPlan):
            inputs = batch.inputs
        else:  # a message of several is bounded before it runs; a single chunk, on its model, when read
            inputs = self.plan_batch(tenant, batch).inputs if len(batch) > 1 else batch
        sink = StepReplies(inputs)
        errors = await self.pipeline.run(tenant, Chunks.of_inputs(inputs, self.settings.max_reply_bytes), sink)
        return [errors[i] if i in errors else sink.results[i] for i in range(len(inputs))]

    async def step_packed(self, tenant: str, p: PackedInput) -> PackedResult:
        """A PackedStepBatch: its columns checked with numpy, then the pipeline (each chunk's equal-length
        peers on the same model version run as one block). Each chunk succeeds or fails alone."""
        lay = packed.layout(p, self.settings.max_batch_chunks)
        budget.check(self._packed_budget(p, lay.total), self.settings.max_reply_bytes)
        expected = lay.expected if lay.expected is not None else np.full(lay.n, -1, np.int64)
        chunks = Chunks(p.session_ids, PackedColumns(p, lay), expected, [p.activations] * lay.n, (), p.deadline,
                        declared_steps=lay.lengths)
        sink = PackedReplies(p, lay)
        return sink.finish(await self.pipeline.run(tenant, chunks, sink))

    async def advance(self, tenant: str, rec: SessionRecord, inp: StepInput, write: bool = True
                      ) -> tuple[SessionRecord, StepResult]:
        """One chunk from a record the caller read and holds locked (Generate, v2 sequences): the record
        after it and its reply. `write` False: nothing is stored (the caller stores the record, or drops it)."""
        sink = StepReplies([inp])
        chunks, errors = Chunks.of_inputs([inp], self.settings.max_reply_bytes), dict[int, Exception]()
        self.pipeline.plan(tenant, chunks, errors)
        if not errors:
            await self.pipeline.round(tenant, chunks, [0], sink, errors, records=[rec], write=write)
        if 0 in errors:
            raise errors[0]
        return sink.records[0], sink.results[0]

    # -- generation ----------------------------------------------------------
    def _check_generate(self, g: GenerateInput) -> None:
        if g.max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1")
        if g.max_tokens > self.settings.max_generate_tokens:
            raise LimitExceeded(f"max_tokens {g.max_tokens} is over the server's limit of "
                                f"{self.settings.max_generate_tokens}")
        if g.temperature < 0 or not np.isfinite(g.temperature):
            raise InvalidInput("temperature must be 0 (greedy) or more")
        if not 0 <= g.top_p <= 1 or g.top_k < 0:
            raise InvalidInput("top_p must be in [0, 1] and top_k 0 or more")
        if g.prompt and g.prompt_tokens:
            raise InvalidInput("give prompt or prompt_tokens, not both")
        steps = len(g.prompt) or len(g.prompt_tokens)
        budget.check(budget.reply_budget(self._widest_widths(), budget.Shape(1, steps, OutputOptions(compact=True),
                                                                             generated=g.max_tokens)),
                     self.settings.max_reply_bytes)

    async def generate(self, tenant: str, g: GenerateInput) -> AsyncGenerator[GeneratedToken, None]:
        """Sample tokens; each is fed back and stored before it is yielded, so a cancel leaves
        the session at the offset of the last token sent."""
        self._check_generate(g)
        stops = StopStrings(g.stop)  # built once: each token then costs work in its own length
        async with self.calls, self.locks.hold((tenant, _checked(g.session_id))):
            rec = await self.store.fresh(tenant, g.session_id)
            model = self.models.get(rec.model, rec.version)
            error = kind_error(model, "tokens")  # as Step says it
            if error is not None:
                raise error
            if model.head != "lm":
                raise InvalidInput(f"model {model.name} has a {model.head} head; Generate needs a language model")
            if g.expected_offset is not None and g.expected_offset != rec.offset:
                self.events.conflict(model.name, model.version, tenant)
                raise offset_mismatch(g.session_id, rec, g.expected_offset)
            if g.prompt or g.prompt_tokens:
                rec, _ = await self.advance(tenant, rec, StepInput(g.session_id, tokens=g.prompt_tokens, text=g.prompt,
                                                                   options=_COMPACT))
            if rec.last_logits is None:  # the last chunk's final step is always kept
                raise NoOutputYet(f"session {g.session_id} has consumed no token yet: give a prompt")
            rng = np.random.default_rng(g.seed)
            for i in range(g.max_tokens):
                token = sample(rec.last_logits[-1], rng, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
                rec, _ = await self.advance(tenant, rec, StepInput(g.session_id, tokens=[int(token)], options=_COMPACT))
                piece = model.decode_token(token)
                stopped = stops.feed(piece)
                last = stopped or i == g.max_tokens - 1
                reason = "stop" if stopped else "max_tokens" if last else ""
                yield GeneratedToken(token, piece, rec.offset, last, reason)
                if stopped:
                    return

    # -- moving and listing sessions (ExportSession, ImportSession, ListSessions) ----------
    async def export_session(self, tenant: str, session_id: str) -> bytes:
        """The session as a blob (service/blob.py), read after the chunks in flight have settled."""
        async with self.calls, self.locks.hold((tenant, _checked(session_id))):
            rec = await self.store.fresh(tenant, session_id)
        model = self.models.described(rec.model, rec.version)  # a version unloaded since is exported too
        return blob.encode(blob.ExportedSession(
            session_id=rec.session_id, model=rec.model, version=rec.version, model_sha256=model.sha256,
            offset=rec.offset, created_at=rec.created_at, updated_at=rec.updated_at, ttl=rec.ttl, state=rec.state,
            last_digest=rec.last_digest, last_start=rec.last_start, last_logits=rec.last_logits,
            last_prev_state=rec.last_prev_state, last_request=rec.last_request))

    async def import_session(self, tenant: str, data: bytes, session_id: str = "", force: bool = False
                             ) -> SessionView:
        """Recreate an exported session in `tenant` (under `session_id`, default its exported id) at
        its offset, with its replay record, so that a retry of its last chunk is replayed here. Its
        idle TTL starts again now (capped at --max-ttl)."""
        s = blob.decode(data)
        sid = _checked(session_id or s.session_id)
        model = self.models.get(s.model, s.version)
        blob.check_against(s, model, model.sha256, force)
        t = self.store.clock()
        rec = SessionRecord(tenant=tenant, session_id=sid, model=model.name, version=model.version, offset=s.offset,
                            created_at=s.created_at, updated_at=t, ttl=min(s.ttl, self.settings.max_ttl),
                            state=s.state, last_digest=s.last_digest, last_start=s.last_start,
                            last_logits=s.last_logits, last_prev_state=s.last_prev_state,
                            last_request=s.last_request)
        async with self.calls, self.locks.hold((tenant, sid)):
            await self.store_new(tenant, rec)
        self.events.created(model.name, model.version, tenant)
        log.info("session imported", extra={"session": sid, "model": model.name, "version": model.version,
                                            "offset": s.offset, "tenant": tenant})
        return self._view(rec)

    async def list_sessions(self, tenant: str, model: str = "", page_size: int = 0, page_token: str = ""
                            ) -> tuple[list[SessionSummary], str]:
        """A page of the tenant's live sessions ordered by id, and the token of the next page ("" at the end)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidInput(f"page_size must be between 0 (the default, {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}")
        after = ""
        if page_token:
            try:
                after = _checked(base64.urlsafe_b64decode(page_token.encode("ascii")).decode("ascii"))
            except (ValueError, InvalidInput):
                raise InvalidInput("page_token is not one ListSessions gave") from None
        size = page_size or DEFAULT_PAGE_SIZE
        page = await self.store.list_sessions(tenant, model, after, size + 1)
        more = len(page) > size
        page = page[:size]
        token = base64.urlsafe_b64encode(page[-1].session_id.encode()).decode() if more else ""
        return page, token
