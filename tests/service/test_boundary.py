"""The boundary, second pass: ordinary clients are never refused by a transport default, a request's
reply is budgeted before anything runs (selections are sets), a never-read stream is bounded in bytes,
and the smaller holes (rates per chunk, key reload, the replica header, an open admin port)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service.auth import add_key
from tests.helpers import ROOT, Server, refused, until

EXHAUSTED, INVALID = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT
SHIPPED = ROOT / "models"  # pylm: the shipped 2-layer LSTM the amplification was measured on


def rss(server: Server) -> int:
    """The server process's resident memory, bytes."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def pylm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(SHIPPED, "memory:").start()
    yield server
    server.kill()


# -- ordinary clients ---------------------------------------------------------------------------------

def test_120_concurrent_unary_calls_on_one_channel_all_succeed(start_server: Callable[..., Server]) -> None:
    """grpc.aio with no retry: the HTTP/2 stream limit must not reset calls (REFUSED_STREAM)."""
    server = start_server(store="memory:")

    async def run() -> list[int]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = recur_pb2_grpc.RecurStub(ch)
            ids = [(await stub.CreateSession(pb.CreateSessionRequest(model="lstm-lm"))).session_id
                   for _ in range(120)]

            async def loop(sid: str) -> int:
                for i in range(5):
                    r = await stub.Step(pb.StepRequest(session_id=sid, tokens=[1, 2], expected_offset=2 * i),
                                        timeout=60)
                return r.offset

            return await asyncio.gather(*(loop(s) for s in ids))

    assert asyncio.run(run()) == [10] * 120


def test_a_plain_blocking_stub_with_300_threads_on_one_channel(start_server: Callable[..., Server]) -> None:
    server = start_server(store="memory:")
    with grpc.insecure_channel(server.target) as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        ids = [stub.CreateSession(pb.CreateSessionRequest(model="gru-lm")).session_id for _ in range(300)]
        with concurrent.futures.ThreadPoolExecutor(300) as pool:
            offsets = list(pool.map(lambda s: stub.Step(pb.StepRequest(session_id=s, tokens=[3]), timeout=60).offset,
                                    ids))
    assert offsets == [1] * 300


def test_the_server_bound_is_max_concurrent_rpcs_answered_resource_exhausted(
        start_server: Callable[..., Server]) -> None:
    server = start_server(store="memory:", extra=["--max-concurrent-rpcs", "4"])
    hold = threading.Event()
    with server.client() as c:
        sid = c.create("lstm-lm").session_id

        def quiet() -> Iterator[pb.StepRequest]:
            yield pb.StepRequest(session_id=sid, tokens=[1])
            hold.wait(30)

        streams = [c.stub.Stream(quiet()) for _ in range(4)]
        for s in streams:
            next(s)
        with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError) as e:  # no retry
            recur_pb2_grpc.RecurStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        assert e.value.code() == EXHAUSTED
        hold.set()
        for s in streams:
            assert list(s) == []


# -- the reply budget -----------------------------------------------------------------------------------

