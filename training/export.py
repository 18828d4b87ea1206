"""Export a trained model to the model repository: models/NAME/VERSION/{model.onnx, manifest.json}.

The graph is built with ONNX's own RNN/LSTM/GRU operators (one per layer), so any
runtime that implements the standard operators can serve it. State is an explicit
input and output: state_h (and state_c for an LSTM), each (layers, batch, hidden).
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

# PyTorch stores gates as LSTM (i, f, g, o) and GRU (r, z, n); ONNX wants LSTM
# (i, o, f, c) and GRU (z, r, h).
_GATE_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}
_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def _reorder(w: np.ndarray, cell: str, hidden: int) -> np.ndarray:
    blocks = [w[i * hidden : (i + 1) * hidden] for i in range(len(_GATE_ORDER[cell]))]
    return np.concatenate([blocks[i] for i in _GATE_ORDER[cell]], axis=0)


def build_graph(model: SequenceModel) -> onnx.ModelProto:
    """The ONNX model computing `model.forward` with explicit state in and out."""
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
) -> dict:
    """The contract between training and serving (see docs/architecture.md, 'The model repository')."""
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
        "opset": OPSET,
        "model_config": cfg.to_dict(),
        "training": training,
        "sha256": sha256,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


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
