"""Bring your own model: plain torch.onnx.export-ed LSTM and GRU modules go through `recur import`, load as the
server loads them, and serve chunked outputs equal to PyTorch eager over the whole sequence; graphs that do not
fit are refused with messages that say what to do; manifests are checked against docs/manifest.schema.json."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recur.cli import main as recur_main
from service.engine.runtime import RuntimeOptions
from service.errors import ModelInvalid
from service.repository.models import ModelRepository, load_model
from service.repository.schema import MANIFEST_SCHEMA, problem
from tests.helpers import ROOT, TOL, Server, logits_of
from training.importer import ImportRefused, import_model

VOCAB = ["<unk>", *"abcdefghij ."]  # 13 tokens
LABELS = ["low", "mid", "high"]


class TokenLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), 8)
        self.rnn = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, len(VOCAB))

    def forward(self, tokens, h0, c0):  # type: ignore[no-untyped-def]
        y, (hn, cn) = self.rnn(self.embed(tokens), (h0, c0))
        return self.head(y), hn, cn


class FeatureGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(5, 12, num_layers=1, batch_first=True)
        self.head = nn.Linear(12, len(LABELS))

    def forward(self, features, h0):  # type: ignore[no-untyped-def]
        y, hn = self.rnn(features, h0)
        return self.head(y), hn


def _export(module: nn.Module, path: Path, *, names_in: list[str], names_out: list[str], dynamic: bool = True) -> Path:
    torch.manual_seed(0)
    module.eval()
    tokens = isinstance(module, TokenLSTM)
    x = torch.zeros(1, 4, dtype=torch.long) if tokens else torch.zeros(1, 4, 5)
    states = (torch.zeros(2, 1, 16), torch.zeros(2, 1, 16)) if tokens else (torch.zeros(1, 1, 12),)
    axes = {names_in[0]: {0: "batch", 1: "time"}, names_out[0]: {0: "batch", 1: "time"}}
    axes.update({n: {1: "batch"} for n in names_in[1:] + names_out[1:]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, *states), str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=axes if dynamic else None, dynamo=False)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("byom")
    torch.manual_seed(1)
    lstm, gru = TokenLSTM().eval(), FeatureGRU().eval()
    (d / "vocab.json").write_text(json.dumps(VOCAB))
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {
        "dir": d, "lstm": lstm, "gru": gru,
        "lstm.onnx": _export(lstm, d / "lstm.onnx", names_in=["tokens", "h0", "c0"], names_out=["logits", "hn", "cn"]),
        "gru.onnx": _export(gru, d / "gru.onnx", names_in=["features", "h0"], names_out=["scores", "hn"]),
    }


@pytest.fixture(scope="module")
def imported(exported: dict) -> Path:
    """A model repository holding lstm-tokens/1 and gru-features/1, written by `recur import`."""
    models, d = exported["dir"] / "models", exported["dir"]
    assert recur_main(["import", str(exported["lstm.onnx"]), "--name", "lstm-tokens", "--version", "1",
                       "--vocab", str(d / "vocab.json"), "--models-dir", str(models)]) == 0
    assert recur_main(["import", str(exported["gru.onnx"]), "--name", "gru-features", "--version", "1",
                       "--head", "tagger", "--labels", str(d / "labels.txt"), "--models-dir", str(models)]) == 0
    return models


def _eager(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """PyTorch eager over the whole sequence from zero state: per-step outputs (T, C)."""
    states = [torch.zeros(shape) for shape in _state_shapes(module)]
    xt = torch.from_numpy(x[None])
    with torch.no_grad():
        return module(xt, *states)[0][0].numpy()


def _state_shapes(module: nn.Module) -> list[torch.Size]:
    if isinstance(module, TokenLSTM):
        return [torch.Size([2, 1, 16])] * 2
    return [torch.Size([1, 1, 12])]


def _sequence(kind: str, steps: int = 40) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "tokens":
        return rng.integers(0, len(VOCAB), size=steps, dtype=np.int64)
    return rng.standard_normal((steps, 5)).astype(np.float32)


def test_the_manifests_have_what_export_writes(imported: Path) -> None:
    ours = json.loads((ROOT / "models" / "pylm" / "1" / "manifest.json").read_text())
    for name in ("lstm-tokens", "gru-features"):
        m = json.loads((imported / name / "1" / "manifest.json").read_text())
        assert set(ours) - {"activations"} <= set(m), set(ours) - set(m)  # activations: optional, export's own
        assert "activations" not in m
        assert m["format"] == 1 and m["opset"] >= 13 and all(s["initial"] == "zeros" for s in m["state"])
        assert m["training"]["parity"]["ok"] and m["training"]["parity"]["max_abs_diff"] <= TOL
        assert problem(m) is None
    lstm = json.loads((imported / "lstm-tokens" / "1" / "manifest.json").read_text())
    assert (lstm["cell"], lstm["layers"], lstm["hidden_size"]) == ("lstm", 2, 16)
    assert [(s["name"], s["output"], s["shape"]) for s in lstm["state"]] == [
        ("h0", "hn", [2, "batch", 16]), ("c0", "cn", [2, "batch", 16])]
    assert lstm["vocabulary"] == {"tokens": VOCAB, "unk_id": 0} and lstm["input"]["vocab_size"] == len(VOCAB)
    gru = json.loads((imported / "gru-features" / "1" / "manifest.json").read_text())
    assert gru["input"] == {"kind": "features", "name": "features", "dtype": "float32",
                            "shape": ["batch", "time", 5]}
    assert gru["head"] == {"kind": "tagger", "output": "scores", "shape": ["batch", "time", 3], "labels": LABELS}


def test_the_import_prints_its_parity_check(exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert recur_main(["import", str(exported["gru.onnx"]), "--name", "g", "--version", "3", "--head", "classifier",
                       "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "parity: 3 chunks vs one pass" in out and "ok" in out
    assert (tmp_path / "g" / "3" / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # no staging directory left behind
    assert recur_main(["import", str(exported["gru.onnx"]), "--name", "g", "--version", "3", "--head", "classifier",
                       "--models-dir", str(tmp_path)]) == 1
    assert "already exists; choose another --version or remove it" in capsys.readouterr().err


@pytest.mark.parametrize("name,module", [("lstm-tokens", "lstm"), ("gru-features", "gru")])
def test_chunked_in_process_equals_pytorch_eager(imported: Path, exported: dict, name: str, module: str) -> None:
    model = load_model(imported / name / "1", RuntimeOptions())
    x = _sequence(model.input_kind)
    states = [s[:, None] for s in model.zero_state()]
    outs = []
    for a, b in ((0, 7), (7, 8), (8, 25), (25, 40)):
        y, states = model.runtime.run(x[None, a:b], states)
        outs.append(y[0])
    assert np.abs(np.concatenate(outs) - _eager(exported[module], x)).max() <= TOL


def test_a_real_server_streams_them_equal_to_pytorch_eager(imported: Path, exported: dict) -> None:
    server = Server(imported, "memory:").start()
    try:
        with server.client() as c:
            for name, module in (("lstm-tokens", "lstm"), ("gru-features", "gru")):
                x = _sequence("tokens" if module == "lstm" else "features")
                sid = c.create(name).session_id
                got = []
                for a, b in ((0, 5), (5, 19), (19, 40)):
                    chunk = {"tokens": x[a:b].tolist()} if module == "lstm" else {"features": x[a:b].tobytes()}
                    got.append(logits_of(c.step(sid, expected_offset=a, return_logits=True, **chunk)))
                assert np.abs(np.concatenate(got) - _eager(exported[module], x)).max() <= TOL, name
            sid = c.create("lstm-tokens").session_id
            assert c.step(sid, text="abc d").offset == 5  # the vocabulary makes text input work
            reply = c.step(c.create("gru-features").session_id, features=x[:2].tobytes())
            assert reply.outputs[-1].label in LABELS
    finally:
        server.kill()


def test_int32_tokens_are_taken_as_int64(exported: dict, tmp_path: Path) -> None:
    path = tmp_path / "int32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(exported["lstm"], (torch.zeros(1, 4, dtype=torch.int32), torch.zeros(2, 1, 16),
                                             torch.zeros(2, 1, 16)), str(path), dynamo=False,
                          input_names=["ids", "h0", "c0"], output_names=["logits", "hn", "cn"],
                          dynamic_axes={"ids": {0: "batch", 1: "time"}, "h0": {1: "batch"}, "c0": {1: "batch"},
                                        "logits": {0: "batch", 1: "time"}, "hn": {1: "batch"}, "cn": {1: "batch"}})
    result = import_model(path, name="i32", version=1, models_dir=tmp_path / "models",
                          vocab=exported["dir"] / "vocab.json")
    assert result.manifest["input"]["dtype"] == "int64"
    model = load_model(result.directory, RuntimeOptions())
    x = _sequence("tokens")
    y, _ = model.runtime.run(x[None], [s[:, None] for s in model.zero_state()])
    assert np.abs(y[0] - _eager(exported["lstm"], x)).max() <= TOL


def test_ambiguous_pairing_is_refused_until_named(exported: dict, tmp_path: Path) -> None:
    path = _export(exported["lstm"], tmp_path / "odd.onnx", names_in=["tokens", "a", "b"], names_out=["y", "p", "q"])
    with pytest.raises(ImportRefused, match=r"ambiguous state pairing \(a could pair with p or q; b could pair with "
                                            r"p or q\): name the pairs with --state-pairs a:OUT,b:OUT"):
        import_model(path, name="odd", version=1, models_dir=tmp_path / "models")
    assert not (tmp_path / "models" / "odd").exists()
    result = import_model(path, name="odd", version=1, models_dir=tmp_path / "models", state_pairs="a:p,b:q")
    assert [(s["name"], s["output"]) for s in result.manifest["state"]] == [("a", "p"), ("b", "q")]


def test_a_wrong_pairing_fails_the_parity_check(exported: dict, tmp_path: Path) -> None:
    path = _export(exported["lstm"], tmp_path / "odd.onnx", names_in=["tokens", "a", "b"], names_out=["y", "p", "q"])
    with pytest.raises(ImportRefused, match="chunking is not invisible"):
        import_model(path, name="odd", version=1, models_dir=tmp_path, state_pairs="a:q,b:p")


def test_a_fixed_shape_graph_is_refused_saying_how_to_export(exported: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    path = _export(exported["gru"], tmp_path / "fixed.onnx", names_in=["features", "h0"], names_out=["y", "hn"],
                   dynamic=False)
    assert recur_main(["import", str(path), "--name", "f", "--version", "1", "--head", "tagger",
                       "--models-dir", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert "refused: the graph has a fixed batch and time: input 'features' is [1, 4, 5]" in err
    assert ("dynamic_axes={'features': {0: 'batch', 1: 'time'}, 'h0': {1: 'batch'}, 'y': {0: 'batch', 1: 'time'}, "
            "'hn': {1: 'batch'}}") in err
    assert not (tmp_path / "models" / "f").exists()


def test_a_directory_without_a_manifest_is_logged(imported: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(imported / "lstm-tokens", tmp_path / "lstm-tokens")
    (tmp_path / "bare" / "1").mkdir(parents=True)
    shutil.copy(imported / "lstm-tokens" / "1" / "model.onnx", tmp_path / "bare" / "1" / "model.onnx")
    with caplog.at_level(logging.INFO, logger="service.repository.models"):
        repo = ModelRepository.load(tmp_path, RuntimeOptions())
    assert [(m.name, m.version) for m in repo.all()] == [("lstm-tokens", 1)]
    assert f"{tmp_path / 'bare' / '1'}: no manifest.json; run recur import" in caplog.text


@pytest.mark.parametrize("change,expected", [
    (lambda m: m["head"].pop("output"), "manifest field head.output is missing"),
    (lambda m: m["input"].update(dtype="float64"), "manifest field input.dtype must be one of"),
    (lambda m: m["state"][1]["shape"].__setitem__(0, 1.5), "manifest field state[1].shape[0] must be integer or "
                                                           "string, not 1.5"),
    (lambda m: m.update(version="1"), "manifest field version must be integer, not \"1\""),
    (lambda m: m.update(layers=0), "manifest field layers must be at least 1, not 0"),
    (lambda m: m["vocabulary"]["tokens"].__setitem__(3, 7), "manifest field vocabulary.tokens[3] must be string"),
    (lambda m: m["input"].pop("vocab_size"), "manifest field input.vocab_size is missing"),
    (lambda m: m.pop("state"), "manifest field state is missing"),
])
def test_schema_refusals_name_the_field(imported: Path, tmp_path: Path, change, expected: str) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "lstm-tokens" / "1"
    shutil.copytree(imported / "lstm-tokens" / "1", d)
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelInvalid) as e:
        load_model(d, RuntimeOptions())
    assert expected in str(e.value), str(e.value)


def test_the_published_schema_is_the_one_the_loader_uses() -> None:
    assert json.loads((ROOT / "docs" / "manifest.schema.json").read_text()) == MANIFEST_SCHEMA, \
        "regenerate it: python -m service.repository.schema > docs/manifest.schema.json"
    for manifest in sorted((ROOT / "models").glob("*/*/manifest.json")):
        assert problem(json.loads(manifest.read_text())) is None, manifest


def test_a_graph_that_fails_when_run_is_one_line(exported: dict, tmp_path: Path) -> None:
    """A graph that passes the checks but fails in ONNX Runtime (a Reshape to a wrong shape): `recur
    import` says so in one line, not a traceback, and leaves nothing behind."""
    import subprocess
    import sys

    import onnx
    from onnx import helper

    model = onnx.load(str(exported["gru.onnx"]))
    g = model.graph
    producer = next(n for n in g.node if "scores" in n.output)
    producer.output[list(producer.output).index("scores")] = "scores_raw"
    # a shape computed at run time, one class too many: nothing to see until ONNX Runtime runs it
    g.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, 1], np.int64), "one_more"))
    g.node.extend([helper.make_node("Shape", ["scores_raw"], ["raw_shape"]),
                   helper.make_node("Add", ["raw_shape", "one_more"], ["bad_shape"]),
                   helper.make_node("Reshape", ["scores_raw", "bad_shape"], ["scores"])])
    path = tmp_path / "breaks.onnx"
    onnx.save(model, str(path))
    out = subprocess.run([sys.executable, "-m", "recur.cli", "import", str(path), "--name", "b", "--version", "1",
                          "--head", "classifier", "--models-dir", str(tmp_path / "models")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("recur import: refused: the graph fails when run"), lines[0]
    assert not (tmp_path / "models" / "b").exists()
