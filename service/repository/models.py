"""The model repository: models/NAME/VERSION/{model.onnx, manifest.json} (and activations.onnx, the
graph with per-step activations, for models exported with them).

A model is loaded only when its manifest and its graph agree: sha256, input name,
dtype and shape, state tensors, output. A mismatch is refused with a message that
names what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from service.engine.runtime import ActivationGraph, ModelRuntime, RuntimeOptions
from service.errors import InvalidInput, ModelInvalid, ModelNotFound, ModelUnloaded
from service.repository.schema import problem as schema_problem

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


def graph_output_names(blob: bytes) -> list[str]:
    """The output names of an ONNX ModelProto's graph (field 7; GraphProto.output is field 12, its name field 1),
    read without onnx, which the serving image lacks."""
    names = []
    for number, graph in _fields(blob):
        if number == 7 and isinstance(graph, bytes):
            for gnum, info in _fields(graph):
                if gnum == 12 and isinstance(info, bytes):
                    name = dict(_fields(info)).get(1, b"")
                    names.append(name.decode() if isinstance(name, bytes) else "")
    return names


def unloaded(name: str, version: int) -> ModelUnloaded:
    return ModelUnloaded(f"version {version} of model {name} was unloaded; export the session or migrate it "
                         "(MigrateSession) to a loaded version")


@dataclass(frozen=True)
class StateSpec:
    name: str  # graph input
    output: str  # graph output carrying the new value
    layers: int
    hidden: int


@dataclass(frozen=True)
class ActivationSpec:
    """One per-step activation a model can return: `state` (h or c) of `layer` at every step, (B, T, units)."""

    output: str  # output of the activation graph
    state: str  # h, c
    layer: int
    units: int


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
    sha256: str = ""  # of model.onnx, as the manifest says: a reload loads a version again when it changes
    activations: list[ActivationSpec] = field(default_factory=list)  # empty: exported without them
    activations_sha256: str = ""  # of the activation graph: a re-export may change only that
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


def read_manifest(directory: Path) -> dict:
    """A version directory's manifest.json as a JSON object; ModelInvalid saying why it is not one."""
    where = str(directory)
    try:
        text = (directory / "manifest.json").read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ModelInvalid(f"{where}: no manifest.json; run recur import") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelInvalid(f"{where}: cannot read manifest.json ({e.__class__.__name__})") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelInvalid(f"{where}: manifest.json is not valid JSON (line {e.lineno}, column {e.colno})") from e
    if not isinstance(manifest, dict):
        raise ModelInvalid(f"{where}: manifest.json is not a JSON object")
    return manifest


def load_model(directory: Path, options: RuntimeOptions) -> Model:
    """Load and validate one model version directory; raises ModelInvalid naming the difference
    (the field, for a manifest defect). Nothing else escapes: any defect is a refusal of this model."""
    try:
        return _load_model(directory, options)
    except ModelInvalid:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a defect the checks above did not name
        raise ModelInvalid(f"{directory}: manifest is malformed ({e.__class__.__name__}: {e})") from e
    except Exception as e:  # onnxruntime refusing the graph, and the like
        raise ModelInvalid(f"{directory}: model.onnx cannot be loaded ({e.__class__.__name__}: "
                           f"{str(e)[:200]})") from e


def _load_model(directory: Path, options: RuntimeOptions) -> Model:
    where = str(directory)
    manifest = read_manifest(directory)
    if manifest.get("format") not in MANIFEST_FORMATS:
        raise ModelInvalid(f"{where}: manifest format {manifest.get('format')!r} is not one this server reads "
                           f"{list(MANIFEST_FORMATS)}")
    bad = schema_problem(manifest)  # docs/manifest.schema.json
    if bad is not None:
        raise ModelInvalid(f"{where}: manifest field {bad[0]} {bad[1]} (docs/manifest.schema.json)")
    try:
        blob = (directory / "model.onnx").read_bytes()
    except FileNotFoundError as e:
        raise ModelInvalid(f"{where}: model.onnx is missing") from e
    except OSError as e:
        raise ModelInvalid(f"{where}: cannot read model.onnx ({e.__class__.__name__})") from e
    digest = hashlib.sha256(blob).hexdigest()
    if manifest.get("sha256") != digest:
        raise ModelInvalid(f"{where}: model.onnx has sha256 {digest} but the manifest says {manifest.get('sha256')}")
    if manifest["input"]["kind"] == "tokens" and "vocab_size" not in manifest["input"]:
        raise ModelInvalid(f"{where}: manifest field input.vocab_size is missing (a tokens input needs it)")
    try:
        opset = graph_opset(blob)
    except (IndexError, ValueError) as e:
        raise ModelInvalid(f"{where}: model.onnx is not an ONNX model ({e.__class__.__name__})") from e
    if manifest.get("opset") != opset:
        raise ModelInvalid(f"{where}: the manifest says opset {manifest.get('opset')!r} but the graph imports {opset}")
    graph = _activation_graph(directory, manifest)
    try:
        inp, head, states = manifest["input"], manifest["head"], manifest["state"]
        runtime = ModelRuntime(blob, options, input_name=inp["name"], output_name=head["output"],
                               state_inputs=[s["name"] for s in states], state_outputs=[s["output"] for s in states],
                               activations=graph)
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
    acts = _activation_specs(where, manifest)
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
        states=specs, metrics=metrics, runtime=runtime, sha256=digest, activations=acts,
        activations_sha256=graph.sha256 if graph is not None else "",
    )


