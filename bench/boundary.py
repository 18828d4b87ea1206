"""The boundary's bounds, measured on a real server with pylm (memory store): what the amplifying
requests cost before they are refused, what a never-read Stream of 4,096-step chunks holds, and how
many of 120 concurrent unary calls on one grpc.aio channel an HTTP/2 stream limit of 100 resets.

    python -m bench.boundary
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from bench.run import Process, recur_server
from recur.client import RecurClient
from recur.kserve import grpc_service_pb2 as v2
from recur.kserve import grpc_service_pb2_grpc
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc


def _rss(p: Process) -> int:
    for line in Path(f"/proc/{p.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def amplification() -> None:
    server = recur_server("memory:")
    target = f"127.0.0.1:{server.port}"
    try:
        with RecurClient(target) as c, RecurClient(target) as other:
            sid, mine = c.create("pylm").session_id, other.create("pylm").session_id
            lat: list[float] = []
            stop = threading.Event()

            def step() -> None:
                while not stop.is_set():
                    t = time.perf_counter()
                    other.step(mine, tokens=[5])
                    lat.append(time.perf_counter() - t)

            thread = threading.Thread(target=step, daemon=True)
            thread.start()
            time.sleep(1)
            before, n0 = _rss(server), len(lat)
            cases = {
                "Step, 8 tokens, activation_layers [-1] x 4,096, units [0] x 4,096": lambda: c.step(
                    sid, tokens=[5] * 8, return_activations=True, activation_layers=[-1] * 4096,
                    activation_units=[0] * 4096),
                "StepPacked, the same selection": lambda: c.stub.StepPacked(pb.PackedStepBatch(
                    session_ids=[sid], lengths=[8], tokens=np.full(8, 5, "<i4").tobytes(), return_activations=True,
                    activation_layers=[-1] * 4096, activation_units=[0] * 4096), timeout=10),
                "StepPacked, 16 x 4,096 steps, every activation and the logits (no repeats)": lambda: c.stub.StepPacked(
                    pb.PackedStepBatch(session_ids=[sid] * 16, lengths=[4096] * 16,
                                       tokens=np.full(4096 * 16, 5, "<i4").tobytes(), return_activations=True,
                                       return_logits=True), timeout=10),
            }
            infer = v2.ModelInferRequest(model_name="pylm")
            tokens = infer.inputs.add(name="tokens", datatype="INT64", shape=[1, 4096])
            tokens.contents.int64_contents.extend([5] * 4096)
            for _ in range(4000):
                infer.outputs.add(name="logits")
            v2_stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(c.channel)
            cases["ModelInfer, 4,096 tokens, outputs naming logits 4,000 times"] = lambda: v2_stub.ModelInfer(
                infer, timeout=10)
            print("| request | answer | time | server RSS change |\n|---|---|---|---|")
            for name, call in cases.items():
                r0, t = _rss(server), time.perf_counter()
                try:
                    call()
                    answer = "OK"
                except grpc.RpcError as e:
                    answer = e.code().name
                ms = 1000 * (time.perf_counter() - t)
                print(f"| {name} | {answer} | {ms:.1f} ms | {(_rss(server) - r0) / 2**20:+.1f} MiB |")
            time.sleep(1)
            stop.set()
            thread.join()
            during = lat[n0:]
            print(f"\nAnother client's 1-token Steps meanwhile: {len(during)}, p50 "
                  f"{1000 * statistics.median(during):.2f} ms, max {1000 * max(during):.2f} ms; server RSS "
                  f"{before / 2**20:.0f} MiB before, {_rss(server) / 2**20:.0f} MiB after.")
    finally:
        server.stop()


def never_read_stream() -> None:
    server = recur_server("memory:")
    target = f"127.0.0.1:{server.port}"
    try:
        with RecurClient(target) as c:
            sid = c.create("pylm").session_id
            c.step(sid, tokens=[1])
            start = _rss(server)
            ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])

            def requests() -> Iterator[pb.StepRequest]:
                for _ in range(600):
                    yield pb.StepRequest(session_id=sid, tokens=[t % 90 for t in range(4096)], return_logits=True)
                time.sleep(60)

            call = recur_pb2_grpc.RecurStub(ch).Stream(requests())
            peak = start
            for _ in range(40):
                time.sleep(0.5)
                peak = max(peak, _rss(server))
            t = time.perf_counter()
            offset = c.get(sid).offset
            waited = time.perf_counter() - t
            call.cancel()
            ch.close()
            after = []
            for _ in range(10):
                time.sleep(0.5)
                after.append(_rss(server))
        print(f"\nNever-read Stream, 4,096-step chunks with logits: RSS {start / 2**20:.0f} MiB at the start, peak "
              f"{peak / 2**20:.0f} MiB over 20 s ({offset - 1:,} steps applied, then the stream stopped reading), "
              f"{after[1] / 2**20:.0f} MiB 1 s after the cancel, {after[-1] / 2**20:.0f} MiB 5 s after; GetSession "
              f"on the same session answered in {1000 * waited:.0f} ms.")
    finally:
        server.stop()


def concurrent_calls() -> None:
    for limit in ("100", "0"):
        server = recur_server("memory:", "--max-streams-per-connection", limit)
        try:
            async def run(port: int) -> int:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = recur_pb2_grpc.RecurStub(ch)
                    ids = [(await stub.CreateSession(pb.CreateSessionRequest(model="pylm"))).session_id
                           for _ in range(120)]

                    async def loop(s: str) -> bool:
                        try:
                            for i in range(5):
                                await stub.Step(pb.StepRequest(session_id=s, tokens=[1], expected_offset=i))
                            return True
                        except grpc.aio.AioRpcError:
                            return False

                    return sum(await asyncio.gather(*(loop(s) for s in ids)))

            ok = asyncio.run(run(server.port))
            print(f"--max-streams-per-connection {limit}: {120 - ok} of 120 concurrent call loops failed")
        finally:
            server.stop()


if __name__ == "__main__":
    amplification()
    never_read_stream()
    concurrent_calls()
