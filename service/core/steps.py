"""The chunk pipeline: every entry point's chunks (Step, StepBatch, StreamBatch, the packed batch, v2
requests, Generate) go through it, so each rule is written once (docs/architecture.md, "The chunk
pipeline"):

- plan: what needs no session: ids, offsets given, top_k, lengths where declared, and the rounds (a
  session named again runs in a later round, so its chunks apply in order); a message's reply
  budget is checked by its entry point before;
- per round, under the sessions' locks: read the records, then per chunk its model, input (kind,
  length, token range, finite features, its reply budget on its model), activation selection and
  the reply's shape rules, and the offset decision: run, replay, refuse, or read again (a
  replica-local hint was stale);
- run: chunks of one model version, length and graph as one block through the engine;
- commit: the store's compare-and-set results: done, conflict, or stale (read again, run again).

The inputs come as columns (`Columns`): the packed batch's are native; Step and StepBatch adapt a
list of StepInput. Results go to a `Sink`, which shapes the reply of its RPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.config import Settings
from service.core import budget, packed
from service.core.locks import CallGate, SessionLocks
from service.core.outputs import ActivationRequest, select_activations
from service.engine.engine import Engine
from service.errors import InvalidInput, NoOutputYet, OffsetMismatch, RecurError, StoreConflict
from service.repository.models import Model, ModelRepository
from service.store import SessionRecord, Store
from service.store.base import Events
from service.store.table import Loc, Rows, RowWrite
from service.tracing import Tracing
from service.types import StepInput

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
Picks = list[tuple[int, str, np.ndarray | None]]  # selected activations: (index, name, units or all)
# Rounds of fewer chunks take the record round over a session table too: numpy's cost per call on
# arrays of a few rows is more than the record round's per-chunk work (in process, Python's µs per
# chunk by records / rows: S = 1 a Step 348 / 407 µs in all, S = 2 170 / 177, S = 4 97 / 90,
# S = 8 62 / 49, S = 16 39 / 27). tests/core sets it to 1 on the memory store: every round by rows.
ROW_ROUND_MIN = 4


def checked_id(session_id: str) -> str:
    """A session id as given, if it is one (never echoed when it is not: it may be huge)."""
    if not _ID.fullmatch(session_id):
        raise InvalidInput("session_id must be 1-128 characters of letters, digits and . _ : @ -")
    return session_id


def replay_key(request_id: str) -> str:
    """What a record keeps of a request id that is a replay key: the id, or the sha256 of a long one."""
    return request_id if len(request_id) <= 64 else hashlib.sha256(request_id.encode("utf-8", "replace")).hexdigest()


# -- the input rules, each once ------------------------------------------------------------------
def steps_error(steps: int, max_chunk: int) -> InvalidInput | None:
    if steps == 0:
        return InvalidInput("a chunk needs 1 step or more")
    if steps > max_chunk:
        return InvalidInput(f"chunk of {steps} steps is longer than the limit of {max_chunk}; "
                            "split it into smaller chunks")
    return None


def kind_error(model: Model, kind: str) -> InvalidInput | None:
    if model.input_kind == "tokens" and kind == "features":
        return InvalidInput(f"model {model.name} takes tokens or text, not features")
    if model.input_kind == "features" and kind != "features":
        return InvalidInput(f"model {model.name} takes features (float32 [time, {model.feature_dim}]), not "
                            f"{kind or 'nothing'}")
    return None


def token_error(model: Model, position: int, token: int) -> InvalidInput:
    return InvalidInput(f"token id {token} at position {position} is out of range [0, {len(model.vocab)}) "
                        f"for model {model.name}")


def feature_bytes_error(model: Model, size: int) -> InvalidInput | None:
    row = 4 * model.feature_dim
    if size % row:
        return InvalidInput(f"features must be little-endian float32 [time, {model.feature_dim}]: "
                            f"{size} bytes is not a multiple of {row}")
    return None


NOT_FINITE = "features contain values that are not finite (NaN or infinity)"
NEGATIVE_TOP_K = "top_k must be 0 or more"


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


# -- the inputs as columns -----------------------------------------------------------------------
class Columns:
    """A message's chunk inputs. `chunk` checks chunk i against its model and gives it as the graph
    takes it, (T,) int64 or (T, D) float32; `gather` stacks chunks of one length into a block."""

    def chunk(self, i: int, model: Model, max_chunk: int) -> np.ndarray:
        raise NotImplementedError

    def gather(self, chunks: list[int], xs: list[np.ndarray], model: Model) -> np.ndarray:
        return np.stack(xs)

    def chunks(self, at: list[int], model: Model, max_chunk: int, errors: dict[int, Exception]
               ) -> list[np.ndarray | None]:
        """`chunk` for each of `at`: None where refused (its error put in `errors`)."""
        out: list[np.ndarray | None] = []
        for i in at:
            try:
                out.append(self.chunk(i, model, max_chunk))
            except RecurError as e:
                errors[i] = e
                out.append(None)
        return out


class InputColumns(Columns):
    """Step and StepBatch: a list of StepInput, each with tokens, text or features."""

    def __init__(self, inputs: Sequence[StepInput], max_reply_bytes: int) -> None:
        self.inputs, self.max_reply_bytes = inputs, max_reply_bytes

    def chunk(self, i: int, model: Model, max_chunk: int) -> np.ndarray:
        inp = self.inputs[i]
        given = [n for n, v in (("tokens", inp.tokens), ("text", inp.text), ("features", inp.features)) if len(v)]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one non-empty input (tokens, text or features); got {given or 'none'}")
        kind = given[0]
        _raise(kind_error(model, kind))
        steps = len(inp.features) // (4 * model.feature_dim) if kind == "features" else len(inp.tokens) or len(inp.text)
        if kind == "features" and steps <= max_chunk:
            _raise(feature_bytes_error(model, len(inp.features)))
        _raise(steps_error(steps, max_chunk))
        budget.check(budget.reply_budget(budget.widths_of(model), budget.Shape(1, steps, inp.options)),
                     self.max_reply_bytes)  # this chunk's reply on its own model, before it runs
        if kind == "features":
            x = np.frombuffer(inp.features, dtype="<f4").reshape(-1, model.feature_dim).astype(np.float32)
            if not np.isfinite(x).all():
                raise InvalidInput(NOT_FINITE)
            return x
        if kind == "text":
            return model.encode(inp.text)
        if min(inp.tokens) < 0 or max(inp.tokens) >= len(model.vocab):  # C loops, no array for a small chunk
            ids = np.asarray(inp.tokens, dtype=np.int64)
            pos = int(np.argmax((ids < 0) | (ids >= len(model.vocab))))
            raise token_error(model, pos, int(ids[pos]))
        return np.array(inp.tokens, dtype=np.int64)


class PackedColumns(Columns):
    """The packed batch: one token (or feature) array and each chunk's rows in it. Token ranges and
    feature rows are checked once per vocabulary size and feature width, over the whole array."""

    def __init__(self, p: packed.PackedInput, lay: packed.Layout) -> None:
        self.p, self.lay = p, lay
        self._bad: dict[int, dict[int, tuple[int, int]]] = {}  # vocabulary size -> chunk -> (position, token)
        self._rows: dict[int, np.ndarray | InvalidInput] = {}  # feature width -> (total, D) or why not

    def chunk(self, i: int, model: Model, max_chunk: int) -> np.ndarray:
        lay = self.lay
        _raise(kind_error(model, lay.kind))
        a, steps = int(lay.starts[i]), int(lay.lengths[i])
        if lay.ids is not None:
            bad = self._bad.get(len(model.vocab))
            if bad is None:
                bad = self._bad[len(model.vocab)] = packed.first_bad_token(lay, len(model.vocab))
            if i in bad:
                raise token_error(model, *bad[i])
            return lay.ids[a : a + steps]
        rows = self._rows.get(model.feature_dim)
        if rows is None:
            error = feature_bytes_error(model, len(self.p.features))
            rows = self._rows[model.feature_dim] = error or packed.features_of(self.p, lay, model.feature_dim)
        if isinstance(rows, InvalidInput):
            raise rows
        x = rows[a : a + steps]
        if not np.isfinite(x).all():
            raise InvalidInput(NOT_FINITE)
        return x

    def chunks(self, at: list[int], model: Model, max_chunk: int, errors: dict[int, Exception]
               ) -> list[np.ndarray | None]:
        lay = self.lay
        if lay.ids is None:
            return super().chunks(at, model, max_chunk, errors)
        error = kind_error(model, lay.kind)
        if error is not None:
            errors.update(dict.fromkeys(at, error))
            return [None] * len(at)
        bad = self._bad.get(len(model.vocab))
        if bad is None:
            bad = self._bad[len(model.vocab)] = packed.first_bad_token(lay, len(model.vocab))
        ids, sel = lay.ids, np.array(at, np.int64)
        out: list[np.ndarray | None] = [ids[a : a + n]
                                        for a, n in zip(lay.starts[sel].tolist(), lay.lengths[sel].tolist())]
        for j, i in enumerate(at if bad else ()):
            if i in bad:
                errors[i], out[j] = token_error(model, *bad[i]), None
        return out

    def gather(self, chunks: list[int], xs: list[np.ndarray], model: Model) -> np.ndarray:
        lay, steps = self.lay, len(xs[0])
        if lay.ids is not None and len(chunks) == lay.n and steps * lay.n == lay.total:
            return lay.ids.reshape(lay.n, steps)  # every chunk, in order: no gather
        source = lay.ids if lay.ids is not None else self._rows[model.feature_dim]
        assert isinstance(source, np.ndarray)
        return source[packed.rows_of(lay, np.array(chunks, np.int64), steps)]


@dataclass
class Chunks:
    """A message's chunks as columns: chunk i is session_ids[i]'s, with the offset it expects (-1:
    not checked), the activations it asks for and the request id that names it, if any."""

    session_ids: Sequence[str]
    columns: Columns
    expected: np.ndarray  # int64 (n,)
    activations: Sequence[ActivationRequest | None]
    replay_keys: Sequence[str] = ()
    deadline: float | None = None
    declared_steps: np.ndarray | None = None  # (n,) where the message declares them (packed): checked in plan
    top_k: Sequence[int] = ()  # per chunk where chunks ask their own (the packed batch's is checked whole)

    @property
    def n(self) -> int:
        return len(self.session_ids)

    @classmethod
    def of_inputs(cls, inputs: Sequence[StepInput], max_reply_bytes: int) -> Chunks:
        # a negative offset given is refused (-2); -1 stands for none given
        expected = np.fromiter((-1 if i.expected_offset is None else -2 if i.expected_offset < 0
                                else i.expected_offset for i in inputs), np.int64, len(inputs))
        return cls([i.session_id for i in inputs], InputColumns(inputs, max_reply_bytes), expected,
                   [i.options.activations for i in inputs], [i.replay_key for i in inputs],
                   min((i.deadline for i in inputs if i.deadline is not None), default=None),
                   top_k=[i.options.top_k for i in inputs])


class Sink:
    """Where a message's results go; each RPC shapes its reply from them."""

    def accepts(self, i: int, model: Model, picks: Picks | None) -> None:
        """Raise InvalidInput when chunk i cannot be part of this reply (the packed reply has one width)."""

    def ran(self, chunks: list[int], logits: np.ndarray, acts: list[np.ndarray] | None, picks: Picks | None) -> None:
        """A block's outputs: logits (B, T, C), activations each (B, T, H) in the model's order."""

    def replayed(self, i: int, model: Model, rec: SessionRecord, logits: np.ndarray,
                 acts: list[np.ndarray] | None, picks: Picks | None) -> None:
        """A replay's outputs (1, T, C) from the record as it stands."""

    def committed(self, i: int, model: Model, rec: SessionRecord) -> None:
        """Chunk i is stored: `rec` is its session now."""

    def refused_at(self, i: int, offset: int) -> None:
        """Chunk i was refused; its session is at `offset` (-1: unknown)."""

    def committed_rows(self, chunks: list[int], model: Model, starts: np.ndarray, steps: int,
                       record: Callable[[int], SessionRecord]) -> None:
        """Chunks stored as rows of a session table: chunk chunks[j] ran `steps` from offset starts[j];
        `record(j)` gives its session now (a copy made on asking: a sink that needs no record asks none)."""
        for j, i in enumerate(chunks):
            self.committed(i, model, record(j))


