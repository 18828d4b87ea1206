"""Replies shaped from the chunk pipeline's results (service/core/steps.py): one StepResult per chunk
for Step and StepBatch, one columnar reply for the packed batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from service.core import packed
from service.core.outputs import OutputOptions, step_outputs, top_k_of
from service.core.packed import PackedInput, PackedResult
from service.core.steps import Picks, Sink
from service.errors import InvalidInput
from service.repository.models import Model
from service.store import SessionRecord
from service.types import NamedTensor, StepInput, StepResult


def step_result(model: Model, rec: SessionRecord, logits: np.ndarray, options: OutputOptions, replayed: bool,
                acts: list[np.ndarray] | None = None, picks: Picks | None = None) -> StepResult:
    """A chunk's reply: `logits` (T, C), `acts` each (T, H) in the model's order, `rec` its session after it."""
    activations = None
    if picks is not None and acts is not None:
        activations = []
        for i, name, units in picks:
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


class StepReplies(Sink):
    """One StepResult per chunk of a list of StepInput."""

    def __init__(self, inputs: Sequence[StepInput]) -> None:
        self.inputs = inputs
        self.results: dict[int, StepResult] = {}
        self.records: dict[int, SessionRecord] = {}  # each chunk's session after it
        self._ran: dict[int, tuple[np.ndarray, list[np.ndarray] | None, Picks | None]] = {}

    def ran(self, chunks: list[int], logits: np.ndarray, acts: list[np.ndarray] | None, picks: Picks | None) -> None:
        for j, i in enumerate(chunks):
            self._ran[i] = (logits[j], None if acts is None else [a[j] for a in acts], picks)

    def replayed(self, i: int, model: Model, rec: SessionRecord, logits: np.ndarray,
                 acts: list[np.ndarray] | None, picks: Picks | None) -> None:
        self.records[i] = rec
        self.results[i] = step_result(model, rec, logits[0], self.inputs[i].options, True,
                                      None if acts is None else [a[0] for a in acts], picks)

    def committed(self, i: int, model: Model, rec: SessionRecord) -> None:
        logits, acts, picks = self._ran.pop(i)
        self.records[i] = rec
        self.results[i] = step_result(model, rec, logits, self.inputs[i].options, False, acts, picks)

    def logits(self, i: int) -> np.ndarray:
        """The logits of chunk i as it ran (before commit): Generate samples from them."""
        return self._ran[i][0]


class _PackedRows:
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



class PackedReplies(Sink):
    """The packed batch's columnar reply."""

    def __init__(self, p: PackedInput, lay: packed.Layout) -> None:
        self.p = p
        self.res = PackedResult(np.full(lay.n, -1, np.int64), np.full(lay.n, -1, np.int64))
        self.out = _PackedRows(lay, p.final_only)

    def accepts(self, i: int, model: Model, picks: Picks | None) -> None:
        out = self.out
        if not out.accepts(model):
            raise InvalidInput(f"a packed batch has one output width: model {model.name} has {model.classes} "
                               f"outputs, the batch's first model {out.classes}")
        if picks is not None and not out.accepts_activations(model, picks):
            raise InvalidInput(f"a packed batch has one activation layout: model {model.name}'s selected "
                               "activations differ from the batch's first model's")

    def ran(self, chunks: list[int], logits: np.ndarray, acts: list[np.ndarray] | None, picks: Picks | None) -> None:
        idx = np.array(chunks, np.int64)
        if picks is not None and acts is not None:
            self.out.place_activations(idx, picks, acts)
        self.out.place(idx, logits)

    def replayed(self, i: int, model: Model, rec: SessionRecord, logits: np.ndarray,
                 acts: list[np.ndarray] | None, picks: Picks | None) -> None:
        self.ran([i], logits, acts, picks)
        self.res.offsets[i], self.res.start_offsets[i] = rec.offset, rec.last_start
        self.res.replayed.append(i)

    def committed(self, i: int, model: Model, rec: SessionRecord) -> None:
        self.res.offsets[i], self.res.start_offsets[i] = rec.offset, rec.last_start

    def committed_rows(self, chunks: list[int], model: Model, starts: np.ndarray, steps: int,
                       record: Callable[[int], SessionRecord]) -> None:
        self.res.offsets[chunks], self.res.start_offsets[chunks] = starts + steps, starts

    def refused_at(self, i: int, offset: int) -> None:
        self.res.offsets[i] = offset

    def finish(self, errors: dict[int, Exception]) -> PackedResult:
        res, out, p = self.res, self.out, self.p
        res.errors = errors
        res.replayed.sort()
        if p.activations is not None:
            res.activations = out.named_activations(errors)
        res.argmax, res.logits = out.finish(errors, p.return_logits)
        if p.top_k and res.logits is not None and out.classes:
            res.top_ids, res.top_probs = top_k_of(res.logits, p.top_k)
        if not p.return_logits:
            res.logits = None
        return res
