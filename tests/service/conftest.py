"""Real `recur serve` processes on free ports, started and stopped by the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recur.client import RecurClient
from recur.v1 import recur_pb2_grpc

START_TIMEOUT = 60.0


@dataclass
class Server:
    """One server process; `start` again after `kill` to restart it on the same store."""

    models_dir: Path
    store: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "recur.cli", "--log-level", "WARNING", "serve", "--models-dir",
               str(self.models_dir), "--store", self.store, "--host", "127.0.0.1", "--port", "0", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if line.startswith("recur listening on port "):
                    self.port = int(line.split()[-1])
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_TIMEOUT):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        with grpc.insecure_channel(self.target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=20,
                                                          wait_for_ready=True).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def client(self) -> RecurClient:
        return RecurClient(self.target)

    def stub(self) -> recur_pb2_grpc.RecurStub:
        return recur_pb2_grpc.RecurStub(grpc.insecure_channel(self.target))


@pytest.fixture
def start_server(tiny_models: Path, tmp_path: Path) -> Iterator:
    """start_server(store=..., extra=[...]) -> a started Server; all are killed at the end."""
    servers: list[Server] = []

    def start(store: str | None = None, extra: list[str] | None = None) -> Server:
        s = Server(tiny_models, store or f"sqlite:{tmp_path / 'recur.db'}", extra or [])
        servers.append(s)
        return s.start()

    yield start
    for s in servers:
        s.kill()


@pytest.fixture
def server(start_server) -> Server:  # type: ignore[no-untyped-def]
    return start_server()


@pytest.fixture
def client(server: Server) -> Iterator[RecurClient]:
    with server.client() as c:
        yield c


class Reference:
    """One pass over a whole sequence through ONNX Runtime in process."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest = json.loads((model_dir / "manifest.json").read_text())
        self.sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """x: (T,) tokens or (T, D) features -> logits (T, C) and states, each (L, H)."""
        m = self.manifest
        feed = {m["input"]["name"]: x[None]}
        for s in m["state"]:
            feed[s["name"]] = np.zeros((s["shape"][0], 1, s["shape"][2]), dtype=np.float32)
        out = self.sess.run([m["head"]["output"]] + [s["output"] for s in m["state"]], feed)
        return out[0][0], [s[:, 0] for s in out[1:]]


@pytest.fixture(scope="session")
def reference(tiny_models: Path):  # type: ignore[no-untyped-def]
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = Reference(tiny_models / name / "1")
        return cache[name]

    return get


def logits_of(reply) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.frombuffer(reply.logits, dtype="<f4").reshape(tuple(reply.logits_shape))


def state_of(msg) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return [np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)) for t in msg.state]


def race(targets: list[str], session_id: str, tokens: list[int], chunk: int) -> tuple[list[int], list[str]]:
    """One client per target feeds the same sequence into one session at once, each chunk at the
    offset it believes current. Returns the start offsets applied (not replayed) and the refusals."""
    applied: list[int] = []
    refusals: list[str] = []
    lock = threading.Lock()

    def feed(target: str) -> None:
        with RecurClient(target) as c:
            offset = 0
            while offset < len(tokens):
                try:
                    r = c.step(session_id, tokens=tokens[offset : offset + chunk], expected_offset=offset)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
                    with lock:
                        refusals.append(e.details())
                    offset = int(re.search(r"is at offset (\d+)", e.details()).group(1))  # type: ignore[union-attr]
                    continue
                if not r.replayed:
                    with lock:
                        applied.append(r.start_offset)
                offset = r.offset

    threads = [threading.Thread(target=feed, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return applied, refusals
