"""The core's entry points in one shape, for the tests that hold each of them to the same rules
(tests/core/test_entry_points.py, tests/core/test_sequences.py): `send(core, chunk)` gives one chunk
to a session through Step, StepBatch, the packed batch or Generate and answers a `Sent`, or raises
the error that refused the chunk. Also the input rules every entry point keeps, as data."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.outputs import ActivationRequest, OutputOptions
from service.core.packed import PackedInput
from service.core.sessions import SessionService
from service.errors import InvalidInput, LimitExceeded, SessionNotFound
from service.store.base import Events
from service.types import GenerateInput, StepInput

TENANT = "t"


@dataclass(frozen=True)
class Chunk:
    """One chunk for a session: tokens (T,) or features (T, D)."""

    session_id: str
    x: np.ndarray
    expected: int | None = None
    activations: ActivationRequest | None = None
    top_k: int = 0


@dataclass(frozen=True)
class Sent:
    """A chunk as an entry point answered it. Generate answers the token it made after the chunk
    (`made`) and no logits."""

    start_offset: int
    offset: int
    replayed: bool
    logits: np.ndarray | None  # (T, classes)
    made: list[int] = field(default_factory=list)


Send = Callable[[SessionService, Chunk], Awaitable[Sent]]


def step_input(c: Chunk) -> StepInput:
    body: dict[str, Any] = ({"features": np.ascontiguousarray(c.x, "<f4").tobytes()} if c.x.ndim == 2
                            else {"tokens": [int(t) for t in c.x]})
    return StepInput(c.session_id, expected_offset=c.expected,
                     options=OutputOptions(top_k=c.top_k, return_logits=True, activations=c.activations), **body)


async def via_step(core: SessionService, c: Chunk) -> Sent:
    r = await core.step(TENANT, step_input(c))
    return Sent(r.start_offset, r.offset, r.replayed, r.logits)


async def via_batch(core: SessionService, c: Chunk) -> Sent:
    [r] = await core.step_batch(TENANT, [step_input(c)])
    if isinstance(r, Exception):
        raise r
    return Sent(r.start_offset, r.offset, r.replayed, r.logits)


async def via_packed(core: SessionService, c: Chunk) -> Sent:
    body = ({"features": np.ascontiguousarray(c.x, "<f4").tobytes()} if c.x.ndim == 2
            else {"tokens": np.asarray(c.x, "<i4").tobytes()})
    r = await core.step_packed(TENANT, PackedInput(
        [c.session_id], [len(c.x)], expected_offsets=[-1 if c.expected is None else c.expected], return_logits=True,
        top_k=c.top_k, activations=c.activations, **body))
    if 0 in r.errors:
        raise r.errors[0]
    return Sent(int(r.start_offsets[0]), int(r.offsets[0]), 0 in r.replayed, r.logits)


async def via_generate(core: SessionService, c: Chunk) -> Sent:
    """The chunk as Generate's prompt, then one greedy token."""
    assert c.x.ndim == 1 and c.activations is None and c.top_k == 0, "Generate takes tokens only"
    g = GenerateInput(c.session_id, prompt_tokens=[int(t) for t in c.x], max_tokens=1, temperature=0,
                      expected_offset=c.expected)
    [made] = [t async for t in core.generate(TENANT, g)]
    return Sent(made.offset - 1 - len(c.x), made.offset, False, None, [made.token])


ENTRIES: dict[str, Send] = {"Step": via_step, "StepBatch": via_batch, "packed": via_packed, "Generate": via_generate}
REPLAYING = ("Step", "StepBatch", "packed")  # Generate keeps no replay: its retry is refused for its offset


async def snapshot(core: SessionService, sid: str) -> tuple:
    """What a refused chunk must leave as it was: the offset and the state."""
    v = await core.get(TENANT, sid, include_state=True)
    return v.offset, [t.value.tobytes() for t in v.state or []]


