"""The core's own types: what the transport converts wire messages to and from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.core.outputs import OutputOptions, StepOutput


@dataclass(frozen=True)
class NamedTensor:
    name: str
    value: np.ndarray  # float32


@dataclass(frozen=True)
class SessionView:
    session_id: str
    tenant: str
    model: str
    version: int
    offset: int
    created_at: float
    updated_at: float
    expires_at: float
    state: list[NamedTensor] | None = None
    last_request: str = ""  # the replay key of its last chunk (what a record keeps of it: service.core.sessions)


@dataclass(frozen=True)
class StepInput:
    session_id: str
    tokens: Sequence[int] = ()  # a list, or the wire message's repeated field as it is
    text: str = ""
    features: bytes = b""
    expected_offset: int | None = None
    options: OutputOptions = OutputOptions()
    deadline: float | None = None  # on the event loop's clock: past it, the chunk is not applied
    replay_key: str = ""  # a request id that names this chunk (Open Inference Protocol): its retry is replayed


@dataclass(frozen=True)
class StepResult:
    session_id: str
    start_offset: int
    offset: int
    replayed: bool
    argmax: list[int]
    outputs: list[StepOutput]  # empty when compact output was asked for
    text: str
    logits: np.ndarray | None  # (steps, classes) when asked
    state: list[NamedTensor] | None
    activations: list[NamedTensor] | None = None  # each (steps, units) when asked


@dataclass(frozen=True)
class GenerateInput:
    session_id: str
    prompt: str = ""
    prompt_tokens: list[int] = field(default_factory=list)
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    expected_offset: int | None = None


@dataclass(frozen=True)
class GeneratedToken:
    token: int
    text: str
    offset: int
    done: bool
    finish_reason: str = ""
