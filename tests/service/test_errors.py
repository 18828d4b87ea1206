"""Every refusal: its status code, a message that says what to fix, and the session unchanged."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from tests.helpers import Server, refused

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture
def strict(start_server, tiny_models: Path, tmp_path: Path) -> Server:  # type: ignore[no-untyped-def]
    """A server with small limits and one model whose vocabulary has no unknown id."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    d = models / "strict-lm" / "1"
    shutil.copytree(models / "lstm-lm" / "1", d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["name"], manifest["vocabulary"]["unk_id"] = "strict-lm", None
    (d / "manifest.json").write_text(json.dumps(manifest))
    server = Server(models, f"sqlite:{tmp_path / 'strict.db'}",
                    ["--max-chunk", "64", "--max-sessions", "4", "--max-generate-tokens", "50"]).start()
    yield server
    server.kill()


def _snapshot(c: RecurClient, sid: str) -> tuple:
    s = c.get(sid, include_state=True)
    return s.offset, [t.data for t in s.state]


def test_bad_chunks_are_invalid_argument_and_change_nothing(strict: Server) -> None:
    with strict.client() as c:
        lm, cls, tight = (c.create(m).session_id for m in ("lstm-lm", "lstm-classifier", "strict-lm"))
        c.step(lm, text="x = ")
        c.step(cls, features=np.zeros((2, 8), "<f4").tobytes())
        c.step(tight, text="ok")
        cases = [
            (lm, dict(tokens=[1, 2, 98]), "token id 98 at position 2 is out of range [0, 98)"),
            (lm, dict(tokens=[-1]), "token id -1 at position 0"),
            (lm, dict(), "give exactly one non-empty input"),
            (lm, dict(text="ab", tokens=[1]), "give exactly one non-empty input"),
            (lm, dict(tokens=[5] * 65), "chunk of 65 steps is longer than the limit of 64"),
            (lm, dict(features=np.zeros((1, 8), "<f4").tobytes()), "takes tokens or text, not features"),
            (cls, dict(tokens=[1, 2]), "takes features (float32 [time, 8]), not tokens"),
            (cls, dict(features=np.zeros((1, 7), "<f4").tobytes()), "28 bytes is not a multiple of 32"),
            (cls, dict(features=np.full((1, 8), np.nan, "<f4").tobytes()), "not finite"),
            (cls, dict(features=np.full((1, 8), np.inf, "<f4").tobytes()), "not finite"),
            (tight, dict(text="caf\u00e9"), "character 'é' at position 3 that model strict-lm cannot encode"),
            (lm, dict(text="a", top_k=-1), "top_k must be 0 or more"),
        ]
        for sid, fields, words in cases:
            before = _snapshot(c, sid)
            refused(lambda sid=sid, fields=fields: c.step(sid, **fields), INVALID, words)
            assert _snapshot(c, sid) == before, fields
        unknown = c.create("lstm-lm").session_id
        assert _snapshot(c, unknown)[0] == 0
        c.step(lm, text="\u00e9")  # a model with an unknown id maps the character to it
        assert _snapshot(c, lm)[0] == 5


def test_not_found_and_already_exists(strict: Server) -> None:
    with strict.client() as c:
        refused(lambda: c.step("nope", text="a"), NOT_FOUND, "session 'nope' does not exist")
        refused(lambda: c.create("nomodel"), NOT_FOUND, "model 'nomodel' is not loaded")
        refused(lambda: c.create("lstm-lm", version=7), NOT_FOUND, "has no version 7 (versions: [1])")
        c.create("lstm-lm", session_id="dup")
        before = _snapshot(c, "dup")
        refused(lambda: c.create("gru-lm", session_id="dup"), grpc.StatusCode.ALREADY_EXISTS, "'dup' already exists")
        assert _snapshot(c, "dup") == before and c.get("dup").model == "lstm-lm"
        refused(lambda: c.create("lstm-lm", session_id="bad id!"), INVALID, "session_id must be")
        refused(lambda: c.create("lstm-lm", ttl_seconds=-5), INVALID, "ttl_seconds must be between")
        c.delete("dup")
        refused(lambda: c.delete("dup"), NOT_FOUND, "does not exist")


def test_initial_state_of_the_wrong_shape_is_refused(strict: Server) -> None:
    with strict.client() as c:
        zeros = np.zeros((2, 16), "<f4").tobytes()
        good = [pb.Tensor(name=n, shape=[2, 16], data=zeros) for n in ("state_h", "state_c")]
        wrong = [good[0], pb.Tensor(name="state_c", shape=[2, 15], data=np.zeros((2, 15), "<f4").tobytes())]
        refused(lambda: c.create("lstm-lm", initial_state=wrong), INVALID, "'state_c' must have shape [2, 16]")
        refused(lambda: c.create("lstm-lm", initial_state=good[:1]), INVALID, "must name each of")
        short = [pb.Tensor(name="state_h", shape=[2, 16], data=b"\0" * 12), good[1]]
        refused(lambda: c.create("lstm-lm", initial_state=short), INVALID, "do not hold float32 of shape [2, 16]")
        assert c.create("lstm-lm", initial_state=good).offset == 0


def test_limits_are_resource_exhausted(strict: Server) -> None:
    with strict.client() as c:
        ids = [c.create("lstm-lm").session_id for _ in range(4)]
        refused(lambda: c.create("lstm-lm"), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 4 sessions")
        refused(lambda: c.fork(ids[0]), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 4 sessions")
        c.step(ids[0], text="a")
        before = _snapshot(c, ids[0])
        refused(lambda: list(c.generate(ids[0], max_tokens=51)), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 50")
        assert _snapshot(c, ids[0]) == before


def test_generation_errors(strict: Server) -> None:
    with strict.client() as c:
        tag, lm = c.create("gru-tagger").session_id, c.create("lstm-lm").session_id
        refused(lambda: list(c.generate(tag, prompt="x")), INVALID, "has a tagger head")
        refused(lambda: list(c.generate(lm)), grpc.StatusCode.FAILED_PRECONDITION, "has consumed no token yet")
        refused(lambda: list(c.generate(lm, prompt="a", temperature=-1)), INVALID, "temperature")
        refused(lambda: list(c.generate(lm, prompt="a", top_p=1.5)), INVALID, "top_p")
        assert _snapshot(c, lm)[0] == 0


def test_a_refused_chunk_on_a_stream_does_not_stop_the_others(client: RecurClient) -> None:
    a, b = client.create("lstm-lm").session_id, client.create("gru-lm").session_id
    reqs = [
        pb.StepRequest(session_id=a, text="ab", request_id="1"),
        pb.StepRequest(session_id=b, tokens=[500], request_id="2"),
        pb.StepRequest(session_id="ghost", text="x", request_id="3"),
        pb.StepRequest(session_id=a, text="cd", expected_offset=0, request_id="4"),
        pb.StepRequest(session_id=b, text="ef", request_id="5"),
        pb.StepRequest(session_id=a, text="gh", expected_offset=2, request_id="6"),
    ]
    replies = {r.request_id: r for r in client.stub.Stream(iter(reqs))}
    assert replies["2"].status.code == INVALID.value[0] and "out of range" in replies["2"].status.message
    assert replies["3"].status.code == NOT_FOUND.value[0]
    assert replies["4"].status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "is at offset 2" in replies["4"].status.message
    assert (replies["1"].offset, replies["5"].offset, replies["6"].offset) == (2, 2, 4)
    assert not replies["6"].HasField("status")
    assert client.get(a).offset == 4 and client.get(b).offset == 2


def test_draining_server_refuses_new_work_and_finishes_what_is_in_flight(start_server) -> None:  # type: ignore[no-untyped-def]
    """While SIGTERM drains an in-flight generation, a new chunk gets UNAVAILABLE; the generation
    runs to its end and the server exits 0."""
    server = start_server(extra=["--grace", "60"])
    with server.client() as c:
        gen_sid, other = c.create("lstm-lm").session_id, c.create("lstm-lm").session_id
        stream = c.generate(gen_sid, prompt="a", max_tokens=4000, seed=1)
        next(stream)
        server.proc.send_signal(15)  # type: ignore[union-attr]
        health = health_pb2_grpc.HealthStub(c.channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.01)
        refused(lambda: c.step(other, text="a"), grpc.StatusCode.UNAVAILABLE, "shutting down")
        rest = list(stream)
        assert len(rest) == 3999 and rest[-1].finish_reason == "max_tokens" and rest[-1].offset == 4001
    assert server.proc.wait(30) == 0  # type: ignore[union-attr]
