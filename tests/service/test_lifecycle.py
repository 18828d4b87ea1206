"""Model versions while serving: new versions load without a restart (--model-poll, ReloadRepository),
sessions stay on their version, unloading a version in use is refused unless forced, and a session
moves between versions with MigrateSession. Real server processes; the admin API on --admin-port."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from recur.client import RecurClient, open_channel
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from tests.helpers import TOL, Reference, Server, free_port, logits_of, refused, state_of

UNLOADED = "version 1 of model gru-lm was unloaded; export the session or migrate it"


def add_version(repo: Path, name: str, version: int, source: Path) -> Path:
    """Copy a model directory in as NAME/VERSION (its manifest renamed), atomically: a hidden copy, renamed."""
    tmp = repo / f".incoming-{name}-{version}"
    shutil.copytree(source, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest.update(name=name, version=version)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    (repo / name).mkdir(exist_ok=True)
    return tmp.rename(repo / name / str(version))


@pytest.fixture
def repo(tiny_models: Path, tmp_path: Path) -> Path:
    """A repository of its own: gru-lm and lstm-lm, version 1."""
    root = tmp_path / "models"
    for name in ("gru-lm", "lstm-lm"):
        shutil.copytree(tiny_models / name / "1", root / name / "1")
    return root


@pytest.fixture
def start(repo: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(*extra: str) -> Server:
        s = Server(repo, f"sqlite:{tmp_path / 'recur.db'}", list(extra))
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.kill()


def admin_stub(port: int) -> recur_pb2_grpc.RecurAdminStub:
    return recur_pb2_grpc.RecurAdminStub(open_channel(f"127.0.0.1:{port}"))


def versions(c: RecurClient, name: str) -> dict[int, int]:
    """version -> live sessions, as ListModels reports them."""
    return {m.version: m.live_sessions for m in c.models() if m.name == name}


def run_from(ref: Reference, x: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One pass of a reference graph over x from a given state (each (L, H))."""
    m = ref.manifest
    feed = {m["input"]["name"]: x[None], **{s["name"]: v[:, None] for s, v in zip(m["state"], state)}}
    out = ref.sess.run([m["head"]["output"]] + [s["output"] for s in m["state"]], feed)
    return out[0][0], [s[:, 0] for s in out[1:]]


def tokens_for(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 90, size=n).astype(np.int64)


def test_new_versions_load_while_sessions_stream_on_the_old_one(start, repo: Path, tiny_models: Path,  # type: ignore[no-untyped-def]
                                                               reference) -> None:
    server = start("--model-poll", "0.5")
    tokens = tokens_for(160)
    got: list[np.ndarray] = []
    errors: list[BaseException] = []
    with server.client() as c:
        old = c.create("gru-lm")
        assert old.version == 1 and versions(c, "gru-lm") == {1: 1}

        def feed() -> None:
            try:
                for i in range(0, len(tokens), 8):
                    r = c.step(old.session_id, tokens=tokens[i : i + 8].tolist(), expected_offset=i,
                               return_logits=True)
                    got.append(logits_of(r))
                    time.sleep(0.05)
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(0.2)
        # version 2: other weights (the tiny RNN's graph), the same state shapes
        add_version(repo, "gru-lm", 2, tiny_models / "rnn-lm" / "1")
        deadline = time.monotonic() + 30
        while 2 not in versions(c, "gru-lm"):
            assert time.monotonic() < deadline, "version 2 was not loaded by --model-poll"
            time.sleep(0.1)
        new = c.create("gru-lm")
        assert new.version == 2
        x = tokens_for(20, seed=1)
        r = c.step(new.session_id, tokens=x.tolist(), return_logits=True)
        np.testing.assert_allclose(logits_of(r), reference("rnn-lm").run(x)[0], atol=TOL)
        feeder.join(60)
        assert not errors, errors
        # the old session stayed on version 1 throughout: one pass of version 1's graph
        np.testing.assert_allclose(np.concatenate(got), reference("gru-lm").run(tokens)[0], atol=TOL)
        assert c.get(old.session_id).version == 1
        assert versions(c, "gru-lm") == {1: 1, 2: 1}
    assert not any("Traceback" in line for line in server.log), "".join(server.log)


