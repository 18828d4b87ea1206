"""The reply budget: the bytes a request's reply will hold and the rows it will run, computed from its
declared shapes alone (chunk lengths, the model's widths, the selected outputs and activations, top-k)
before any session is read or any model runs. Every entry point (Step, Stream, StepBatch, StreamBatch,
StepPacked, StreamPacked, ModelInfer, ModelStreamInfer, Generate) goes through `reply_budget`, so a
field that changes what a reply holds is counted here once.

The figures are upper bounds of the serialized reply (protobuf framing included), never guesses
below it: a request under the budget cannot build a reply over --max-reply-bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from service.core.outputs import ActivationRequest, OutputOptions
from service.errors import LimitExceeded
from service.repository.models import Model

CHUNK_OVERHEAD = 512  # a chunk's ids, offsets, status and field tags, beyond its per-step rows
TENSOR_OVERHEAD = 64  # a named tensor's name, shape and tags
GENERATED_OVERHEAD = 48  # one GenerateResponse beyond its text


@dataclass(frozen=True)
class Widths:
    """What a model's reply rows are made of. For a request whose model is not known yet (a batch
    before its sessions are read, a stream's read-ahead), the widest of the loaded models bounds it."""

    classes: int = 0
    token_bytes: int = 0  # longest decoded token or label, UTF-8
    state_bytes: int = 0  # a session's state tensors, float32
    state_tensors: int = 0
    layers: int = 0  # activation layers (0: exported without activations)
    act_states: int = 0  # activation kinds (h, and c for an LSTM)
    act_units: int = 0  # widest activation tensor
    feature_dim: int = 0  # narrowest feature input (steps of a features chunk)

    @classmethod
    def of(cls, m: Model) -> Widths:
        words = m.vocab if m.head == "lm" else m.labels
        acts = m.activations
        return cls(
            classes=m.classes,
            token_bytes=max((len(w.encode("utf-8", "surrogatepass")) for w in words), default=0) + 3,  # + U+FFFD
            state_bytes=sum(4 * s.layers * s.hidden for s in m.states), state_tensors=len(m.states),
            layers=max((a.layer + 1 for a in acts), default=0), act_states=len({a.state for a in acts}),
            act_units=max((a.units for a in acts), default=0), feature_dim=m.feature_dim)

    @classmethod
    def widest(cls, models: Iterable[Model]) -> Widths:
        ws = [widths_of(m) for m in models]
        if not ws:
            return cls()
        dims = [w.feature_dim for w in ws if w.feature_dim]
        return cls(max(w.classes for w in ws), max(w.token_bytes for w in ws), max(w.state_bytes for w in ws),
                   max(w.state_tensors for w in ws), max(w.layers for w in ws), max(w.act_states for w in ws),
                   max(w.act_units for w in ws), min(dims, default=0))


@dataclass(frozen=True)
class Shape:
    """What a request declares: its chunks and their steps, and what it asks back."""

    chunks: int
    steps: int  # all chunks together
    options: OutputOptions = OutputOptions()
    columnar: bool = False  # the packed reply: int32 argmax and float32 columns, no per-step text
    generated: int = 0  # Generate: tokens it may send back


@dataclass(frozen=True)
class Budget:
    rows: int  # model rows x steps it runs
    bytes: int  # the most its reply (or, for Generate, its replies together) can hold


def _activation_units(w: Widths, a: ActivationRequest) -> tuple[int, int]:
    """The selected activation tensors and their units together, per output row."""
    tensors = (len(a.states) or w.act_states) * (len(a.layers) or w.layers)
    return tensors, tensors * (len(a.units) or w.act_units)


def reply_budget(w: Widths, s: Shape) -> Budget:
    o = s.options
    rows = s.chunks if o.final_only else s.steps  # output rows
    k = min(o.top_k, w.classes)
    size = s.chunks * CHUNK_OVERHEAD
    if s.columnar:
        size += rows * (4 + 8 * k)  # argmax, top ids and probabilities
    else:
        size += rows * (6 + w.token_bytes)  # argmax and text
        if not o.compact:
            size += rows * (16 + w.token_bytes + 11 * k)  # a StepOutput: argmax, label or text, top-k
    if o.return_logits:
        size += rows * w.classes * 4
    if o.return_state:
        size += s.chunks * (w.state_bytes + w.state_tensors * TENSOR_OVERHEAD)
    if o.activations is not None:
        tensors, units = _activation_units(w, o.activations)
        size += rows * units * 4 + s.chunks * tensors * TENSOR_OVERHEAD
    size += s.generated * (GENERATED_OVERHEAD + w.token_bytes)
    return Budget(s.steps + s.generated, size)


def check(b: Budget, max_reply_bytes: int) -> Budget:
    """The budget, or RESOURCE_EXHAUSTED naming the bound when the reply would not fit."""
    if b.bytes > max_reply_bytes:
        raise LimitExceeded(f"the reply to this request would hold up to {b.bytes} bytes ({b.rows} steps), over "
                            f"the limit of {max_reply_bytes} (--max-reply-bytes); ask for fewer steps, outputs or "
                            "activations per request")
    return b


_WIDTHS: dict[int, tuple[weakref.ref[Model], Widths]] = {}


def widths_of(m: Model) -> Widths:
    """A model's widths, computed once per loaded model."""
    hit = _WIDTHS.get(id(m))
    if hit is None or hit[0]() is not m:
        if len(_WIDTHS) > 1024:  # models come and go with reloads: forget the dead ones
            for k in [k for k, (ref, _) in _WIDTHS.items() if ref() is None]:
                del _WIDTHS[k]
        hit = _WIDTHS[id(m)] = (weakref.ref(m), Widths.of(m))
    return hit[1]
