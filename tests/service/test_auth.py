"""Tenants behind API keys, against a real server: every Recur RPC needs a key (health and
reflection do not), a tenant never sees another's sessions (NOT_FOUND, never PERMISSION_DENIED),
per-tenant limits, the key file and its generator, and the open server's warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recur.client import RecurClient, packed_request, retryable
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service.auth import Authenticator, TenantLimits, add_key, hash_key
from service.errors import LimitExceeded, Unauthenticated
from tests.helpers import Server, refused, state_of

ROOT = Path(__file__).resolve().parents[2]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
CAPPED_SESSIONS = 2
SLOW_RPS = 2


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A key file: tenants acme (its key made by `recur keys add`) and globex (two keys), capped
    (max_sessions 2, max_chunk 8) and slow (2 requests per second). Returns it and tenant -> key."""
    path = tmp_path_factory.mktemp("auth") / "keys.json"
    out = subprocess.run([sys.executable, "-m", "recur.cli", "keys", "add", "--file", str(path), "--tenant", "acme",
                          "--label", "acme prod"], capture_output=True, text=True, timeout=60, check=True)
    acme = out.stdout.strip()
    assert acme and "\n" not in acme and "shown only this once" in out.stderr
    found = {"acme": acme, "globex": add_key(path, "globex"), "globex2": add_key(path, "globex"),
             "capped": add_key(path, "capped", max_sessions=CAPPED_SESSIONS, max_chunk=8),
             "slow": add_key(path, "slow", requests_per_second=SLOW_RPS)}
    text = path.read_text()
    assert all(key not in text for key in found.values())  # only hashes are stored
    assert hash_key(acme) in text and oct(path.stat().st_mode & 0o777) == "0o600"
    return path, found


@pytest.fixture(scope="module")
def server(tiny_models: Path, keys: tuple[Path, dict[str, str]]) -> Iterator[Server]:
    s = Server(tiny_models, "memory:", ["--auth-keys", str(keys[0])]).start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def key(keys: tuple[Path, dict[str, str]]) -> dict[str, str]:
    return keys[1]


def _auth(k: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {k}")]


def _rpcs(stub: recur_pb2_grpc.RecurStub, sid: str) -> dict[str, Callable[[list[tuple[str, str]]], object]]:
    """Each RPC of recur.v1.Recur as a call taking metadata; streams are read to their first reply."""
    step = pb.StepRequest(session_id=sid, tokens=[1, 2])
    packed = packed_request([sid], [np.array([1, 2], np.int32)])
    return {
        "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10),
        "CreateSession": lambda md: stub.CreateSession(pb.CreateSessionRequest(model="gru-lm"), metadata=md,
                                                       timeout=10),
        "GetSession": lambda md: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md, timeout=10),
        "DeleteSession": lambda md: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=md,
                                                       timeout=10),
        "ForkSession": lambda md: stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=md, timeout=10),
        "Step": lambda md: stub.Step(step, metadata=md, timeout=10),
        "Stream": lambda md: next(stub.Stream(iter([step]), metadata=md, timeout=10)),
        "StreamBatch": lambda md: next(stub.StreamBatch(iter([pb.StepBatch(steps=[step])]), metadata=md,
                                                        timeout=10)),
        "StepPacked": lambda md: stub.StepPacked(packed, metadata=md, timeout=10),
        "StreamPacked": lambda md: next(stub.StreamPacked(iter([packed]), metadata=md, timeout=10)),
        "Generate": lambda md: next(stub.Generate(pb.GenerateRequest(session_id=sid, prompt="a", max_tokens=2),
                                                  metadata=md, timeout=10)),
        "MigrateSession": lambda md: stub.MigrateSession(pb.MigrateSessionRequest(session_id=sid, version=1),
                                                         metadata=md, timeout=10),
        "ExportSession": lambda md: stub.ExportSession(pb.ExportSessionRequest(session_id=sid), metadata=md,
                                                       timeout=10),
        "ImportSession": lambda md: stub.ImportSession(pb.ImportSessionRequest(blob=b"RECURSESSION1\n"), metadata=md,
                                                       timeout=10),
        "ListSessions": lambda md: stub.ListSessions(pb.ListSessionsRequest(), metadata=md, timeout=10),
    }


