"""The transport-free core: sessions and their rules.

Invariants (docs/architecture.md, "A session"): chunking is invisible; a chunk with expected_offset applies
only at that offset and a retry of the last applied chunk is replayed; one chunk at a
time per session, in arrival order; a reply only after the state is as durable as the
store promises; a refused request changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import numpy as np

from service import blob
from service.auth import NO_LIMITS, TenantLimits
from service.config import Settings
from service.core import budget, packed
from service.core.locks import CallGate, SessionLocks
from service.core.outputs import OutputOptions, StopStrings, sample, select_activations, step_outputs, top_k_of
from service.core.packed import PackedInput, PackedResult
from service.engine.engine import Engine
from service.errors import InvalidInput, LimitExceeded, NoOutputYet, OffsetMismatch, RecurError, StoreConflict
from service.repository.models import Model, ModelRepository, StateSpec
from service.store import SessionRecord, Store
from service.store.base import NO_EVENTS, Events, SessionSummary
from service.tracing import OFF, Tracing
from service.types import GeneratedToken, GenerateInput, NamedTensor, SessionView, StepInput, StepResult

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # ListSessions
_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def replay_key(request_id: str) -> str:
    """What a record keeps of a request id that is a replay key: the id, or the sha256 of a long one."""
    return request_id if len(request_id) <= 64 else hashlib.sha256(request_id.encode("utf-8", "replace")).hexdigest()


def _advanced(rec: SessionRecord, steps: int, digest: bytes, logits: np.ndarray, states: list[np.ndarray],
              t: float, max_replay_bytes: int, request: str = "") -> SessionRecord:
    """The record after a chunk of `steps` steps ran from its state, remembering the chunk for a replay:
    its outputs when they fit in `max_replay_bytes`, else the final step's and the state before it,
    from which a replay recomputes them."""
    if logits.nbytes <= max_replay_bytes:
        return rec.copy(offset=rec.offset + steps, updated_at=t, state=states, last_digest=digest,
                        last_start=rec.offset, last_logits=logits, last_prev_state=None, last_request=request)
    return rec.copy(offset=rec.offset + steps, updated_at=t, state=states, last_digest=digest,
                    last_start=rec.offset, last_logits=logits[-1:].copy(), last_prev_state=rec.state,
                    last_request=request)


class _PackedOutputs:
    """The packed reply's output rows (rows, classes), filled block by block; when one block covers
    every chunk in order, its logits are the rows as they are (no copy)."""

    def __init__(self, lay: packed.Layout, final_only: bool) -> None:
        self.lay, self.final_only = lay, final_only
        self.rows = lay.n if final_only else lay.total
        self.classes = 0
        self.logits: np.ndarray | None = None
        self.picks: list[tuple[str, int]] | None = None  # the activation tensors' (name, width) of the batch
        self.acts: list[np.ndarray] = []

    def accepts(self, model: Model) -> bool:
        if not self.classes:
            self.classes = model.classes
        return model.classes == self.classes

    def place(self, chunks: np.ndarray, logits: np.ndarray) -> None:
        """Chunks' logits (B, T, C) into their rows."""
        if self.final_only:
            part, rows = logits[:, -1], chunks
        else:
            part, rows = logits.reshape(-1, logits.shape[-1]), packed.rows_of(self.lay, chunks, logits.shape[1]).ravel()
        if self.logits is None:
            if len(rows) == self.rows and (self.final_only or len(chunks) == self.lay.n):
                self.logits = np.ascontiguousarray(part)  # the whole reply in order already
                return
            self.logits = np.zeros((self.rows, self.classes), np.float32)
        self.logits[rows] = part

    def accepts_activations(self, model: Model, picks: list[tuple[int, str, np.ndarray | None]]) -> bool:
        shape = [(name, model.activations[i].units if units is None else len(units)) for i, name, units in picks]
        if self.picks is None:
            self.picks = shape
            self.acts = [np.zeros((self.rows, width), np.float32) for _, width in shape]
        return shape == self.picks

    def place_activations(self, chunks: np.ndarray, picks: list[tuple[int, str, np.ndarray | None]],
                          acts: list[np.ndarray]) -> None:
        """Chunks' activations (each (B, T, H), the model's order) into their rows, as selected."""
        steps = acts[0].shape[1]
        rows = chunks if self.final_only else packed.rows_of(self.lay, chunks, steps).ravel()
        for out, (i, _, units) in zip(self.acts, picks):
            a = acts[i][:, -1] if self.final_only else acts[i].reshape(-1, acts[i].shape[-1])
            out[rows] = a if units is None else a[:, units]

    def _failed_rows(self, errors: dict[int, Exception]) -> np.ndarray:
        """The output rows of the refused chunks."""
        failed = np.fromiter(errors, np.int64, len(errors))
        if self.final_only or not len(failed):
            return failed
        return np.concatenate([np.arange(self.lay.starts[i], self.lay.starts[i] + self.lay.lengths[i])
                               for i in failed.tolist()])

    def named_activations(self, errors: dict[int, Exception]) -> list[NamedTensor]:
        if self.picks is None:
            return []
        if errors:
            rows = self._failed_rows(errors)
            for a in self.acts:
                a[rows] = 0
        return [NamedTensor(name, a) for (name, _), a in zip(self.picks, self.acts)]

    def finish(self, errors: dict[int, Exception], keep_logits: bool) -> tuple[np.ndarray, np.ndarray]:
        """argmax (rows,) int32 and the logits, refused chunks' rows cleared (argmax -1, zeros)."""
        logits = self.logits if self.logits is not None else np.zeros((self.rows, self.classes), np.float32)
        argmax = logits.argmax(axis=-1).astype(np.int32) if self.classes else np.full(self.rows, -1, np.int32)
        if errors:
            rows = self._failed_rows(errors)
            argmax[rows] = -1
            if keep_logits and len(rows):
                logits = logits.copy() if logits.base is not None else logits
                logits[rows] = 0
        return argmax, logits


