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
from service.schema import problem as schema_problem

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32"}
MANIFEST_FORMATS = (1,)  # manifest layouts this server reads
INITIAL_STATES = ("zeros",)  # how a new session's state may start


def _varint(blob: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = blob[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _fields(blob: bytes) -> list[tuple[int, int | bytes]]:
    """The top-level fields of a protobuf message (number, value); enough to read an ONNX header."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(blob):
        key, pos = _varint(blob, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(blob, pos)
            out.append((number, value))
        elif wire == 2:
            size, pos = _varint(blob, pos)
            out.append((number, blob[pos : pos + size]))
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return out


def graph_opset(blob: bytes) -> int | None:
    """The default-domain opset an ONNX ModelProto imports (its field 8: domain 1, version 2)."""
    for number, value in _fields(blob):
        if number == 8 and isinstance(value, bytes):
            entry = dict(_fields(value))
            if entry.get(1, b"") in (b"", b"ai.onnx"):
                version = entry.get(2)
                return version if isinstance(version, int) else None
    return None


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
        # code point -> token id (-1: none), so text is encoded without a Python loop per character
        singles = {t: i for t, i in self._char_ids.items() if len(t) == 1}
        table = np.full(max((ord(t) for t in singles), default=-1) + 1, -1, dtype=np.int64)
        for t, i in singles.items():
            table[ord(t)] = i
        self._code_ids = table

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of `text`, one per character; unknown characters map to unk_id."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        table = self._code_ids
        ids = np.where(codes < len(table), table[np.minimum(codes, max(len(table) - 1, 0))], -1) if len(table) else \
            np.full(len(codes), -1, dtype=np.int64)
        unknown = ids < 0
        if unknown.any():
            if self.unk_id is None:
                pos = int(np.argmax(unknown))
                raise InvalidInput(
                    f"text has character {text[pos]!r} at position {pos} that model {self.name} cannot encode"
                )
            ids[unknown] = self.unk_id
        return ids

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
    if not isinstance(manifest, dict):
        raise ModelInvalid(f"{where}: manifest.json is not a JSON object")
    digest = hashlib.sha256(blob).hexdigest()
    if manifest.get("sha256") != digest:
        raise ModelInvalid(f"{where}: model.onnx has sha256 {digest} but the manifest says {manifest.get('sha256')}")
    if manifest.get("format") not in MANIFEST_FORMATS:
        raise ModelInvalid(f"{where}: manifest format {manifest.get('format')!r} is not one this server reads "
                           f"{list(MANIFEST_FORMATS)}")
    bad = schema_problem(manifest)  # docs/manifest.schema.json
    if bad is not None:
        raise ModelInvalid(f"{where}: manifest field {bad[0]} {bad[1]} (docs/manifest.schema.json)")
    if manifest["input"]["kind"] == "tokens" and "vocab_size" not in manifest["input"]:
        raise ModelInvalid(f"{where}: manifest field input.vocab_size is missing (a tokens input needs it)")
    try:
        opset = graph_opset(blob)
    except (IndexError, ValueError) as e:
        raise ModelInvalid(f"{where}: model.onnx is not an ONNX model ({e.__class__.__name__})") from e
    if manifest.get("opset") != opset:
        raise ModelInvalid(f"{where}: the manifest says opset {manifest.get('opset')!r} but the graph imports {opset}")
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
        if s.get("initial") not in INITIAL_STATES:
            raise ModelInvalid(f"{where}: state {s['name']!r} starts at {s.get('initial')!r}; "
                               f"this server starts states at {list(INITIAL_STATES)}")
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
        input_kind=inp["kind"],
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
        for stray in sorted(p for p in root.glob("*/*.onnx") if not p.parent.name.startswith(".")):
            log.error("refusing model: %s: not in a VERSION directory, no manifest.json; run recur import", stray)
        for directory in sorted(d for d in root.glob("*/*") if d.is_dir() and d.name.isdigit()):
            if not (directory / "manifest.json").is_file():
                log.error("refusing model: %s: no manifest.json; run recur import", directory)
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