def test_every_rpc_needs_a_known_key(server: Server, key: dict[str, str]) -> None:
    with RecurClient(server.target, api_key=key["acme"]) as c:
        sid = c.create("gru-lm").session_id
        c.step(sid, tokens=[5, 6, 7])
        rpcs = _rpcs(c.stub, sid)
        assert set(rpcs) == set(pb.DESCRIPTOR.services_by_name["Recur"].methods_by_name)
        for name, call in rpcs.items():
            for metadata, words in (([], "missing API key: send 'authorization: Bearer KEY' metadata"),
                                    ([("authorization", key["acme"])], "missing API key"),  # no "Bearer"
                                    ([("authorization", "Basic " + key["acme"])], "missing API key"),
                                    (_auth("not-a-key"), "unknown API key"),
                                    (_auth(key["acme"] + "x"), "unknown API key")):
                details = refused(lambda call=call, metadata=metadata: call(metadata), grpc.StatusCode.UNAUTHENTICATED,
                                  words)
                assert key["acme"] not in details, name
        # nothing was changed by the refused calls
        got = c.get(sid)
        assert got.offset == 3 and c.stub.ListModels(pb.ListModelsRequest(), metadata=_auth(key["acme"])).models
        # "Bearer" is case-insensitive, like every HTTP auth scheme
        assert c.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=[
            ("authorization", f"bearer {key['acme']}")]).offset == 3
    # Health checking and reflection stay open.
    with grpc.insecure_channel(server.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listing = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert "recur.v1.Recur" in {s.name for s in listing.list_services_response.service}


def test_tenants_never_see_each_other(server: Server, key: dict[str, str]) -> None:
    acme = RecurClient(server.target, api_key=key["acme"])
    globex = RecurClient(server.target, api_key=key["globex"])
    try:
        sid = f"shared-{time.monotonic_ns()}"
        acme.create("lstm-lm", session_id=sid)
        acme.step(sid, tokens=[3, 1, 4, 1, 5], expected_offset=0)
        before = acme.get(sid, include_state=True)
        # Every way to reach acme's session from globex is NOT_FOUND, worded as for an unknown id.
        for call in (lambda: globex.get(sid), lambda: globex.step(sid, tokens=[9]),
                     lambda: globex.fork(sid, f"{sid}-copy"), lambda: globex.delete(sid),
                     lambda: list(globex.generate(sid, prompt="x", max_tokens=3))):
            details = refused(call, grpc.StatusCode.NOT_FOUND, sid)
            assert "tenant" not in details.lower() and "permission" not in details.lower()
        stream = next(globex.stub.Stream(iter([pb.StepRequest(session_id=sid, tokens=[9], request_id="r")]),
                                         metadata=globex.metadata(sid), timeout=10))
        assert stream.status.code == NOT_FOUND and stream.request_id == "r"
        batch = next(globex.stub.StreamBatch(iter([pb.StepBatch(steps=[pb.StepRequest(session_id=sid, tokens=[9])])]),
                                             metadata=globex.metadata(sid), timeout=10))
        assert [s.status.code for s in batch.steps] == [NOT_FOUND]
        with pytest.raises(grpc.RpcError) as e:  # stream_sequence's first GetSession
            globex.stream_sequence(sid, [1, 2, 3])
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # globex's other key is the same tenant; the same id may exist in both tenants.
        with RecurClient(server.target, api_key=key["globex2"]) as globex2:
            refused(lambda: globex2.get(sid), grpc.StatusCode.NOT_FOUND)
            assert globex.create("gru-lm", session_id=sid).session_id == sid
            assert globex2.step(sid, tokens=[2, 7], expected_offset=0).offset == 2
            assert globex.fork(sid, f"{sid}-fork").offset == 2
        assert acme.fork(sid, f"{sid}-fork").offset == 5  # the same new id, in the other tenant
        globex.delete(sid)
        refused(lambda: globex.get(sid), grpc.StatusCode.NOT_FOUND)
        # acme's session is untouched by all of it
        after = acme.get(sid, include_state=True)
        assert (after.model, after.offset) == ("lstm-lm", 5)
        assert all(np.array_equal(a, b) for a, b in zip(state_of(before), state_of(after)))
        assert acme.step(sid, tokens=[9], expected_offset=5).offset == 6
        assert acme.get(f"{sid}-fork").offset == 5 and globex.get(f"{sid}-fork").offset == 2
    finally:
        acme.close()
        globex.close()


def test_a_tenants_session_limit(server: Server, key: dict[str, str]) -> None:
    with RecurClient(server.target, api_key=key["capped"]) as capped, \
            RecurClient(server.target, api_key=key["acme"]) as acme:
        sids = [capped.create("gru-lm").session_id for _ in range(CAPPED_SESSIONS)]
        limit = f"limit of {CAPPED_SESSIONS} sessions"
        refused(lambda: capped.create("gru-lm"), grpc.StatusCode.RESOURCE_EXHAUSTED, "capped", limit)
        refused(lambda: capped.fork(sids[0]), grpc.StatusCode.RESOURCE_EXHAUSTED, "capped", limit)
        assert acme.create("gru-lm").session_id  # another tenant is not held by capped's limit
        # The tenant's max_chunk: 8 steps, not the server's 4096.
        assert capped.step(sids[0], tokens=list(range(1, 9))).offset == 8
        refused(lambda: capped.step(sids[0], tokens=list(range(1, 10))), grpc.StatusCode.INVALID_ARGUMENT, "8")
        assert acme.step(acme.create("gru-lm").session_id, tokens=list(range(1, 10))).offset == 9
        capped.delete(sids[0])
        assert capped.create("gru-lm").session_id  # room again
        assert capped.get(sids[1]).offset == 0


def test_a_tenants_request_rate(server: Server, key: dict[str, str]) -> None:
    with RecurClient(server.target, api_key=key["slow"]) as slow, \
            RecurClient(server.target, api_key=key["acme"]) as acme:
        outcomes = []
        for _ in range(10):
            try:
                slow.models()
                outcomes.append("ok")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert f"tenant slow is over its limit of {SLOW_RPS} requests per second" in e.details()
                outcomes.append("refused")
            assert acme.models()  # another tenant is not slowed
        assert outcomes[:SLOW_RPS] == ["ok"] * SLOW_RPS and "refused" in outcomes, outcomes
        time.sleep(1.2)  # the bucket refills at SLOW_RPS calls per second
        assert slow.models()


def test_the_client_sends_the_key_from_the_environment(server: Server, key: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECUR_API_KEY", key["acme"])
    with RecurClient(server.target) as c:
        sid = c.create("gru-lm").session_id
        replies = c.stream_sequence(sid, list(range(1, 30)), chunk=8)
        assert [r.offset for r in replies] == [8, 16, 24, 29] and c.reconnects == 0
    with RecurClient(server.target, api_key="wrong") as c:  # the argument wins over the variable
        refused(c.models, grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:  # not retried: a bad key is not a dropped connection
            c.stream_sequence(sid, [1, 2, 3], retry_for=60)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - started < 10
    env = {**os.environ, "RECUR_API_KEY": key["globex"]}
    cli = [sys.executable, "-m", "recur.cli", "client", "--target", server.target]
    out = subprocess.run([*cli, "get", sid], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "error: NOT_FOUND" in out.stderr, out.stderr  # globex's key: not its session
    out = subprocess.run([*cli, "--api-key", key["acme"], "get", sid], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0 and f"session {sid}" in out.stdout and "offset 29" in out.stdout, out.stderr
    out = subprocess.run([*cli, "models"], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in env.items() if k != "RECUR_API_KEY"})
    assert out.returncode == 1 and "error: UNAUTHENTICATED: missing API key" in out.stderr, out.stderr


def test_an_open_server_warns_and_serves_one_tenant(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:")
    assert any("WARNING" in line and "this server is open" in line for line in server.log), server.log
    with RecurClient(server.target, api_key="") as anonymous, RecurClient(server.target, api_key="anything") as c:
        sid = anonymous.create("gru-lm").session_id
        assert c.step(sid, tokens=[1, 2]).offset == 2  # any key, or none: the one tenant "default"


@pytest.mark.parametrize(("content", "words"), [
    (None, ["no such file"]),
    ("{not json", ["not valid JSON", "line 1"]),
    ('["a"]', ["must be a JSON object"]),
    ('{"keys": []}', ["lists no keys"]),
    ('{"keys": [{"sha256": "hunter2-the-plain-key", "tenant": "a"}]}', ["keys entry 1", "64 hex digits"]),
    ('{"keys": [{"sha256": "%s", "tenant": "a b"}]}', ["keys entry 1", "tenant names"]),
    ('{"keys": [{"sha256": "%s", "tenant": "a"}, {"sha256": "%s", "tenant": "b"}]}', ["keys entry 2", "twice"]),
    ('{"keys": [{"sha256": "%s", "tenant": "a", "key": "hunter2"}]}', ["unknown field", "'key'"]),
    ('{"keys": [{"sha256": "%s", "tenant": "a"}], "tenants": {"a": {"max_sessions": -1}}}',
     ["tenant a", "max_sessions must be a non-negative integer"]),
    ('{"keys": [{"sha256": "%s", "tenant": "a"}], "tenants": {"a": {"max_sesions": 1}}}',
     ["tenant a", "unknown limit", "max_sesions"]),
])
def test_a_bad_key_file_stops_the_start(tmp_path: Path, content: str | None, words: list[str]) -> None:
    digest = hash_key("hunter2")
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content.replace("%s", digest))
    out = subprocess.run([sys.executable, "-m", "recur.cli", "serve", "--store", "memory:", "--port", "0",
                          "--auth-keys", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert str(path) in last
    for w in words:
        assert w in last, last
    assert "hunter2" not in out.stderr and digest not in out.stderr  # never a key or a hash


def test_the_authenticator_in_process(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "k.json"
    key = add_key(path, "t", requests_per_second=0.5, max_sessions=3)
    auth = Authenticator.load(path, clock=lambda: now[0])
    assert auth.tenants == ["t"] and not auth.is_open
    assert auth.limits("t") == TenantLimits(max_sessions=3, requests_per_second=0.5)
    assert auth.limits("nobody") == TenantLimits()
    md: list[tuple[str, str | bytes]] = [("x-session-id", "s"), ("authorization", f"Bearer {key}".encode())]
    assert auth.tenant_of(md) == "t"  # the burst: max(1, rate) calls
    with pytest.raises(LimitExceeded, match=r"tenant t is over its limit of 0\.5 requests per second"):
        auth.tenant_of(md)
    now[0] += 2.0
    assert auth.tenant_of(md) == "t"
    with pytest.raises(Unauthenticated, match="missing API key"):
        auth.tenant_of(None)
    with pytest.raises(Unauthenticated, match="unknown API key"):
        auth.tenant_of([("authorization", "Bearer nope")])
    opened = Authenticator.open()
    assert opened.is_open and opened.tenants == ["default"] and opened.tenant_of(()) == "default"
    doc = json.loads(path.read_text())
    assert doc["tenants"] == {"t": {"max_sessions": 3, "requests_per_second": 0.5}}
    assert [k["tenant"] for k in doc["keys"]] == ["t"] and doc["keys"][0]["sha256"] == hash_key(key)


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details", "expected"), [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", True),
    (grpc.StatusCode.ABORTED, "aborted", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
    # nginx losing the replica behind a stream resets it: a lost connection, not the server's answer
    (grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))", True),
    (grpc.StatusCode.INTERNAL, "internal error (logged on the server)", False),
    (grpc.StatusCode.UNKNOWN, "Exception iterating responses", False),
    (grpc.StatusCode.CANCELLED, "Cancelled", False),
    (grpc.StatusCode.UNAUTHENTICATED, "unknown API key", False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant t is over its limit", False),
])
def test_what_the_client_retries(code: grpc.StatusCode, details: str, expected: bool) -> None:
    assert retryable(_Failure(code, details)) is expected
