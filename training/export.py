"""Export a trained model to the model repository: models/NAME/VERSION/{model.onnx, activations.onnx,
manifest.json}.

The graph is built with ONNX's own RNN/LSTM/GRU operators (one per layer), so any
runtime that implements the standard operators can serve it. State is an explicit
input and output: state_h (and state_c for an LSTM), each (layers, batch, hidden).

activations.onnx is the same graph with every layer's states at every step as extra outputs.
It is a second file, not extra outputs of model.onnx, because ONNX Runtime runs every node of a
graph whatever outputs are asked for: the activation branch would slow every request (LSTM
256x2, batch 64 x 16 steps: 21 ms -> 50 ms).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from training.model import ModelConfig, SequenceModel

OPSET = 17
MANIFEST_FORMAT = 1
ACTIVATIONS_FILE = "activations.onnx"

# PyTorch stores gates as LSTM (i, f, g, o) and GRU (r, z, n); ONNX wants LSTM
# (i, o, f, c) and GRU (z, r, h).
_GATE_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}
_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def _reorder(w: np.ndarray, cell: str, hidden: int) -> np.ndarray:
    blocks = [w[i * hidden : (i + 1) * hidden] for i in range(len(_GATE_ORDER[cell]))]
    return np.concatenate([blocks[i] for i in _GATE_ORDER[cell]], axis=0)


def activation_outputs(cell: str, layers: int) -> list[tuple[str, str, int]]:
    """(graph output, state, layer) of the per-step activations, in manifest order: state-major, like
    the state tensors (h of every layer, then c of every layer for an LSTM)."""
    states = ["h", "c"] if cell == "lstm" else ["h"]
    return [(f"act_{s}_l{layer}", s, layer) for s in states for layer in range(layers)]


def _c_body() -> onnx.GraphProto:
    """Scan body of the cell-state recurrence c_t = f_t * c_{t-1} + (i_t * g_t)."""
    def t(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "hidden"])
    nodes = [helper.make_node("Mul", ["f_t", "c_prev"], ["fc"]),
             helper.make_node("Add", ["fc", "ig_t"], ["c_next"]),
             helper.make_node("Identity", ["c_next"], ["c_out"])]
    return helper.make_graph(nodes, "cell_state", [t("c_prev"), t("f_t"), t("ig_t")], [t("c_next"), t("c_out")])


def _cell_state_steps(layer: int, x: str, nodes: list[onnx.NodeProto]) -> str:
    """Nodes computing an LSTM layer's c at every step (T, B, H); returns its name. ONNX's LSTM gives
    only the last c, so the gates are recomputed for all steps at once from the layer's input and the
    h of the step before (h0, then Y[:-1]), and the linear recurrence in c is left to a Scan."""
    p = f"l{layer}_act"
    nodes += [
        helper.make_node("Slice", [f"l{layer}_out", "zero", "minus1", "axis0"], [f"{p}_y_prev"]),  # (T-1, B, H)
        helper.make_node("Concat", [f"l{layer}_h0", f"{p}_y_prev"], [f"{p}_h_prev"], axis=0),  # (T, B, H)
        # W (1, 4H, In), R (1, 4H, H): transposed once, by constant folding at load
        helper.make_node("Transpose", [f"l{layer}_W"], [f"{p}_Wt"], perm=[0, 2, 1]),
        helper.make_node("Transpose", [f"l{layer}_R"], [f"{p}_Rt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", [x, f"{p}_Wt"], [f"{p}_xw"]),  # (T, B, 4H)
        helper.make_node("MatMul", [f"{p}_h_prev", f"{p}_Rt"], [f"{p}_hr"]),
        helper.make_node("Split", [f"l{layer}_B"], [f"{p}_wb", f"{p}_rb"], axis=1),  # (1, 4H) each
        helper.make_node("Add", [f"{p}_wb", f"{p}_rb"], [f"{p}_b"]),
        helper.make_node("Add", [f"{p}_xw", f"{p}_hr"], [f"{p}_pre"]),
        helper.make_node("Add", [f"{p}_pre", f"{p}_b"], [f"{p}_gates"]),
        # ONNX gate order i, o, f, c
        helper.make_node("Split", [f"{p}_gates"], [f"{p}_i", f"{p}_o", f"{p}_f", f"{p}_g"], axis=2),
        helper.make_node("Sigmoid", [f"{p}_i"], [f"{p}_is"]),
        helper.make_node("Sigmoid", [f"{p}_f"], [f"{p}_fs"]),
        helper.make_node("Tanh", [f"{p}_g"], [f"{p}_gt"]),
        helper.make_node("Mul", [f"{p}_is", f"{p}_gt"], [f"{p}_ig"]),
        helper.make_node("Squeeze", [f"l{layer}_c0", "axis0"], [f"{p}_c0"]),  # (B, H)
        helper.make_node("Scan", [f"{p}_c0", f"{p}_fs", f"{p}_ig"], [f"{p}_c_last", f"{p}_c"],
                         num_scan_inputs=2, body=_c_body()),
    ]
    return f"{p}_c"


def build_graph(model: SequenceModel, *, activations: bool = False) -> onnx.ModelProto:
    """The ONNX model computing `model.forward` with explicit state in and out. With `activations`, it
    also outputs every layer's states at every step (act_h_l{L}, act_c_l{L}: (B, T, H)); see
    `activation_outputs`."""
    cfg = model.config
    hidden, layers = cfg.hidden, cfg.layers
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    init: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    state_names = ["h", "c"] if cfg.cell == "lstm" else ["h"]

    def const(name: str, value: np.ndarray) -> str:
        init.append(numpy_helper.from_array(value, name))
        return name

    if cfg.input_kind == "tokens":
        inp = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
        const("embedding", sd["embed.weight"])
        nodes.append(helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], axis=0))  # (B, T, E)
        seq_in = "embedded"
    else:
        inp = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "time", cfg.feature_dim])
        seq_in = "features"
    nodes.append(helper.make_node("Transpose", [seq_in], ["x0"], perm=[1, 0, 2]))  # (T, B, In)

    state_in = [
        helper.make_tensor_value_info(f"state_{s}", TensorProto.FLOAT, [layers, "batch", hidden]) for s in state_names
    ]
    const("axis0", np.array([0], dtype=np.int64))
    const("axis1", np.array([1], dtype=np.int64))
    layer_out: dict[str, list[str]] = {s: [] for s in state_names}
    act_steps: dict[str, str] = {}  # activation output -> its (T, B, H) value
    if activations and cfg.cell == "lstm":
        const("zero", np.array([0], dtype=np.int64))
        const("minus1", np.array([-1], dtype=np.int64))
    x = "x0"
    for layer in range(layers):
        const(f"l{layer}_start", np.array([layer], dtype=np.int64))
        const(f"l{layer}_end", np.array([layer + 1], dtype=np.int64))
        init_states = []
        for s in state_names:
            name = f"l{layer}_{s}0"
            nodes.append(
                helper.make_node("Slice", [f"state_{s}", f"l{layer}_start", f"l{layer}_end", "axis0"], [name])
            )  # (1, B, H)
            init_states.append(name)
        w = _reorder(sd[f"rnn.weight_ih_l{layer}"], cfg.cell, hidden)[None]
        r = _reorder(sd[f"rnn.weight_hh_l{layer}"], cfg.cell, hidden)[None]
        b_ih = _reorder(sd[f"rnn.bias_ih_l{layer}"], cfg.cell, hidden)
        b_hh = _reorder(sd[f"rnn.bias_hh_l{layer}"], cfg.cell, hidden)
        b = np.concatenate([b_ih, b_hh])[None]
        ins = [x, const(f"l{layer}_W", w), const(f"l{layer}_R", r), const(f"l{layer}_B", b), "", *init_states]
        outs = [f"l{layer}_Y"] + [f"l{layer}_{s}" for s in state_names]
        attrs: dict = {"hidden_size": hidden}
        if cfg.cell == "gru":
            attrs["linear_before_reset"] = 1  # PyTorch's GRU applies the reset gate after the matmul
        if cfg.cell == "rnn":
            attrs["activations"] = ["Tanh"]
        nodes.append(helper.make_node(_OP[cfg.cell], ins, outs, name=f"{cfg.cell}_{layer}", **attrs))
        nodes.append(helper.make_node("Squeeze", [f"l{layer}_Y", "axis1"], [f"l{layer}_out"]))  # (T, B, H)
        if activations:
            act_steps[f"act_h_l{layer}"] = f"l{layer}_out"
            if cfg.cell == "lstm":
                act_steps[f"act_c_l{layer}"] = _cell_state_steps(layer, x, nodes)
        x = f"l{layer}_out"
        for s in state_names:
            layer_out[s].append(f"l{layer}_{s}")

    for s in state_names:
        nodes.append(helper.make_node("Concat", layer_out[s], [f"new_state_{s}"], axis=0))  # (L, B, H)
    nodes.append(helper.make_node("Transpose", [x], ["y"], perm=[1, 0, 2]))  # (B, T, H)
    nodes.append(helper.make_node("MatMul", ["y", const("head_W", sd["head.weight"].T.copy())], ["head_mm"]))
    nodes.append(helper.make_node("Add", ["head_mm", const("head_b", sd["head.bias"])], ["logits"]))  # (B, T, C)

    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", cfg.classes])]
    outputs += [helper.make_tensor_value_info(f"new_state_{s}", TensorProto.FLOAT, [layers, "batch", hidden])
                for s in state_names]
    if activations:
        for out, _, _ in activation_outputs(cfg.cell, layers):
            nodes.append(helper.make_node("Transpose", [act_steps[out]], [out], perm=[1, 0, 2]))  # (B, T, H)
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "time", hidden]))
    graph = helper.make_graph(nodes, f"recur_{cfg.cell}_{cfg.head}", [inp, *state_in], outputs, init)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="recur")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def manifest_for(
    model: SequenceModel,
    *,
    name: str,
    version: int,
    vocabulary: list[str] | None,
    unk_id: int | None,
    labels: list[str] | None,
    training: dict,
    sha256: str,
    activations: dict | None = None,
) -> dict:
    """The contract between training and serving (see docs/architecture.md, 'The model repository').
    `activations`: the manifest's section for activations.onnx (`activations_section`), if written."""
    cfg = model.config
    states = ["h", "c"] if cfg.cell == "lstm" else ["h"]
    if cfg.input_kind == "tokens":
        inp = {"kind": "tokens", "name": "tokens", "dtype": "int64", "shape": ["batch", "time"],
               "vocab_size": cfg.vocab_size}
    else:
        inp = {"kind": "features", "name": "features", "dtype": "float32", "shape": ["batch", "time", cfg.feature_dim]}
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "cell": cfg.cell,
        "layers": cfg.layers,
        "hidden_size": cfg.hidden,
        "input": inp,
        "vocabulary": None if vocabulary is None else {"tokens": vocabulary, "unk_id": unk_id},
        "head": {
            "kind": cfg.head,
            "output": "logits",
            "shape": ["batch", "time", cfg.classes],
            "labels": labels,
        },
        "state": [
            {
                "name": f"state_{s}",
                "output": f"new_state_{s}",
                "dtype": "float32",
                "shape": [cfg.layers, "batch", cfg.hidden],
                "initial": "zeros",
            }
            for s in states
        ],
        **({} if activations is None else {"activations": activations}),
        "opset": OPSET,
        "model_config": cfg.to_dict(),
        "training": training,
        "sha256": sha256,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def activations_section(model: SequenceModel, sha256: str) -> dict:
    """The manifest's `activations`: the file, its sha256, and each output (docs/manifest.schema.json)."""
    cfg = model.config
    return {
        "file": ACTIVATIONS_FILE,
        "sha256": sha256,
        "outputs": [{"output": out, "state": s, "layer": layer, "units": cfg.hidden}
                    for out, s, layer in activation_outputs(cfg.cell, cfg.layers)],
    }


