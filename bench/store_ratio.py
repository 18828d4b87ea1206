"""The durable store's cost over gRPC: SQLite with sync durability (or Redis, `--store redis`) against
the memory store, packed messages of S sessions and C tokens (pylm, 512 tokens a session, full logits,
the Python client of bench.run), both servers started side by side, each cell measured in turn.

    python -m bench.store_ratio                            # this checkout
    python -m bench.store_ratio --against ../old-checkout  # A/B: alternating runs of both, 2 each
    python -m bench.store_ratio --quick                    # a smoke run: S = 4, C = 2, 16 tokens
    python -m bench.store_ratio --store redis              # a local redis-server, as the compose file runs it

Each run is its own process started in its checkout (that checkout's `service` and `bench.run`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = [(64, 16), (64, 1), (256, 1)]  # (S, C)

_CHILD = """
import json, subprocess, sys, tempfile
from bench.run import _sequences, over_grpc, recur_server
from bench.redis_store import _free_port, _wait_port
out, redis = [], None
with tempfile.TemporaryDirectory() as tmp:
    if sys.argv[3] == "redis":  # as bench.redis_store.start_redis, which an older checkout lacks
        port = _free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
                                  "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                                 stdout=subprocess.DEVNULL)
        _wait_port(port, redis)
    url = f"redis://127.0.0.1:{port}/0" if redis else f"sqlite:{tmp}/t.db"
    servers = {"memory": recur_server("memory:"), "durable": recur_server(url)}
    try:
        for s, c in json.loads(sys.argv[1]):
            seqs = _sequences(s, int(sys.argv[2]), seed=s * 100 + c)
            rates = {k: over_grpc(p, "packed", seqs, c, "packed", 20).rate for k, p in servers.items()}
            out.append({"S": s, "C": c, **rates})
    finally:
        for p in servers.values():
            p.stop()
        if redis:
            redis.terminate()
print(json.dumps(out))
"""


def _measure(root: Path, cells: list[tuple[int, int]], length: int, store: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cells), str(length), store], cwd=root,
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout, measured alternately with this one")
    ap.add_argument("--quick", action="store_true", help="a smoke run: S = 4, C = 2, 16 tokens a session")
    ap.add_argument("--store", choices=["sqlite", "redis"], default="sqlite", help="the durable store measured")
    args = ap.parse_args()
    cells, length = ([(4, 2)], 16) if args.quick else (CELLS, 512)
    roots = [("this", ROOT)] + ([("against", args.against.resolve())] if args.against else [])
    durable = "SQLite sync" if args.store == "sqlite" else "Redis"
    print(f"| checkout | S | C | memory tok/s | {durable} tok/s | {durable} / memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for _ in range(2 if args.against else 1):
        for name, root in roots[::-1]:
            for m in _measure(root, cells, length, args.store):
                print(f"| {name} | {m['S']} | {m['C']} | {m['memory']:,.0f} | {m['durable']:,.0f} | "
                      f"{m['durable'] / m['memory']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
