"""Per-step activations: activations.onnx beside model.onnx gives every layer's h (and an LSTM's c) at
every step, equal to PyTorch's; run() and model.onnx are untouched by it; models exported before it
still load; the manifest's activations section is checked."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.engine.runtime import ActivationsUnavailable, RuntimeOptions
from service.errors import ModelInvalid
from service.repository.models import Model, ModelRepository, load_model
from service.repository.schema import problem
from tests.helpers import CELLS, HEADS, TOL, torch_activations
from training.export import build_graph, model_from_repository, reexport

CASES = [(c, h) for c in CELLS for h in HEADS]
CUTS = [0, 7, 8, 30, 41]  # chunks of 7, 1, 22 and 11 steps


def _copy(tiny_models: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name / "1"
    shutil.copytree(tiny_models / name / "1", d)
    return d


def _edit(d: Path, change) -> None:  # type: ignore[no-untyped-def]
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _strip(d: Path) -> None:
    """Make `d` look like an export from before activations."""
    _edit(d, lambda m: m.pop("activations"))
    (d / "activations.onnx").unlink()


def _inputs(model: Model, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    if model.input_kind == "tokens":
        return rng.integers(0, len(model.vocab), size=(batch, steps)).astype(np.int64)
    return rng.standard_normal((batch, steps, model.feature_dim)).astype(np.float32)


def _states(model: Model, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [(rng.standard_normal((s.layers, batch, s.hidden)) * 0.5).astype(np.float32) for s in model.states]


def _chunked(model: Model, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """run_activations over CUTS, state carried: logits, final states, {(state, layer): (B, T, H)}."""
    logits, acts = [], []
    for a, b in itertools.pairwise(CUTS):
        out, states, act = model.runtime.run_activations(x[:, a:b], states)
        logits.append(out)
        acts.append(act)
    joined = {(s.state, s.layer): np.concatenate([c[i] for c in acts], axis=1) for i, s in enumerate(model.activations)}
    return np.concatenate(logits, axis=1), states, joined


@pytest.mark.parametrize("cell,head", CASES)
def test_activations_equal_pytorch_across_chunks(tiny_models: Path, cell: str, head: str) -> None:
    d = tiny_models / f"{cell}-{head}" / "1"
    model = load_model(d, RuntimeOptions())
    states_names = ["h", "c"] if cell == "lstm" else ["h"]
    assert [(a.state, a.layer, a.units) for a in model.activations] == [(s, layer, 16) for s in states_names
                                                                           for layer in range(2)]
    rng = np.random.default_rng(0)
    x, states = _inputs(model, 2, CUTS[-1], rng), _states(model, 2, rng)
    logits, new_states, acts = _chunked(model, x, states)
    assert all(v.dtype == np.float32 and v.shape == (2, CUTS[-1], 16) for v in acts.values())
    assert np.abs(logits - model.runtime.run(x, states)[0]).max() <= TOL  # chunks equal one pass

    net = model_from_repository(d)
    with torch.no_grad():  # the last layer's h is the trunk's output y
        seq = torch.from_numpy(x)
        y, _ = net.rnn(net.embed(seq) if net.embed is not None else seq,
                       tuple(torch.from_numpy(s) for s in states) if cell == "lstm" else torch.from_numpy(states[0]))
    assert np.abs(acts[("h", 1)] - y.numpy()).max() <= TOL
    for key, want in torch_activations(net, x, states).items():  # every layer's h, and c, step by step
        assert np.abs(acts[key] - want).max() <= TOL, key
    for i, s in enumerate(states_names):  # the last step's activations are the new state
        for layer in range(2):
            assert np.abs(acts[(s, layer)][:, -1] - new_states[i][layer]).max() <= TOL


@pytest.mark.parametrize("cell,head", CASES)
def test_run_and_run_activations_agree(tiny_models: Path, cell: str, head: str) -> None:
    model = load_model(tiny_models / f"{cell}-{head}" / "1", RuntimeOptions())
    rng = np.random.default_rng(1)
    x, states = _inputs(model, 3, 13, rng), _states(model, 3, rng)
    logits, new_states = model.runtime.run(x, states)
    a_logits, a_states, acts = model.runtime.run_activations(x, states)
    assert len(acts) == len(model.activations)
    assert np.array_equal(a_logits, logits)  # the same nodes on the same inputs
    for got, want in zip(a_states, new_states):
        assert np.array_equal(got, want)


def test_model_onnx_has_no_activation_branch(tiny_models: Path) -> None:
    """Requests that do not ask for activations pay nothing: ONNX Runtime runs every node of a graph."""
    d = tiny_models / "lstm-lm" / "1"
    graph = onnx.load(str(d / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["logits", "new_state_h", "new_state_c"]
    assert "Scan" not in {n.op_type for n in graph.node}
    assert (d / "model.onnx").read_bytes() == build_graph(model_from_repository(d)).SerializeToString()


def test_the_activation_session_opens_once_under_concurrency(tiny_models: Path) -> None:
    model = load_model(tiny_models / "lstm-tagger" / "1", RuntimeOptions())
    rng = np.random.default_rng(2)
    x, states = _inputs(model, 1, 5, rng), _states(model, 1, rng)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: model.runtime.run_activations(x, states), range(16)))
    for _, _, acts in results:
        for got, want in zip(acts, results[0][2]):
            assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ["lstm-lm", "gru-classifier"])
def test_a_model_exported_before_activations_still_serves(tiny_models: Path, tmp_path: Path, name: str) -> None:
    d = _copy(tiny_models, tmp_path, name)
    _strip(d)
    old = load_model(d, RuntimeOptions())
    new = load_model(tiny_models / name / "1", RuntimeOptions())
    assert old.activations == [] and old.activations_sha256 == ""
    rng = np.random.default_rng(3)
    x, states = _inputs(old, 2, 9, rng), _states(old, 2, rng)
    logits, new_states = old.runtime.run(x, states)
    want, want_states = new.runtime.run(x, states)
    assert np.array_equal(logits, want) and all(np.array_equal(a, b) for a, b in zip(new_states, want_states))
    with pytest.raises(ActivationsUnavailable, match="exported without activations"):
        old.runtime.run_activations(x, states)


def test_reexport_adds_activations_and_leaves_model_onnx(tiny_models: Path, tmp_path: Path) -> None:
    d = _copy(tiny_models, tmp_path, "lstm-lm")
    _strip(d)
    before_blob, before = (d / "model.onnx").read_bytes(), json.loads((d / "manifest.json").read_text())
    reexport(d)
    after = json.loads((d / "manifest.json").read_text())
    assert (d / "model.onnx").read_bytes() == before_blob
    assert {k: v for k, v in after.items() if k != "activations"} == before
    assert list(after).index("activations") == list(after).index("state") + 1
    assert after["activations"] == json.loads((tiny_models / "lstm-lm" / "1" / "manifest.json").read_text())[
        "activations"]  # the same graph as a fresh export
    model = load_model(d, RuntimeOptions())
    rng = np.random.default_rng(4)
    _, _, acts = model.runtime.run_activations(_inputs(model, 1, 4, rng), _states(model, 1, rng))
    assert len(acts) == 4


def test_a_reload_notices_a_changed_activation_graph(tiny_models: Path, tmp_path: Path) -> None:
    d = _copy(tiny_models, tmp_path, "gru-lm")
    _strip(d)
    repo = ModelRepository.load(tmp_path, RuntimeOptions())
    assert repo.unchanged(d)
    reexport(d)  # model.onnx and its sha256 stay; only the activations are new
    assert not repo.unchanged(d)


@pytest.mark.parametrize("change,field", [
    (lambda a: a["outputs"][1].update(state="x"), "activations.outputs[1].state must be one of"),
    (lambda a: a["outputs"][0].update(layer=-1), "activations.outputs[0].layer must be at least 0"),
    (lambda a: a["outputs"][2].pop("units"), "activations.outputs[2].units is missing"),
    (lambda a: a["outputs"][0].update(output=3), "activations.outputs[0].output must be string"),
    (lambda a: a.pop("sha256"), "activations.sha256 is missing"),
    (lambda a: a.update(outputs={}), "activations.outputs must be array"),
])
def test_the_schema_refuses_a_malformed_activations_entry(tiny_models: Path, tmp_path: Path, change,  # type: ignore[no-untyped-def]
                                                          field: str) -> None:
    d = _copy(tiny_models, tmp_path, "lstm-lm")
    _edit(d, lambda m: change(m["activations"]))
    bad = problem(json.loads((d / "manifest.json").read_text()))
    assert bad is not None and " ".join(bad).startswith(field)
    with pytest.raises(ModelInvalid, match=f"manifest field {field}".replace("[", r"\[").replace("]", r"\]")):
        load_model(d, RuntimeOptions())


@pytest.mark.parametrize("change,expected", [
    (lambda d, a: a["outputs"][1].update(layer=2), r"activations.outputs\[1\].layer is 2 but the model has 2 layers"),
    (lambda d, a: a["outputs"][0].update(state="c"), r"activations.outputs\[0\].state is 'c' but the model's states"),
    (lambda d, a: a["outputs"][1].update(output="act_h_l0"), r"activations.outputs\[1\].output 'act_h_l0' is named"),
    (lambda d, a: a["outputs"][0].update(output="act_z"), r"activation outputs \['act_z'\] that activations.onnx"),
    (lambda d, a: a.update(sha256="0" * 64), "activations.onnx has sha256 .* but the manifest says 0000"),
    (lambda d, a: a.update(file="../model.onnx"), "activations.file must name a file beside model.onnx"),
    (lambda d, a: (d / "activations.onnx").unlink(), "activations.onnx is missing"),
])
def test_a_wrong_activations_section_is_refused(tiny_models: Path, tmp_path: Path, change,  # type: ignore[no-untyped-def]
                                                expected: str) -> None:
    d = _copy(tiny_models, tmp_path, "gru-lm")
    _edit(d, lambda m: change(d, m["activations"]))
    with pytest.raises(ModelInvalid, match=expected):
        load_model(d, RuntimeOptions())


def test_a_wrong_activation_shape_is_refused_when_first_used(tiny_models: Path, tmp_path: Path) -> None:
    d = _copy(tiny_models, tmp_path, "rnn-lm")
    _edit(d, lambda m: m["activations"]["outputs"][0].update(units=17))
    model = load_model(d, RuntimeOptions())  # shapes are checked when the session opens, not at load
    rng = np.random.default_rng(5)
    with pytest.raises(ModelInvalid, match=r"activation 'act_h_l0' has shape \[batch, time, 17\] in the manifest"):
        model.runtime.run_activations(_inputs(model, 1, 2, rng), _states(model, 1, rng))


def test_a_changed_activation_file_is_refused_when_first_used(tiny_models: Path, tmp_path: Path) -> None:
    d = _copy(tiny_models, tmp_path, "rnn-tagger")
    model = load_model(d, RuntimeOptions())
    blob = (d / "activations.onnx").read_bytes()
    (d / "activations.onnx").write_bytes(blob + b"\0")
    rng = np.random.default_rng(6)
    with pytest.raises(ModelInvalid, match="has changed since the model was loaded"):
        model.runtime.run_activations(_inputs(model, 1, 2, rng), _states(model, 1, rng))
    assert hashlib.sha256(blob).hexdigest() == model.activations_sha256
