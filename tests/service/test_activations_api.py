"""Per-step activations over the API (return_activations): equal to PyTorch's per-step outputs on
Step, Stream and the packed batch, across chunks and a restart; sliced as asked; refused clearly on
a model exported without them and for selections that do not fit."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from tests.helpers import Server, torch_activations
from training.export import model_from_repository

TOL = 1e-5


def _torch_layers(model_dir: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Each layer's per-step h (and c for an LSTM) from PyTorch, named as the API names them; the last
    layer's h is also checked to be the model's own output."""
    model = model_from_repository(model_dir)
    cfg = model.config
    x = tokens.astype(np.int64)[None]
    zeros = [np.zeros((cfg.layers, 1, cfg.hidden), np.float32) for _ in model.state_names]
    out = {f"{state}_l{layer}": v[0] for (state, layer), v in torch_activations(model, x, zeros).items()}
    with torch.no_grad():
        y, _ = model.rnn(model.embed(torch.from_numpy(x)))
    assert np.abs(out[f"h_l{cfg.layers - 1}"] - y[0].numpy()).max() <= TOL
    return out


def _acts(reply) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {t.name: np.frombuffer(t.data, "<f4").reshape(tuple(t.shape)) for t in reply.activations}


@pytest.mark.parametrize("name", ["lstm-lm", "gru-lm"])
def test_last_layer_h_equals_pytorch_across_chunks_and_a_restart(tiny_models: Path, tmp_path: Path,
                                                                 name: str) -> None:
    rng = np.random.default_rng(4)
    seq = rng.integers(0, 98, 60)
    want = _torch_layers(tiny_models / name / "1", seq)
    server = Server(tiny_models, f"sqlite:{tmp_path / 'r.db'}").start()
    got: dict[str, list[np.ndarray]] = {}
    try:
        c = server.client()
        sid = c.create(name).session_id
        cuts = [0, 7, 8, 30, 45, 60]
        for k, (a, b) in enumerate(itertools.pairwise(cuts)):
            if k == 3:  # a restart in the middle: the state comes from the store
                c.close()
                server.kill()
                server.start()
                c = server.client()
            reply = c.step(sid, tokens=seq[a:b].tolist(), expected_offset=a, return_activations=True)
            for key, value in _acts(reply).items():
                got.setdefault(key, []).append(value)
        c.close()
    finally:
        server.kill()
    layers = 2
    names = [f"h_l{i}" for i in range(layers)] + ([f"c_l{i}" for i in range(layers)] if name.startswith("lstm")
                                                  else [])
    assert sorted(got) == sorted(names)
    for key in names:
        full = np.concatenate(got[key])
        assert full.shape == want[key].shape
        assert np.abs(full - want[key]).max() <= TOL, key


def test_layer_unit_and_state_selection(client: RecurClient, tiny_models: Path) -> None:
    seq = np.arange(20) % 98
    want = _torch_layers(tiny_models / "lstm-lm" / "1", seq)
    sid = client.create("lstm-lm").session_id
    reply = client.step(sid, tokens=seq.tolist(), return_activations=True, activation_layers=[-1, 0],
                        activation_units=[3, 1, 7], activation_states=["c"])
    acts = _acts(reply)
    assert list(acts) == ["c_l1", "c_l0"]
    assert np.abs(acts["c_l1"] - want["c_l1"][:, [3, 1, 7]]).max() <= TOL
    assert np.abs(acts["c_l0"] - want["c_l0"][:, [3, 1, 7]]).max() <= TOL
    last = client.step(client.create("lstm-lm").session_id, tokens=seq.tolist(), return_activations=True,
                       final_only=True, activation_states=["h"])
    assert [t.name for t in last.activations] == ["h_l0", "h_l1"]
    assert np.abs(_acts(last)["h_l1"] - want["h_l1"][-1:]).max() <= TOL
    plain = client.step(client.create("lstm-lm").session_id, tokens=seq.tolist())
    assert not plain.activations


def test_stream_and_packed_return_the_same_activations(client: RecurClient, tiny_models: Path) -> None:
    rng = np.random.default_rng(9)
    seqs = [rng.integers(0, 98, 12) for _ in range(3)]
    wants = [_torch_layers(tiny_models / "gru-lm" / "1", s) for s in seqs]
    sids = [client.create("gru-lm").session_id for _ in seqs]
    first = client.step_packed(sids, [s[:5].astype(np.int32) for s in seqs], return_activations=True,
                               activation_layers=[1])
    assert not first.errors and list(first.activations) == ["h_l1"]
    rows = first.activations["h_l1"].reshape(3, 5, -1)
    reqs = [pb.StepRequest(session_id=sid, tokens=s[5:].tolist(), expected_offset=5, return_activations=True,
                           activation_layers=[1], request_id=str(i)) for i, (sid, s) in enumerate(zip(sids, seqs))]
    replies = {int(r.request_id): r for r in client.stub.Stream(iter(reqs))}
    for i in range(3):
        full = np.concatenate([rows[i], _acts(replies[i])["h_l1"]])
        assert np.abs(full - wants[i]["h_l1"]).max() <= TOL
    # a retry of each session's last chunk (sent on the Stream), now packed: replayed, recomputed
    again = client.step_packed(sids, [s[5:].astype(np.int32) for s in seqs], expected_offsets=[5, 5, 5],
                               return_activations=True, activation_layers=[1])
    assert again.replayed == {0, 1, 2} and list(again.offsets) == [12, 12, 12]
    for i in range(3):
        assert np.abs(again.activations["h_l1"][7 * i : 7 * (i + 1)] - wants[i]["h_l1"][5:]).max() <= TOL


def test_a_model_exported_without_activations_refuses_clearly(tiny_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "lstm-lm", models / "old")
    manifest_path = models / "old" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("activations")
    manifest["name"] = "old"
    manifest_path.write_text(json.dumps(manifest))
    (models / "old" / "1" / "activations.onnx").unlink()
    server = Server(models, "memory:").start()
    try:
        with server.client() as c:
            sid = c.create("old").session_id
            with pytest.raises(grpc.RpcError) as e:
                c.step(sid, tokens=[1, 2, 3], return_activations=True)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "exported without activation outputs" in (e.value.details() or "")
            assert "export it again" in (e.value.details() or "")
            assert c.get(sid).offset == 0
            assert c.step(sid, tokens=[1, 2, 3]).offset == 3  # everything else still serves
            packed = c.step_packed([sid], [np.array([4], np.int32)], return_activations=True)
            assert packed.errors[0][0] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    finally:
        server.kill()


@pytest.mark.parametrize("fields, message", [
    ({"activation_layers": [2]}, "has layers 0..1"),
    ({"activation_units": [16]}, "has units 0..15, not 16"),
    ({"activation_states": ["c"]}, "has states ['h'], not 'c'"),
    # selections are sets: a name given twice (or a layer twice, counted from either end) is refused
    ({"activation_units": [3, 1, 3]}, "activation_units is a set"),
    ({"activation_layers": [-1, 1]}, "layer 1 is named more than once"),
    ({"activation_states": ["h", "h"]}, "activation_states is a set"),
])
def test_selections_that_do_not_fit_are_invalid(client: RecurClient, fields: dict, message: str) -> None:
    sid = client.create("gru-lm").session_id
    with pytest.raises(grpc.RpcError) as e:
        client.step(sid, tokens=[1, 2], return_activations=True, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (e.value.details() or "")
    with pytest.raises(grpc.RpcError) as e:
        client.step(sid, tokens=[1, 2], **fields)  # a selection without return_activations
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.get(sid).offset == 0