class CountingEvents(Events):
    """The core's events, counted by kind (the metrics' recur_offset_conflicts_total, ...)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def replayed(self, model: str, version: int, tenant: str) -> None:
        self._count("replayed")

    def conflict(self, model: str, version: int, tenant: str) -> None:
        self._count("conflict")


# -- the input rules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A chunk every entry point in `entries` refuses with `error` and a message holding `words`,
    on a session of `model` (or under `session_id`), in a core with `settings`."""

    name: str
    model: str
    x: np.ndarray
    error: type[Exception]
    words: str
    entries: tuple[str, ...] = ("Step", "StepBatch", "packed", "Generate")
    settings: dict[str, Any] = field(default_factory=dict)
    session_id: str = ""  # "": the session made for the rule
    activations: ActivationRequest | None = None
    top_k: int = 0


_F8 = np.zeros((2, 8), np.float32)
_STEPPING = ("Step", "StepBatch", "packed")  # the entry points that take features and output options

RULES = [
    Rule("bad session id", "lstm-lm", np.array([1]), InvalidInput, "session_id must be 1-128 characters",
         session_id="bad id!"),
    Rule("unknown session", "lstm-lm", np.array([1]), SessionNotFound, "session 'ghost' does not exist",
         session_id="ghost"),
    Rule("features to a tokens model", "lstm-lm", _F8, InvalidInput, "model lstm-lm takes tokens or text, not features",
         entries=_STEPPING),
    Rule("tokens to a features model", "lstm-classifier", np.array([1, 2]), InvalidInput,
         "model lstm-classifier takes features (float32 [time, 8]), not tokens"),
    Rule("chunk over max chunk", "lstm-lm", np.ones(65, np.int64), InvalidInput,
         "chunk of 65 steps is longer than the limit of 64", settings={"max_chunk": 64}),
    Rule("token out of range", "lstm-lm", np.array([1, 2, 98]), InvalidInput,
         "token id 98 at position 2 is out of range [0, 98)"),
    Rule("negative token", "lstm-lm", np.array([-1]), InvalidInput, "token id -1 at position 0"),
    Rule("non-finite features", "lstm-classifier", np.full((1, 8), np.nan, np.float32), InvalidInput,
         "not finite", entries=_STEPPING),
    Rule("infinite features", "lstm-classifier", np.full((1, 8), np.inf, np.float32), InvalidInput,
         "not finite", entries=_STEPPING),
    Rule("activation layer out of range", "gru-lm", np.array([1, 2]), InvalidInput, "has layers 0..1",
         entries=_STEPPING, activations=ActivationRequest(layers=(2,))),
    Rule("activation unit out of range", "gru-lm", np.array([1, 2]), InvalidInput, "has units 0..15, not 16",
         entries=_STEPPING, activations=ActivationRequest(units=(16,))),
    Rule("activation state not in the model", "gru-lm", np.array([1, 2]), InvalidInput, "has states ['h'], not 'c'",
         entries=_STEPPING, activations=ActivationRequest(states=("c",))),
    Rule("activation layer named twice", "gru-lm", np.array([1, 2]), InvalidInput,
         "layer 1 is named more than once", entries=_STEPPING, activations=ActivationRequest(layers=(-1, 1))),
    Rule("negative top_k", "lstm-lm", np.array([1, 2]), InvalidInput, "top_k must be 0 or more", entries=_STEPPING,
         top_k=-1),
    # 64 steps: Step's logits (64 x 98 float32) and Generate's prompt and token, each over 1,000 bytes
    Rule("reply over --max-reply-bytes", "lstm-lm", np.ones(64, np.int64), LimitExceeded, "(--max-reply-bytes)",
         settings={"max_reply_bytes": 1000}),
]


def rule_chunk(rule: Rule, sid: str) -> Chunk:
    return Chunk(rule.session_id or sid, rule.x, activations=rule.activations, top_k=rule.top_k)


def masked(message: str) -> str:
    """A message with its numbers masked: a reply budget's bytes depend on the reply's format."""
    return re.sub(r"\d+", "N", message)