def _activation_specs(where: str, manifest: dict) -> list[ActivationSpec]:
    """The manifest's activations, checked against the model's layers and states (the schema checked the types)."""
    section = manifest.get("activations")
    if section is None:
        return []
    states = {s["name"].removeprefix("state_") for s in manifest["state"]}
    specs, seen = [], set()
    for i, a in enumerate(section["outputs"]):
        spec = ActivationSpec(a["output"], a["state"], int(a["layer"]), int(a["units"]))
        if spec.layer >= int(manifest["layers"]):
            raise ModelInvalid(f"{where}: manifest field activations.outputs[{i}].layer is {spec.layer} but the "
                               f"model has {manifest['layers']} layers")
        if spec.state not in states:
            raise ModelInvalid(f"{where}: manifest field activations.outputs[{i}].state is {spec.state!r} but the "
                               f"model's states are {sorted(states)}")
        if spec.output in seen:
            raise ModelInvalid(f"{where}: manifest field activations.outputs[{i}].output {spec.output!r} is named "
                               "twice")
        seen.add(spec.output)
        specs.append(spec)
    return specs


def _activation_graph(directory: Path, manifest: dict) -> ActivationGraph | None:
    """The activation graph the manifest names, checked as far as is cheap at load (file, sha256, opset, output
    names); the runtime opens it on the first request for activations and then checks its shapes."""
    section = manifest.get("activations")
    if section is None:
        return None
    where, file = str(directory), section["file"]
    if not file or "/" in file or "\\" in file or file.startswith(".") or file == "model.onnx":
        raise ModelInvalid(f"{where}: manifest field activations.file must name a file beside model.onnx, "
                           f"not {file!r}")
    try:
        blob = (directory / file).read_bytes()
    except FileNotFoundError as e:
        raise ModelInvalid(f"{where}: {file} is missing (the manifest's activations name it)") from e
    except OSError as e:
        raise ModelInvalid(f"{where}: cannot read {file} ({e.__class__.__name__})") from e
    digest = hashlib.sha256(blob).hexdigest()
    if section["sha256"] != digest:
        raise ModelInvalid(f"{where}: {file} has sha256 {digest} but the manifest says {section['sha256']}")
    try:
        opset, names = graph_opset(blob), set(graph_output_names(blob))
    except (IndexError, ValueError) as e:
        raise ModelInvalid(f"{where}: {file} is not an ONNX model ({e.__class__.__name__})") from e
    if manifest.get("opset") != opset:
        raise ModelInvalid(f"{where}: the manifest says opset {manifest.get('opset')!r} but {file} imports {opset}")
    outputs = tuple(a["output"] for a in section["outputs"])
    missing = [o for o in outputs if o not in names]
    if missing:
        raise ModelInvalid(f"{where}: manifest names activation outputs {missing} that {file} lacks")
    inp, head, states = manifest["input"], manifest["head"], manifest["state"]
    units = {a["output"]: a["units"] for a in section["outputs"]}

    def check(inputs: dict, graph_outputs: dict) -> None:  # the same interface as model.onnx, plus activations
        w = f"{where}/{file}"
        _check_io(w, "input", inp["name"], inp["dtype"], inp["shape"], inputs)
        _check_io(w, "output", head["output"], "float32", head["shape"], graph_outputs)
        for s in states:
            _check_io(w, "state", s["name"], s["dtype"], s["shape"], inputs)
            _check_io(w, "state", s["output"], s["dtype"], s["shape"], graph_outputs)
        for o in outputs:
            _check_io(w, "activation", o, "float32", ["batch", "time", units[o]], graph_outputs)
        extra = set(inputs) - {inp["name"], *(s["name"] for s in states)}
        if extra:
            raise ModelInvalid(f"{w}: the graph has inputs {sorted(extra)} that the manifest does not describe")

    return ActivationGraph(directory / file, digest, outputs, check)


@dataclass(frozen=True)
class Refusal:
    """A version directory that was not loaded, and why."""

    path: str  # NAME/VERSION, relative to the repository
    name: str
    version: int
    reason: str


