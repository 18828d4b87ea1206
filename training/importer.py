"""Bring your own model: `recur import MODEL.onnx --name NAME --version N` writes models/NAME/N/.

The graph must follow the serving contract (docs/architecture.md): one data input, tokens
(int64 or int32) [batch, time] or features (float32) [batch, time, D]; state inputs
[layers, batch, hidden] (float32), each with a state output of the same shape carrying its new
value; and one per-step output [batch, time, classes] (float32). Batch and time must be dynamic.

The importer finds the data input and the output, pairs state inputs with state outputs by shape
and then by name (h0/hn, c0/cn, state_h/new_state_h, h_in/h_out ...; --state-pairs when that is
ambiguous), writes the manifest (format 1, the fields training/export.py writes), loads the model
exactly as the server does (service.repository.models.load_model) and checks that running a random sequence
in chunks gives what one pass gives before it puts the directory in place.

This is the training side: it imports onnx (the serving code does not).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from service.engine.runtime import RuntimeOptions
from service.errors import ModelInvalid
from service.repository.models import graph_opset, load_model

MANIFEST_FORMAT = 1
PARITY_TOL = 1e-5
_DTYPES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.INT32: "int32"}
_CELLS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
# name parts that say "before" or "after" rather than which state: h0/hn, state_h/new_state_h, h_in/h_out
_DIRECTION_WORDS = {"in", "input", "inputs", "out", "output", "outputs", "new", "next", "prev", "previous", "old",
                    "init", "initial", "last", "final", "0", "n", "t", "1"}


class ImportRefused(ValueError):
    """The graph cannot be served as it is; the message says why and what to do."""


Dim = int | str | None  # a fixed size, a named dynamic axis, or an unnamed dynamic axis


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: list[Dim] | None  # None: rank unknown

    @property
    def rank(self) -> int:
        return -1 if self.shape is None else len(self.shape)

    def dim(self, i: int) -> Dim:
        assert self.shape is not None
        return self.shape[i]

    def shape_str(self) -> str:
        if self.shape is None:
            return "[?]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass
class ImportResult:
    directory: Path
    manifest: dict
    parity: dict


def _tensor(v: onnx.ValueInfoProto) -> Tensor:
    t = v.type.tensor_type
    elem = int(t.elem_type)
    dtype = _DTYPES.get(elem) or (TensorProto.DataType.Name(elem).lower() if elem else "unknown")
    if not t.HasField("shape"):
        return Tensor(v.name, dtype, None)
    dims: list[Dim] = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None)
    return Tensor(v.name, dtype, dims)


def _fixed(d: Dim) -> bool:
    return isinstance(d, int)


def _manifest_dim(d: Dim, name: str) -> int | str:
    """A manifest shape entry: a fixed size, or the axis's name ('batch', 'time') for a dynamic axis."""
    return d if isinstance(d, int) else name


def _state_key(name: str) -> str:
    """What a state tensor's name says about which state it is, without its before/after words."""
    parts = [p for p in re.split(r"[^a-z0-9]+|(?<=[a-z])(?=[0-9])", name.lower()) if p]
    out = []
    for p in parts:
        if p in _DIRECTION_WORDS:
            continue
        m = re.fullmatch(r"([a-z])(0|n|in|out|t|1)", p)  # h0, hn, cn, c0, hin, hout
        out.append(m.group(1) if m else p)
    return "_".join(out)