@dataclass
class _Run:
    i: int
    model: Model
    rec: SessionRecord
    x: np.ndarray
    digest: bytes
    picks: Picks | None
    key: str


@dataclass
class _Replay:
    i: int
    model: Model
    rec: SessionRecord
    x: np.ndarray
    picks: Picks | None


def _refusal(sink: Sink, i: int, model: Model, picks: Picks | None) -> RecurError | None:
    try:
        sink.accepts(i, model, picks)
    except RecurError as e:
        return e
    return None


class _RowRun:
    """Chunks of one block of rows, length and activation selection: one engine job, one batched write."""

    def __init__(self, block: Rows, model: Model, picks: Picks | None, steps: int, chunks: list[int] | None = None,
                 xs: list[np.ndarray] | None = None, rows: list[int] | None = None, gens: list[int] | None = None,
                 offsets: list[int] | None = None, created: list[float] | None = None,
                 ttl: list[float] | None = None) -> None:
        self.block, self.model, self.picks, self.steps = block, model, picks, steps
        self.chunks: list[int] = chunks or []
        self.xs: list[np.ndarray] = xs or []
        # each row as read: a store that caches rows (SQLite) may give one up before the write
        self.rows: list[int] = rows or []
        self.gens: list[int] = gens or []
        self.offsets: list[int] = offsets or []
        self.created: list[float] = created or []
        self.ttl: list[float] = ttl or []

    def add(self, i: int, x: np.ndarray, row: int, gen: int, offset: int) -> None:
        self.chunks.append(i)
        self.xs.append(x)
        self.rows.append(row)
        self.gens.append(gen)
        self.offsets.append(offset)
        self.created.append(float(self.block.created[row]))
        self.ttl.append(float(self.block.ttl[row]))