@dataclass(frozen=True)
class BatchPlan:
    """A StepBatch planned: its chunks and the bytes its reply can hold (within --max-reply-bytes)."""

    inputs: list[StepInput]
    reply_bytes: int


class VersionMismatch(RecurError):
    code = "FAILED_PRECONDITION"


class VersionInUse(RecurError):
    code = "FAILED_PRECONDITION"


def _specs_str(specs: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{n} [{layers}, {hidden}]" for n, layers, hidden in specs) or "none"


def _checked(session_id: str) -> str:
    """A session id as given, if it is one (never echoed when it is not: it may be huge)."""
    if not _ID.fullmatch(session_id):
        raise InvalidInput("session_id must be 1-128 characters of letters, digits and . _ : @ -")
    return session_id


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
        self._locks = SessionLocks()
        self._calls = CallGate()
        self._widest: tuple[list[Model], budget.Widths] = ([], budget.Widths())

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
        """A StepBatch's chunks with their reply budget, refused whole (RESOURCE_EXHAUSTED) when over it."""
        size = self.reply_bytes(tenant, inputs)
        budget.check(budget.Budget(sum(len(i.tokens) or len(i.text) or len(i.features) // 4 for i in inputs), size),
                     self.settings.max_reply_bytes)
        return BatchPlan(inputs, size)

    def packed_reply_bytes(self, p: PackedInput) -> int:
        """As reply_bytes, for a packed batch (one columnar reply)."""
        return self._packed_budget(p, sum(p.lengths)).bytes

    def _packed_budget(self, p: PackedInput, steps: int) -> budget.Budget:
        options = OutputOptions(top_k=p.top_k, return_logits=p.return_logits, final_only=p.final_only, compact=True,
                                activations=p.activations)
        return budget.reply_budget(self._widest_widths(), budget.Shape(len(p.session_ids), steps, options,
                                                                       columnar=True))

    async def close(self) -> None:
        await self.engine.close()

    async def drain(self, timeout: float) -> None:
        """Refuse new work and wait up to `timeout` seconds for calls in flight."""
        if not await self._calls.close(timeout):
            log.warning("%d calls still in flight after %.0f s", self._calls.in_flight, timeout)

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

    async def _store_new(self, tenant: str, rec: SessionRecord) -> None:
        """Create atomically within the server's and the tenant's session limits."""
        await self.store.create(rec, max_sessions=self.settings.max_sessions,
                                max_tenant_sessions=self._limits(tenant).max_sessions)

    async def create(self, tenant: str, model_name: str, version: int, session_id: str = "", ttl: float = 0,
                     initial_state: list[NamedTensor] | None = None) -> SessionView:
        model = self.models.get(model_name, version)
        sid, ttl = self._new_id(session_id), self._ttl(ttl)
        state = self._initial_state(model, initial_state) if initial_state else model.zero_state()
        t = self.store.clock()
        rec = SessionRecord(tenant, sid, model.name, model.version, 0, t, t, ttl, state)
        async with self._calls:
            await self._store_new(tenant, rec)
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
        async with self._locks.hold((tenant, _checked(session_id))):  # after the chunks in flight: settled
            rec = await self.store.fresh(tenant, session_id)
        # the state's names: of the version, even one unloaded since (its shapes are kept)
        specs = self.models.state_specs(rec.model, rec.version) if include_state else None
        return self._view(rec, specs, include_state)

    async def delete(self, tenant: str, session_id: str) -> None:
        async with self._calls, self._locks.hold((tenant, _checked(session_id))):
            await self.store.delete(tenant, session_id)
        self.events.deleted(tenant)
        log.info("session deleted", extra={"session": session_id, "tenant": tenant})

    async def fork(self, tenant: str, session_id: str, new_id: str = "", ttl: float = 0) -> SessionView:
        sid, ttl = self._new_id(new_id), self._ttl(ttl)
        async with self._calls, self._locks.hold((tenant, _checked(session_id))):
            src = await self.store.fresh(tenant, session_id)
            self.models.get(src.model, src.version)  # refused when that version was unloaded
            t = self.store.clock()
            rec = src.copy(session_id=sid, created_at=t, updated_at=t, ttl=ttl,
                           state=[s.copy() for s in src.state])
            await self._store_new(tenant, rec)
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
        async with self._calls, self._locks.hold((tenant, _checked(session_id))):
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
                raise self._conflict(e, session_id) from e
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

    # -- steps ---------------------------------------------------------------
    def _chunk(self, model: Model, inp: StepInput, max_chunk: int) -> tuple[np.ndarray, bytes]:
        """The chunk as the graph's input (1, T[, D]) and a digest of its content. Sizes are
        checked before any per-element work; the rest is vectorised."""
        given = [n for n, v in (("tokens", inp.tokens), ("text", inp.text), ("features", inp.features)) if len(v)]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one non-empty input (tokens, text or features); got {given or 'none'}")
        kind = given[0]
        if model.input_kind == "tokens" and kind == "features":
            raise InvalidInput(f"model {model.name} takes tokens or text, not features")
        if model.input_kind == "features" and kind != "features":
            raise InvalidInput(f"model {model.name} takes features (float32 [time, {model.feature_dim}]), not {kind}")
        row = 4 * model.feature_dim
        steps = len(inp.features) // row if kind == "features" else len(inp.tokens) if kind == "tokens" else \
            len(inp.text)
        if steps > max_chunk:
            raise InvalidInput(f"chunk of {steps} steps is longer than the limit of {max_chunk}; "
                               "split it into smaller chunks")
        budget.check(budget.reply_budget(budget.widths_of(model), budget.Shape(1, steps, inp.options)),
                     self.settings.max_reply_bytes)
        if kind == "features":
            if len(inp.features) % row:
                raise InvalidInput(f"features must be little-endian float32 [time, {model.feature_dim}]: "
                                   f"{len(inp.features)} bytes is not a multiple of {row}")
            x: np.ndarray = np.frombuffer(inp.features, dtype="<f4").reshape(1, -1, model.feature_dim)
            x = x.astype(np.float32)
            if not np.isfinite(x).all():
                raise InvalidInput("features contain values that are not finite (NaN or infinity)")
        else:
            if kind == "text":
                ids = model.encode(inp.text)
            elif min(inp.tokens) < 0 or max(inp.tokens) >= len(model.vocab):  # C loops, no array for a small chunk
                ids = np.asarray(inp.tokens, dtype=np.int64)
                pos = int(np.argmax((ids < 0) | (ids >= len(model.vocab))))
                raise InvalidInput(f"token id {ids[pos]} at position {pos} is out of range "
                                   f"[0, {len(model.vocab)}) for model {model.name}")
            else:
                ids = np.array(inp.tokens, dtype=np.int64)
            x = ids.reshape(1, -1)
        return x, hashlib.sha256(x.tobytes()).digest()

    async def _advance(self, model: Model, rec: SessionRecord, x: np.ndarray, digest: bytes,
                       deadline: float | None = None, activations: bool = False, request: str = ""
                       ) -> tuple[SessionRecord, np.ndarray, list[np.ndarray] | None]:
        """Run one chunk from the record's state and store the result (compare-and-set); the new
        record, the chunk's logits (T, C), and with `activations` the model's per-step activations
        (each (T, H)). A chunk run for its activations keeps the state before it, so that a replay
        can recompute them."""
        acts = None
        max_replay = self.settings.max_replay_bytes
        if activations:
            logits, new_states, acts = await self._run_with_activations(model, x, rec.state, deadline)
            max_replay = -1
        else:
            with self.tracing.span("recur.engine", rows=x.shape[1]):
                logits, new_states = await self.engine.run(model.runtime, x[0], rec.state, deadline)  # batched
        new = _advanced(rec, x.shape[1], digest, logits, new_states, self.store.clock(), max_replay, request)
        try:
            with self.tracing.span("recur.store.write"):
                await self.store.put(new, prev_offset=rec.offset)  # settles even if this call is cancelled
        except StoreConflict as e:
            self.events.conflict(model.name, model.version, rec.tenant)
            raise self._conflict(e, rec.session_id) from e
        return new, logits, acts

    @staticmethod
    def _conflict(e: StoreConflict, session_id: str) -> OffsetMismatch:
        where = f"it is at offset {e.actual}" if e.actual is not None else "read it again for its offset"
        return OffsetMismatch(f"session {session_id} was advanced elsewhere; {where}",
                              e.actual if e.actual is not None else -1)

    def _result(self, model: Model, rec: SessionRecord, logits: np.ndarray, options: OutputOptions,
                replayed: bool, acts: list[np.ndarray] | None = None) -> StepResult:
        activations = None
        if options.activations is not None and acts is not None:
            activations = []
            for i, name, units in select_activations(model, options.activations):
                a = acts[i][-1:] if options.final_only else acts[i]
                activations.append(NamedTensor(name, a if units is None else a[:, units]))
        if options.final_only:
            logits = logits[-1:]
        argmax = logits.argmax(axis=-1).tolist()
        outputs = [] if options.compact else step_outputs(model, logits, options.top_k)
        text = "".join(model.decode_token(a) for a in argmax) if model.head == "lm" else ""
        state = [NamedTensor(s.name, v) for s, v in zip(model.states, rec.state)] if options.return_state else None
        return StepResult(rec.session_id, rec.last_start, rec.offset, replayed, argmax, outputs, text,
                          logits if options.return_logits else None, state, activations)

    async def _prepare(self, tenant: str, inp: StepInput, rec: SessionRecord | None = None, fresh: bool = False
                       ) -> tuple[Model, SessionRecord, np.ndarray, bytes] | StepResult:
        """Validate a chunk against its session (held locked): what to run, or the replayed reply.
        `fresh`: the record was read from the store itself, not from a replica-local hint."""
        if inp.options.top_k < 0:
            raise InvalidInput("top_k must be 0 or more")
        if rec is None:
            with self.tracing.span("recur.store.read", tenant):
                rec = await self.store.get(tenant, _checked(inp.session_id))
        model = self.models.get(rec.model, rec.version)
        if inp.options.activations is not None:
            select_activations(model, inp.options.activations)  # refused before anything runs
        x, digest = self._chunk(model, inp, self._max_chunk(tenant))
        expected = inp.expected_offset
        if (inp.replay_key and expected is None and rec.last_start >= 0
                and replay_key(inp.replay_key) == rec.last_request):
            expected = rec.last_start  # the retry of the chunk this request id applied last
        if expected is not None and expected != rec.offset and self.store.hints and not fresh:
            return await self._prepare(tenant, inp, await self.store.fresh(tenant, inp.session_id), fresh=True)
        if expected is not None and expected != rec.offset:
            if expected == rec.last_start and digest == rec.last_digest:
                self.events.replayed(model.name, model.version, tenant)
                if inp.options.activations is not None:
                    logits, acts = await self._replayed_activations(model, rec, x, inp.deadline)
                    return self._result(model, rec, logits, inp.options, replayed=True, acts=acts)
                return self._result(model, rec, await self._replayed_logits(model, rec, x, inp.deadline),
                                    inp.options, replayed=True)
            self.events.conflict(model.name, model.version, tenant)
            if expected != inp.expected_offset:
                raise OffsetMismatch(f"request id {inp.replay_key[:64]!r} was last applied to session {inp.session_id} "
                                     f"at offset {rec.last_start} with other inputs; give each request its own id",
                                     rec.offset)
            raise OffsetMismatch(f"session {inp.session_id} is at offset {rec.offset}, "
                                 f"not {inp.expected_offset}; resend from offset {rec.offset}", rec.offset)
        return model, rec, x, digest

    async def _replayed_logits(self, model: Model, rec: SessionRecord, x: np.ndarray, deadline: float | None
                               ) -> np.ndarray:
        """The last chunk's outputs: as recorded, or recomputed from the state before it (the retry
        carries the same chunk, checked by its digest); nothing is stored."""
        if rec.last_prev_state is None:
            assert rec.last_logits is not None
            return rec.last_logits
        logits, _ = await self.engine.run(model.runtime, x[0], rec.last_prev_state, deadline)
        return logits

    async def _replayed_activations(self, model: Model, rec: SessionRecord, x: np.ndarray, deadline: float | None
                                    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """A replay's logits and activations, recomputed from the state before the chunk."""
        if rec.last_prev_state is None:
            raise NoOutputYet(f"session {rec.session_id}'s last chunk was applied without return_activations, so "
                              "its activations were not kept; its retry cannot return them")
        logits, _, acts = await self._run_with_activations(model, x, rec.last_prev_state, deadline)
        return logits, acts

    async def _run_with_activations(self, model: Model, x: np.ndarray, state: list[np.ndarray], deadline: float | None
                                    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """One chunk x (1, T[, D]) from `state` on the activation graph, as a block of one: its logits
        (T, C), new state (each (L, H)) and activations (each (T, H))."""
        logits, states, acts = await self.engine.submit_block(model.runtime, x, [s[:, None] for s in state], deadline,
                                                              activations=True)
        return logits[0], [np.ascontiguousarray(s[:, 0]) for s in states], [a[0] for a in acts]

    async def step(self, tenant: str, inp: StepInput) -> StepResult:
        async with self._calls, self._locks.hold((tenant, inp.session_id)):
            with self.tracing.span("recur.plan", tenant, session=inp.session_id):
                prepared = await self._prepare(tenant, inp)
            if isinstance(prepared, StepResult):
                return prepared
            model, rec, x, digest = prepared
            try:
                rec, logits, acts = await self._advance(model, rec, x, digest, inp.deadline,
                                                        inp.options.activations is not None, replay_key(inp.replay_key))
            except OffsetMismatch:
                if not self.store.hints:
                    raise
                # the session was read from a hint another replica made stale: decide on what is stored
                prepared = await self._prepare(tenant, inp, await self.store.fresh(tenant, inp.session_id), fresh=True)
                if isinstance(prepared, StepResult):
                    return prepared
                model, rec, x, digest = prepared
                rec, logits, acts = await self._advance(model, rec, x, digest, inp.deadline,
                                                        inp.options.activations is not None, replay_key(inp.replay_key))
            return self._result(model, rec, logits, inp.options, replayed=False, acts=acts)

    async def step_batch(self, tenant: str, batch: BatchPlan | list[StepInput]) -> list[StepResult | Exception]:
        """Many sessions' chunks as one unit: each session locked once (all its locks' queues joined at
        once, so batches keep arrival order and cannot deadlock), one engine submission, one store
        write batch. A session named again later in the batch runs those chunks afterwards, in order.
        Each chunk succeeds or fails alone: the result list holds a StepResult or the error for each input."""
        inputs = (batch if isinstance(batch, BatchPlan) else self.plan_batch(tenant, batch)).inputs
        out: dict[int, StepResult | Exception] = {}
        first: list[int] = []
        later: list[int] = []
        seen: set[str] = set()
        for i, inp in enumerate(inputs):
            try:
                _checked(inp.session_id)
            except InvalidInput as e:
                out[i] = e
                continue
            # a chunk asking for activations runs on its own afterwards (the activation graph)
            (later if inp.session_id in seen or inp.options.activations is not None else first).append(i)
            seen.add(inp.session_id)
        async with self._calls, self._locks.hold_many([(tenant, inputs[i].session_id) for i in first]):
            await self._step_many(tenant, inputs, first, out)
        if self.store.hints:  # a stale hint's conflict: again on its own, reading what is stored
            retry = [i for i in first if isinstance(out[i], OffsetMismatch)]
            later = sorted(later + retry)
        for i in later:
            try:
                out[i] = await self.step(tenant, inputs[i])
            except Exception as e:
                out[i] = e
        return [out[i] for i in range(len(inputs))]

    async def _step_many(self, tenant: str, inputs: list[StepInput], indices: list[int],
                         out: dict[int, StepResult | Exception]) -> None:
        jobs = []
        with self.tracing.span("recur.store.read", tenant, rows=len(indices)):
            records = await self.store.get_many(tenant, [inputs[i].session_id for i in indices])
        for i, rec in zip(indices, records):
            if isinstance(rec, Exception):
                out[i] = rec
                continue
            try:
                prepared = await self._prepare(tenant, inputs[i], rec)
            except Exception as e:
                out[i] = e
                continue
            if isinstance(prepared, StepResult):
                out[i] = prepared
            else:
                jobs.append((i, *prepared))
        with self.tracing.span("recur.engine", rows=sum(x.shape[1] for *_, x, _ in jobs)):
            ran = await asyncio.gather(*(self._submit(model, rec, x, inputs[i].deadline)
                                         for i, model, rec, x, _ in jobs), return_exceptions=True)
        writes, done = [], []
        t = self.store.clock()
        for (i, model, rec, x, digest), result in zip(jobs, ran):
            if isinstance(result, BaseException):
                out[i] = result if isinstance(result, Exception) else RuntimeError("cancelled")
                continue
            logits, new_states = result
            new = _advanced(rec, x.shape[1], digest, logits, new_states, t, self.settings.max_replay_bytes,
                            replay_key(inputs[i].replay_key))
            writes.append((new, rec.offset))
            done.append((i, model, new, logits))
        with self.tracing.span("recur.store.write", rows=len(writes)):
            errors = await self.store.put_many(writes)
        for (i, model, new, logits), err in zip(done, errors):
            if err is None:
                out[i] = self._result(model, new, logits, inputs[i].options, replayed=False)
            else:
                if isinstance(err, StoreConflict):
                    self.events.conflict(model.name, model.version, tenant)
                out[i] = self._conflict(err, new.session_id) if isinstance(err, StoreConflict) else err

    # -- the packed (columnar) batch ---------------------------------------------------
    async def step_packed(self, tenant: str, p: PackedInput) -> PackedResult:
        """A PackedStepBatch: one pass of Python over the chunks (id, lock, record, offset, digest),
        numpy for the rest; each chunk's equal-length peers on the same model version run as one
        block. A session named again runs in a later round, so its chunks apply in order. Each
        chunk succeeds or fails alone (PackedResult.errors)."""
        lay = packed.layout(p, self.settings.max_batch_chunks)
        budget.check(self._packed_budget(p, lay.total), self.settings.max_reply_bytes)
        n = lay.n
        res = PackedResult(np.full(n, -1, np.int64), np.full(n, -1, np.int64))
        errors = res.errors
        max_chunk = self._max_chunk(tenant)
        for i in np.flatnonzero((lay.lengths == 0) | (lay.lengths > max_chunk)).tolist():
            steps = int(lay.lengths[i])
            errors[i] = InvalidInput("a chunk needs 1 step or more" if steps == 0 else
                                     f"chunk of {steps} steps is longer than the limit of {max_chunk}; "
                                     "split it into smaller chunks")
        if lay.expected is not None:
            for i in np.flatnonzero(lay.expected < -1).tolist():
                errors[i] = InvalidInput("expected_offsets must be 0 or more, or -1 (not checked)")
        rounds: list[list[int]] = [[]]
        seen: dict[str, int] = {}
        for i, sid in enumerate(p.session_ids):
            if i in errors:
                continue
            if not _ID.fullmatch(sid):
                errors[i] = InvalidInput("session_id must be 1-128 characters of letters, digits and . _ : @ -")
                continue
            k = seen.get(sid, 0)
            seen[sid] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        out = _PackedOutputs(lay, p.final_only)
        async with self._calls:
            for chunks in rounds:
                if chunks:
                    async with self._locks.hold_many([(tenant, p.session_ids[i]) for i in chunks]):
                        stale = await self._packed_round(tenant, p, lay, chunks, res, out)
                        if stale:  # read from hints another replica made stale: again, from the store
                            await self._packed_round(tenant, p, lay, stale, res, out, fresh=True)
        if p.activations is not None:
            res.activations = out.named_activations(errors)
        res.argmax, res.logits = out.finish(errors, p.return_logits)
        if p.top_k and res.logits is not None and out.classes:
            res.top_ids, res.top_probs = top_k_of(res.logits, p.top_k)
        if not p.return_logits:
            res.logits = None
        return res

    async def _packed_round(self, tenant: str, p: PackedInput, lay: packed.Layout, chunks: list[int],
                            res: PackedResult, out: _PackedOutputs, fresh: bool = False) -> list[int]:
        """One round of distinct sessions. Returns the chunks to run again from `fresh` reads: those whose
        offset disagreed with a replica-local hint, or whose compare-and-set failed on one."""
        errors = res.errors
        stale: list[int] = []
        retry = self.store.hints and not fresh
        if fresh:
            records: list[SessionRecord | Exception] = []
            for i in chunks:
                try:
                    records.append(await self.store.fresh(tenant, p.session_ids[i]))
                except RecurError as e:
                    records.append(e)
        else:
            with self.tracing.span("recur.store.read", tenant, rows=len(chunks)):
                records = await self.store.get_many(tenant, [p.session_ids[i] for i in chunks])
        models: dict[tuple[str, int], Model | Exception] = {}
        bad_tokens: dict[int, dict[int, tuple[int, int]]] = {}
        features: dict[int, np.ndarray | Exception] = {}
        runs: dict[tuple[int, int], list[tuple[int, Model, SessionRecord, bytes]]] = {}
        picks: dict[int, list[tuple[int, str, np.ndarray | None]] | Exception] = {}
        for i, rec in zip(chunks, records):
            if isinstance(rec, Exception):
                errors[i] = rec
                continue
            model = models.get((rec.model, rec.version))
            if model is None:
                try:
                    model = self.models.get(rec.model, rec.version)
                except RecurError as e:
                    model = e
                models[(rec.model, rec.version)] = model
            if isinstance(model, Exception):
                errors[i] = model
                continue
            a, steps = int(lay.starts[i]), int(lay.lengths[i])
            if model.input_kind != lay.kind:
                errors[i] = InvalidInput(f"model {model.name} takes {model.input_kind}, not {lay.kind or 'nothing'}")
                continue
            if lay.ids is not None:
                bad = bad_tokens.get(len(model.vocab))
                if bad is None:
                    bad = bad_tokens[len(model.vocab)] = packed.first_bad_token(lay, len(model.vocab))
                if i in bad:
                    pos, tok = bad[i]
                    errors[i] = InvalidInput(f"token id {tok} at position {pos} is out of range "
                                             f"[0, {len(model.vocab)}) for model {model.name}")
                    continue
                data = lay.ids[a : a + steps]
            else:
                rows = features.get(model.feature_dim)
                if rows is None:
                    try:
                        rows = packed.features_of(p, lay, model.feature_dim)
                    except InvalidInput as e:
                        rows = e
                    features[model.feature_dim] = rows
                if isinstance(rows, Exception):
                    errors[i] = rows
                    continue
                data = rows[a : a + steps]
                if not np.isfinite(data).all():
                    errors[i] = InvalidInput("features contain values that are not finite (NaN or infinity)")
                    continue
            if not out.accepts(model):
                errors[i] = InvalidInput(f"a packed batch has one output width: model {model.name} has "
                                         f"{model.classes} outputs, the batch's first model {out.classes}")
                continue
            if p.activations is not None:
                chosen = picks.get(id(model))
                if chosen is None:
                    try:
                        chosen = select_activations(model, p.activations)
                    except RecurError as e:
                        chosen = e
                    picks[id(model)] = chosen
                if isinstance(chosen, Exception):
                    errors[i] = chosen
                    continue
                if not out.accepts_activations(model, chosen):
                    errors[i] = InvalidInput(f"a packed batch has one activation layout: model {model.name}'s "
                                             "selected activations differ from the batch's first model's")
                    continue
            digest = hashlib.sha256(data.tobytes()).digest()
            expected = -1 if lay.expected is None else int(lay.expected[i])
            if expected >= 0 and expected != rec.offset and retry:
                stale.append(i)
                continue
            if expected >= 0 and expected != rec.offset:
                if expected == rec.last_start and digest == rec.last_digest:
                    self.events.replayed(model.name, model.version, tenant)
                    try:
                        if p.activations is not None:
                            logits, acts = await self._replayed_activations(model, rec, data[None], p.deadline)
                            chosen = picks[id(model)]
                            assert not isinstance(chosen, Exception)
                            out.place_activations(np.array([i]), chosen, [a[None] for a in acts])
                        else:
                            logits = await self._replayed_logits(model, rec, data[None], p.deadline)
                    except Exception as e:
                        errors[i] = e
                        continue
                    out.place(np.array([i]), logits[None])
                    res.offsets[i], res.start_offsets[i] = rec.offset, rec.last_start
                    res.replayed.append(i)
                    continue
                self.events.conflict(model.name, model.version, tenant)
                errors[i] = OffsetMismatch(f"session {p.session_ids[i]} is at offset {rec.offset}, not {expected}; "
                                           f"resend from offset {rec.offset}", rec.offset)
                res.offsets[i] = rec.offset
                continue
            runs.setdefault((id(model), steps), []).append((i, model, rec, digest))
        submitted = []
        for (_, steps), items in runs.items():
            idx = np.fromiter((i for i, *_ in items), np.int64, len(items))
            model = items[0][1]
            if lay.ids is not None:
                if len(items) == lay.n and steps * lay.n == lay.total:  # every chunk, in order: no gather
                    x = lay.ids.reshape(lay.n, steps)
                else:
                    x = lay.ids[packed.rows_of(lay, idx, steps)]
            else:
                rows = features[model.feature_dim]
                assert isinstance(rows, np.ndarray)
                x = rows[packed.rows_of(lay, idx, steps)]
            states = [np.stack([rec.state[k] for _, _, rec, _ in items], axis=1) for k in range(len(model.states))]
            try:
                submitted.append((items, idx, steps, self.engine.submit_block(model.runtime, x, states, p.deadline,
                                                                              p.activations is not None)))
            except LimitExceeded as e:
                for i, *_ in items:
                    errors[i] = e
        with self.tracing.span("recur.engine", rows=sum(len(items) * steps for items, _, steps, _ in submitted)):
            ran = await asyncio.gather(*(f for *_, f in submitted), return_exceptions=True)
        writes, done = [], []
        t = self.store.clock()
        max_replay = self.settings.max_replay_bytes if p.activations is None else -1  # replays recompute them
        for (items, idx, steps, _), result in zip(submitted, ran):
            if isinstance(result, BaseException):
                for i, *_ in items:
                    errors[i] = result if isinstance(result, Exception) else RuntimeError("cancelled")
                continue
            logits, new_states = result[0], result[1]
            if p.activations is not None:
                chosen = picks[id(items[0][1])]
                assert not isinstance(chosen, Exception)
                out.place_activations(idx, chosen, result[2])
            for j, (i, model, rec, digest) in enumerate(items):
                own = logits[j]
                own = own.copy() if own.nbytes <= max_replay else own  # a view would pin the whole batch
                new = _advanced(rec, steps, digest, own, [np.ascontiguousarray(s[:, j]) for s in new_states], t,
                                max_replay)
                writes.append((new, rec.offset))
                done.append((i, model, new))
            out.place(idx, logits)
        with self.tracing.span("recur.store.write", rows=len(writes)):
            stored = await self.store.put_many(writes)
        for (i, model, new), err in zip(done, stored):
            if err is None:
                res.offsets[i], res.start_offsets[i] = new.offset, new.last_start
            elif isinstance(err, StoreConflict) and retry:
                stale.append(i)
            elif isinstance(err, StoreConflict):
                self.events.conflict(model.name, model.version, tenant)
                errors[i] = self._conflict(err, new.session_id)
                res.offsets[i] = -1 if err.actual is None else err.actual
            else:
                errors[i] = err
        return sorted(stale)

    async def _submit(self, model: Model, rec: SessionRecord, x: np.ndarray, deadline: float | None
                      ) -> tuple[np.ndarray, list[np.ndarray]]:
        return await self.engine.submit(model.runtime, x[0], rec.state, deadline)

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
        async with self._calls, self._locks.hold((tenant, _checked(g.session_id))):
            rec = await self.store.fresh(tenant, g.session_id)
            model = self.models.get(rec.model, rec.version)
            if model.head != "lm":
                raise InvalidInput(f"model {model.name} has a {model.head} head; Generate needs a language model")
            if g.expected_offset is not None and g.expected_offset != rec.offset:
                self.events.conflict(model.name, model.version, tenant)
                raise OffsetMismatch(f"session {g.session_id} is at offset {rec.offset}, not {g.expected_offset}",
                                     rec.offset)
            if g.prompt or g.prompt_tokens:
                x, digest = self._chunk(model, StepInput(g.session_id, tokens=g.prompt_tokens, text=g.prompt),
                                        self._max_chunk(tenant))
                rec, _, _ = await self._advance(model, rec, x, digest)
            if rec.last_logits is None:  # the last chunk's final step is always kept
                raise NoOutputYet(f"session {g.session_id} has consumed no token yet: give a prompt")
            rng = np.random.default_rng(g.seed)
            for i in range(g.max_tokens):
                token = sample(rec.last_logits[-1], rng, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
                x = np.array([[token]], dtype=np.int64)
                rec, _, _ = await self._advance(model, rec, x, hashlib.sha256(x.tobytes()).digest())
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
        async with self._calls, self._locks.hold((tenant, _checked(session_id))):
            rec = await self.store.fresh(tenant, session_id)
        model = self.models.described(rec.model, rec.version)  # a version unloaded since is exported too
        return blob.encode(blob.ExportedSession(
            rec.session_id, rec.model, rec.version, model.sha256, rec.offset, rec.created_at, rec.updated_at,
            rec.ttl, rec.state, rec.last_digest, rec.last_start, rec.last_logits, rec.last_prev_state,
            rec.last_request))

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
        rec = SessionRecord(tenant, sid, model.name, model.version, s.offset, s.created_at, t,
                            min(s.ttl, self.settings.max_ttl), s.state, s.last_digest, s.last_start, s.last_logits,
                            s.last_prev_state, s.last_request)
        async with self._calls, self._locks.hold((tenant, sid)):
            await self._store_new(tenant, rec)
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