def _write(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def export(checkpoint: Path, *, name: str, version: int, models_dir: Path, command: str | None = None) -> Path:
    """Write models_dir/name/version/ from a training checkpoint; returns that directory.
    `command` (the export command line, if any) is recorded in the manifest beside the training one."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = SequenceModel(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    vocabulary, labels = ckpt.get("vocabulary"), ckpt.get("labels")
    cfg = model.config
    if cfg.input_kind == "tokens" and len(vocabulary or []) != cfg.vocab_size:
        raise ValueError(f"{checkpoint}: the vocabulary has {len(vocabulary or [])} entries but the model reads "
                         f"{cfg.vocab_size} token ids")
    if cfg.head != "lm" and len(labels or []) != cfg.classes:
        raise ValueError(f"{checkpoint}: {len(labels or [])} labels but the model has {cfg.classes} outputs")
    proto = build_graph(model)
    out = models_dir / name / str(version)
    out.mkdir(parents=True, exist_ok=True)
    blob = proto.SerializeToString()
    (out / "model.onnx").write_bytes(blob)
    acts_blob = build_graph(model, activations=True).SerializeToString()
    (out / ACTIVATIONS_FILE).write_bytes(acts_blob)
    training = {
        "command": ckpt.get("command"),
        "export_command": command,
        "metrics": ckpt.get("metrics", {}),
        "steps": ckpt.get("step"),
        "seconds": ckpt.get("seconds"),
        "data": ckpt.get("data"),
    }
    manifest = manifest_for(
        model,
        name=name,
        version=version,
        vocabulary=vocabulary,
        unk_id=ckpt.get("unk_id"),
        labels=labels,
        training=training,
        sha256=hashlib.sha256(blob).hexdigest(),
        activations=activations_section(model, hashlib.sha256(acts_blob).hexdigest()),
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def reexport(directory: Path, *, steps: int = 300, tol: float = 1e-5) -> Path:
    """Add activations.onnx to a repository entry exported before it, without retraining: the weights come from
    its model.onnx (`model_from_repository`), which is left as it is, and the manifest keeps everything it said
    (training metadata, sha256, exported_at) and gains `activations`. Before anything is written, the new graph
    must give the same logits and states as model.onnx on `steps` steps (within `tol`), and its last-step
    activations must equal those states. Returns `directory`."""
    import onnxruntime as ort  # the serving runtime, to compare what will be served

    manifest = json.loads((directory / "manifest.json").read_text())
    model = model_from_repository(directory)
    cfg = model.config
    acts_blob = build_graph(model, activations=True).SerializeToString()

    rng = np.random.default_rng(0)
    inp = manifest["input"]
    x = (rng.integers(0, cfg.vocab_size, size=(2, steps)).astype(np.int64) if inp["kind"] == "tokens"
         else rng.standard_normal((2, steps, cfg.feature_dim)).astype(np.float32))
    feed = {inp["name"]: x, **{s["name"]: (rng.standard_normal((cfg.layers, 2, cfg.hidden)) * 0.5).astype(np.float32)
                               for s in manifest["state"]}}
    names = [manifest["head"]["output"], *(s["output"] for s in manifest["state"])]
    providers = ["CPUExecutionProvider"]
    old = ort.InferenceSession(str(directory / "model.onnx"), providers=providers).run(names, feed)
    acts = activation_outputs(cfg.cell, cfg.layers)
    new = ort.InferenceSession(acts_blob, providers=providers).run(names + [a[0] for a in acts], feed)
    for name, a, b in zip(names, old, new):
        if np.abs(a - b).max() > tol:
            raise ValueError(f"{directory}: the re-exported graph's {name} differs from model.onnx's by "
                             f"{np.abs(a - b).max():.3g}; nothing was written")
    last = {(s, layer): v[:, -1] for (_, s, layer), v in zip(acts, new[len(names):])}
    for i, s in enumerate(model.state_names):
        for layer in range(cfg.layers):
            if np.abs(last[(s, layer)] - new[1 + i][layer]).max() > tol:
                raise ValueError(f"{directory}: activation {s} of layer {layer} at the last step is not the new "
                                 "state; nothing was written")

    section = activations_section(model, hashlib.sha256(acts_blob).hexdigest())
    updated: dict = {}
    for key, value in manifest.items():  # `activations` after `state`, as export writes it
        if key != "activations":
            updated[key] = value
        if key == "state":
            updated["activations"] = section
    _write(directory / ACTIVATIONS_FILE, acts_blob)
    _write(directory / "manifest.json", (json.dumps(updated, indent=2) + "\n").encode())
    return directory


def model_from_repository(directory: Path) -> SequenceModel:
    """The PyTorch model a repository entry was exported from, rebuilt from its graph's weights
    (for baselines and checks that want eager PyTorch on exactly the served weights)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    cfg = ModelConfig(**manifest["model_config"])
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(directory / "model.onnx")).graph.initializer}
    inverse = np.argsort(_GATE_ORDER[cfg.cell])
    model = SequenceModel(cfg)
    sd = {"head.weight": weights["head_W"].T, "head.bias": weights["head_b"]}
    if cfg.input_kind == "tokens":
        sd["embed.weight"] = weights["embedding"]
    for layer in range(cfg.layers):
        w, r, b = weights[f"l{layer}_W"][0], weights[f"l{layer}_R"][0], weights[f"l{layer}_B"][0]
        back = {"weight_ih": w, "weight_hh": r, "bias_ih": b[: len(b) // 2], "bias_hh": b[len(b) // 2 :]}
        for name, value in back.items():
            blocks = np.split(value, len(inverse))
            sd[f"rnn.{name}_l{layer}"] = np.concatenate([blocks[i] for i in inverse])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    return model.eval()