def _read_list(path: Path, what: str) -> list[str]:
    """One entry per line, or a JSON list (for entries holding newlines)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ImportRefused(f"{path}: not a JSON list of {what} ({e})") from e
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ImportRefused(f"{path}: a JSON {what} file must be a list of strings")
        return items
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def parse_state_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        inp, sep, out = item.strip().partition(":")
        if not sep or not inp or not out:
            raise ImportRefused(f"--state-pairs wants IN:OUT[,IN:OUT...], not {text!r}")
        pairs.append((inp, out))
    return pairs


def _dynamic_hint(data: Tensor, inputs: list[Tensor], outputs: list[Tensor]) -> str:
    """How to export this graph with dynamic axes (torch.onnx.export's dynamic_axes, with the graph's names)."""
    axes: dict[str, dict[int, str]] = {data.name: {0: "batch", 1: "time"}}
    state_shapes = set()
    for t in inputs:
        if t is not data:
            axes[t.name] = {1: "batch"}
            if t.shape is not None:
                state_shapes.add(tuple(t.shape))
    for o in outputs:
        is_state = o.shape is not None and tuple(o.shape) in state_shapes
        axes[o.name] = {1: "batch"} if is_state else {0: "batch", 1: "time"}
    return (f"export with dynamic axes, e.g. torch.onnx.export(model, args, path, dynamo=False, "
            f"input_names={[t.name for t in inputs]}, output_names={[o.name for o in outputs]}, "
            f"dynamic_axes={axes})")


@dataclass
class GraphSpec:
    data: Tensor
    kind: str  # tokens, features
    output: Tensor
    pairs: list[tuple[Tensor, Tensor]]
    cell: str
    opset: int
    embedding_rows: int | None  # tokens: the rows of the embedding table the tokens index, if found


def inspect(proto: onnx.ModelProto, state_pairs: list[tuple[str, str]] | None = None) -> GraphSpec:
    """What the graph takes and returns, checked against the serving contract; ImportRefused if it does not fit."""
    g = proto.graph
    initializers = {t.name for t in g.initializer}
    inputs = [_tensor(v) for v in g.input if v.name not in initializers]
    outputs = [_tensor(v) for v in g.output]
    by_in, by_out = {t.name: t for t in inputs}, {t.name: t for t in outputs}

    def names(ts: list[Tensor]) -> str:
        return ", ".join(f"{t.name} {t.dtype} {t.shape_str()}" for t in ts) or "none"

    # the data input: tokens [batch, time], else features [batch, time, D] (batch dynamic, unlike a state's layers)
    paired_in = {i for i, _ in state_pairs or []}
    unknown = [n for n in paired_in if n not in by_in] + [o for _, o in state_pairs or [] if o not in by_out]
    if unknown:
        raise ImportRefused(f"--state-pairs names {unknown}, which the graph does not have "
                            f"(inputs: {names(inputs)}; outputs: {names(outputs)})")
    rest = [t for t in inputs if t.name not in paired_in]
    tokens = [t for t in rest if t.dtype in ("int64", "int32") and t.rank == 2]
    features = [t for t in rest if t.dtype == "float32" and t.rank == 3]
    if state_pairs is not None:
        if len(rest) != 1:
            raise ImportRefused(f"with --state-pairs every other input is data, and there must be one; "
                                f"the graph has {names(rest)}")
        candidates = rest
    elif tokens:
        candidates = tokens
    else:
        candidates = [t for t in features if not _fixed(t.dim(0))] or features[:1]
    if len(candidates) != 1:
        raise ImportRefused(f"cannot tell the data input (tokens int64/int32 [batch, time] or features float32 "
                            f"[batch, time, D]) among the graph's inputs: {names(inputs)}")
    data = candidates[0]
    if data.dtype in ("int64", "int32") and data.rank == 2:
        kind = "tokens"
    elif data.dtype == "float32" and data.rank == 3:
        kind = "features"
    else:
        raise ImportRefused(f"data input {data.name!r} is {data.dtype} {data.shape_str()}: the server feeds tokens "
                            f"int64 [batch, time] or features float32 [batch, time, D]")
    # batch and time must be dynamic: the server stacks sessions on the batch axis and cuts chunks in time
    if _fixed(data.dim(0)) or _fixed(data.dim(1)):
        what = " and ".join(w for w, d in (("batch", data.dim(0)), ("time", data.dim(1))) if _fixed(d))
        raise ImportRefused(f"the graph has a fixed {what}: input {data.name!r} is {data.shape_str()}; the server "
                            f"needs dynamic batch and time axes; {_dynamic_hint(data, inputs, outputs)}")
    if kind == "features" and not _fixed(data.dim(2)):
        raise ImportRefused(f"features input {data.name!r} {data.shape_str()} has no fixed width D (its last axis)")

    state_ins = [t for t in inputs if t is not data]
    # the output: per-step [batch, time, classes], the one output that is not a state
    if state_pairs is not None:
        pairs = [(by_in[i], by_out[o]) for i, o in state_pairs]
    else:
        pairs = _pair(state_ins, [o for o in outputs if o.rank == 3 and _fixed(o.dim(0))])
    paired_out = {o.name for _, o in pairs}
    heads = [o for o in outputs if o.name not in paired_out]
    if len(heads) != 1:
        raise ImportRefused(f"expected one output besides the states, [batch, time, classes] float32; the graph has "
                            f"{names(heads)}")
    output = heads[0]
    if output.dtype != "float32" or output.rank != 3 or not _fixed(output.dim(2)):
        raise ImportRefused(f"output {output.name!r} is {output.dtype} {output.shape_str()}; the server wants one "
                            f"output per step, float32 [batch, time, classes] (a classifier too: the server "
                            f"reports the last step's)")

    fixed = [f"{o.name} {o.shape_str()}" for o in [output] if _fixed(o.dim(0)) or _fixed(o.dim(1))]
    for i, o in pairs:
        fixed += [f"{t.name} {t.shape_str()}" for t in (i, o) if t.rank == 3 and _fixed(t.dim(1))]
    if fixed:
        raise ImportRefused(f"the graph has a fixed batch or time ({'; '.join(fixed)}): the server needs dynamic "
                            f"batch and time axes; {_dynamic_hint(data, inputs, outputs)}")

    for i, o in pairs:
        if i.dtype != "float32" or o.dtype != "float32":
            raise ImportRefused(f"state {i.name!r} -> {o.name!r} is {i.dtype} -> {o.dtype}; states are float32")
        if i.rank != 3 or not _fixed(i.dim(0)) or not _fixed(i.dim(2)):
            raise ImportRefused(f"state input {i.name!r} is {i.shape_str()}; states are [layers, batch, hidden]")
        if o.rank != 3 or (o.dim(0), o.dim(2)) != (i.dim(0), i.dim(2)):
            raise ImportRefused(f"state input {i.name!r} {i.shape_str()} and output {o.name!r} {o.shape_str()} "
                                f"differ in shape")
    if not pairs:
        raise ImportRefused("the graph has no state inputs: a recurrent model takes its state [layers, batch, "
                            "hidden] as an input and returns the new state as an output")

    ops = {n.op_type for n in g.node}
    cells = {_CELLS[op] for op in ops if op in _CELLS}
    cell = cells.pop() if len(cells) == 1 else "custom"
    opset = graph_opset(proto.SerializeToString())
    if opset is None:
        raise ImportRefused("the graph imports no default-domain (ai.onnx) opset")
    rows = None
    if kind == "tokens":
        weights = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == data.name and n.input[0] in weights:
                rows = int(weights[n.input[0]].dims[0])
    return GraphSpec(data, kind, output, pairs, cell, opset, rows)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every use of `old` (in subgraphs too) at `new`."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_uses(sub, old, new)


def widen_int32_tokens(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The graph with its int32 tokens input `name` taken as int64 and cast to int32 inside (the server feeds
    int64 token ids)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inner = f"{name}__int32"
    _rename_uses(out.graph, name, inner)
    out.graph.node.insert(0, onnx.helper.make_node("Cast", [name], [inner], to=TensorProto.INT32,
                                                   name=f"recur_import_cast_{name}"))
    for v in out.graph.input:
        if v.name == name:
            v.type.tensor_type.elem_type = TensorProto.INT64
    onnx.checker.check_model(out)
    return out


def _pair(state_ins: list[Tensor], state_outs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Each state input with the one output of its shape [layers, batch, hidden], narrowed by name when several
    fit; ImportRefused when that leaves a choice."""
    pairs: list[tuple[Tensor, Tensor]] = []
    choices: list[str] = []
    for i in state_ins:
        if i.rank != 3:
            raise ImportRefused(f"input {i.name!r} is {i.dtype} {i.shape_str()}: besides the data input the graph "
                                f"may take only states [layers, batch, hidden]")
        fit = [o for o in state_outs if (o.dim(0), o.dim(2)) == (i.dim(0), i.dim(2)) and o.dtype == i.dtype]
        if len(fit) > 1:
            named = [o for o in fit if _state_key(o.name) == _state_key(i.name)]
            fit = named if len(named) == 1 else fit
        if not fit:
            outs = ", ".join(o.name + " " + o.shape_str() for o in state_outs) or "none"
            raise ImportRefused(f"state input {i.name!r} {i.shape_str()} has no output of the same shape to carry "
                                f"its new value (outputs [layers, batch, hidden]: {outs})")
        if len(fit) > 1:
            choices.append(f"{i.name} could pair with {' or '.join(o.name for o in fit)}")
        pairs.append((i, fit[0]))
    used = [o.name for _, o in pairs]
    if not choices and len(set(used)) != len(used):
        choices.append("two state inputs pair with the same output " + ", ".join(
            f"{i.name}:{o.name}" for i, o in pairs))
    if choices:
        example = ",".join(f"{i.name}:OUT" for i in state_ins)
        raise ImportRefused(f"ambiguous state pairing ({'; '.join(choices)}): name the pairs with "
                            f"--state-pairs {example}")
    return pairs


