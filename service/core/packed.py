"""The columnar batch (PackedStepBatch): its columns checked against each other and decoded with
numpy. The chunk pipeline reads chunks from them (steps.PackedColumns); the reply's rows are
assembled in replies.PackedReplies.

Chunk i is session_ids[i], lengths[i] steps starting at row starts[i] of one token (or feature)
array. Output rows follow the same layout (one row per chunk with final_only). Every size is
checked before any per-element work; per-chunk problems refuse that chunk only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.core.outputs import ActivationRequest
from service.errors import InvalidInput, LimitExceeded
from service.types import NamedTensor


@dataclass(frozen=True)
class PackedInput:
    session_ids: Sequence[str]
    lengths: Sequence[int]
    tokens: bytes = b""  # little-endian int32 [sum(lengths)]
    features: bytes = b""  # little-endian float32 [sum(lengths), feature_dim]
    expected_offsets: Sequence[int] = ()  # empty, or one per chunk (-1: not checked)
    return_logits: bool = False
    final_only: bool = False
    top_k: int = 0
    deadline: float | None = None
    activations: ActivationRequest | None = None


@dataclass
class PackedResult:
    offsets: np.ndarray  # int64 (n,)
    start_offsets: np.ndarray  # int64 (n,)
    errors: dict[int, Exception] = field(default_factory=dict)  # refused chunks
    replayed: list[int] = field(default_factory=list)
    argmax: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (rows,)
    logits: np.ndarray | None = None  # (rows, C) when asked
    top_ids: np.ndarray | None = None  # (rows, k)
    top_probs: np.ndarray | None = None
    activations: list[NamedTensor] | None = None  # each (rows, units) when asked

    def applied(self) -> tuple[int, int]:
        """Chunks answered, and the steps they newly applied (a replay applies none): what metrics count."""
        answered = len(self.offsets) - len(self.errors)
        if not answered:
            return 0, 0
        fresh = self.start_offsets >= 0
        fresh[list(self.replayed)] = False
        return answered, int((self.offsets - self.start_offsets)[fresh].sum())


@dataclass
class Layout:
    """A packed batch's decoded columns."""

    n: int
    lengths: np.ndarray  # int64 (n,)
    starts: np.ndarray  # int64 (n,): first row of each chunk
    total: int
    kind: str  # "tokens" or "features" ("" for an empty batch)
    ids: np.ndarray | None  # int64 (total,) for tokens
    expected: np.ndarray | None  # int64 (n,) or None: nothing checked


def layout(p: PackedInput, max_chunks: int) -> Layout:
    """The columns checked against each other (not yet against any model); a problem here refuses
    the whole message, since no chunk's rows could be found."""
    n = len(p.session_ids)
    if n > max_chunks:
        raise LimitExceeded(f"a PackedStepBatch holds at most {max_chunks} chunks (--max-batch-chunks); "
                            f"this one holds {n}")
    if len(p.lengths) != n:
        raise InvalidInput(f"lengths must hold one length per session id: {len(p.lengths)} lengths for {n} ids")
    if len(p.expected_offsets) not in (0, n):
        raise InvalidInput(f"expected_offsets must be empty or hold one offset per session id: "
                           f"{len(p.expected_offsets)} for {n} ids")
    if p.top_k < 0:
        raise InvalidInput("top_k must be 0 or more")  # as steps.NEGATIVE_TOP_K: one option for the message
    lengths = np.array(p.lengths, dtype=np.int64)
    if n and lengths.min() < 0:
        raise InvalidInput(f"lengths must be 1 or more; chunk {int(np.argmin(lengths))} has {int(lengths.min())}")
    total = int(lengths.sum())
    starts = np.zeros(n, np.int64)
    if n > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    expected = np.array(p.expected_offsets, dtype=np.int64) if len(p.expected_offsets) else None
    if p.tokens and p.features:
        raise InvalidInput("give tokens or features, not both")
    if p.tokens:
        if len(p.tokens) != 4 * total:
            raise InvalidInput(f"tokens must hold sum(lengths) = {total} little-endian int32 values "
                               f"({4 * total} bytes); it holds {len(p.tokens)} bytes")
        ids = np.frombuffer(p.tokens, dtype="<i4").astype(np.int64)
        return Layout(n, lengths, starts, total, "tokens", ids, expected)
    if p.features:
        return Layout(n, lengths, starts, total, "features", None, expected)  # the width is the model's
    if total:
        raise InvalidInput(f"lengths add up to {total} steps but neither tokens nor features was given")
    return Layout(n, lengths, starts, total, "", None, expected)


def features_of(p: PackedInput, lay: Layout, width: int) -> np.ndarray:
    """The feature rows (total, width) for models `width` wide; refuses the message if they do not fit."""
    row = 4 * width
    if len(p.features) != row * lay.total:
        raise InvalidInput(f"features must hold sum(lengths) = {lay.total} rows of {width} little-endian float32 "
                           f"({row * lay.total} bytes); it holds {len(p.features)} bytes")
    return np.frombuffer(p.features, dtype="<f4").reshape(lay.total, width).astype(np.float32)


def first_bad_token(lay: Layout, vocab_size: int) -> dict[int, tuple[int, int]]:
    """Chunks holding a token id outside [0, vocab_size): chunk -> (position in the chunk, id)."""
    assert lay.ids is not None
    bad = np.flatnonzero((lay.ids < 0) | (lay.ids >= vocab_size))
    if not len(bad):
        return {}
    chunks = np.searchsorted(lay.starts, bad, side="right") - 1
    out: dict[int, tuple[int, int]] = {}
    for pos, chunk in zip(bad.tolist(), chunks.tolist()):
        if chunk not in out:
            out[chunk] = (pos - int(lay.starts[chunk]), int(lay.ids[pos]))
    return out


def rows_of(lay: Layout, chunks: np.ndarray, steps: int) -> np.ndarray:
    """Row indices (len(chunks), steps) of equal-length chunks."""
    return lay.starts[chunks][:, None] + np.arange(steps)
