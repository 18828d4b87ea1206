"""The model repository: models/NAME/VERSION/{model.onnx, manifest.json}.

A model is loaded only when its manifest and its graph agree: sha256, input name,
dtype and shape, state tensors, output. A mismatch is refused with a message that
names what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.errors import InvalidInput, ModelInvalid, ModelNotFound
from service.runtime import ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32"}


@dataclass(frozen=True)
class StateSpec:
    name: str  # graph input
    output: str  # graph output carrying the new value
    layers: int
    hidden: int


@dataclass
class Model:
    """A loaded, validated model: its manifest's contract and a runtime to run it."""

    name: str
    version: int
    cell: str
    head: str  # lm, tagger, classifier
    input_kind: str  # tokens, features
    input_name: str
    feature_dim: int  # features only
    vocab: list[str]  # tokens only
    unk_id: int | None
    labels: list[str]
    classes: int
    states: list[StateSpec]
    metrics: dict[str, float]
    runtime: ModelRuntime
    _char_ids: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._char_ids = {t: i for i, t in enumerate(self.vocab) if i != self.unk_id}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, one per character; unknown characters map to unk_id."""
        out = []
        for pos, ch in enumerate(text):
            i = self._char_ids.get(ch)
            if i is None:
                if self.unk_id is None:
                    raise InvalidInput(
                        f"text has character {ch!r} at position {pos} that model {self.name} cannot encode"
                    )
                i = self.unk_id
            out.append(i)
        return out

    def decode_token(self, token: int) -> str:
        if token == self.unk_id:
            return "\ufffd"
        return self.vocab[token]

    def zero_state(self) -> list[np.ndarray]:
        return [np.zeros((s.layers, s.hidden), dtype=np.float32) for s in self.states]


def _shape_str(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_io(where: str, kind: str, spec_name: str, spec_dtype: str, spec_shape: list, graph: dict) -> None:
    node = graph.get(spec_name)
    if node is None:
        raise ModelInvalid(f"{where}: manifest names {kind} {spec_name!r} but the graph has {sorted(graph)}")
    dtype = _ORT_DTYPES.get(node.type, node.type)
    if dtype != spec_dtype:
        raise ModelInvalid(f"{where}: {kind} {spec_name!r} is {spec_dtype} in the manifest but {dtype} in the graph")
    g_shape = list(node.shape)
    fixed_ok = len(g_shape) == len(spec_shape) and all(
        g == w if isinstance(w, int) else not isinstance(g, int) for g, w in zip(g_shape, spec_shape)
    )
    if not fixed_ok:
        raise ModelInvalid(
            f"{where}: {kind} {spec_name!r} has shape {_shape_str(spec_shape)} in the manifest "
            f"but {_shape_str(list(node.shape))} in the graph"
        )


def load_model(directory: Path, options: RuntimeOptions) -> Model:
    """Load and validate one model version directory; raises ModelInvalid naming the difference."""
    where = str(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        blob = (directory / "model.onnx").read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        raise ModelInvalid(f"{where}: cannot read manifest.json and model.onnx ({e.__class__.__name__})") from e
    digest = hashlib.sha256(blob).hexdigest()
    if manifest.get("sha256") != digest:
        raise ModelInvalid(f"{where}: model.onnx has sha256 {digest} but the manifest says {manifest.get('sha256')}")
    try:
        inp, head, states = manifest["input"], manifest["head"], manifest["state"]
        runtime = ModelRuntime(blob, options, input_name=inp["name"], output_name=head["output"],
                               state_inputs=[s["name"] for s in states], state_outputs=[s["output"] for s in states])
    except KeyError as e:
        raise ModelInvalid(f"{where}: manifest lacks {e}") from e
    _check_io(where, "input", inp["name"], inp["dtype"], inp["shape"], runtime.graph_inputs)
    _check_io(where, "output", head["output"], "float32", head["shape"], runtime.graph_outputs)
    specs = []
    for s in states:
        _check_io(where, "state", s["name"], s["dtype"], s["shape"], runtime.graph_inputs)
        _check_io(where, "state", s["output"], s["dtype"], s["shape"], runtime.graph_outputs)
        specs.append(StateSpec(s["name"], s["output"], int(s["shape"][0]), int(s["shape"][2])))
    extra = set(runtime.graph_inputs) - {inp["name"], *(s["name"] for s in states)}
    if extra:
        raise ModelInvalid(f"{where}: the graph has inputs {sorted(extra)} that the manifest does not describe")
    vocab = manifest.get("vocabulary") or {}
    classes = int(head["shape"][2])
    if inp["kind"] == "tokens" and len(vocab.get("tokens", [])) != int(inp["vocab_size"]):
        n = len(vocab.get("tokens", []))
        raise ModelInvalid(f"{where}: vocabulary has {n} tokens, input says {inp['vocab_size']}")
    labels = head.get("labels") or []
    if head["kind"] != "lm" and len(labels) != classes:
        raise ModelInvalid(f"{where}: head has {classes} outputs but {len(labels)} labels")
    metrics = {k: float(v) for k, v in ((manifest.get("training") or {}).get("metrics") or {}).items()
               if isinstance(v, (int, float))}
    return Model(
        name=manifest["name"], version=int(manifest["version"]), cell=manifest["cell"], head=head["kind"],
        input_kind=inp["kind"], input_name=inp["name"],
        feature_dim=int(inp["shape"][2]) if inp["kind"] == "features" else 0,
        vocab=list(vocab.get("tokens", [])), unk_id=vocab.get("unk_id"), labels=list(labels), classes=classes,
        states=specs, metrics=metrics, runtime=runtime,
    )


class ModelRepository:
    """All valid models under a directory; invalid ones are logged and left out."""

    def __init__(self, models: list[Model]) -> None:
        self._models = {(m.name, m.version): m for m in models}

    @classmethod
    def load(cls, root: Path, options: RuntimeOptions) -> ModelRepository:
        models = []
        for manifest in sorted(root.glob("*/*/manifest.json")):
            directory = manifest.parent
            if not directory.name.isdigit():
                continue
            try:
                model = load_model(directory, options)
            except ModelInvalid as e:
                log.error("refusing model: %s", e)
                continue
            if (model.name, model.version) != (directory.parent.name, int(directory.name)):
                log.error("refusing model: %s: manifest says %s/%s", directory, model.name, model.version)
                continue
            models.append(model)
            log.info("loaded model %s version %d (%s %s)", model.name, model.version, model.cell, model.head)
        return cls(models)

    def all(self) -> list[Model]:
        return [self._models[k] for k in sorted(self._models)]

    def get(self, name: str, version: int = 0) -> Model:
        """The model `name` at `version` (0: the latest)."""
        model = self._models.get((name, version))
        if model is not None:
            return model
        versions = sorted(v for (n, v) in self._models if n == name)
        if not versions:
            known = ", ".join(sorted({n for n, _ in self._models})) or "none"
            raise ModelNotFound(f"model {name!r} is not loaded (loaded: {known})")
        if version == 0:
            version = versions[-1]
        if (name, version) not in self._models:
            raise ModelNotFound(f"model {name!r} has no version {version} (versions: {versions})")
        return self._models[(name, version)]
