"""The serving-side loader checks the manifest against the graph and refuses a mismatch."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from service.engine.runtime import RuntimeOptions
from service.errors import ModelInvalid
from service.repository.models import ModelRepository, load_model


@pytest.fixture
def model_dir(tiny_models: Path, tmp_path: Path) -> Path:
    d = tmp_path / "lstm-lm" / "1"
    shutil.copytree(tiny_models / "lstm-lm" / "1", d)
    return d


def _edit(d: Path, change) -> None:  # type: ignore[no-untyped-def]
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_a_valid_model_loads(model_dir: Path) -> None:
    m = load_model(model_dir, RuntimeOptions())
    assert (m.cell, m.head, m.input_kind, len(m.states), m.states[0].layers, m.states[0].hidden) == (
        "lstm", "lm", "tokens", 2, 2, 16)


@pytest.mark.parametrize("change,expected", [
    (lambda m: m["state"][0].update(shape=[3, "batch", 16]),
     "state 'state_h' has shape [3, batch, 16] in the manifest but [2, batch, 16]"),
    (lambda m: m["state"][1].update(name="state_x"), "manifest names state 'state_x'"),
    (lambda m: m["input"].update(name="ids"), "manifest names input 'ids'"),
    (lambda m: m["input"].update(dtype="int32"), "input 'tokens' is int32 in the manifest but int64 in the graph"),
    (lambda m: m["head"].update(shape=["batch", "time", 50]), "output 'logits' has shape [batch, time, 50]"),
    (lambda m: m.update(state=m["state"][:1]), "inputs ['state_c'] that the manifest does not describe"),
    (lambda m: m["vocabulary"]["tokens"].pop(), "vocabulary has 97 tokens, input says 98"),
    (lambda m: m.update(format=2), "manifest format 2 is not one this server reads [1]"),
    (lambda m: m.pop("format"), "manifest format None is not one this server reads"),
    (lambda m: m.update(opset=13), "the manifest says opset 13 but the graph imports 17"),
    (lambda m: m["state"][1].update(initial="random"), "state 'state_c' starts at 'random'"),
])
def test_a_mismatch_is_refused_naming_the_difference(model_dir: Path, change, expected: str) -> None:  # type: ignore[no-untyped-def]
    _edit(model_dir, change)
    with pytest.raises(ModelInvalid, match=expected.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_model(model_dir, RuntimeOptions())


def test_a_changed_graph_fails_its_checksum(model_dir: Path) -> None:
    blob = bytearray((model_dir / "model.onnx").read_bytes())
    blob[-10] ^= 0xFF
    (model_dir / "model.onnx").write_bytes(bytes(blob))
    with pytest.raises(ModelInvalid, match=f"sha256 {hashlib.sha256(blob).hexdigest()} but the manifest says"):
        load_model(model_dir, RuntimeOptions())


def test_a_file_that_is_not_onnx_is_refused(model_dir: Path) -> None:
    blob = b"\xff" * 64
    (model_dir / "model.onnx").write_bytes(blob)
    _edit(model_dir, lambda m: m.update(sha256=hashlib.sha256(blob).hexdigest()))
    with pytest.raises(ModelInvalid, match=r"model\.onnx is not an ONNX model"):
        load_model(model_dir, RuntimeOptions())


def test_the_repository_leaves_out_invalid_models(model_dir: Path, tiny_models: Path) -> None:
    shutil.copytree(tiny_models / "gru-tagger", model_dir.parent.parent / "gru-tagger")
    _edit(model_dir, lambda m: m.update(sha256="0" * 64))
    repo = ModelRepository.load(model_dir.parent.parent, RuntimeOptions())
    assert [(m.name, m.version) for m in repo.all()] == [("gru-tagger", 1)]
