"""Where a packed message's time goes inside the core, per chunk: the core's wall time and its process
CPU (the event loop, the engine's threads and ONNX Runtime together), ONNX Runtime's own CPU for the
same call made directly (the model's runtime, all S sessions in one batch), and Python's: the
difference. In process (no gRPC, no client), pylm, 1-token chunks, every chunk's logits and an
expected offset; the memory store (the session table's rows or the record path, whichever the
checkout has) or, with `--store sqlite`, a SQLite file with sync durability in a temporary directory.

    python -m bench.core_cpu                          # this checkout
    python -m bench.core_cpu --against ../old-checkout   # A/B: alternating runs of both, 3 each
    python -m bench.core_cpu --store sqlite           # the durable store's share
    python -m bench.core_cpu --step                   # a lone unary Step, as the wire gives it
    python -m bench.core_cpu --store redis            # a local redis-server (its own CPU in the last column)

`--step`: one session's 1-token Steps one after another (the request message converted as the
servicer converts it, the reply converted back), each running on the event loop's thread as a lone
chunk on an idle engine does; "ONNX Runtime" is then the wall time inside the model's run, timed
in the call itself.

Each run is its own process (one checkout's `service` package imported), so the two never share a
heap or a cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(root: str, sessions: int, messages: int, store: str, step: bool = False) -> dict:
    sys.path.insert(0, root)
    import asyncio
    import tempfile

    import numpy as np

    from service.config import Settings
    from service.core.packed import PackedInput
    from service.core.sessions import SessionService
    from service.engine.engine import Engine, EngineOptions
    from service.engine.runtime import RuntimeOptions
    from service.repository.models import ModelRepository
    from service.store import MemoryStore, Store
    from service.store.redis import RedisStore
    from service.store.sqlite import SqliteStore
    from service.transport import convert

    redis: subprocess.Popen | None = None

    async def run(tmp: str) -> dict:
        repo = ModelRepository.load(ROOT / "models", RuntimeOptions())
        db: Store
        if store == "redis":
            db = RedisStore(f"redis://127.0.0.1:{redis_port}/0")
        else:
            db = MemoryStore() if store == "memory" else await SqliteStore(Path(tmp) / "s.db").open()
        # a lone Step runs inline when no call ended for inline_idle: over gRPC the round trip gives that
        core = SessionService(Settings(), repo, db, Engine(EngineOptions(inline_idle=0.0) if step else EngineOptions()))
        if step:
            return await unary(core, repo)
        sids = [(await core.create("t", "pylm", 0, session_id=f"s{i}")).session_id for i in range(sessions)]
        rng = np.random.default_rng(0)
        bodies = [rng.integers(0, 90, sessions).astype("<i4").tobytes() for _ in range(messages + 20)]

        async def one(k: int) -> None:
            p = PackedInput(sids, [1] * sessions, bodies[k], expected_offsets=[k] * sessions, return_logits=True)
            res = await core.step_packed("t", p)
            assert not res.errors, list(res.errors.items())[:2]

        for k in range(20):  # warm-up
            await one(k)
        model = repo.get("pylm")
        x = np.zeros((sessions, 1), np.int64)
        states = [np.stack([z] * sessions, axis=1) for z in model.zero_state()]
        c0 = time.process_time()
        for _ in range(messages):
            model.runtime.run(x, states)
        ort = (time.process_time() - c0) / messages / sessions
        t0, c0, r0 = time.perf_counter(), time.process_time(), _cpu_of(redis)
        for k in range(20, 20 + messages):
            await one(k)
        wall = (time.perf_counter() - t0) / messages / sessions
        cpu = (time.process_time() - c0) / messages / sessions
        store_cpu = (_cpu_of(redis) - r0) / messages / sessions
        await core.close()
        return {"wall_us": wall * 1e6, "cpu_us": cpu * 1e6, "ort_us": ort * 1e6, "store_us": store_cpu * 1e6}

    async def unary(core: SessionService, repo: ModelRepository) -> dict:
        from recur.v1 import recur_pb2 as pb

        sid = (await core.create("t", "pylm", 0, session_id="s0")).session_id
        requests = [pb.StepRequest(session_id=sid, tokens=[k % 90], expected_offset=k, return_logits=True,
                                   compact=True) for k in range(messages + 200)]
        runtime, inside = repo.get("pylm").runtime, [0.0]
        run = runtime.run

        def timed_run(*a: object, **kw: object) -> object:
            t = time.perf_counter()
            try:
                return run(*a, **kw)  # type: ignore[arg-type]
            finally:
                inside[0] += time.perf_counter() - t

        runtime.run = timed_run  # type: ignore[method-assign,assignment]
        for k in range(200):  # warm-up
            convert.step_to_pb(await core.step("t", convert.step_from_pb(requests[k])))
        inside[0] = 0.0
        t0, c0, r0 = time.perf_counter(), time.process_time(), _cpu_of(redis)
        for k in range(200, 200 + messages):
            convert.step_to_pb(await core.step("t", convert.step_from_pb(requests[k])))
        wall, cpu = (time.perf_counter() - t0) / messages, (time.process_time() - c0) / messages
        await core.close()
        return {"wall_us": wall * 1e6, "cpu_us": cpu * 1e6, "ort_us": inside[0] / messages * 1e6,
                "store_us": (_cpu_of(redis) - r0) / messages * 1e6}

    with tempfile.TemporaryDirectory() as tmp:
        if store == "redis":
            from bench.redis_store import start_redis

            redis, redis_port = start_redis(tmp)
        try:
            return asyncio.run(run(tmp))
        finally:
            if redis is not None:
                redis.terminate()
                redis.wait(30)


def _cpu_of(proc: subprocess.Popen | None) -> float:
    """User + system CPU seconds of a child process so far (0 without one)."""
    from bench.run import cpu_seconds

    return 0.0 if proc is None else cpu_seconds(proc.pid)


def _measure(root: Path, sessions: int, messages: int, store: str, step: bool) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.core_cpu", "--child", str(root), "--sessions", str(sessions),
                          "--messages", str(messages), "--store", store, *(["--step"] if step else [])], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout, measured alternately with this one")
    ap.add_argument("--sessions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--store", choices=["memory", "sqlite", "redis"], default="memory")
    ap.add_argument("--step", action="store_true", help="a lone unary Step (S = 1), not packed messages")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        args.sessions, args.messages = [1], max(args.messages, 3000)
    if args.child:
        print(json.dumps(_child(args.child, args.sessions[0], args.messages, args.store, args.step)))
        return
    roots = [("this", ROOT)] + ([("against", args.against.resolve())] if args.against else [])
    rounds = 3 if args.against else 1
    ort = "ONNX Runtime wall µs/chunk (inside its run)" if args.step else "ONNX Runtime CPU µs/chunk"
    print(f"| checkout | S | core wall µs/chunk | core CPU µs/chunk | {ort} | Python µs/chunk "
          "| ratio (ORT / core wall) | redis-server CPU µs/chunk |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for _ in range(rounds):
        for name, root in roots[::-1]:
            for s in args.sessions:
                m = _measure(root, s, args.messages, args.store, args.step)
                print(f"| {name} | {s} | {m['wall_us']:.1f} | {m['cpu_us']:.1f} | {m['ort_us']:.1f} | "
                      f"{m['cpu_us'] - m['ort_us']:.1f} | {m['ort_us'] / m['wall_us']:.2f} | "
                      + (f"{m['store_us']:.1f} |" if args.store == "redis" else "- |"), flush=True)


if __name__ == "__main__":
    main()
