"""Parity of the exported graphs: ONNX Runtime vs PyTorch, chunked vs one pass, rows independent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.helpers import CELLS, HEADS, TOL
from training.model import ModelConfig, SequenceModel

CASES = [(c, h) for c in CELLS for h in HEADS]


def _load(models: Path, cell: str, head: str) -> tuple[ort.InferenceSession, dict, SequenceModel]:
    d = models / f"{cell}-{head}" / "1"
    manifest = json.loads((d / "manifest.json").read_text())
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    ckpt_model = SequenceModel(ModelConfig(**manifest["model_config"]))
    return sess, manifest, ckpt_model


def _inputs(manifest: dict, batch: int, time: int, rng: np.random.Generator) -> np.ndarray:
    inp = manifest["input"]
    if inp["kind"] == "tokens":
        return rng.integers(0, inp["vocab_size"], size=(batch, time)).astype(np.int64)
    return rng.random((batch, time, inp["shape"][2]), dtype=np.float32)


def _state(manifest: dict, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s["name"]: rng.standard_normal((s["shape"][0], batch, s["shape"][2])).astype(np.float32) * 0.5
            for s in manifest["state"]}


def _run(sess: ort.InferenceSession, manifest: dict, x: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
    outs = [manifest["head"]["output"]] + [s["output"] for s in manifest["state"]]
    res = sess.run(outs, {manifest["input"]["name"]: x, **state})
    return res[0], {s["name"]: v for s, v in zip(manifest["state"], res[1:])}


@pytest.mark.parametrize("cell,head", CASES)
def test_graph_uses_onnx_recurrent_operators(tiny_models: Path, cell: str, head: str) -> None:
    proto = onnx.load(str(tiny_models / f"{cell}-{head}" / "1" / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count({"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}[cell]) == 2  # one per layer


@pytest.mark.parametrize("cell,head", CASES)
def test_onnx_matches_pytorch(tiny_models: Path, cell: str, head: str) -> None:
    sess, manifest, _ = _load(tiny_models, cell, head)
    ckpt = torch.load(tiny_models.parent / "runs" / f"{cell}-{head}" / "best.pt", weights_only=False)
    model = SequenceModel(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    rng = np.random.default_rng(0)
    x, state = _inputs(manifest, 3, 23, rng), _state(manifest, 3, rng)
    logits, new_state = _run(sess, manifest, x, state)
    with torch.no_grad():
        t_logits, t_state = model(torch.from_numpy(x), tuple(torch.from_numpy(v) for v in state.values()))
    assert np.abs(logits - t_logits.numpy()).max() <= TOL
    for got, want in zip(new_state.values(), t_state):
        assert np.abs(got - want.numpy()).max() <= TOL


@pytest.mark.parametrize("cell,head", CASES)
def test_random_chunk_splits_equal_one_pass(tiny_models: Path, cell: str, head: str) -> None:
    sess, manifest, _ = _load(tiny_models, cell, head)
    rng = np.random.default_rng(1)
    x = _inputs(manifest, 1, 97, rng)
    zero = {k: np.zeros_like(v) for k, v in _state(manifest, 1, rng).items()}
    full, full_state = _run(sess, manifest, x, zero)
    for _ in range(5):
        cuts = np.sort(rng.choice(np.arange(1, 97), size=rng.integers(1, 12), replace=False))
        state, parts = zero, []
        for a, b in zip([0, *cuts], [*cuts, 97]):
            out, state = _run(sess, manifest, x[:, a:b], state)  # state carried between calls
            parts.append(out)
        assert np.abs(np.concatenate(parts, axis=1) - full).max() <= TOL
        for k in state:
            assert np.abs(state[k] - full_state[k]).max() <= TOL


@pytest.mark.parametrize("cell,head", CASES)
def test_batch_rows_are_independent(tiny_models: Path, cell: str, head: str) -> None:
    sess, manifest, _ = _load(tiny_models, cell, head)
    rng = np.random.default_rng(2)
    x, state = _inputs(manifest, 4, 19, rng), _state(manifest, 4, rng)
    together, together_state = _run(sess, manifest, x, state)
    for row in range(4):
        alone, alone_state = _run(sess, manifest, x[row : row + 1], {k: v[:, row : row + 1] for k, v in state.items()})
        assert np.abs(alone - together[row : row + 1]).max() <= TOL
        for k in alone_state:
            assert np.abs(alone_state[k] - together_state[k][:, row : row + 1]).max() <= TOL


@pytest.mark.parametrize("batch,time", [(1, 1), (7, 3), (2, 301), (33, 5)])
def test_dynamic_batch_and_time(tiny_models: Path, batch: int, time: int) -> None:
    """Sizes other than any used at export (which traced none: the graph is written symbolically)."""
    sess, manifest, _ = _load(tiny_models, "lstm", "lm")
    rng = np.random.default_rng(3)
    logits, state = _run(sess, manifest, _inputs(manifest, batch, time, rng), _state(manifest, batch, rng))
    assert logits.shape == (batch, time, manifest["head"]["shape"][2])
    assert all(v.shape == (2, batch, 16) for v in state.values())
    graph_input = sess.get_inputs()[0]
    assert not isinstance(graph_input.shape[0], int) and not isinstance(graph_input.shape[1], int)


@pytest.mark.parametrize("cell,head", CASES)
def test_the_repository_entry_rebuilds_the_pytorch_model(tiny_models: Path, cell: str, head: str) -> None:
    from training.export import model_from_repository

    ckpt = torch.load(tiny_models.parent / "runs" / f"{cell}-{head}" / "best.pt", weights_only=False)
    rebuilt = model_from_repository(tiny_models / f"{cell}-{head}" / "1")
    for name, value in ckpt["model"].items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
