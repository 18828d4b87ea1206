"""`recur serve --workers 2`: real supervisor processes on free ports. Both workers serve on the one
port (each reply names its worker in x-recur-replica), a session moves between them and still equals
one pass, a SIGKILLed worker is restarted without losing an acknowledged chunk, SIGTERM drains every
worker (exit 0), a worker that keeps dying at start ends the supervisor (exit 1), the admin port
reaches every worker, /metrics has every worker's series, and the memory store is refused."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from tests.helpers import TOL, Fed, Redis, Reference, Server, feed, free_port, logits_of, state_of, until

WORKER = re.compile(r"^worker (\d+) \(pid (\d+)\) serving$")
FRESH = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own: a new connection, not a shared one


@pytest.fixture
def start(tiny_models: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """start(store=None, models=None, *extra) -> a started `--workers 2` server; all killed at the end."""
    servers: list[Server] = []

    def make(store: str | None = None, models: Path | None = None, *extra: str) -> Server:
        s = Server(models or tiny_models, store or f"sqlite:{tmp_path / 'recur.db'}", ["--workers", "2", *extra])
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.kill()


def pids(server: Server) -> dict[int, int]:
    """Worker index -> the pid it last said it serves with."""
    out: dict[int, int] = {}
    for line in list(server.log):
        m = WORKER.match(line.strip())
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


def on_worker(server: Server, index: int, call: Callable[[recur_pb2_grpc.RecurStub], object]) -> object:
    """`call` answered by worker `index`: new connections until the kernel hands one to it (about two tries;
    each asks ListModels which worker it reached, x-recur-replica), then `call` on that connection."""
    for _ in range(200):
        with grpc.insecure_channel(server.target, options=FRESH) as channel:
            stub = recur_pb2_grpc.RecurStub(channel)
            _, rpc = stub.ListModels.with_call(pb.ListModelsRequest())
            if dict(rpc.initial_metadata())["x-recur-replica"].endswith(f"/{index}"):
                return call(stub)
    raise AssertionError(f"no connection reached worker {index} in 200")


def test_the_memory_store_is_refused_at_start(tiny_models: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "recur.cli", "serve", "--workers", "2", "--store", "memory:",
                          "--models-dir", str(tiny_models), "--port", "0", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip() == ("recur serve: --workers 2 needs a store the workers share (sqlite:PATH or "
                                  "redis://...); the memory store (and --durability none) lives in one process")


def test_sqlite_write_behind_is_refused_at_start(tiny_models: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "recur.cli", "serve", "--workers", "2", "--store",
                          f"sqlite:{tmp_path / 'r.db'}", "--durability", "async", "--models-dir", str(tiny_models),
                          "--port", "0", "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "needs --durability sync" in out.stderr
    assert not (tmp_path / "r.db").exists()  # refused before anything was opened


def test_both_workers_serve_and_say_serving(start: Callable[..., Server]) -> None:
    server = start()
    assert sorted(pids(server)) == [0, 1] and len(set(pids(server).values())) == 2
    answered: dict[str, int] = {}
    for _ in range(40):  # each on a new connection: the kernel spreads them over both workers
        with grpc.insecure_channel(server.target, options=FRESH) as channel:
            _, rpc = recur_pb2_grpc.RecurStub(channel).ListModels.with_call(pb.ListModelsRequest())
            replica = dict(rpc.initial_metadata())["x-recur-replica"]
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            assert health == health_pb2.HealthCheckResponse.SERVING  # from the worker that just answered
        answered[replica] = answered.get(replica, 0) + 1
    name = f"{socket.gethostname()}:{server.port}"
    assert set(answered) == {f"{name}/0", f"{name}/1"}, answered


def _alternate(server: Server, ref: Reference, model: str, seed: int) -> None:
    """One session fed chunk by chunk, alternately through worker 0 and worker 1, equals one pass."""
    tokens = np.random.default_rng(seed).integers(0, 98, 90)
    sid = str(on_worker(server, 1, lambda s: s.CreateSession(pb.CreateSessionRequest(model=model)))
              .session_id)  # type: ignore[attr-defined]
    cuts = [0, 7, 8, 30, 41, 60, 61, 90]
    parts, last = [], None
    for k, (a, b) in enumerate(itertools.pairwise(cuts)):
        req = pb.StepRequest(session_id=sid, tokens=[int(t) for t in tokens[a:b]], expected_offset=a,
                             return_logits=True, return_state=True)
        last = on_worker(server, k % 2, lambda s, req=req: s.Step(req))  # type: ignore[misc]
        assert last.start_offset == a and last.offset == b  # type: ignore[attr-defined]
        parts.append(logits_of(last))
    want_logits, want_state = ref.run(tokens.astype(np.int64))
    assert np.abs(np.concatenate(parts) - want_logits).max() <= TOL
    for got, want in zip(state_of(last), want_state):
        assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_session_moves_between_workers_and_equals_one_pass(start: Callable[..., Server], tmp_path: Path,
                                                             reference: Callable[[str], Reference],
                                                             store: str) -> None:
    redis = Redis(tmp_path).start() if store == "redis" else None
    try:
        server = start(redis.url if redis else None)
        for seed, model in enumerate(("lstm-lm", "gru-lm", "rnn-lm")):
            _alternate(server, reference(model), model, seed)
        # a retry of the last chunk at the other worker is answered as a replay, not applied again
        tokens = [1, 2, 3]
        sid = str(on_worker(server, 0, lambda s: s.CreateSession(pb.CreateSessionRequest(
            model="gru-lm"))).session_id)  # type: ignore[attr-defined]
        req = pb.StepRequest(session_id=sid, tokens=tokens, expected_offset=0)
        first = on_worker(server, 0, lambda s: s.Step(req))
        again = on_worker(server, 1, lambda s: s.Step(req))
        assert not first.replayed and again.replayed and again.offset == 3  # type: ignore[attr-defined]
    finally:
        if redis:
            redis.kill()


def _metric(server: Server, name: str) -> dict[str, float]:
    """Every sample of `name` on the supervisor's /metrics, by its label text."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_a_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(
        start: Callable[..., Server], reference: Callable[[str], Reference]) -> None:
    server = start()
    rng = np.random.default_rng(7)
    sequences = {f"s{i}": rng.integers(0, 98, 400) for i in range(6)}
    with server.client() as c:
        for sid in sequences:
            c.create("lstm-lm", session_id=sid)
    fed = Fed()
    feeder = threading.Thread(target=feed, args=(server.target, sequences, 4, fed), kwargs={"deadline": 120})
    feeder.start()
    until(lambda: sum(len(a) for a in fed.acked.values()) >= 60, 60, "no chunk was acknowledged")
    victim = pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    until(lambda: pids(server).get(0) not in (None, victim), 60, "worker 0 was not restarted")
    feeder.join(150)
    assert not feeder.is_alive() and not fed.failures, fed.failures
    with server.client() as c:
        for sid, seq in sequences.items():
            got = c.get(sid, include_state=True)
            assert got.offset == len(seq) == fed.last(sid)
            for a, b in zip(state_of(got), reference("lstm-lm").run(seq.astype(np.int64))[1]):
                assert np.abs(a - b).max() <= TOL
    assert _metric(server, "recur_worker_restarts_total") == {'{worker="0"}': 1.0, '{worker="1"}': 0.0}
    assert server.terminate() == 0