def test_reload_repository_loads_new_and_changed_versions(start, repo: Path, tiny_models: Path,  # type: ignore[no-untyped-def]
                                                          reference) -> None:
    port = free_port()
    server = start("--admin-port", str(port))
    admin = admin_stub(port)
    assert list(admin.ReloadRepository(pb.ReloadRepositoryRequest(), timeout=30).loaded) == []
    add_version(repo, "gru-lm", 2, tiny_models / "gru-lm" / "1")  # a copy: same weights
    reply = admin.ReloadRepository(pb.ReloadRepositoryRequest(), timeout=30)
    assert [(m.name, m.version, m.live_sessions) for m in reply.loaded] == [("gru-lm", 2, 0)] and not reply.refused
    assert list(admin.ReloadRepository(pb.ReloadRepositoryRequest(), timeout=30).loaded) == []  # unchanged
    x = tokens_for(30)
    with server.client() as c:
        s = c.create("gru-lm")
        assert s.version == 2
        np.testing.assert_allclose(logits_of(c.step(s.session_id, tokens=x.tolist(), return_logits=True)),
                                   reference("gru-lm").run(x)[0], atol=TOL)
        # version 2's files change (the RNN's graph): loaded again, the session now runs the new weights
        shutil.rmtree(repo / "gru-lm" / "2")
        add_version(repo, "gru-lm", 2, tiny_models / "rnn-lm" / "1")
        reply = admin.ReloadRepository(pb.ReloadRepositoryRequest(), timeout=30)
        assert [(m.name, m.version, m.live_sessions) for m in reply.loaded] == [("gru-lm", 2, 1)]
        s2 = c.create("gru-lm", version=2)
        np.testing.assert_allclose(logits_of(c.step(s2.session_id, tokens=x.tolist(), return_logits=True)),
                                   reference("rnn-lm").run(x)[0], atol=TOL)
        # a changed version whose state shapes differ is refused: sessions on it carry its state
        shutil.rmtree(repo / "gru-lm" / "2")
        add_version(repo, "gru-lm", 2, tiny_models / "lstm-lm" / "1")
        reply = admin.ReloadRepository(pb.ReloadRepositoryRequest(), timeout=30)
        assert not reply.loaded and [(r.path, r.name, r.version) for r in reply.refused] == [("gru-lm/2", "gru-lm", 2)]
        assert "state tensors differ" in reply.refused[0].reason
        assert c.step(s2.session_id, tokens=[1, 2]).offset == 32  # still served by the loaded version 2


