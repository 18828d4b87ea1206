"""The shipped models load, are small, say how they were made, and still meet their targets when
measured again here with ONNX Runtime on the test split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.engine.runtime import RuntimeOptions
from service.repository.models import load_model
from training import data

MODELS = Path(__file__).resolve().parents[2] / "models"


def _run_stream(name: str, ids: np.ndarray, rows: int = 16, window: int = 512) -> np.ndarray:
    """Logits for a long stream cut into `rows` rows, state carried across windows. (rows, n, C)"""
    d = MODELS / name / "1"
    m = json.loads((d / "manifest.json").read_text())
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    n = len(ids) // rows
    x = ids[: rows * n].reshape(rows, n)
    state = {s["name"]: np.zeros((s["shape"][0], rows, s["shape"][2]), np.float32) for s in m["state"]}
    outs = []
    for i in range(0, n, window):
        res = sess.run(["logits"] + [s["output"] for s in m["state"]], {"tokens": x[:, i : i + window], **state})
        outs.append(res[0])
        state = {s["name"]: v for s, v in zip(m["state"], res[1:])}
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", ["pylm", "pytag", "digits"])
def test_shipped_model_loads_and_describes_itself(name: str) -> None:
    d = MODELS / name / "1"
    model = load_model(d, RuntimeOptions())
    manifest = json.loads((d / "manifest.json").read_text())
    assert (d / "model.onnx").stat().st_size <= 10 * 2**20
    assert manifest["training"]["command"].startswith("recur train ")
    assert model.name == name and model.version == 1


def test_pylm_bits_per_character() -> None:
    test = data.load_text("test")
    ids = test.ids[:200_001]
    logits = _run_stream("pylm", ids[:-1])  # (R, n, V)
    n = logits.shape[1]
    target = ids[1:][: 16 * n].reshape(16, n)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, target[..., None], -1).mean()
    assert nll / math.log(2) <= 2.0


def test_pytag_accuracy_beats_the_majority_baseline() -> None:
    test = data.load_text("test")
    ids, tags = test.ids[:200_000], test.tags[:200_000]
    pred = _run_stream("pytag", ids).argmax(-1).reshape(-1)
    truth = tags[: pred.size].reshape(16, -1).reshape(-1)
    accuracy = (pred == truth).mean()
    assert accuracy >= 0.90 and accuracy > np.bincount(truth).max() / truth.size + 0.5


def test_digits_accuracy() -> None:
    d = data.load_digits("test")
    sess = ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    zeros = np.zeros((1, len(d.labels), 64), np.float32)
    logits = sess.run(["logits"], {"features": d.features, "state_h": zeros, "state_c": zeros})[0]
    assert (logits[:, -1].argmax(-1) == d.labels).mean() >= 0.95
