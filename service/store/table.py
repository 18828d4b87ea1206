"""A columnar session table: the sessions of one model version and state layout as rows of
preallocated arrays (offset, last start, times, state and the state before the last chunk), so the
chunk pipeline reads, gathers, decides on and scatters a message's rows with array operations
instead of building a record per chunk (docs/architecture.md, "The session table").

A row is a session record spread over columns; `record` gives it back as a SessionRecord (a copy)
and `write` stores one. `commit` is the pipeline's batched write: the new states of chunks that ran
from their rows' states, each row checked by compare-and-set on its offset and its generation (a
row freed and given to another session has a new generation), the state before each kept beside
it, from which a replay recomputes the chunk's outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from service.store.record import RECORD_OVERHEAD, SessionRecord

Shapes = tuple[tuple[int, ...], ...]
_INTS = ("gen", "offset", "last_start", "names", "nbytes")  # names: len(tenant) + len(session_id), in a row's bytes
_FLOATS = ("created", "updated", "ttl")
_FLAGS = ("has_prev", "has_final", "complete")  # complete: a commit kept every output of the chunk
Loc = tuple["Rows", int]  # a session's block of rows and its row there
Key = tuple[str, str]  # (tenant, session id)
DIGEST_BYTES = 32  # sha256, what the pipeline keeps of a chunk for its replay check


class Rows:
    """The rows of one (model, version, state shapes). State tensors are (layers, ...) per session and
    kept as (layers, capacity, ...): a gather over rows is the engine's (layers, batch, ...) as is."""

    def __init__(self, model: str, version: int, shapes: Shapes) -> None:
        if any(len(s) < 1 for s in shapes):
            raise ValueError(f"state tensors need a layer axis: {shapes}")
        self.model, self.version, self.shapes = model, version, shapes
        self.state_bytes = sum(4 * int(np.prod(s)) for s in shapes)
        self.capacity = 0
        self.free: list[int] = []
        # Scalar columns side by side, so the record round writes or reads a row's in one operation;
        # each column is a view (`_views`), as the array operations over rows use them.
        self.ints = np.zeros((0, len(_INTS)), np.int64)
        self.floats = np.zeros((0, len(_FLOATS)), np.float64)
        self.flags = np.zeros((0, len(_FLAGS)), bool)
        self._views()
        self.final = np.zeros((0, 0), np.float32)  # the last chunk's final step's outputs, where a commit kept them
        self.state = [np.zeros((s[0], 0, *s[1:]), np.float32) for s in shapes]
        self.prev = [np.zeros((s[0], 0, *s[1:]), np.float32) for s in shapes]
        self.tenant: list[str] = []
        self.session_id: list[str] = []
        self.digest: list[bytes] = []
        self.request: list[str] = []
        self.logits: list[np.ndarray | None] = []

    def _views(self) -> None:
        self.gen, self.offset, self.last_start, self.names, self.nbytes = (self.ints[:, k] for k in range(len(_INTS)))
        self.created, self.updated, self.ttl = (self.floats[:, k] for k in range(len(_FLOATS)))
        self.has_prev, self.has_final, self.complete = (self.flags[:, k] for k in range(len(_FLAGS)))

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def _grow(self) -> None:
        old, new = self.capacity, max(8, self.capacity * 2)
        for name in ("ints", "floats", "flags", "final"):
            a = getattr(self, name)
            b = np.zeros((new, *a.shape[1:]), a.dtype)
            b[:old] = a
            setattr(self, name, b)
        self._views()
        for arrays in (self.state, self.prev):
            for k, a in enumerate(arrays):
                b = np.zeros((a.shape[0], new, *a.shape[2:]), np.float32)
                b[:, :old] = a
                arrays[k] = b
        for column in (self.tenant, self.session_id, self.request):
            column.extend([""] * (new - old))
        self.digest.extend([b""] * (new - old))
        self.logits.extend([None] * (new - old))
        self.free.extend(range(new - 1, old - 1, -1))  # the lowest row first
        self.capacity = new

    def allocate(self) -> int:
        if not self.free:
            self._grow()
        return self.free.pop()

    def release(self, r: int) -> None:
        self.gen[r] += 1  # whoever read the row before cannot write it now
        self.logits[r] = None  # do not pin an array for a free row
        self.free.append(r)

    def write(self, r: int, rec: SessionRecord) -> None:
        """Row r becomes `rec` (of this block's model, version and shapes)."""
        self.tenant[r], self.session_id[r] = rec.tenant, rec.session_id
        for a, s in zip(self.state, rec.state):
            a[:, r] = s
        prev = rec.last_prev_state
        if prev is not None:
            for a, s in zip(self.prev, prev):
                a[:, r] = s
        self.digest[r], self.request[r], self.logits[r] = rec.last_digest, rec.last_request, rec.last_logits
        names = len(rec.tenant) + len(rec.session_id)
        nbytes = (self.state_bytes * (2 if prev is not None else 1) + len(rec.last_digest) + names
                  + len(rec.last_request) + (0 if rec.last_logits is None else rec.last_logits.nbytes)
                  + RECORD_OVERHEAD)
        self.ints[r, 1:] = (rec.offset, rec.last_start, names, nbytes)  # gen stays: the row is the same session's
        self.floats[r] = (rec.created_at, rec.updated_at, rec.ttl)
        self.flags[r] = (prev is not None, False, False)

    def record(self, r: int, token: bytes = b"") -> SessionRecord:
        """Row r as a SessionRecord of its own arrays (a row a commit wrote has the form of a record whose
        outputs were too large to keep: its final step's outputs and the state before); `token`: the store's
        version of it, where the store keeps one beside the row (Redis's write id)."""
        _, offset, last_start, _, _ = self.ints[r].tolist()
        created, updated, ttl = self.floats[r].tolist()
        prev, final, complete = self.flags[r].tolist()
        logits = self.logits[r]
        if final:
            logits = self.final[r : r + 1].copy() if logits is None else logits
            prev = not complete  # kept, but a record of kept outputs shows none
        return SessionRecord.of_fields(
            tenant=self.tenant[r], session_id=self.session_id[r], model=self.model, version=self.version,
            offset=offset, created_at=created, updated_at=updated, ttl=ttl,
            state=[a[:, r].copy() for a in self.state], last_digest=self.digest[r], last_start=last_start,
            last_logits=logits, last_prev_state=[a[:, r].copy() for a in self.prev] if prev else None,
            last_request=self.request[r], token=token)

    def expires(self, rows: int | np.ndarray) -> np.ndarray:
        """When the rows expire (updated + ttl): a number for a row, an array for rows."""
        return self.updated[rows] + self.ttl[rows]

    def gather(self, rows: np.ndarray | list[int]) -> list[np.ndarray]:
        """The rows' states as the engine takes them: each (layers, len(rows), ...), a new array."""
        return [a[:, rows] for a in self.state]

    def commit(self, w: RowWrite) -> int:
        """Rows that ran a chunk from their state now hold its new states, its final step's outputs and
        the outputs kept (`w.kept`), the state before kept for a replay. Checked by the caller (`stale`).
        Returns the change in bytes."""
        rows, steps, states, final = w.rows, w.steps, w.states, w.final
        if self.final.shape[1] != final.shape[1]:  # the first commit: the model's width
            self.final = np.zeros((self.capacity, final.shape[1]), np.float32)
            self.has_final[:] = False
        for a, p, s in zip(self.state, self.prev, states):
            p[:, rows] = a[:, rows]
            a[:, rows] = s
        self.final[rows] = final
        self.has_final[rows] = True
        self.last_start[rows] = self.offset[rows]
        self.offset[rows] += steps
        self.updated[rows] = w.t
        self.has_prev[rows] = True
        self.complete[rows] = w.complete
        before = int(self.nbytes[rows].sum())
        digest, request, logits = self.digest, self.request, self.logits
        for r, d in zip(rows.tolist(), w.digests):
            digest[r], request[r], logits[r] = d, "", None
        self.nbytes[rows] = (2 * self.state_bytes + 4 * final.shape[1] + DIGEST_BYTES + RECORD_OVERHEAD
                             + self.names[rows])
        for r, k in zip(rows.tolist(), w.kept or ()):
            if k is not None:
                logits[r] = k
                self.nbytes[r] += k.nbytes
        return int(self.nbytes[rows].sum()) - before

    def stale(self, rows: np.ndarray, gens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Which rows no longer hold what was read (another session's now, or advanced): a mask."""
        return (self.gen[rows] != gens) | (self.offset[rows] != offsets)


def shapes_of(rec: SessionRecord) -> Shapes:
    return tuple(s.shape for s in rec.state)


def check_held(held: Iterable[tuple[Key, Loc]], blocks: Iterable[Rows]) -> int:
    """The invariants of rows held by session (tests run them): each row is in use in its block, names its
    session and is held once, and every row in use is held. Returns the held rows' bytes."""
    blocks = list(blocks)
    assert all(len(b.free) == len(set(b.free)) for b in blocks), "a row freed twice"
    used = {id(b): set(range(b.capacity)) - set(b.free) for b in blocks}
    seen: set[tuple[int, int]] = set()
    total = 0
    for (tenant, sid), (block, r) in held:
        assert r in used[id(block)] and (id(block), r) not in seen, f"session {sid}'s row {r} is not its own"
        assert block.tenant[r] == tenant and block.session_id[r] == sid, f"row {r} names another session"
        seen.add((id(block), r))
        total += int(block.nbytes[r])
    assert len(seen) == sum(len(u) for u in used.values()), "a row in use that no session holds"
    return total


def block_for(blocks: dict[tuple[str, int, Shapes], Rows], rec: SessionRecord) -> Rows:
    """The block of rows that holds records like `rec` (its model, version and state shapes), made on first use."""
    key = (rec.model, rec.version, shapes_of(rec))
    block = blocks.get(key)
    if block is None:
        block = blocks[key] = Rows(*key)
    return block


class RowCache:
    """Sessions held as rows for a store whose own copy is elsewhere (the SQLite store's clean records, a Redis
    replica's hints), least recently used first. Bounded by its owner, which evicts (`pop_oldest`) while over
    its limits."""

    def __init__(self) -> None:
        self._locs: OrderedDict[Key, Loc] = OrderedDict()
        self._blocks: dict[tuple[str, int, Shapes], Rows] = {}
        self.nbytes = 0  # the rows' bytes, as the table counts them

    def __len__(self) -> int:
        return len(self._locs)

    def loc(self, key: Key) -> Loc | None:
        """The session's row, now the most recently used; None when not held."""
        loc = self._locs.get(key)
        if loc is not None:
            self._locs.move_to_end(key)
        return loc

    def get(self, key: Key) -> SessionRecord | None:
        """The session's record (a copy of its row), now the most recently used; None when not held."""
        loc = self.loc(key)
        return None if loc is None else loc[0].record(loc[1])

    def put(self, rec: SessionRecord) -> None:
        key = (rec.tenant, rec.session_id)
        block, loc = block_for(self._blocks, rec), self._locs.get(key)
        if loc is not None and loc[0] is block:  # the session's row, written again in place
            r = loc[1]
            self.nbytes -= int(block.nbytes[r])
            block.gen[r] += 1  # as a row freed and given again: whoever read it before cannot write it now
            self._locs.move_to_end(key)
        else:
            self.pop(key)
            r = block.allocate()
            self._locs[key] = (block, r)
        block.write(r, rec)
        self.nbytes += int(block.nbytes[r])

    def pop(self, key: Key) -> bool:
        loc = self._locs.pop(key, None)
        if loc is None:
            return False
        self._release(loc)
        return True

    def pop_oldest(self) -> Key:
        key, loc = self._locs.popitem(last=False)
        self._release(loc)
        return key

    def _release(self, loc: Loc) -> None:
        block, r = loc
        self.nbytes -= int(block.nbytes[r])
        block.release(r)

    def commit(self, w: RowWrite) -> None:
        """The store stored `w`: rows still held as they were read take it; a row given up meanwhile is not
        held any more (the next read goes to the store)."""
        held = ~w.block.stale(w.rows, w.gens, w.offsets)
        if held.all():
            self.nbytes += w.block.commit(w)
        elif held.any():
            self.nbytes += w.block.commit(w.only(held))

    def expired(self, t: float) -> list[Key]:
        return [k for k, (b, r) in self._locs.items() if b.expires(r) <= t]

    def check(self) -> None:
        """Every held row is in use, in its block, names its session and is held once; the byte count is
        the rows'."""
        total = check_held(self._locs.items(), self._blocks.values())
        assert total == self.nbytes, f"the cache's byte count is off: {self.nbytes}, rows {total}"


@dataclass
class RowWrite:
    """The pipeline's batched write to one block: chunk j ran `steps[j]` steps from row `rows[j]` as read
    (its generation `gens[j]`, offset `offsets[j]`, creation time and TTL); `states` are the new ones, each
    (layers, n, ...), and `before` the states they ran from where some chunk's outputs are not kept whole
    (else empty); `t` the write's time. It carries everything the sessions' new records hold, so a store
    that keeps records elsewhere (SQLite) writes them from it alone."""

    block: Rows
    session_ids: list[str]
    rows: np.ndarray
    gens: np.ndarray
    offsets: np.ndarray
    steps: np.ndarray
    states: Sequence[np.ndarray]
    final: np.ndarray  # (n, classes): each chunk's final step's outputs
    digests: list[bytes]
    complete: np.ndarray  # (n,) bool: every output of the chunk is kept (final holds them, or `kept`)
    before: Sequence[np.ndarray]
    created: np.ndarray
    ttl: np.ndarray
    t: float
    kept: list[np.ndarray | None] | None = None  # the outputs of chunks of several steps kept whole

    def only(self, keep: np.ndarray) -> RowWrite:
        """The writes where `keep` (a mask) holds."""
        at = np.flatnonzero(keep)
        return RowWrite(self.block, [self.session_ids[j] for j in at.tolist()], self.rows[at], self.gens[at],
                        self.offsets[at], self.steps[at], [s[:, at] for s in self.states], self.final[at],
                        [self.digests[j] for j in at.tolist()], self.complete[at], [s[:, at] for s in self.before],
                        self.created[at], self.ttl[at], self.t,
                        None if self.kept is None else [self.kept[j] for j in at.tolist()])

    def outputs(self, j: int) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """What chunk j's record keeps for a replay, as the record round keeps it: its outputs (whole, or the
        final step's) and, where those are not whole, the state it ran from."""
        kept = None if self.kept is None else self.kept[j]
        logits = kept if kept is not None else self.final[j : j + 1]
        return logits, None if self.complete[j] else [s[:, j] for s in self.before]

    def record(self, j: int, tenant: str) -> SessionRecord:
        """Chunk j's session as this write stored it, built from the write (not from a row a cache may have
        given up since)."""
        b, start = self.block, int(self.offsets[j])
        logits, prev = self.outputs(j)
        return SessionRecord.of_fields(
            tenant=tenant, session_id=self.session_ids[j], model=b.model, version=b.version,
            offset=start + int(self.steps[j]), created_at=float(self.created[j]), updated_at=self.t,
            ttl=float(self.ttl[j]), state=[s[:, j].copy() for s in self.states], last_digest=self.digests[j],
            last_start=start, last_logits=logits.copy(), last_prev_state=None if prev is None else
            [p.copy() for p in prev], last_request="", token=b"")