def test_unload_refused_in_use_forced_strands_sessions_and_migrate_moves_them(  # type: ignore[no-untyped-def]
        start, repo: Path, tiny_models: Path, reference) -> None:
    add_version(repo, "gru-lm", 2, tiny_models / "rnn-lm" / "1")
    port = free_port()
    server = start("--admin-port", str(port))
    admin = admin_stub(port)
    x = tokens_for(48)
    with server.client() as c:
        s = c.create("gru-lm", version=1).session_id
        c.step(s, tokens=x[:20].tolist())
        assert versions(c, "gru-lm") == {1: 1, 2: 0}
        refused(lambda: admin.UnloadModel(pb.UnloadModelRequest(name="gru-lm", version=1), timeout=30),
                grpc.StatusCode.FAILED_PRECONDITION, "version 1 of model gru-lm is used by 1 live sessions", "force")
        refused(lambda: admin.UnloadModel(pb.UnloadModelRequest(name="gru-lm", version=9), timeout=30),
                grpc.StatusCode.NOT_FOUND, "no version 9")
        assert c.step(s, tokens=x[20:24].tolist()).offset == 24  # nothing changed
        reply = admin.UnloadModel(pb.UnloadModelRequest(name="gru-lm", version=1, force=True), timeout=30)
        assert reply.sessions_stranded == 1 and versions(c, "gru-lm") == {2: 0}
        for call in (lambda: c.step(s, tokens=[1]), lambda: c.fork(s),
                     lambda: list(c.generate(s, max_tokens=2)),
                     lambda: c.create("gru-lm", version=1)):
            refused(call, grpc.StatusCode.FAILED_PRECONDITION, UNLOADED)
        # reading it, with its state, still works: the unloaded version's state shapes are kept
        got = c.get(s, include_state=True)
        want = reference("gru-lm").run(x[:24])[1]
        assert got.offset == 24 and [t.name for t in got.state] == ["state_h"]
        np.testing.assert_allclose(state_of(got)[0], want[0], atol=TOL)
        assert c.export_session(s)  # and so does an export (the unloaded version's sha256 is kept too)
        # a reload does not bring an unloaded version back
        assert list(admin.ReloadRepository(pb.ReloadRepositoryRequest(), timeout=30).loaded) == []
        # migrate: the same offset and state, the next chunks on version 2's weights
        moved = c.stub.MigrateSession(pb.MigrateSessionRequest(session_id=s, version=2, expected_offset=24),
                                      timeout=30)
        assert (moved.version, moved.offset) == (2, 24)
        r = c.step(s, tokens=x[24:].tolist(), expected_offset=24, return_logits=True)
        np.testing.assert_allclose(logits_of(r), run_from(reference("rnn-lm"), x[24:], want)[0], atol=TOL)
        assert versions(c, "gru-lm") == {2: 1}
        # LoadModel brings version 1 back; unloading an unused version needs no force
        loaded = admin.LoadModel(pb.LoadModelRequest(name="gru-lm", version=1), timeout=30)
        assert (loaded.model.version, loaded.changed) == (1, True)
        assert not admin.LoadModel(pb.LoadModelRequest(name="gru-lm", version=1), timeout=30).changed
        assert admin.UnloadModel(pb.UnloadModelRequest(name="gru-lm", version=1), timeout=30).sessions_stranded == 0
        refused(lambda: admin.LoadModel(pb.LoadModelRequest(name="gru-lm", version=7), timeout=30),
                grpc.StatusCode.NOT_FOUND, "no directory gru-lm/7")


def test_migrate_needs_the_same_state_shapes(start, repo: Path, tiny_models: Path) -> None:  # type: ignore[no-untyped-def]
    add_version(repo, "lstm-lm", 2, tiny_models / "gru-lm" / "1")  # one state, not the LSTM's two
    add_version(repo, "gru-lm", 2, tiny_models / "gru-lm" / "1")
    server = start()
    with server.client() as c:
        s = c.create("lstm-lm", version=1).session_id
        c.step(s, tokens=[1, 2, 3])
        refused(lambda: c.stub.MigrateSession(pb.MigrateSessionRequest(session_id=s, version=2), timeout=30),
                grpc.StatusCode.FAILED_PRECONDITION,
                "cannot move from version 1 to version 2 of model lstm-lm",
                "state_h [2, 16], state_c [2, 16]", "that version's is state_h [2, 16]")
        refused(lambda: c.stub.MigrateSession(pb.MigrateSessionRequest(session_id=s, version=5), timeout=30),
                grpc.StatusCode.NOT_FOUND, "no version 5")
        refused(lambda: c.stub.MigrateSession(pb.MigrateSessionRequest(session_id=s, version=1, expected_offset=1),
                                              timeout=30),
                grpc.StatusCode.FAILED_PRECONDITION, "is at offset 3")
        got = c.get(s)
        assert (got.version, got.offset) == (1, 3)
        # the same shapes (a copy as version 2): a migrated session continues exactly as one pass
        g = c.create("gru-lm", version=1).session_id
        x = tokens_for(40)
        first = logits_of(c.step(g, tokens=x[:25].tolist(), return_logits=True))
        assert c.stub.MigrateSession(pb.MigrateSessionRequest(session_id=g), timeout=30).version == 2  # 0: latest
        rest = logits_of(c.step(g, tokens=x[25:].tolist(), return_logits=True))
        np.testing.assert_allclose(np.concatenate([first, rest]), Reference(repo / "gru-lm" / "1").run(x)[0],
                                   atol=TOL)
        # Generate samples from the last step's outputs, kept across the move
        assert len(list(c.generate(g, max_tokens=3, temperature=0))) == 3