def test_sigterm_drains_every_worker_and_exits_0(start: Callable[..., Server]) -> None:
    server = start()
    workers = list(pids(server).values())
    with server.client() as c:
        sid = c.create("gru-lm").session_id
        c.step(sid, tokens=[1, 2, 3], expected_offset=0)
    assert server.terminate() == 0
    for pid in workers:  # every worker gone, not left holding the port
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    again = Server(server.models_dir, server.store).start()  # one process on the same file: the chunk is there
    try:
        with again.client() as c:
            assert c.get(sid).offset == 3
    finally:
        again.kill()


def test_a_worker_that_keeps_dying_at_start_ends_the_supervisor(start: Callable[..., Server], tiny_models: Path,
                                                               tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "gru-lm", models / "gru-lm")
    server = start(None, models)
    shutil.rmtree(models / "gru-lm")  # a worker started now finds no model: it exits at start, every time
    os.kill(pids(server)[1], signal.SIGKILL)
    assert server.proc is not None
    code = server.proc.wait(120)
    assert code == 1
    assert any("giving up" in line for line in server.log), "".join(server.log)


def test_the_admin_port_reaches_every_worker(start: Callable[..., Server]) -> None:
    admin_port = free_port()
    server = start(None, None, "--admin-port", str(admin_port), "--metrics-port", "-1")
    with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as channel:
        admin = recur_pb2_grpc.RecurAdminStub(channel)
        assert admin.UnloadModel(pb.UnloadModelRequest(name="rnn-lm", version=1)).sessions_stranded == 0
        with pytest.raises(grpc.RpcError) as refused:  # unloaded on both: a refusal, naming its worker
            admin.UnloadModel(pb.UnloadModelRequest(name="rnn-lm", version=1))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (refused.value.details() or "").startswith("worker 0: version 1 of model rnn-lm was unloaded")
    for index in (0, 1):
        listed = on_worker(server, index, lambda s: s.ListModels(pb.ListModelsRequest()))
        names = {m.name for m in listed.models}  # type: ignore[attr-defined]
        assert "rnn-lm" not in names and "gru-lm" in names
    # /metrics: each worker's series with its label, and the supervisor's own
    cpu = _metric(server, "recur_process_cpu_seconds_total")
    assert set(cpu) == {'{worker="0"}', '{worker="1"}'} and all(v > 0 for v in cpu.values())
    assert _metric(server, "recur_workers_serving") == {"": 2.0}
