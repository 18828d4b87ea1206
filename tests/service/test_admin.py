"""The admin API (recur.v1.RecurAdmin): who may call it, and a broken model directory is refused alone,
by the call and in the log, and never stops the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from recur.client import RecurClient, open_channel
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service.auth import add_key
from tests.helpers import Server, free_port, refused


def _auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _calls(stub: recur_pb2_grpc.RecurAdminStub) -> dict[str, Callable[[list[tuple[str, str]]], object]]:
    return {
        "LoadModel": lambda md: stub.LoadModel(pb.LoadModelRequest(name="gru-lm", version=1), metadata=md,
                                               timeout=30),
        "UnloadModel": lambda md: stub.UnloadModel(pb.UnloadModelRequest(name="gru-lm", version=1), metadata=md,
                                                   timeout=30),
        "ReloadRepository": lambda md: stub.ReloadRepository(pb.ReloadRepositoryRequest(), metadata=md, timeout=30),
    }


def test_every_admin_rpc_is_tested_here() -> None:
    assert set(_calls(None)) == set(pb.DESCRIPTOR.services_by_name["RecurAdmin"].methods_by_name)  # type: ignore[arg-type]


# -- broken model directories --------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("admin") / "models"
    shutil.copytree(tiny_models / "gru-lm" / "1", root / "gru-lm" / "1")
    return root


@pytest.fixture(scope="module")
def open_server(repo: Path) -> Iterator[tuple[Server, int]]:
    """An open server (no --auth-keys) with its admin API on --admin-port; returns it and that port."""
    port = free_port()
    s = Server(repo, "memory:", ["--admin-port", str(port)]).start()
    yield s, port
    s.kill()


def _manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        change(m)
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


DEFECTS = {  # kind of defect -> (how the version directory is broken, words of the refusal)
    "not JSON": (lambda d: (d / "manifest.json").write_text("{ not json"),
                 ["manifest.json is not valid JSON (line 1, column 3)"]),
    "missing cell": (_manifest(lambda m: m.pop("cell")), ["manifest field cell is missing"]),
    "missing input": (_manifest(lambda m: m.pop("input")), ["manifest field input is missing"]),
    "wrong type": (_manifest(lambda m: m.update(layers="two")), ["manifest field layers must be integer", '"two"']),
    "missing sha256": (_manifest(lambda m: m.pop("sha256")), ["manifest field sha256 is missing"]),
    "missing model.onnx": (lambda d: (d / "model.onnx").unlink(), ["model.onnx is missing"]),
    "not a JSON object": (lambda d: (d / "manifest.json").write_text("[1, 2]"),
                          ["manifest.json is not a JSON object"]),
    "state shape not a list": (_manifest(lambda m: m["state"][0].update(shape=7)),
                               ["manifest field state[0].shape must be array"]),
}


@pytest.mark.parametrize("kind", list(DEFECTS))
def test_a_broken_model_is_refused_alone(open_server: tuple[Server, int], repo: Path, tiny_models: Path,
                                         kind: str) -> None:
    server, port = open_server
    version = 2 + list(DEFECTS).index(kind)
    d = repo / "gru-lm" / str(version)
    shutil.copytree(tiny_models / "gru-lm" / "1", d)
    _manifest(lambda m: m.update(version=version))(d)
    breaks, words = DEFECTS[kind]
    breaks(d)
    try:
        admin = recur_pb2_grpc.RecurAdminStub(open_channel(f"127.0.0.1:{port}"))
        details = refused(lambda: admin.LoadModel(pb.LoadModelRequest(name="gru-lm", version=version), timeout=30),
                          grpc.StatusCode.FAILED_PRECONDITION, f"gru-lm/{version}", *words)
        reply = admin.ReloadRepository(pb.ReloadRepositoryRequest(), timeout=30)
        mine = [r for r in reply.refused if r.path == f"gru-lm/{version}"]
        assert len(mine) == 1 and (mine[0].name, mine[0].version) == ("gru-lm", version), reply
        assert all(w in mine[0].reason for w in words), mine[0].reason
        assert not reply.loaded
        deadline = time.monotonic() + 10
        while not any("refusing model" in line and words[0] in line for line in server.log):
            assert time.monotonic() < deadline, "".join(server.log)
            time.sleep(0.05)
        assert server.proc is not None and server.proc.poll() is None  # still serving
        with server.client() as c:
            assert [(m.name, m.version) for m in c.models()] == [("gru-lm", 1)]
            assert c.step(c.create("gru-lm").session_id, tokens=[1, 2]).offset == 2
        assert details.count("\n") == 0
    finally:
        shutil.rmtree(d)


def test_an_open_server_serves_admin_only_on_the_admin_port(open_server: tuple[Server, int]) -> None:
    server, port = open_server
    with open_channel(server.target) as ch:  # the public port: not there at all
        stub = recur_pb2_grpc.RecurAdminStub(ch)
        for call in _calls(stub).values():
            refused(lambda call=call: call([]), grpc.StatusCode.UNIMPLEMENTED)
    with open_channel(f"127.0.0.1:{port}") as ch:
        reply = recur_pb2_grpc.RecurAdminStub(ch).LoadModel(pb.LoadModelRequest(name="gru-lm", version=1),
                                                             timeout=30)
        assert (reply.model.name, reply.model.version, reply.changed) == ("gru-lm", 1, False)
        refused(lambda: recur_pb2_grpc.RecurAdminStub(ch).LoadModel(pb.LoadModelRequest(name="../x", version=1),
                                                                     timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, "give a model name")
        raw = ch.unary_unary("/recur.v1.RecurAdmin/LoadModel")  # a name that is not UTF-8: refused, not UNKNOWN
        refused(lambda: raw(b"\x0a\x02\xff\xfe", timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "does not parse")


# -- admin keys ----------------------------------------------------------------------------------


def test_only_an_admin_key_may_call_the_admin_api(tiny_models: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    out = subprocess.run([sys.executable, "-m", "recur.cli", "keys", "add", "--file", str(keys), "--tenant", "ops",
                          "--admin"], capture_output=True, text=True, timeout=60, check=True)
    admin_key = out.stdout.strip()
    user_key = add_key(keys, "acme")
    assert [e.get("admin", False) for e in json.loads(keys.read_text())["keys"]] == [True, False]
    listed = subprocess.run([sys.executable, "-m", "recur.cli", "keys", "list", "--file", str(keys)],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ops: 1 key(s) (1 admin)" in listed and "acme: 1 key(s);" in listed
    repo = tmp_path / "models"
    shutil.copytree(tiny_models / "gru-lm" / "1", repo / "gru-lm" / "1")
    port = free_port()
    server = Server(repo, "memory:", ["--auth-keys", str(keys), "--admin-port", str(port)]).start()
    try:
        for target in (server.target, f"127.0.0.1:{port}"):  # with keys: on both ports, admin keys only
            with open_channel(target) as ch:
                calls = _calls(recur_pb2_grpc.RecurAdminStub(ch))
                for call in calls.values():
                    refused(lambda call=call: call(_auth(user_key)), grpc.StatusCode.PERMISSION_DENIED,
                            "may not call the admin API", "recur keys add --admin")
                    refused(lambda call=call: call([]), grpc.StatusCode.UNAUTHENTICATED, "missing API key")
                    refused(lambda call=call: call(_auth("nope")), grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
                reply = calls["ReloadRepository"](_auth(admin_key))
                assert isinstance(reply, pb.ReloadRepositoryResponse) and not reply.refused
                assert calls["LoadModel"](_auth(admin_key)).model.version == 1  # type: ignore[attr-defined]
        with RecurClient(server.target, api_key=user_key) as c:  # the normal API is unchanged for either key
            assert c.step(c.create("gru-lm").session_id, tokens=[1]).offset == 1
            assert [m.live_sessions for m in c.models()] == [1]
    finally:
        server.kill()