def advanced(rec: SessionRecord, steps: int, digest: bytes, logits: np.ndarray, states: list[np.ndarray],
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


def offset_mismatch(session_id: str, rec: SessionRecord, expected: int, key: str = "") -> OffsetMismatch:
    if key:
        return OffsetMismatch(f"request id {key[:64]!r} was last applied to session {session_id} at offset "
                              f"{rec.last_start} with other inputs; give each request its own id", rec.offset)
    return OffsetMismatch(f"session {session_id} is at offset {rec.offset}, not {expected}; resend from offset "
                          f"{rec.offset}", rec.offset)


def conflict_error(e: StoreConflict, session_id: str) -> OffsetMismatch:
    where = f"it is at offset {e.actual}" if e.actual is not None else "read it again for its offset"
    return OffsetMismatch(f"session {session_id} was advanced elsewhere; {where}",
                          e.actual if e.actual is not None else -1)


class Pipeline:
    """The chunk pipeline over a store, a model repository and an engine."""

    def __init__(self, settings: Settings, models: ModelRepository, store: Store, engine: Engine,
                 max_chunk: Callable[[str], int], events: Events, tracing: Tracing, locks: SessionLocks,
                 calls: CallGate) -> None:
        self.settings, self.models, self.store, self.engine = settings, models, store, engine
        self.max_chunk, self.events, self.tracing, self.locks, self.calls = max_chunk, events, tracing, locks, calls

    # -- plan ------------------------------------------------------------------------------------
    def plan(self, tenant: str, c: Chunks, errors: dict[int, Exception]) -> list[list[int]]:
        """The rules that need no session, and the rounds: each a list of chunks of distinct sessions."""
        if c.declared_steps is not None and c.n:
            max_chunk = self.max_chunk(tenant)
            for i in np.flatnonzero((c.declared_steps == 0) | (c.declared_steps > max_chunk)).tolist():
                errors[i] = steps_error(int(c.declared_steps[i]), max_chunk)  # type: ignore[assignment]
        if c.top_k and min(c.top_k) < 0:
            for i, k in enumerate(c.top_k):
                if k < 0:
                    errors[i] = InvalidInput(NEGATIVE_TOP_K)
        if c.n and c.expected.min() < -1:
            for i in np.flatnonzero(c.expected < -1).tolist():
                errors[i] = InvalidInput("expected offsets must be 0 or more, or -1 (not checked)")
        rounds: list[list[int]] = [[]]
        seen: dict[str, int] = {}
        for i, sid in enumerate(c.session_ids):
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
        return [r for r in rounds if r]

    async def run(self, tenant: str, c: Chunks, sink: Sink, errors: dict[int, Exception] | None = None
                  ) -> dict[int, Exception]:
        """Every chunk of the message, round by round, each round under its sessions' locks (all taken
        at once: messages keep arrival order and cannot deadlock). Returns the refused chunks' errors
        (`errors`: chunks the caller refused already)."""
        errors = {} if errors is None else errors
        rounds = self.plan(tenant, c, errors)
        async with self.calls:
            for chunks in rounds:
                async with self.locks.hold_many([(tenant, c.session_ids[i]) for i in chunks]):
                    rest, stale = await self.round_rows(tenant, c, chunks, sink, errors)
                    stale += await self.round(tenant, c, rest, sink, errors) if rest else []
                    if stale:  # read from hints another replica made stale: again, from the store
                        await self.round(tenant, c, sorted(stale), sink, errors, fresh=True)
        return errors

    async def _read(self, tenant: str, c: Chunks, chunks: list[int], fresh: bool
                    ) -> list[SessionRecord | Exception]:
        if not fresh:
            with self.tracing.span("recur.store.read", tenant, rows=len(chunks)):
                return await self.store.get_many(tenant, [c.session_ids[i] for i in chunks])
        records: list[SessionRecord | Exception] = []
        for i in chunks:
            try:
                records.append(await self.store.fresh(tenant, c.session_ids[i]))
            except RecurError as e:
                records.append(e)
        return records

    # -- a round over a session table --------------------------------------------------------------
    async def round_rows(self, tenant: str, c: Chunks, chunks: list[int], sink: Sink,
                         errors: dict[int, Exception]) -> tuple[list[int], list[int]]:
        """The round over a store that keeps its sessions as rows (store.read_rows): the chunks that run from
        their session's offset are decided, gathered, run and stored as array operations over their rows.
        Returns the chunks left to the record round: any whose offset is not its session's (a replay
        or a refusal) or that names a request id, or all where the store keeps records; and those whose
        row was a hint another replica made stale (the write's compare-and-set said so): to run again
        from a fresh read."""
        if len(chunks) < ROW_ROUND_MIN:
            return chunks, []
        with self.tracing.span("recur.plan", tenant, rows=len(chunks),
                               session=c.session_ids[chunks[0]] if len(chunks) == 1 else ""):
            with self.tracing.span("recur.store.read", tenant, rows=len(chunks)):
                locs = await self.store.read_rows(tenant, [c.session_ids[i] for i in chunks])
            if locs is None:
                return chunks, []
            runs, rest = self._decide_rows(tenant, c, chunks, locs, sink, errors)
        with self.tracing.span("recur.engine", rows=sum(len(r.chunks) * r.steps for r in runs)):
            before = [r.block.gather(r.rows) for r in runs]
            jobs = [self._submit(r.model, c.columns.gather(r.chunks, r.xs, r.model), states, c.deadline,
                                 r.picks is not None) for r, states in zip(runs, before)]
            ran = await self._settle(jobs, [r.chunks for r in runs], errors)
        stale: list[int] = []
        for r, states, result in zip(runs, before, ran):
            if not isinstance(result, BaseException):
                stale += await self._commit_rows(tenant, c, r, states, result, sink, errors)
        return rest, stale

    def _decide_rows(self, tenant: str, c: Chunks, chunks: list[int], locs: Sequence[Loc | Exception], sink: Sink,
                     errors: dict[int, Exception]) -> tuple[list[_RowRun], list[int]]:
        """The chunks grouped by block of rows; those at their session's offset (or unchecked) checked against
        their model and grouped into runs of one length and activation selection; the rest returned."""
        rest: list[int] = []
        found: dict[int, tuple[Rows, list[int], list[int]]] = {}  # id(block) -> (block, chunks, rows)
        keys = c.replay_keys
        for i, loc in zip(chunks, locs):
            if isinstance(loc, Exception):
                errors[i] = loc
            elif keys and keys[i]:
                rest.append(i)
            else:
                group = found.get(id(loc[0]))
                if group is None:
                    group = found[id(loc[0])] = (loc[0], [], [])
                group[1].append(i)
                group[2].append(loc[1])
        max_chunk = self.max_chunk(tenant)
        runs: dict[tuple[int, int, int], _RowRun] = {}  # (id(block), steps, id(picks)) -> its run
        picked: dict[tuple[int, int], Picks] = {}
        accepted: dict[tuple[int, int], RecurError | None] = {}
        for block, idx, rows in found.values():
            at, row = np.array(idx, np.int64), np.array(rows, np.int64)
            offsets, expected = block.offset[row], c.expected[at]
            mine = (expected < 0) | (expected == offsets)
            if not mine.all():
                rest.extend(at[~mine].tolist())
                at, row, offsets = at[mine], row[mine], offsets[mine]
            try:
                model = self.models.get(block.model, block.version)
            except RecurError as e:
                errors.update(dict.fromkeys(at.tolist(), e))
                continue
            gens, idx = block.gen[row], at.tolist()
            xs = c.columns.chunks(idx, model, max_chunk, errors)
            checked = self._one_run(c, idx, xs)
            if checked:  # the common message: one length, one selection
                try:
                    picks = self._picks(model, c.activations[idx[0]], picked)
                    _raise(_refusal(sink, idx[0], model, picks))
                except RecurError as e:
                    errors.update(dict.fromkeys(idx, e))
                    continue
                steps = len(checked[0])
                runs[(id(block), steps, id(picks))] = _RowRun(block, model, picks, steps, idx, checked, row.tolist(),
                                                               gens.tolist(), offsets.tolist(),
                                                               block.created[row].tolist(), block.ttl[row].tolist())
                continue
            for j, (i, x) in enumerate(zip(idx, xs)):
                if x is None:
                    continue
                try:
                    picks = self._picks(model, c.activations[i], picked)
                    if (id(model), id(picks)) not in accepted:  # the sink's rule is on the model and selection
                        accepted[(id(model), id(picks))] = _refusal(sink, i, model, picks)
                    _raise(accepted[(id(model), id(picks))])
                except RecurError as e:
                    errors[i] = e
                    continue
                run = runs.get((id(block), len(x), id(picks)))
                if run is None:
                    run = runs[(id(block), len(x), id(picks))] = _RowRun(block, model, picks, len(x))
                run.add(i, x, int(row[j]), int(gens[j]), int(offsets[j]))
        return list(runs.values()), rest

    async def _commit_rows(self, tenant: str, c: Chunks, r: _RowRun, before: list[np.ndarray], result: tuple,
                           sink: Sink, errors: dict[int, Exception]) -> list[int]:
        """A run's new states stored in its rows, each by compare-and-set on the row as read. Returns the
        chunks whose row was a stale hint (a store with hints: its compare-and-set failed)."""
        logits, states, acts = result
        sink.ran(r.chunks, logits, acts, r.picks)
        n = len(r.chunks)
        # Outputs kept for a replay as the record round keeps them: whole when they fit in --max-replay-bytes
        # (a 1-step chunk's are its final step's), else recomputed from the state before; always recomputed
        # where activations were asked (they are not kept).
        whole = r.picks is None and logits[0].nbytes <= self.settings.max_replay_bytes
        kept = [logits[j].copy() for j in range(n)] if whole and r.steps > 1 else None
        rows = np.array(r.rows, np.int64)
        w = RowWrite(r.block, [c.session_ids[i] for i in r.chunks], rows, np.array(r.gens, np.int64),
                     np.array(r.offsets, np.int64), np.full(n, r.steps, np.int64), states, logits[:, -1],
                     [hashlib.sha256(x.tobytes()).digest() for x in r.xs], np.full(n, whole),
                     [] if whole else before,  # the state before is kept only where outputs are not (held, it costs)
                     np.array(r.created), np.array(r.ttl), self.store.clock(), kept)
        with self.tracing.span("recur.store.write", rows=n):
            stored = await self.store.write_rows(tenant, w)
        done = [j for j, err in enumerate(stored) if err is None]
        if len(done) == n:
            sink.committed_rows(r.chunks, r.model, w.offsets, r.steps, lambda j: w.record(j, tenant))
        else:
            sink.committed_rows([r.chunks[j] for j in done], r.model, w.offsets[done], r.steps,
                                lambda j: w.record(done[j], tenant))
        stale = []
        for j, err in enumerate(stored):
            if isinstance(err, StoreConflict) and self.store.hints:
                stale.append(r.chunks[j])
            elif isinstance(err, StoreConflict):
                self.events.conflict(r.model.name, r.model.version, tenant)
                errors[r.chunks[j]] = conflict_error(err, w.session_ids[j])
                sink.refused_at(r.chunks[j], -1 if err.actual is None else err.actual)
            elif err is not None:
                errors[r.chunks[j]] = err
        return stale

    # -- one round -------------------------------------------------------------------------------
    async def round(self, tenant: str, c: Chunks, chunks: list[int], sink: Sink, errors: dict[int, Exception],
                    fresh: bool = False, records: Sequence[SessionRecord | Exception] | None = None,
                    write: bool = True) -> list[int]:
        """One round of distinct sessions, held locked by the caller. Returns the chunks to run again
        from fresh reads (their hint was stale). `records`: read already; `write` False: run and
        answer without storing (a one-shot request, or a record its caller stores)."""
        retry = self.store.hints and not fresh and records is None
        with self.tracing.span("recur.plan", tenant, rows=len(chunks),
                               session=c.session_ids[chunks[0]] if len(chunks) == 1 else ""):
            if records is None:
                records = await self._read(tenant, c, chunks, fresh)
            runs, replays, stale = self._decide(tenant, c, chunks, records, sink, errors, retry)
        ran = await self._run(c, runs, replays, errors)
        for r, result in zip(replays, ran[len(runs):]):
            if not isinstance(result, BaseException):
                sink.replayed(r.i, r.model, r.rec, result[0], result[2], r.picks)
        stale += await self._commit(tenant, runs, ran[: len(runs)], sink, errors, retry, write)
        return sorted(stale)

    def _decide(self, tenant: str, c: Chunks, chunks: list[int], records: Sequence[SessionRecord | Exception],
                sink: Sink, errors: dict[int, Exception], retry: bool
                ) -> tuple[list[list[_Run]], list[_Replay], list[int]]:
        """Each chunk checked against its session: a run (grouped into blocks), a replay, a refusal, or
        stale (its hint disagrees: read again)."""
        max_chunk = self.max_chunk(tenant)
        models: dict[tuple[str, int], Model] = {}
        picked: dict[tuple[int, int], Picks] = {}  # (model, selection) -> picks
        blocks: dict[tuple[int, int, int], list[_Run]] = {}  # (id(model), steps, id(picks))
        replays: list[_Replay] = []
        stale: list[int] = []
        for i, rec in zip(chunks, records):
            try:
                if isinstance(rec, Exception):
                    raise rec
                model = models.get((rec.model, rec.version))
                if model is None:
                    model = models[(rec.model, rec.version)] = self.models.get(rec.model, rec.version)
                x = c.columns.chunk(i, model, max_chunk)
                picks = self._picks(model, c.activations[i], picked)
                sink.accepts(i, model, picks)
            except RecurError as e:
                errors[i] = e
                continue
            digest = hashlib.sha256(x.tobytes()).digest()
            expected, key = int(c.expected[i]), c.replay_keys[i] if c.replay_keys else ""
            by_key = key and expected < 0 and rec.last_start >= 0 and replay_key(key) == rec.last_request
            if by_key:
                expected = rec.last_start  # the retry of the chunk this request id applied last
            if 0 <= expected != rec.offset:
                if retry:
                    stale.append(i)
                elif expected == rec.last_start and digest == rec.last_digest:
                    self.events.replayed(model.name, model.version, tenant)
                    replays.append(_Replay(i, model, rec, x, picks))
                else:
                    self.events.conflict(model.name, model.version, tenant)
                    errors[i] = offset_mismatch(c.session_ids[i], rec, expected, key if by_key else "")
                    sink.refused_at(i, rec.offset)
                continue
            blocks.setdefault((id(model), len(x), id(picks)), []).append(_Run(i, model, rec, x, digest, picks, key))
        return list(blocks.values()), replays, stale

    @staticmethod
    def _one_run(c: Chunks, idx: list[int], xs: list[np.ndarray | None]) -> list[np.ndarray] | None:
        """The chunks' inputs when every one was accepted, all of one length, all asking one activation
        selection (the same object); else None."""
        if not idx or any(x is None for x in xs):
            return None
        checked = typing.cast(list[np.ndarray], xs)
        first = c.activations[idx[0]]
        if len({len(x) for x in checked}) == 1 and all(c.activations[i] is first for i in idx):
            return checked
        return None

    @staticmethod
    def _picks(model: Model, request: ActivationRequest | None, picked: dict[tuple[int, int], Picks]
               ) -> Picks | None:
        if request is None:
            return None
        picks = picked.get((id(model), id(request)))
        if picks is None:
            picks = picked[(id(model), id(request))] = select_activations(model, request)
        return picks

    # -- run -------------------------------------------------------------------------------------
    async def _run(self, c: Chunks, runs: list[list[_Run]], replays: list[_Replay], errors: dict[int, Exception]
                   ) -> list[tuple | BaseException]:
        """Each block as one engine job, and each replay that recomputes its outputs as a job of one
        row; the results in that order (an error for a job that failed)."""
        jobs: list[asyncio.Future | tuple | BaseException] = []
        with self.tracing.span("recur.engine", rows=sum(len(b) * len(b[0].x) for b in runs)):
            for block in runs:
                model = block[0].model
                x = c.columns.gather([r.i for r in block], [r.x for r in block], model)
                states = ([s[:, None] for s in block[0].rec.state] if len(block) == 1 else
                          [np.stack([r.rec.state[k] for r in block], axis=1) for k in range(len(model.states))])
                jobs.append(self._submit(model, x, states, c.deadline, block[0].picks is not None))
            for r in replays:
                jobs.append(self._replay(r, c.deadline))
            return await self._settle(jobs, [[r.i for r in b] for b in runs] + [[r.i] for r in replays], errors)

    @staticmethod
    async def _settle(jobs: Sequence[asyncio.Future | tuple | BaseException], chunks: list[list[int]],
                      errors: dict[int, Exception]) -> list[tuple | BaseException]:
        """Each job's result, in order; a failed job's error for each of its chunks."""
        futures = [j for j in jobs if isinstance(j, asyncio.Future)]
        for f in futures:  # awaited in turn: no waiter task, no extra turn of the loop
            try:
                await f
            except asyncio.CancelledError:  # this call was cancelled: so are its jobs
                for g in futures:
                    g.cancel()
                raise
            except Exception:
                pass  # read below
        out: list[tuple | BaseException] = []
        for j, indices in zip(jobs, chunks):
            result = j if not isinstance(j, asyncio.Future) else j.exception() or j.result()
            if isinstance(result, BaseException):
                for i in indices:
                    errors[i] = result if isinstance(result, Exception) else RuntimeError("cancelled")
            out.append(result)
        return out

    def _submit(self, model: Model, x: np.ndarray, states: list[np.ndarray], deadline: float | None,
                activations: bool) -> asyncio.Future | BaseException:
        try:
            # alone: no other call in the server, so a tiny block runs at once; else it waits to batch
            return self.engine.submit(model.runtime, x, states, deadline, activations, self.calls.in_flight <= 1)
        except RecurError as e:  # the queue bound: refused at once
            return e

    def _replay(self, r: _Replay, deadline: float | None) -> asyncio.Future | tuple | BaseException:
        """A replay's outputs: as recorded, or recomputed from the state before the chunk (the retry
        carries the same chunk, checked by its digest); nothing is stored."""
        prev = r.rec.last_prev_state
        if r.picks is not None and prev is None:
            return NoOutputYet(f"session {r.rec.session_id}'s last chunk was applied without return_activations, "
                               "so its activations were not kept; its retry cannot return them")
        if prev is None:
            assert r.rec.last_logits is not None
            return (r.rec.last_logits[None], [], None)
        return self._submit(r.model, r.x[None], [s[:, None] for s in prev], deadline, r.picks is not None)

    # -- commit ----------------------------------------------------------------------------------
    async def _commit(self, tenant: str, runs: list[list[_Run]], ran: list[tuple | BaseException], sink: Sink,
                      errors: dict[int, Exception], retry: bool, write: bool) -> list[int]:
        """The new records, stored by compare-and-set; returns the chunks whose hint was stale."""
        writes: list[tuple[SessionRecord, int]] = []
        done: list[tuple[_Run, SessionRecord]] = []
        t = self.store.clock()
        for block, result in zip(runs, ran):
            if isinstance(result, BaseException):
                continue
            logits, new_states, acts = result
            sink.ran([r.i for r in block], logits, acts, block[0].picks)
            max_replay = self.settings.max_replay_bytes if block[0].picks is None else -1  # replays recompute them
            for j, r in enumerate(block):
                own = logits[j]
                own = own.copy() if own.nbytes <= max_replay else own  # a view would pin the whole block
                new = advanced(r.rec, len(r.x), r.digest, own, [np.ascontiguousarray(s[:, j]) for s in new_states],
                               t, max_replay, replay_key(r.key) if r.key else "")
                writes.append((new, r.rec.offset))
                done.append((r, new))
        if not write:
            stored: list[Exception | None] = [None] * len(writes)
        else:
            with self.tracing.span("recur.store.write", rows=len(writes)):
                stored = await self.store.put_many(writes) if writes else []
        stale = []
        for (r, new), err in zip(done, stored):
            if err is None:
                sink.committed(r.i, r.model, new)
            elif isinstance(err, StoreConflict) and retry:
                stale.append(r.i)
            elif isinstance(err, StoreConflict):
                self.events.conflict(r.model.name, r.model.version, tenant)
                errors[r.i] = conflict_error(err, new.session_id)
                sink.refused_at(r.i, -1 if err.actual is None else err.actual)
            else:
                errors[r.i] = err
        return stale
