"""A bounded soak: 1,000 sessions of the default model streaming for 60 s through a mix of Step,
Stream and StreamBatch, a tenth of the calls cancelled halfway, on the default SQLite store with
synchronous durability. Records the server's RSS at the start and end, errors by code, and checks
that nothing acknowledged was lost: every session ends at or past the last offset acknowledged to it,
and a sample of sessions' final states equal one pass over the tokens at their offsets.

    python -m bench.soak [--seconds 60] [--sessions 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from bench.run import ROOT, Process, _session, machine, write_section
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc


def _rss_mb(server: Process) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, stub: recur_pb2_grpc.RecurStub, sids: list[str], seqs: np.ndarray) -> None:
        self.stub, self.sids, self.seqs = stub, sids, seqs
        self.acked = [0] * len(sids)  # the last offset acknowledged to the client
        self.next = [0] * len(sids)  # where the client sends from (resynced after a cancel)
        self.codes: Counter[str] = Counter()
        self.chunks = 0
        self.busy: set[int] = set()

    def _request(self, i: int, n: int) -> pb.StepRequest:
        start = self.next[i]
        return pb.StepRequest(session_id=self.sids[i], tokens=self.seqs[i, start : start + n].tolist(),
                              expected_offset=start, compact=True, request_id=str(i))

    def _ack(self, i: int, reply: pb.StepResponse) -> None:
        if reply.HasField("status"):
            self.codes[grpc.StatusCode(next(c.value for c in grpc.StatusCode if c.value[0] == reply.status.code)
                                       ).name] += 1
            return
        self.acked[i] = max(self.acked[i], reply.offset)
        self.next[i] = reply.offset
        self.chunks += 1
        self.codes["OK"] += 1

    async def _resync(self, i: int) -> None:
        self.next[i] = (await self.stub.GetSession(pb.GetSessionRequest(session_id=self.sids[i]))).offset

    async def one_call(self, rng: random.Random) -> None:
        free = [i for i in rng.sample(range(len(self.sids)), 8) if i not in self.busy]
        if not free:
            await asyncio.sleep(0)
            return
        self.busy.update(free)
        cancel = rng.random() < 0.1
        kind = rng.choice(["step", "stream", "batch"])
        try:
            if kind == "step":
                i = free[0]
                call = self.stub.Step(self._request(i, rng.randint(1, 16)))

                async def replies() -> AsyncIterator[pb.StepResponse]:
                    yield await call
            elif kind == "stream":
                call = self.stub.Stream()
                for i in free:
                    await call.write(self._request(i, rng.randint(1, 16)))

                async def replies() -> AsyncIterator[pb.StepResponse]:
                    async for reply in call:
                        yield reply
            else:
                call = self.stub.StreamBatch()
                await call.write(pb.StepBatch(steps=[self._request(i, rng.randint(1, 16)) for i in free]))

                async def replies() -> AsyncIterator[pb.StepResponse]:
                    async for batch in call:
                        for reply in batch.steps:
                            yield reply
            if cancel:
                call.cancel()
            elif kind != "step":
                await call.done_writing()
            try:
                async for reply in replies():
                    self._ack(int(reply.request_id), reply)
            except grpc.RpcError as e:
                self.codes[e.code().name] += 1
            except asyncio.CancelledError:
                if not cancel:
                    raise
                self.codes["CANCELLED (by the client)"] += 1
            if cancel:
                for i in free:
                    await self._resync(i)  # a cancelled chunk may or may not have applied: ask
        finally:
            self.busy.difference_update(free)


async def soak(port: int, sessions: int, seconds: float, length: int) -> tuple[Soak, float]:
    seqs = np.random.default_rng(0).integers(0, 98, (sessions, length))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        sids = [(await stub.CreateSession(pb.CreateSessionRequest(model="pylm"))).session_id for _ in range(sessions)]
        s = Soak(stub, sids, seqs)
        deadline = time.monotonic() + seconds

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                await s.one_call(rng)

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(16)))
        took = time.monotonic() - t0
        finals = [(await stub.GetSession(pb.GetSessionRequest(session_id=sid, include_state=i < 20)))
                  for i, sid in enumerate(sids)]
    lost = sum(f.offset < a for f, a in zip(finals, s.acked))
    ort_session = _session()
    for i, f in enumerate(finals[:20]):  # final state = one pass over the tokens at its offset
        feed = {"tokens": seqs[i : i + 1, : f.offset] if f.offset else seqs[i : i + 1, :1][:, :0],
                "state_h": np.zeros((2, 1, 256), np.float32), "state_c": np.zeros((2, 1, 256), np.float32)}
        if f.offset:
            want = ort_session.run(["new_state_h"], feed)[0][:, 0]
            got = np.frombuffer(f.state[0].data, "<f4").reshape(tuple(f.state[0].shape))
            assert np.abs(got - want).max() <= 1e-4, f"session {i}: state differs from one pass"
    assert lost == 0, f"{lost} sessions lost acknowledged steps"
    return s, took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--no-write", action="store_true", help="print the figures; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        server = Process([__import__("sys").executable, "-m", "recur.cli", "--log-level", "WARNING", "serve",
                          "--models-dir", str(ROOT / "models"), "--store", f"sqlite:{tmp}/soak.db", "--host",
                          "127.0.0.1", "--port", "0"])
        try:
            rss0 = _rss_mb(server)
            s, took = asyncio.run(soak(server.port, args.sessions, args.seconds, length=20_000))
            rss1 = _rss_mb(server)
        finally:
            server.stop()
    codes = ", ".join(f"{k} {v}" for k, v in sorted(s.codes.items()))
    section = (f"## Soak\n\n`python -m bench.soak` ({started}; {machine()}): {args.sessions} sessions of pylm on "
               f"SQLite (sync) for {took:.0f} s through Step, Stream and StreamBatch with 10% of calls cancelled "
               f"halfway. {s.chunks} chunks acknowledged; replies by code: {codes}. Server RSS {rss0:.0f} MB at "
               f"the start, {rss1:.0f} MB at the end. Lost: 0 (every session at or past its last acknowledged "
               "offset; 20 sampled final states equal one pass).\n")
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "## Soak", section)


if __name__ == "__main__":
    main()