class ModelRepository:
    """The loaded models, mutable at run time (load, unload) from the event loop's thread.

    A version unloaded while sessions used it leaves its state shapes behind (`state_specs`), so
    those sessions can still be read with their state, exported or migrated; calls that would run
    it answer FAILED_PRECONDITION. Loading reads and checks files on the caller's thread: the
    admin API does it on a worker thread (`read`), then `add`s the model on the loop.
    """

    def __init__(self, models: list[Model], root: Path | None = None,
                 options: RuntimeOptions | None = None) -> None:
        self._models = {(m.name, m.version): m for m in models}
        self._retired: dict[tuple[str, int], Model] = {}  # unloaded: metadata only, the runtime freed
        self.root, self.options = root, options or RuntimeOptions()

    @classmethod
    def load(cls, root: Path, options: RuntimeOptions) -> ModelRepository:
        repo = cls([], root, options)
        for directory in repo.candidates():
            try:
                repo.add(repo.read(directory))
            except ModelInvalid as e:
                log.error("refusing model: %s", e)
        return repo

    def candidates(self) -> list[Path]:
        """The version directories under the root (NAME/VERSION, VERSION a number); logs stray graphs."""
        if self.root is None:
            return []
        for stray in sorted(p for p in self.root.glob("*/*.onnx") if not p.parent.name.startswith(".")):
            log.error("refusing model: %s: not in a VERSION directory, no manifest.json; run recur import", stray)
        return sorted((d for d in self.root.glob("*/*") if d.is_dir() and d.name.isdigit()
                       and not d.parent.name.startswith(".")), key=lambda d: (d.parent.name, int(d.name)))

    def directory(self, name: str, version: int) -> Path:
        if self.root is None or not name or name.startswith(".") or "/" in name or "\\" in name or version < 1:
            raise InvalidInput("give a model name and a version of 1 or more")
        return self.root / name / str(version)

    def read(self, directory: Path) -> Model:
        """Load and check one version directory (blocking: files and onnxruntime); ModelInvalid naming why not."""
        model = load_model(directory, self.options)
        if (model.name, model.version) != (directory.parent.name, int(directory.name)):
            raise ModelInvalid(f"{directory}: manifest says {model.name}/{model.version}")
        return model

    def unchanged(self, directory: Path) -> bool:
        """Whether the version in `directory` is loaded from the same graph (by the manifest's sha256)."""
        loaded = self._models.get((directory.parent.name, int(directory.name)))
        if loaded is None:
            return False
        try:
            manifest = read_manifest(directory)
        except ModelInvalid:
            return False
        acts = manifest.get("activations")
        acts_sha = acts.get("sha256", "") if isinstance(acts, dict) else ""
        return manifest.get("sha256") == loaded.sha256 and acts_sha == loaded.activations_sha256

    def add(self, model: Model) -> Model | None:
        """Serve `model` (replacing the same version: new sessions and chunks use it); the one it replaced."""
        key = (model.name, model.version)
        old = self._models.get(key)
        self._models[key] = model
        self._retired.pop(key, None)
        log.info("loaded model %s version %d (%s %s)", model.name, model.version, model.cell, model.head)
        return old

    def unload(self, name: str, version: int) -> Model:
        """Stop serving a version; its state shapes stay known for the sessions left on it."""
        model = self._models.get((name, version))
        if model is None:
            raise ModelNotFound(f"model {name!r} has no loaded version {version}")
        del self._models[(name, version)]
        # what sessions left on it still need (state shapes, sha256 for an export); never run: get() refuses it
        self._retired[(name, version)] = dataclasses.replace(model, runtime=cast(ModelRuntime, None))
        log.warning("unloaded model %s version %d", name, version)
        return model

    def retired(self, name: str, version: int) -> bool:
        """Whether the version was unloaded (a reload leaves it out; only LoadModel brings it back)."""
        return (name, version) in self._retired

    def described(self, name: str, version: int) -> Model:
        """A version's description, loaded or unloaded (an unloaded one has no runtime: never run it)."""
        retired = self._retired.get((name, version))
        return retired if retired is not None else self.get(name, version)

    def state_specs(self, name: str, version: int) -> list[StateSpec]:
        """The state tensors of a version, loaded or unloaded."""
        return self.described(name, version).states

    def all(self) -> list[Model]:
        return [self._models[k] for k in sorted(self._models)]

    def get(self, name: str, version: int = 0) -> Model:
        """The model `name` at `version` (0: the latest)."""
        model = self._models.get((name, version))
        if model is not None:
            return model
        versions = sorted(v for (n, v) in self._models if n == name)
        if not versions and (name, version) in self._retired:
            raise unloaded(name, version)
        if not versions:
            known = ", ".join(sorted({n for n, _ in self._models})) or "none"
            raise ModelNotFound(f"model {name!r} is not loaded (loaded: {known})")
        if version == 0:
            version = versions[-1]
        if (name, version) in self._retired:
            raise unloaded(name, version)
        if (name, version) not in self._models:
            raise ModelNotFound(f"model {name!r} has no version {version} (versions: {versions})")
        return self._models[(name, version)]