class Stepper:
    """Another client stepping its own session while an adversary sends; its worst latency."""

    def __init__(self, target: str) -> None:
        self.client = RecurClient(target)
        self.sid = self.client.create("pylm").session_id
        self.worst, self.steps = 0.0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            self.client.step(self.sid, tokens=[5])
            self.worst = max(self.worst, time.perf_counter() - t)
            self.steps += 1

    def __enter__(self) -> Stepper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def _refused_fast(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> float:
    t = time.perf_counter()
    refused(call, code, *words)
    return time.perf_counter() - t


def test_amplifying_requests_are_refused_before_anything_runs(pylm: Server) -> None:
    """The requests that grew the server by gigabytes: each refused in milliseconds, memory unchanged,
    another client's steps unaffected, and the session not advanced."""
    with pylm.client() as c, Stepper(pylm.target) as other:
        sid = c.create("pylm").session_id
        before = rss(pylm)
        times = [
            _refused_fast(lambda: c.step(sid, tokens=[5] * 8, return_activations=True,
                                         activation_layers=[-1] * 4096, activation_units=[0] * 4096),
                          INVALID, "activation_layers is a set"),
            _refused_fast(lambda: c.step(sid, tokens=[5] * 16, return_activations=True,
                                         activation_units=list(range(256)) * 16),
                          INVALID, "activation_units is a set"),
            _refused_fast(lambda: c.step(sid, tokens=[5] * 8, return_activations=True, activation_layers=[1, -1]),
                          INVALID, "more than once"),
        ]
        times.append(_refused_fast(lambda: c.stub.StepPacked(pb.PackedStepBatch(
            session_ids=[sid], lengths=[8], tokens=np.full(8, 5, "<i4").tobytes(), return_activations=True,
            activation_layers=[-1] * 4096, activation_units=[0] * 4096), timeout=10), INVALID, "is a set"))
        # no duplicates, but a reply over --max-reply-bytes (32 MiB): 16 chunks of 4,096 steps, each step
        # with 1,024 units of activations and the logits; refused from the shapes alone
        times.append(_refused_fast(lambda: c.stub.StepPacked(pb.PackedStepBatch(
            session_ids=[sid] * 16, lengths=[4096] * 16, tokens=np.full(4096 * 16, 5, "<i4").tobytes(),
            return_activations=True, return_logits=True), timeout=10), EXHAUSTED, "--max-reply-bytes"))
        assert max(times) < 1.0, times
        assert c.get(sid).offset == 0
        assert rss(pylm) - before < 50 * 2**20
    assert other.steps > 0 and other.worst < 2.0


def test_a_stepbatch_over_the_budget_is_refused_whole(start_server: Callable[..., Server]) -> None:
    server = start_server(store="memory:", extra=["--max-reply-bytes", "200000", "--stream-buffer-bytes", "200000"])
    with server.client() as c:
        ids = [c.create("lstm-lm").session_id for _ in range(8)]
        batch = pb.StepBatch(steps=[pb.StepRequest(session_id=s, tokens=[1] * 1000, return_logits=True)
                                    for s in ids])
        [reply] = list(c.stub.StreamBatch(iter([batch])))
        assert {r.status.code for r in reply.steps} == {EXHAUSTED.value[0]}
        assert "--max-reply-bytes" in reply.steps[0].status.message
        small = pb.StepBatch(steps=[pb.StepRequest(session_id=s, tokens=[1] * 10, return_logits=True) for s in ids])
        [ok] = list(c.stub.StreamBatch(iter([small])))
        assert [r.offset for r in ok.steps] == [10] * 8
        assert all(c.get(s).offset == 10 for s in ids)


def test_the_max_reply_bytes_must_fit_a_stream(tiny_models: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "recur.cli", "serve", "--models-dir", str(tiny_models), "--store",
                          "memory:", "--port", "0", "--max-reply-bytes", "1000", "--stream-buffer-bytes", "10"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--stream-buffer-bytes" in out.stderr


# -- a stream nobody reads ---------------------------------------------------------------------------------

def test_a_never_read_stream_is_bounded_in_bytes_and_frees_them(tmp_path: Path) -> None:
    """4,096-step chunks with logits on a stream whose client never reads: the server holds at most
    --stream-buffer-bytes of replies (64 MiB), the session's own GetSession is answered in seconds,
    and a cancelled call gives its memory back."""
    server = Server(SHIPPED, "memory:").start()
    try:
        with server.client() as c:
            sid = c.create("pylm").session_id
            c.step(sid, tokens=[1])
            start = rss(server)
            ch = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)])
            stub = recur_pb2_grpc.RecurStub(ch)
            chunk = list(range(4096))
            sent = threading.Event()

            def requests() -> Iterator[pb.StepRequest]:
                for _ in range(600):
                    yield pb.StepRequest(session_id=sid, tokens=[t % 90 for t in chunk], return_logits=True)
                sent.set()
                time.sleep(60)

            call = stub.Stream(requests())  # never read
            peak = 0
            for _ in range(30):
                time.sleep(0.5)
                peak = max(peak, rss(server))
            t = time.perf_counter()
            got = c.get(sid)
            waited = time.perf_counter() - t
            assert got.offset > 1
            assert waited < 10.0, waited
            peak = max(peak, rss(server))
            call.cancel()
            ch.close()
            until(lambda: rss(server) - start < 50 * 2**20, 20, "the cancelled stream's memory given back")
            time.sleep(1.0)
            after = rss(server)
            assert after - start < 50 * 2**20
        # 64 MiB of replies, plus what the reader holds and gRPC's own buffers; 256 such replies were 600 MB
        assert peak - start < 220 * 2**20, (start, peak, after)
        print(f"never-read stream: start {start >> 20} MiB, peak {peak >> 20} MiB, after cancel {after >> 20} MiB, "
              f"GetSession waited {waited:.2f} s")
    finally:
        server.kill()


# -- Generate ---------------------------------------------------------------------------------------------------

