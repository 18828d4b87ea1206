"""The Open Inference Protocol (KServe v2) with Triton's sequence extension, driven by the real
tritonclient[grpc] (scripts in clients/, run in .venv-tritonclient) against a real server, and
checked against the one-pass reference and the native recur.v1 API."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.helpers import ROOT, TOL, Reference, Server, refused
from tests.v2.conftest import TRITON_PYTHON

TOKENS_MODEL, STREAM_MODEL, FEATURES_MODEL = "lstm-lm", "gru-tagger", "lstm-classifier"


def _tokens(reference: Reference, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, reference.manifest["input"]["vocab_size"], n).astype(np.int64)


def _states(reference: Reference) -> list[str]:
    return [s["name"] for s in reference.manifest["state"]]


def test_metadata_and_readiness(v2_server: Server, triton: Callable[..., str], reference) -> None:  # type: ignore[no-untyped-def]
    out = json.loads(triton("metadata.py", target=v2_server.target, models=[TOKENS_MODEL, FEATURES_MODEL]))
    assert out["live"] and out["ready"]
    assert out["model_ready"] == {TOKENS_MODEL: True, FEATURES_MODEL: True, "no-such-model": False}
    assert out["server"]["name"] == "recur" and "sequence" in out["server"]["extensions"]
    lm, digits = out["models"][TOKENS_MODEL], out["models"][FEATURES_MODEL]
    classes = reference(TOKENS_MODEL).manifest["head"]["shape"][2]
    assert lm["versions"] == ["1"]
    assert lm["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": ["1", "-1"]}]
    assert lm["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": ["1", "-1", str(classes)]}
    assert [o["name"] for o in lm["outputs"][1:]] == ["state_h", "state_c"]
    assert lm["outputs"][1]["shape"] == ["2", "1", "16"]  # [layers, batch 1, hidden]
    dim = reference(FEATURES_MODEL).manifest["input"]["shape"][2]
    assert digits["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["1", "-1", str(dim)]}]


@pytest.mark.parametrize(("dtype", "sequence_id", "end"), [("INT64", 424242, False), ("INT32", "user-7:a@b.c", True)])
def test_sequence_in_random_chunks_matches_one_pass_and_native(
        v2_server: Server, triton: Callable[..., str], reference, tmp_path: Path,  # type: ignore[no-untyped-def]
        dtype: str, sequence_id: int | str, end: bool) -> None:
    ref = reference(TOKENS_MODEL)
    x = _tokens(ref, 2000, seed=1)
    np.save(tmp_path / "x.npy", x)
    triton("sequence.py", target=v2_server.target, model=TOKENS_MODEL, input=str(tmp_path / "x.npy"),
           input_name="tokens", dtype=dtype, sequence_id=sequence_id, start=True, end=end, seed=3, **{"from": 0},
           to=len(x), states=_states(ref), out=str(tmp_path / "out.npz"))
    out = np.load(tmp_path / "out.npz")
    want, want_states = ref.run(x)
    assert np.abs(out["logits"] - want).max() <= TOL
    assert out["offsets"][-1] == len(x) and (np.diff(out["offsets"]) > 0).all() and len(out["offsets"]) > 5
    assert len(out["replay_diffs"]) and out["replay_diffs"].max() == 0.0  # a repeated request id is replayed
    for name, w in zip(_states(ref), want_states):
        assert np.abs(out[f"state_{name}"][:, 0] - w).max() <= TOL
    with v2_server.client() as c:
        if end:  # the sequence's session is gone
            refused(lambda: c.get(f"v2-{sequence_id}"), grpc.StatusCode.NOT_FOUND)
        else:  # the same session is visible to the native API as v2-<id>
            s = c.get(f"v2-{sequence_id}", include_state=True)
            assert s.offset == len(x) and s.model == TOKENS_MODEL
            for t, w in zip(s.state, want_states):
                assert np.abs(np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)) - w).max() <= TOL
        native = c.create(TOKENS_MODEL).session_id
        r = c.step(native, tokens=x.tolist(), return_logits=True)
        got = np.frombuffer(r.logits, dtype="<f4").reshape(tuple(r.logits_shape))
        assert np.abs(out["logits"] - got).max() <= TOL


def test_features_sequence(v2_server: Server, triton: Callable[..., str], reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = reference(FEATURES_MODEL)
    x = np.random.default_rng(5).standard_normal((300, ref.manifest["input"]["shape"][2])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    triton("sequence.py", target=v2_server.target, model=FEATURES_MODEL, input=str(tmp_path / "x.npy"),
           input_name="features", dtype="FP32", sequence_id=77, start=True, end=True, seed=4, max_chunk=40,
           **{"from": 0}, to=len(x), states=_states(ref), out=str(tmp_path / "out.npz"))
    out = np.load(tmp_path / "out.npz")
    want, want_states = ref.run(x)
    assert np.abs(out["logits"] - want).max() <= TOL
    for name, w in zip(_states(ref), want_states):
        assert np.abs(out[f"state_{name}"][:, 0] - w).max() <= TOL


def test_stream_with_eight_interleaved_sequences(v2_server: Server, triton: Callable[..., str], reference,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    ref = reference(STREAM_MODEL)
    rng = np.random.default_rng(11)
    xs = [_tokens(ref, int(rng.integers(50, 700)), seed=20 + i) for i in range(8)]
    paths = []
    for i, x in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", x)
        paths.append(str(tmp_path / f"x{i}.npy"))
    ids: list[int | str] = [1, 2, 3, 4, "five", "six-6", "seven.7", "eight@8"]
    triton("stream.py", target=v2_server.target, model=STREAM_MODEL, inputs=paths, input_name="tokens",
           sequence_ids=ids, seed=12, states=_states(ref), out=str(tmp_path / "out.npz"))
    out = np.load(tmp_path / "out.npz")
    for i, x in enumerate(xs):
        want, want_states = ref.run(x)
        assert np.abs(out[f"seq{i}"] - want).max() <= TOL, i
        for name, w in zip(_states(ref), want_states):
            assert np.abs(out[f"seq{i}_{name}"][:, 0] - w).max() <= TOL


def test_errors_as_tritonclient_surfaces_them(v2_server: Server, triton: Callable[..., str]) -> None:
    out = json.loads(triton("errors.py", target=v2_server.target, model=TOKENS_MODEL, input_name="tokens"))
    status = {k: v[0] for k, v in out.items() if k != "stream"}
    message = {k: v[1] for k, v in out.items() if k != "stream"}
    assert status["unknown model"] == status["unknown model in a sequence"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in message["unknown model"] and TOKENS_MODEL in message["unknown model"]
    for case in ("missing start", "missing start (string id)", "after a refused start"):
        assert status[case] == "StatusCode.NOT_FOUND", out[case]
        assert "sequence_start" in message[case], message[case]
    assert status["wrong dtype"] == "StatusCode.INVALID_ARGUMENT"
    assert "INT64 or INT32" in message["wrong dtype"] and "FP32" in message["wrong dtype"]
    assert status["wrong shape"] == "StatusCode.INVALID_ARGUMENT"
    assert "[1, T]" in message["wrong shape"] and "[3]" in message["wrong shape"]
    assert status["wrong input name"] == "StatusCode.INVALID_ARGUMENT" and "'tokens'" in message["wrong input name"]
    assert status["token out of range"] == "StatusCode.INVALID_ARGUMENT" and "out of range" in message[
        "token out of range"]
    # on a stream, a refusal is an error_message and the stream goes on, in order for one sequence
    (e1, ok2, e3, ok4) = out["stream"]
    assert e1[0] == "error" and "sequence_start" in e1[1]
    assert ok2 == ["ok", "s2", 3]
    assert e3[0] == "error" and "INT64 or INT32" in e3[1]
    assert ok4 == ["ok", "s4", 6]


def test_sequence_survives_sigkill_and_restart(tiny_models: Path, triton: Callable[..., str], reference,  # type: ignore[no-untyped-def]
                                               tmp_path: Path) -> None:
    ref = reference(TOKENS_MODEL)
    x = _tokens(ref, 1200, seed=8)
    np.save(tmp_path / "x.npy", x)
    common = dict(model=TOKENS_MODEL, input=str(tmp_path / "x.npy"), input_name="tokens", sequence_id="restart-me",
                  states=_states(ref))
    server = Server(tiny_models, f"sqlite:{tmp_path / 'recur.db'}").start()  # its own: it is killed
    try:
        triton("sequence.py", target=server.target, start=True, end=False, seed=1, **{"from": 0}, to=500,
               out=str(tmp_path / "a.npz"), **common)
        server.kill()
        server.start()
        triton("sequence.py", target=server.target, start=False, end=True, seed=2, **{"from": 500}, to=len(x),
               out=str(tmp_path / "b.npz"), **common)
    finally:
        server.kill()
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    want, want_states = ref.run(x)
    assert np.abs(np.concatenate([a["logits"], b["logits"]]) - want).max() <= TOL
    assert b["offsets"][-1] == len(x)
    for name, w in zip(_states(ref), want_states):
        assert np.abs(b[f"state_{name}"][:, 0] - w).max() <= TOL


def test_the_documented_example_runs(triton: Callable[..., str], tmp_path: Path) -> None:
    """docs/v2.md's tritonclient example, as written, against the shipped models (`triton`: the venv is there)."""
    code = (ROOT / "docs" / "v2.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    server = Server(ROOT / "models", f"sqlite:{tmp_path / 'ex.db'}").start()
    try:
        script = code.replace("localhost:50051", server.target) + (
            "\nassert r.as_numpy('logits').shape == (1, 3, 98) and r.as_numpy('state_h').shape == (2, 1, 256)"
            "\nassert r.get_response().parameters['sequence_offset'].int64_param == 6\n")
        out = subprocess.run([str(TRITON_PYTHON), "-c", script], capture_output=True, text=True, timeout=120,
                             check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        server.kill()
