"""Per-step activations over the API (return_activations): equal to PyTorch's per-step outputs on
Step, Stream and the packed batch, across chunks and a restart; a selection needs return_activations.
The selection rules and a model exported without activations are tests/core/test_activations.py's."""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import numpy as np
import pytest

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from tests.helpers import TOL, Server, torch_layers


def _acts(reply) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {t.name: np.frombuffer(t.data, "<f4").reshape(tuple(t.shape)) for t in reply.activations}


@pytest.mark.parametrize("name", ["lstm-lm", "gru-lm"])
def test_last_layer_h_equals_pytorch_across_chunks_and_a_restart(tiny_models: Path, tmp_path: Path,
                                                                 name: str) -> None:
    rng = np.random.default_rng(4)
    seq = rng.integers(0, 98, 60)
    want = torch_layers(tiny_models / name / "1", seq)
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


def test_stream_and_packed_return_the_same_activations(client: RecurClient, tiny_models: Path) -> None:
    rng = np.random.default_rng(9)
    seqs = [rng.integers(0, 98, 12) for _ in range(3)]
    wants = [torch_layers(tiny_models / "gru-lm" / "1", s) for s in seqs]
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


@pytest.mark.parametrize("fields", [{"activation_layers": [0]}, {"activation_units": [1]},
                                    {"activation_states": ["h"]}])
def test_a_selection_without_return_activations_is_invalid(client: RecurClient, fields: dict) -> None:
    sid = client.create("gru-lm").session_id
    with pytest.raises(grpc.RpcError) as e:
        client.step(sid, tokens=[1, 2], **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "need return_activations" in (e.value.details() or "")
    assert client.get(sid).offset == 0
