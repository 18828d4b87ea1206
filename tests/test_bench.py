"""A smoke run of the benchmark suite (make bench) so that it keeps working; not a measurement."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.capacity import STEP_PACKED, answered_offsets, create_sessions, frame, h2load, packed_request
from bench.run import TOL, Process, _sequences, naive_server, recur_server, reference, yardstick_server
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recur_memory() -> Iterator[Process]:
    server = recur_server("memory:")
    yield server
    server.stop()


def _packed_logits(port: int, seqs: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int]]:
    """StepPacked chunk by chunk over fresh sessions: logits (S, T, classes) and the last offsets."""
    sids = create_sessions(port, len(seqs))
    parts, offsets = [], []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        for a in range(0, seqs.shape[1], chunk):
            request = packed_request(sids, seqs[:, a : a + chunk])
            request.expected_offsets.extend([a] * len(sids))
            reply = stub.StepPacked(request)
            assert not reply.failed and list(reply.start_offsets) == [a] * len(sids)
            logits = np.frombuffer(reply.logits, "<f4").reshape(tuple(reply.logits_shape))  # (S * C, classes)
            parts.append(logits.reshape(len(sids), chunk, -1))
            offsets = list(reply.offsets)
    return np.concatenate(parts, axis=1), offsets


def test_yardstick_answers_as_recur_and_onnx_runtime(recur_memory: Process) -> None:
    """The yardstick's StepPacked, chunk by chunk, gives recur's logits and offsets, and one in-process
    ONNX Runtime pass's logits; an offset that does not match is refused."""
    seqs = _sequences(3, 12, seed=7)
    yardstick = yardstick_server()
    try:
        got, offsets = _packed_logits(yardstick.port, seqs, 4)
        with grpc.insecure_channel(f"127.0.0.1:{yardstick.port}") as ch:
            sid = create_sessions(yardstick.port, 1)
            late = packed_request(sid, seqs[:1, :4])
            late.expected_offsets.append(4)
            with pytest.raises(grpc.RpcError) as refused:
                recur_pb2_grpc.RecurStub(ch).StepPacked(late)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        yardstick.stop()
    want, recur_offsets = _packed_logits(recur_memory.port, seqs, 4)
    assert offsets == recur_offsets == [12, 12, 12]
    assert float(np.abs(got - want).max()) <= TOL
    for i, seq in enumerate(seqs):
        assert float(np.abs(got[i] - reference(seq)).max()) <= TOL


def test_h2load_body_is_a_grpc_frame_recur_answers(recur_memory: Process, tmp_path: Path) -> None:
    """The pre-serialised body: one uncompressed gRPC frame that recur answers OK, from Python and from
    h2load; every request h2load sends is applied (each session's offset moves one chunk a request)."""
    if shutil.which("h2load") is None:
        pytest.fail("h2load is not installed: `make test` installs it (nghttp2-client, deploy/ensure-packages)")
    sids = create_sessions(recur_memory.port, 4)
    request = packed_request(sids, _sequences(4, 2))
    body = frame(request.SerializeToString())
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    assert pb.PackedStepBatch.FromString(body[5:]) == request and not request.expected_offsets
    (tmp_path / "body.grpc").write_bytes(body)
    first = answered_offsets(recur_memory.port, STEP_PACKED, body[5:], rows=8)
    assert first.tolist() == [2] * 4
    run = h2load(recur_memory.port, STEP_PACKED, tmp_path / "body.grpc", 1, 4, 12, tmp_path / "h2load.log")
    assert run.requests == run.succeeded == 12 and len(run.latencies) == 12
    assert answered_offsets(recur_memory.port, STEP_PACKED, body[5:], rows=8).tolist() == [2 * 14] * 4


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--json", str(out)], cwd=ROOT, check=True,
                   timeout=180, capture_output=True)
    results = json.loads(out.read_text())
    modes = {r["mode"] for r in results}
    assert {"limit (1 thread)", "limit (default threads)", "per-call", "recur memory (Stream)",
            "recur memory (StreamBatch)", "recur memory (packed)", "recur sqlite-sync (packed)",
            "naive ort (unary)", "naive torch (unary)", "yardstick (packed)"} <= modes
    grpc_cells = [r for r in results if r["mode"].startswith(("recur", "yardstick"))]
    assert all(r["tokens"] == r["sessions"] * 32 and r["checked"] >= 1 for r in grpc_cells)
    # CPU times come from /proc in clock ticks (10 ms): a tiny cell may read 0, the run as a whole may not
    assert all(r["server_cpu"] >= 0 and r["ort_seconds"] >= 0 for r in grpc_cells)
    assert sum(r["server_cpu"] for r in grpc_cells) > 0 and sum(r["ort_seconds"] for r in grpc_cells) > 0


def test_soak_smoke() -> None:
    """The soak itself asserts that nothing acknowledged was lost; here it runs for a few seconds."""
    out = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", "3", "--sessions", "40", "--no-write"],
                         cwd=ROOT, check=True, timeout=180, capture_output=True, text=True).stdout
    assert "Lost: 0" in out and " OK " in out


def test_v2_bench_smoke() -> None:
    """The v2 row's load generator (tritonclient, in its own venv) against the native Stream."""
    out = subprocess.run([sys.executable, "-m", "bench.v2", "--sessions", "4", "--chunk", "4", "--length", "32",
                          "--no-write"], cwd=ROOT, check=True, timeout=300, capture_output=True, text=True).stdout
    assert "ModelStreamInfer (tritonclient, full logits)" in out and "v2 / native:" in out


