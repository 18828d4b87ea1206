"""From logits to what a client reads: probabilities, top-k, labels, text; and sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.models import Model


@dataclass(frozen=True)
class OutputOptions:
    top_k: int = 0
    return_logits: bool = False
    final_only: bool = False  # many-to-one: only the last step's output
    return_state: bool = False
    compact: bool = False  # argmax ids and text only, no per-step StepOutput


@dataclass(frozen=True)
class StepOutput:
    argmax: int
    top_ids: list[int]
    top_probs: list[float]
    label: str  # tagger and classifier heads
    text: str  # lm head: the predicted next token


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def step_outputs(model: Model, logits: np.ndarray, top_k: int) -> list[StepOutput]:
    """One StepOutput per row of `logits` (T, C). Probabilities are computed only when top-k is asked."""
    argmax = logits.argmax(axis=-1).tolist()
    k = min(top_k, logits.shape[-1])
    if k:
        probs = softmax(logits.astype(np.float64))
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        top_ids = top.tolist()
        top_probs = np.take_along_axis(probs, top, axis=-1).tolist()
    else:
        top_ids = top_probs = [[]] * len(argmax)
    if model.head == "lm":
        labels, texts = [""] * len(argmax), [model.decode_token(a) for a in argmax]
    else:
        labels, texts = [model.labels[a] for a in argmax], [""] * len(argmax)
    return [StepOutput(a, i, p, lab, t) for a, i, p, lab, t in zip(argmax, top_ids, top_probs, labels, texts)]


def sample(logits: np.ndarray, rng: np.random.Generator, *, temperature: float, top_k: int, top_p: float) -> int:
    """Draw one id from `logits` (C,): greedy at temperature 0, else top-k then nucleus (top-p) filtered."""
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = softmax(logits.astype(np.float64) / temperature)
    order = np.argsort(-probs, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    if 0 < top_p < 1:
        cum = np.cumsum(probs[order])
        order = order[: int(np.searchsorted(cum, top_p) + 1)]
    p = probs[order] / probs[order].sum()
    return int(order[rng.choice(len(order), p=p)])
