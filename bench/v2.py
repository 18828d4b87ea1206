"""The Open Inference Protocol row: tritonclient's ModelStreamInfer at S = 64, C = 16 (full logits)
against recur's native Stream with full logits, same server, same run. Needs the tritonclient venv
(`make test` or `make bench` builds it).

    python -m bench.v2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time

import numpy as np

from bench.run import ROOT, _drive, machine, recur_server, write_section

TRITON_PYTHON = ROOT / ".venv-tritonclient" / "bin" / "python"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--no-write", action="store_true", help="print the figures; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    sessions, chunk, length = args.sessions, args.chunk, args.length
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    server = recur_server("memory:")
    try:
        seqs = np.random.default_rng(0).integers(0, 98, (sessions, length))
        native = asyncio.run(_drive(server.port, seqs, chunk, "stream", check=sessions, budget=120))
        out = subprocess.run([str(TRITON_PYTHON), str(ROOT / "bench" / "v2_client.py"), f"127.0.0.1:{server.port}",
                              str(sessions), str(chunk), str(length)], capture_output=True, text=True, timeout=900,
                             check=True).stdout
    finally:
        server.stop()
    v2 = json.loads(out.strip().splitlines()[-1])
    v2_rate = v2["tokens"] / v2["seconds"]
    p50, p99 = np.percentile(v2["latencies_ms"], [50, 99])
    rows = [("recur Stream (native, full logits)", native.rate, native.p(50), native.p(99)),
            ("ModelStreamInfer (tritonclient, full logits)", v2_rate, p50, p99)]
    table = "\n".join(f"| {name} | {rate:,.0f} | {a:.2f} | {b:.2f} |" for name, rate, a, b in rows)
    section = (f"## Open Inference Protocol\n\nMeasured {started} on {machine()}. Command: `python -m bench.v2` "
               f"(in `make bench`). S = {sessions}, C = {chunk}, {length} tokens a sequence, pylm, memory store; "
               "the native rows' logits are checked against a one-pass reference, the v2 client checks shapes. "
               "Both load generators share the 2 cores with the server.\n\n"
               "| path | tokens/s | p50 chunk ms | p99 chunk ms |\n|---|---:|---:|---:|\n" + table +
               f"\n\nv2 / native: {v2_rate / native.rate:.2f}.\n")
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "## Open Inference Protocol", section)


if __name__ == "__main__":
    main()