def test_activations_bench_smoke() -> None:
    """Its four cells run and check their logits against the one-pass reference (a few seconds)."""
    out = subprocess.run([sys.executable, "-m", "bench.activations", "--quick"], cwd=ROOT, check=True, timeout=300,
                         capture_output=True, text=True).stdout
    assert "exported without | not asked" in out and "asked: every layer's h and c" in out


def test_arena_bench_smoke() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.arena", "--quick"], cwd=ROOT, check=True, timeout=120,
                         capture_output=True, text=True).stdout
    assert out.count("\n") == 4 and "| 64 |" in out and "| 256 |" in out


def test_capacity_bench_smoke() -> None:
    """bench.capacity's rows run, each h2load row checked (gRPC OK, every request applied); not a measurement."""
    if shutil.which("h2load") is None:
        pytest.fail("h2load is not installed: `make test` installs it (nghttp2-client, deploy/ensure-packages)")
    out = subprocess.run([sys.executable, "-m", "bench.capacity", "--quick"], cwd=ROOT, check=True, timeout=300,
                         capture_output=True, text=True).stdout
    assert "| recur memory (StepPacked) | h2load -c 4 -m 4 |" in out and "| yardstick (StreamPacked) | Python" in out


def test_workers_bench_smoke() -> None:
    """bench.workers' rows run against --workers 1 and 2, each checked (logits against the one-pass reference;
    every h2load request applied); not a measurement."""
    out = subprocess.run([sys.executable, "-m", "bench.workers", "--quick"], cwd=ROOT, check=True, timeout=300,
                         capture_output=True, text=True).stdout
    assert "| workers 1 | Python, 2 connections | " in out and "| workers 2 | Python, 2 connections | " in out


def test_core_cpu_bench_smoke() -> None:
    """bench.core_cpu's A/B runs each checkout in its own process (here this one against itself), every
    chunk answered without a refusal; not a measurement."""
    out = subprocess.run([sys.executable, "-m", "bench.core_cpu", "--against", str(ROOT), "--sessions", "8",
                          "--messages", "5"], cwd=ROOT, check=True, timeout=300, capture_output=True, text=True).stdout
    assert out.count("| this | 8 |") == 3 and out.count("| against | 8 |") == 3


def test_core_cpu_step_smoke() -> None:
    """bench.core_cpu --step: a lone unary Step's cost in process (every Step applied, or the run fails)."""
    out = subprocess.run([sys.executable, "-m", "bench.core_cpu", "--step"], cwd=ROOT, check=True, timeout=300,
                         capture_output=True, text=True).stdout
    assert out.count("| this | 1 |") == 1 and "inside its run" in out


def test_naive_server_on_grpc_aio_sends_the_replica_header_and_one_pass_logits() -> None:
    """bench.targets' unary split: the naive server on grpc.aio with --header answers Steps as one pass
    would, each with an x-recur-replica initial-metadata header (without --header, none)."""
    seq = _sequences(1, 6, seed=3)[0]
    for extra, header in ((["--aio", "--header"], True), (["--aio"], False)):
        server = naive_server("ort", *extra)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = recur_pb2_grpc.RecurStub(ch)
                sid = stub.CreateSession(pb.CreateSessionRequest(model="pylm")).session_id
                logits = []
                for a in range(0, 6, 3):
                    reply, call = stub.Step.with_call(pb.StepRequest(session_id=sid, tokens=seq[a : a + 3].tolist(),
                                                                     return_logits=True))
                    assert reply.offset == a + 3
                    assert (dict(call.initial_metadata()).get("x-recur-replica") == "naive") is header
                    logits.append(np.frombuffer(reply.logits, "<f4").reshape(tuple(reply.logits_shape)))
            assert np.abs(np.concatenate(logits) - reference(seq)).max() <= TOL
        finally:
            server.stop()


def test_core_cpu_on_sqlite_and_store_ratio_smoke() -> None:
    """bench.core_cpu on the SQLite store (the row round's writes) and bench.store_ratio's A/B (SQLite and
    memory servers side by side, every cell's logits checked by bench.run's client); not a measurement."""
    out = subprocess.run([sys.executable, "-m", "bench.core_cpu", "--store", "sqlite", "--sessions", "8",
                          "--messages", "5"], cwd=ROOT, check=True, timeout=300, capture_output=True, text=True).stdout
    assert out.count("| this | 8 |") == 1
    out = subprocess.run([sys.executable, "-m", "bench.store_ratio", "--quick", "--against", str(ROOT)], cwd=ROOT,
                         check=True, timeout=300, capture_output=True, text=True).stdout
    assert out.count("| this | 4 | 2 |") == 2 and out.count("| against | 4 | 2 |") == 2


def test_core_cpu_and_store_ratio_on_redis_smoke() -> None:
    """The same two on a local redis-server (each run starts its own): the core's rounds and the put scripts'
    answers in process, then Redis against memory over gRPC (logits checked); not a measurement."""
    out = subprocess.run([sys.executable, "-m", "bench.core_cpu", "--store", "redis", "--sessions", "8",
                          "--messages", "5"], cwd=ROOT, check=True, timeout=300, capture_output=True, text=True).stdout
    row = [line for line in out.splitlines() if line.startswith("| this | 8 |")]
    assert len(row) == 1 and float(row[0].split("|")[-2]) >= 0  # redis-server's CPU, read from /proc
    out = subprocess.run([sys.executable, "-m", "bench.store_ratio", "--quick", "--store", "redis"], cwd=ROOT,
                         check=True, timeout=300, capture_output=True, text=True).stdout
    assert "Redis / memory" in out and out.count("| this | 4 | 2 |") == 1