def test_generate_stop_strings_are_bounded_before_they_are_copied(client: RecurClient) -> None:
    """65 stop strings are refused as the request is converted (tests/core holds the bounds and the matching)."""
    sid = client.create("lstm-lm").session_id
    refused(lambda: list(client.generate(sid, prompt="ab", max_tokens=2, stop=["x"] * 65)), INVALID, "at most 64")
    assert client.get(sid).offset == 0


# -- rates, keys, the replica header, the admin port ----------------------------------------------------------

@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Path, str, str]:
    path = tmp_path / "keys.json"
    slow = add_key(path, "slow", requests_per_second=5)
    fast = add_key(path, "fast")
    return path, slow, fast


def test_a_rate_limit_counts_chunks_on_a_stream(start_server: Callable[..., Server], keyed: tuple) -> None:
    path, slow, _ = keyed
    server = start_server(store="memory:", extra=["--auth-keys", str(path)])
    with RecurClient(server.target, api_key=slow) as c:
        sid = c.create("gru-lm").session_id
        time.sleep(1.2)  # a full bucket
        replies = list(c.stub.Stream(iter([pb.StepRequest(session_id=sid, tokens=[1]) for _ in range(300)]),
                                     metadata=(("authorization", f"Bearer {slow}"),)))
        ok = [r for r in replies if not r.status.code]
        limited = [r for r in replies if r.status.code == EXHAUSTED.value[0]]
        assert len(ok) <= 8 and len(ok) + len(limited) == 300
        assert "requests per second" in limited[0].status.message


def test_a_revoked_key_is_refused_after_sighup_and_after_a_poll(start_server: Callable[..., Server],
                                                                  keyed: tuple) -> None:
    path, _, fast = keyed
    server = start_server(store="memory:", extra=["--auth-keys", str(path), "--auth-keys-poll", "0.5"])
    with RecurClient(server.target, api_key=fast) as c:
        assert c.models()
    doc = json.loads(path.read_text())
    kept = [k for k in doc["keys"] if k["tenant"] != "fast"]
    path.write_text(json.dumps({**doc, "keys": kept}))
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    with RecurClient(server.target, api_key=fast) as c:
        until(lambda: _refused(c), 5, "the revoked key refused")
    new = add_key(path, "late")  # the poll finds it without a signal
    with RecurClient(server.target, api_key=new) as c:
        until(lambda: _served(c), 10, "the new key served")


def _refused(c: RecurClient) -> bool:
    try:
        c.models()
    except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def _served(c: RecurClient) -> bool:
    try:
        return bool(c.models())
    except grpc.RpcError:
        return False


def test_the_replica_header_goes_to_known_keys_only(start_server: Callable[..., Server], keyed: tuple) -> None:
    path, _, fast = keyed
    server = start_server(store="memory:", extra=["--auth-keys", str(path), "--replica-id", "r-7"])
    with grpc.insecure_channel(server.target) as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        call = stub.ListModels.with_call(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {fast}"),))
        assert ("x-recur-replica", "r-7") in call[1].initial_metadata()
        for md in [(), (("authorization", "Bearer nope"),)]:
            with pytest.raises(grpc.RpcError) as e:
                stub.ListModels(pb.ListModelsRequest(), metadata=md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert all(k != "x-recur-replica" for k, _ in e.value.initial_metadata())
            assert all(k != "x-recur-replica" for k, _ in e.value.trailing_metadata())


def test_live_sessions_are_the_callers_tenants_and_an_admin_sees_all(start_server: Callable[..., Server],
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    a, b = add_key(path, "a"), add_key(path, "b")
    admin = add_key(path, "ops", admin=True)
    server = start_server(extra=["--auth-keys", str(path)])
    with RecurClient(server.target, api_key=a) as ca, RecurClient(server.target, api_key=b) as cb, \
            RecurClient(server.target, api_key=admin) as cadmin:
        for _ in range(3):
            ca.create("gru-lm")
        cb.create("gru-lm")

        def live(c: RecurClient) -> int:
            return next(m.live_sessions for m in c.models() if m.name == "gru-lm")

        until(lambda: live(ca) == 3, 10, "tenant a's count")
        assert live(cb) == 1
        assert live(cadmin) == 4


def test_an_open_admin_port_off_loopback_refuses_to_start(tiny_models: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "recur.cli", "serve", "--models-dir", str(tiny_models), "--store",
                          "memory:", "--port", "0", "--admin-port", "59123", "--admin-host",
                          "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--auth-keys" in out.stderr and "loopback" in out.stderr
