"""Session-count scaling and resume cost, on the SQLite store with the default pylm model.

  scaling  N idle sessions created directly through the store (N = 1,000 and 1,000,000), then 64
           active sessions streaming chunks of 16 tokens over StreamBatch: p50 chunk latency and
           the store file's size per session
  resume   the first chunk of a session that is not in the server's cache (just restarted) against
           the next, cached one

    python -m bench.scale                      # writes its sections of BENCHMARKS.md
    python -m bench.scale --sessions 1000      # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.run import ROOT, _drive, _sequences, machine, recur_server, write_section
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from service.store import SqliteStore
from service.store.base import SessionRecord


async def fill(path: Path, n: int) -> float:
    """Create n idle pylm sessions through the store; returns seconds taken."""
    store = await SqliteStore(path, durability="async", cache_size=1000).open()
    t0 = time.perf_counter()
    zeros = [np.zeros((2, 256), np.float32), np.zeros((2, 256), np.float32)]
    batch = 5000
    for start in range(0, n, batch):
        t = time.time()
        await asyncio.gather(*(store.create(SessionRecord(
            tenant="default", session_id=f"idle-{i}", model="pylm", version=1, offset=0, created_at=t, updated_at=t,
            ttl=30 * 86400, state=zeros)) for i in range(start, min(n, start + batch))))
    await store.close()
    return time.perf_counter() - t0


def scaling(n: int, tmp: Path) -> dict:
    db = tmp / f"scale-{n}.db"
    fill_seconds = asyncio.run(fill(db, n))
    size = sum(p.stat().st_size for p in tmp.glob(f"scale-{n}.db*"))
    server = recur_server(f"sqlite:{db}")
    try:
        r = asyncio.run(_drive(server.port, _sequences(64, 512, seed=7), 16, "batch", check=1, budget=60))
    finally:
        server.stop()
    return {"n": n, "fill_s": fill_seconds, "bytes_per_session": size / n, "p50": r.p(50), "p99": r.p(99),
            "rate": r.rate}


async def _first_and_second(port: int, sids: list[str]) -> tuple[list[float], list[float]]:
    first: list[float] = []
    second: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        for sid in sids:
            for out in (first, second):
                t0 = time.perf_counter()
                await stub.Step(pb.StepRequest(session_id=sid, tokens=[5] * 16, compact=True))
                out.append(time.perf_counter() - t0)
    return first, second


async def _create(port: int, n: int) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        sids = [(await stub.CreateSession(pb.CreateSessionRequest(model="pylm"))).session_id for _ in range(n)]
        for sid in sids:
            await stub.Step(pb.StepRequest(session_id=sid, tokens=[5] * 16, compact=True))
    return sids


def resume(tmp: Path) -> dict:
    db = f"sqlite:{tmp / 'resume.db'}"
    server = recur_server(db)
    sids = asyncio.run(_create(server.port, 200))
    server.stop()
    server = recur_server(db)  # a fresh process: nothing cached
    try:
        first, second = asyncio.run(_first_and_second(server.port, sids))
    finally:
        server.stop()
    return {"uncached": float(np.median(first) * 1e3), "cached": float(np.median(second) * 1e3),
            "uncached_p99": float(np.percentile(first, 99) * 1e3), "cached_p99": float(np.percentile(second, 99) * 1e3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, nargs="+", default=[1000, 1_000_000])
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(dir=ROOT / "var" if (ROOT / "var").exists() else None) as t:
        tmp = Path(t)
        rows = []
        for n in args.sessions:
            rows.append(scaling(n, tmp))
            print(rows[-1], flush=True)
        r = resume(tmp)
        print(r, flush=True)
    base = rows[0]["p50"]
    table = ["| stored sessions | p50 chunk ms | p99 chunk ms | ratio of p50 to the first row | tokens/s | "
             "store bytes per session | time to create them |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        table.append(f"| {row['n']:,} | {row['p50']:.2f} | {row['p99']:.2f} | {row['p50'] / base:.2f} | "
                     f"{row['rate']:,.0f} | {row['bytes_per_session']:,.0f} | {row['fill_s']:.0f} s |")
    write_section(args.out, "## Session-count scaling", (
        f"## Session-count scaling\n\nMeasured {started} on {machine()}. Command: `python -m bench.scale`. "
        "Idle pylm sessions created directly through the SQLite store, then 64 active sessions stream 512 "
        "tokens each in chunks of 16 over StreamBatch (durability sync).\n\n" + "\n".join(table) + "\n"))
    write_section(args.out, "## Resume cost", (
        f"## Resume cost\n\nMeasured {started}. 200 sessions on the SQLite store, server restarted so nothing "
        "is cached; each session then gets two 16-token Step calls in turn.\n\n"
        "| first chunk after restart (read from SQLite) | next chunk (cached) |\n|---:|---:|\n"
        f"| p50 {r['uncached']:.3f} ms, p99 {r['uncached_p99']:.3f} ms | "
        f"p50 {r['cached']:.3f} ms, p99 {r['cached_p99']:.3f} ms |\n"))


if __name__ == "__main__":
    main()
