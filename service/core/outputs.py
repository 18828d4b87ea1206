"""From logits to what a client reads: probabilities, top-k, labels, text; and sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.runtime import ActivationsUnavailable
from service.errors import InvalidInput
from service.repository.models import Model

MAX_SELECTION = 4096  # layers, units or states named in one request


@dataclass(frozen=True)
class ActivationRequest:
    """Which per-step activations to return: layers (empty: all; negative from the last), units
    (empty: all), states ("h", "c"; empty: all of the model's)."""

    layers: tuple[int, ...] = ()
    units: tuple[int, ...] = ()
    states: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # sizes first, then sets: a repeated name would multiply the reply
        if max(len(self.layers), len(self.units), len(self.states)) > MAX_SELECTION:
            raise InvalidInput(f"an activation selection names at most {MAX_SELECTION} layers, units or states")
        for what, values in (("activation_layers", self.layers), ("activation_units", self.units),
                             ("activation_states", self.states)):
            if len(set(values)) != len(values):
                raise InvalidInput(f"{what} is a set: it names {_first_repeat(values)!r} more than once")


def _first_repeat(values: tuple) -> object:
    seen = set()
    for v in values:
        if v in seen:
            return v if not isinstance(v, str) else v[:16]
        seen.add(v)
    return None


@dataclass(frozen=True)
class OutputOptions:
    top_k: int = 0
    return_logits: bool = False
    final_only: bool = False  # many-to-one: only the last step's output
    return_state: bool = False
    compact: bool = False  # argmax ids and text only, no per-step StepOutput
    activations: ActivationRequest | None = None  # None: no activations (the graph without them runs)


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


def top_k_of(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely ids (int32) of each row of `logits` (rows, C), most likely first, and their
    probabilities (float32, from a float64 softmax)."""
    k = min(k, logits.shape[-1])
    probs = softmax(logits.astype(np.float64))
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return top.astype(np.int32), np.take_along_axis(probs, top, axis=-1).astype(np.float32)


def step_outputs(model: Model, logits: np.ndarray, top_k: int) -> list[StepOutput]:
    """One StepOutput per row of `logits` (T, C). Probabilities are computed only when top-k is asked."""
    argmax = logits.argmax(axis=-1).tolist()
    if top_k:
        ids, probs = top_k_of(logits, top_k)
        top_ids, top_probs = ids.tolist(), probs.tolist()
    else:
        top_ids = top_probs = [[]] * len(argmax)
    if model.head == "lm":
        labels, texts = [""] * len(argmax), [model.decode_token(a) for a in argmax]
    else:
        labels, texts = [model.labels[a] for a in argmax], [""] * len(argmax)
    return [StepOutput(a, i, p, lab, t) for a, i, p, lab, t in zip(argmax, top_ids, top_probs, labels, texts)]


def select_activations(model: Model, req: ActivationRequest) -> list[tuple[int, str, np.ndarray | None]]:
    """The request resolved against the model: (index into model.activations, tensor name, unit
    indices or None for all), in the model's order of states, then the requested order of layers.
    Refused (never run) when the model has no activations or the selection does not fit it."""
    if not model.activations:
        raise ActivationsUnavailable(f"model {model.name} version {model.version} was exported without activation "
                                     "outputs; export it again (recur export, or training.export.reexport on its "
                                     "directory) to serve them")
    layers = max(a.layer for a in model.activations) + 1
    have = list(dict.fromkeys(a.state for a in model.activations))
    for s in req.states:
        if s not in have:
            raise InvalidInput(f"activation_states: model {model.name} has states {have}, not {s[:16]!r}")
    picked_layers = []
    for layer in req.layers or range(layers):
        if not -layers <= layer < layers:
            raise InvalidInput(f"activation_layers: model {model.name} has layers 0..{layers - 1} (or -1 for the "
                               f"last), not {layer}")
        if layer % layers in picked_layers:
            raise InvalidInput(f"activation_layers is a set: layer {layer % layers} is named more than once")
        picked_layers.append(layer % layers)
    index = {(a.state, a.layer): i for i, a in enumerate(model.activations)}
    out = []
    for s in [s for s in have if s in (req.states or have)]:
        for layer in picked_layers:
            i = index[(s, layer)]
            units = model.activations[i].units
            picked: np.ndarray | None = None
            if req.units:
                picked = np.array(req.units, dtype=np.int64)
                bad = picked[(picked < 0) | (picked >= units)]
                if len(bad):
                    raise InvalidInput(f"activation_units: layer {layer} of {s} has units 0..{units - 1}, not "
                                       f"{int(bad[0])}")
            out.append((i, f"{s}_l{layer}", picked))
    return out


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


MAX_STOP_STRINGS = 64  # Generate's stop strings: how many, and their UTF-8 bytes together
MAX_STOP_BYTES = 4096


class StopStrings:
    """Generate's stop strings as one automaton (Aho-Corasick), so each generated piece costs work in
    its own length, not in the number of stop strings. `feed` answers whether the text so far now
    ends with one of them."""

    def __init__(self, stops: list[str]) -> None:
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidInput(f"stop holds at most {MAX_STOP_STRINGS} strings; got {len(stops)}")
        size = sum(len(s) for s in stops)  # characters: a first bound before encoding anything
        if size > MAX_STOP_BYTES or sum(len(s.encode("utf-8", "surrogatepass")) for s in stops) > MAX_STOP_BYTES:
            raise InvalidInput(f"stop strings hold at most {MAX_STOP_BYTES} UTF-8 bytes together")
        self.goto: list[dict[str, int]] = [{}]
        ends = [False]
        for s in stops:
            if not s:
                continue  # an empty stop string stops nothing
            node = 0
            for ch in s:
                nxt = self.goto[node].get(ch)
                if nxt is None:
                    nxt = self.goto[node][ch] = len(self.goto)
                    self.goto.append({})
                    ends.append(False)
                node = nxt
            ends[node] = True
        self.fail = [0] * len(self.goto)
        order = list(self.goto[0].values())
        for node in order:  # breadth first: a node's failure link is known before its children's
            for ch, child in self.goto[node].items():
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f].get(ch, 0) if node else 0
                ends[child] = ends[child] or ends[self.fail[child]]
                order.append(child)
        self.ends = ends
        self.node = 0
        self.any = len(self.goto) > 1

    def feed(self, piece: str) -> bool:
        if not self.any:
            return False
        node = self.node
        for ch in piece:
            while node and ch not in self.goto[node]:
                node = self.fail[node]
            node = self.goto[node].get(ch, 0)
        self.node = node
        return self.ends[node]