def build_manifest(spec: GraphSpec, *, name: str, version: int, head: str, vocabulary: list[str] | None,
                   labels: list[str] | None, sha256: str, training: dict) -> dict:
    """The manifest for an imported graph: format 1, the fields training/export.py writes."""
    classes = int(spec.output.dim(2))  # type: ignore[arg-type]
    d = spec.data
    if spec.kind == "tokens":
        vocab_size = len(vocabulary) if vocabulary is not None else spec.embedding_rows or classes
        inp: dict = {"kind": "tokens", "name": d.name, "dtype": d.dtype, "shape": ["batch", "time"],
                     "vocab_size": vocab_size}
        if vocabulary is None:  # ids only: each token is named by its id; text input is refused
            vocabulary = [f"<{i}>" for i in range(vocab_size)]
        unk_id = vocabulary.index("<unk>") if "<unk>" in vocabulary else None
        vocab: dict | None = {"tokens": vocabulary, "unk_id": unk_id}
    else:
        inp = {"kind": "features", "name": d.name, "dtype": d.dtype, "shape": ["batch", "time", d.dim(2)]}
        vocab = None
    first = spec.pairs[0][0]
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "cell": spec.cell,
        "layers": first.dim(0),
        "hidden_size": first.dim(2),
        "input": inp,
        "vocabulary": vocab,
        "head": {"kind": head, "output": spec.output.name, "shape": ["batch", "time", classes], "labels": labels},
        "state": [{"name": i.name, "output": o.name, "dtype": "float32",
                   "shape": [i.dim(0), "batch", i.dim(2)], "initial": "zeros"} for i, o in spec.pairs],
        "opset": spec.opset,
        "model_config": None,  # not trained by recur train
        "training": training,
        "sha256": sha256,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parity_check(directory: Path, *, steps: int = 24, chunks: int = 3, seed: int = 0) -> dict:
    """Run a random sequence (batch 2) through the model as the server loads it, in `chunks` chunks carrying the
    state and in one pass, and row 0 alone; the largest differences of outputs and final states."""
    model = load_model(directory, RuntimeOptions(log_severity=4))  # a failing run is reported, not logged
    rng = np.random.default_rng(seed)
    vocab = max(len(model.vocab), 1)
    if model.input_kind == "tokens":
        x = rng.integers(0, vocab, size=(2, steps), dtype=np.int64)
    else:
        x = rng.standard_normal((2, steps, model.feature_dim)).astype(np.float32)
    zeros = [np.zeros((s.layers, 2, s.hidden), dtype=np.float32) for s in model.states]
    one_y, one_s = model.runtime.run(x, zeros)
    cuts = np.linspace(0, steps, chunks + 1).astype(int)
    ys, state = [], zeros
    for a, b in itertools.pairwise(cuts):
        y, state = model.runtime.run(x[:, a:b], state)
        ys.append(y)
    chunk_y = np.concatenate(ys, axis=1)
    row_y, row_s = model.runtime.run(x[:1], [z[:, :1] for z in zeros])
    diff = max(float(np.abs(chunk_y - one_y).max()), *(float(np.abs(a - b).max()) for a, b in zip(state, one_s)))
    batch_diff = max(float(np.abs(row_y[0] - one_y[0]).max()),
                     *(float(np.abs(a[:, 0] - b[:, 0]).max()) for a, b in zip(row_s, one_s)))
    return {"steps": steps, "chunks": chunks, "max_abs_diff": diff, "batch_max_abs_diff": batch_diff,
            "tolerance": PARITY_TOL, "ok": diff <= PARITY_TOL and batch_diff <= PARITY_TOL}


