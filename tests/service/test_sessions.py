"""Sessions over the real server: create, get, fork, delete, initial state, models, health, reflection."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from tests.helpers import TOL, Server, logits_of, state_of


def test_list_models_describes_every_model(client: RecurClient) -> None:
    models = {m.name: m for m in client.models()}
    assert len(models) == 9
    lm, tag, cls = models["lstm-lm"], models["gru-tagger"], models["lstm-classifier"]
    assert (lm.cell, lm.head, lm.input_kind, len(lm.vocabulary), lm.unk_id) == ("lstm", "lm", "tokens", 98, 0)
    assert [(s.name, list(s.shape)) for s in lm.state] == [("state_h", [2, -1, 16]), ("state_c", [2, -1, 16])]
    assert tag.labels[:3] == ["whitespace", "comment", "string"] and len(tag.state) == 1
    assert (cls.input_kind, cls.feature_dim, list(cls.labels)) == ("features", 8, [str(d) for d in range(10)])
    assert "test_accuracy" in cls.metrics


def test_create_get_delete(client: RecurClient) -> None:
    s = client.create("lstm-lm", session_id="alpha", ttl_seconds=600)
    assert (s.session_id, s.model, s.version, s.offset, s.tenant) == ("alpha", "lstm-lm", 1, 0, "default")
    assert s.expires_at.seconds - s.updated_at.seconds == 600
    made = {client.create("gru-tagger").session_id for _ in range(3)}
    assert len(made) == 3 and all(len(i) == 32 for i in made)
    client.step("alpha", text="abc")
    got = client.get("alpha", include_state=True)
    assert got.offset == 3 and [t.name for t in got.state] == ["state_h", "state_c"]
    assert all(list(t.shape) == [2, 16] for t in got.state)
    client.delete("alpha")
    with pytest.raises(grpc.RpcError) as e:
        client.get("alpha")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_kept_state_restores_the_sequence(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    """Read a session's state, start a new session from it: it continues exactly."""
    tokens = list(np.random.default_rng(5).integers(0, 98, 60))
    a = client.create("gru-lm").session_id
    client.step(a, tokens=tokens[:25])
    kept = client.get(a, include_state=True).state
    b = client.create("gru-lm", initial_state=kept).session_id
    reply = client.step(b, tokens=tokens[25:], return_logits=True, return_state=True)
    want_logits, want_state = reference("gru-lm").run(np.array(tokens))
    assert np.abs(logits_of(reply) - want_logits[25:]).max() <= TOL
    assert np.abs(state_of(reply)[0] - want_state[0]).max() <= TOL
    assert reply.offset == 35  # offsets count this session's steps


def test_fork_branches_from_the_same_state(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(6)
    prefix, left, right = (list(rng.integers(0, 98, n)) for n in (20, 7, 9))
    root = client.create("rnn-lm").session_id
    client.step(root, tokens=prefix)
    branch = client.fork(root, new_session_id="branch")
    assert (branch.session_id, branch.offset) == ("branch", 20)
    r1 = client.step(root, tokens=left, return_logits=True)
    r2 = client.step("branch", tokens=right, return_logits=True)
    ref = reference("rnn-lm")
    assert np.abs(logits_of(r1) - ref.run(np.array(prefix + left))[0][20:]).max() <= TOL
    assert np.abs(logits_of(r2) - ref.run(np.array(prefix + right))[0][20:]).max() <= TOL


def test_outputs_of_each_head(client: RecurClient, reference) -> None:  # type: ignore[no-untyped-def]
    s = client.create("lstm-lm").session_id
    r = client.step(s, text="def f():", top_k=3, return_logits=True)
    logits = logits_of(r)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for o, row, p in zip(r.outputs, logits, probs):
        assert o.argmax == int(row.argmax()) and o.top_ids[0] == o.argmax and len(o.top_ids) == 3
        assert abs(o.top_probs[0] - p.max()) < 1e-5 and o.top_probs[0] >= o.top_probs[1] >= o.top_probs[2]
    vocab = client.models()[[m.name for m in client.models()].index("lstm-lm")].vocabulary
    assert r.text == "".join(vocab[o.argmax] for o in r.outputs)
    t = client.create("gru-tagger").session_id
    tags = client.step(t, text="x = 1  # c")
    assert len(tags.outputs) == 10 and all(o.label for o in tags.outputs)
    c = client.create("lstm-classifier").session_id
    image = np.random.default_rng(0).random((8, 8), dtype=np.float32)
    one = client.step(c, features=image.astype("<f4").tobytes(), final_only=True, return_logits=True)
    assert len(one.outputs) == 1 and one.outputs[0].label in [str(d) for d in range(10)]
    assert np.abs(logits_of(one)[0] - reference("lstm-classifier").run(image)[0][-1]).max() <= TOL


def test_health_and_reflection(server: Server) -> None:
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "recur.v1.Recur"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"recur.v1.Recur", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_and_exits_zero(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Write-behind durability: what was acknowledged before SIGTERM is on disk after it."""
    db = f"sqlite:{tmp_path / 'drain.db'}"
    server = start_server(db, ["--durability", "async", "--async-window", "5"])
    with server.client() as c:
        s = c.create("lstm-lm").session_id
        for _ in range(5):
            c.step(s, text="hello ")
    assert server.terminate() == 0
    again = start_server(db)
    with again.client() as c:
        assert c.get(s).offset == 30


def test_stream_replies_name_their_requests(client: RecurClient) -> None:
    a, b = client.create("lstm-lm").session_id, client.create("gru-lm").session_id
    reqs = [pb.StepRequest(session_id=sid, text="ab", request_id=f"{sid}-{i}") for i in range(4) for sid in (a, b)]
    replies = list(client.stub.Stream(iter(reqs)))
    assert sorted(r.request_id for r in replies) == sorted(r.request_id for r in reqs)
    for sid in (a, b):
        offsets = [r.offset for r in replies if r.session_id == sid]
        assert offsets == [2, 4, 6, 8]  # each session's chunks in order
