"""The Node.js example (examples/node, stubs from protos/ alone) against a real server: it streams a
file through a session while the server is SIGKILLed and restarted on the same port and SQLite
file, and its logits, its replay and refusal, and its packed call equal one pass."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from recur.client import RecurClient
from tests.helpers import ROOT, TOL, Reference, Server, free_port

EXAMPLE = ROOT / "examples" / "node"
MODEL = "lstm-lm"


def _floats(b64: str, classes: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4").reshape(-1, classes)


def test_the_node_example_resumes_and_matches_one_pass(tiny_models: Path, tmp_path: Path,
                                                       reference: Callable[[str], Reference]) -> None:
    node = shutil.which("node")
    assert node and (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "node and examples/node/node_modules are needed: `make test` installs them (npm ci)"
    text = (ROOT / "recur" / "client.py").read_text()[:6000]  # a file in the models' alphabet, and beyond it
    source = tmp_path / "input.txt"
    source.write_text(text)
    server = Server(tiny_models, f"sqlite:{tmp_path / 'node.db'}", ["--port", str(free_port())]).start()
    sid = "node-example"
    try:
        proc = subprocess.Popen([node, str(EXAMPLE / "recur_stream.js"), "--target", server.target, "--model", MODEL,
                                 "--file", str(source), "--chunk", "8", "--session-id", sid],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with RecurClient(server.target) as c:  # SIGKILL the server once the stream is well under way
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline and proc.poll() is None, "the example made no progress"
                try:
                    if c.get(sid).offset >= 400:
                        break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND  # not created yet
                time.sleep(0.02)
        server.kill()
        server.start()
        out, err = proc.communicate(timeout=120)
    finally:
        server.kill()
    assert proc.returncode == 0, err
    assert "resuming at offset" in err  # the connection really dropped mid-file
    result = json.loads(out)
    ref = reference(MODEL)
    vocab = ref.manifest["vocabulary"]
    index = {s: i for i, s in enumerate(vocab["tokens"])}
    tokens = [index.get(ch, vocab["unk_id"]) for ch in text]
    assert result["tokens"] == tokens and result["offset"] == len(tokens) == 6000 and result["reconnects"] >= 1
    assert result["start_offsets"] == list(range(0, 6000, 8))
    want, _ = ref.run(np.array(tokens))
    got = _floats(result["logits_b64"], result["classes"])
    assert got.shape == want.shape and np.abs(got - want).max() <= TOL
    assert result["argmax"] == want.argmax(-1).tolist()

    # The replay rule and a refusal, on unary Steps.
    assert result["replay"] == {"first": False, "again": True, "offset": 5, "start_offset": 0}
    assert result["stale"]["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "is at offset 5, not 0" in result["stale"]["details"]

    # One StepPacked: a fresh session's 7 tokens checked at offset 0, and 4 more for the replay
    # session (at 5) not checked (-1).
    packed = result["packed"]
    assert (packed["offsets"], packed["start_offsets"], packed["failed"]) == ([7, 9], [0, 5], [])
    rows = _floats(packed["logits_b64"], result["classes"])
    assert list(packed["logits_shape"]) == [11, result["classes"]]
    assert np.abs(rows[:7] - want[:7]).max() <= TOL
    assert np.abs(rows[7:] - ref.run(np.array(tokens[:9]))[0][5:]).max() <= TOL
    assert packed["argmax"] == rows.argmax(-1).tolist()