def import_model(source: Path, *, name: str, version: int, models_dir: Path = Path("models"),
                 vocab: Path | None = None, labels: Path | None = None, state_pairs: str | None = None,
                 head: str | None = None, command: str | None = None) -> ImportResult:
    """Check `source` against the serving contract and write models_dir/name/version/; ImportRefused says why not."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ImportRefused(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    if version < 1:
        raise ImportRefused(f"--version {version}: versions are positive integers")
    target = models_dir / name / str(version)
    if target.exists():
        raise ImportRefused(f"{target} already exists; choose another --version or remove it")
    try:
        blob = source.read_bytes()
    except OSError as e:
        raise ImportRefused(f"cannot read {source}: {e.strerror or e}") from e
    try:
        proto = onnx.load_model_from_string(blob)
    except Exception as e:  # onnx raises DecodeError and friends
        raise ImportRefused(f"{source} is not an ONNX model ({e.__class__.__name__})") from e
    if any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ImportRefused(f"{source} keeps its weights in external files; save it as one file "
                            f"(onnx.save(model, path, save_as_external_data=False))")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ImportRefused(f"{source} does not pass onnx.checker: {e}") from e
    pairs = parse_state_pairs(state_pairs) if state_pairs else None
    spec = inspect(proto, pairs)
    if spec.data.dtype == "int32":  # the server feeds int64 token ids: take int64 and cast inside the graph
        proto = widen_int32_tokens(proto, spec.data.name)
        blob = proto.SerializeToString()
        spec = inspect(proto, pairs)

    try:
        vocabulary = _read_list(vocab, "tokens") if vocab else None
        label_list = _read_list(labels, "labels") if labels else None
    except (OSError, UnicodeDecodeError) as e:
        raise ImportRefused(f"cannot read {vocab if labels is None else labels}: {e}") from e
    if vocabulary is not None and spec.kind != "tokens":
        raise ImportRefused(f"--vocab is for a tokens input; {spec.data.name!r} takes features")
    classes = int(spec.output.dim(2))  # type: ignore[arg-type]
    head = head or ("lm" if label_list is None else "tagger")
    if head == "lm":
        if label_list is not None:
            raise ImportRefused("--labels is for a tagger or classifier head (--head tagger|classifier)")
        if spec.kind != "tokens":
            raise ImportRefused("an lm head predicts the next token; a features model is a tagger or classifier "
                                "(--head tagger|classifier --labels FILE)")
    else:
        if label_list is None:
            label_list = [str(i) for i in range(classes)]
        if len(label_list) != classes:
            raise ImportRefused(f"output {spec.output.name!r} has {classes} classes but {labels} has "
                                f"{len(label_list)} labels")
    if spec.kind == "tokens":
        size = len(vocabulary) if vocabulary is not None else spec.embedding_rows
        if vocabulary is not None and spec.embedding_rows is not None and len(vocabulary) > spec.embedding_rows:
            raise ImportRefused(f"{vocab} has {len(vocabulary)} tokens but the embedding {spec.data.name!r} indexes "
                                f"has {spec.embedding_rows} rows")
        if size is None and head != "lm":
            raise ImportRefused("cannot tell the vocabulary size from the graph; give --vocab FILE")
    training: dict = {"command": None, "export_command": command, "metrics": {}, "steps": None, "seconds": None,
                "data": None, "imported_from": str(source)}
    manifest = build_manifest(spec, name=name, version=version, head=head, vocabulary=vocabulary,
                              labels=label_list, sha256=hashlib.sha256(blob).hexdigest(), training=training)

    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=models_dir))
    try:
        (staging / "model.onnx").write_bytes(blob)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            load_model(staging, RuntimeOptions())  # exactly as the server loads it
        except ModelInvalid as e:
            raise ImportRefused(f"the server would refuse it: {e}") from e
        try:
            parity = parity_check(staging)
        except Exception as e:  # ONNX Runtime refusing to run it: one line, not a traceback
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ImportRefused(f"the graph fails when run on a test sequence ({type(e).__name__}: {first})") from e
        if not parity["ok"]:
            raise ImportRefused(
                f"chunking is not invisible: {parity['chunks']} chunks vs one pass differ by "
                f"{parity['max_abs_diff']:.3g}, one row alone vs in a batch by {parity['batch_max_abs_diff']:.3g} "
                f"(tolerance {PARITY_TOL:g}); the graph must carry all of its state in its state inputs/outputs")
        manifest["training"]["parity"] = parity
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ImportResult(target, manifest, parity)
