"""The hot path's targets in one run (BENCHMARKS.md, "Hot path, third pass"): each cell's ratio to
the in-process batched ONNX Runtime limit measured beside it (the better of one thread and ONNX
Runtime's default, as bench.run takes it), and a unary Step's p50 against the naive ONNX Runtime
server's. pylm, 512 tokens a session, full logits returned; C is the tokens of a chunk.

The unary cell is split: the naive server on grpcio's thread pool (the target's baseline), on
grpc.aio (recur's server framework), on grpc.aio with recur's per-call `x-recur-replica` header, and
recur, whose time inside its Step handler (recur_step_duration_seconds) is read from its /metrics.

    python -m bench.targets
"""

from __future__ import annotations

import re
import tempfile
import urllib.request

from bench.run import Process, _sequences, in_process, naive_server, over_grpc, recur_server

# (label, store, S, C, api)
CELLS = [("packed", "memory", 64, 1, "packed"), ("packed", "memory", 256, 1, "packed"),
         ("Stream", "memory", 64, 1, "stream"), ("packed", "memory", 64, 16, "packed"),
         ("packed", "sqlite-sync", 64, 16, "packed")]


def step_handler_seconds(server: Process) -> tuple[float, float]:
    """recur_step_duration_seconds of the Step RPC from the server's /metrics: (sum, count)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    total = [sum(float(v) for v in re.findall(rf'^recur_step_duration_seconds_{part}{{[^}}]*rpc="Step"[^}}]*}} (\S+)$',
                                               text, re.M)) for part in ("sum", "count")]
    return total[0], total[1]


def unary(servers: dict[str, Process]) -> None:
    """A unary Step's p50 on each server, one session, 2,048 1-token Steps a pass, 2 passes."""
    one = _sequences(1, 2048, seed=7)
    for _ in range(2):
        p50 = {name: over_grpc(servers[name], "step", one, 1, "step", 8).p(50)
               for name in ("naive", "naive aio", "naive aio+header")}
        before = step_handler_seconds(servers["memory"])
        p50["recur"] = over_grpc(servers["memory"], "step", one, 1, "step", 8).p(50)
        after = step_handler_seconds(servers["memory"])
        handler = 1000 * (after[0] - before[0]) / max(after[1] - before[1], 1)
        print(f"unary Step S=1 C=1 p50: recur {p50['recur']:.3f} ms, naive ort {p50['naive']:.3f} ms, "
              f"ratio {p50['recur'] / p50['naive']:.2f}", flush=True)
        print(f"  split: naive on grpc.aio {p50['naive aio']:.3f} ms, with the replica header "
              f"{p50['naive aio+header']:.3f} ms; recur's Step handler (core and conversions) {handler:.3f} ms "
              "a call (mean)", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"memory": recur_server("memory:"), "sqlite-sync": recur_server(f"sqlite:{tmp}/t.db"),
                   "naive": naive_server("ort"), "naive aio": naive_server("ort", "--aio"),
                   "naive aio+header": naive_server("ort", "--aio", "--header")}
        try:
            unary(servers)
            for label, store, s, c, api in CELLS:
                seqs = _sequences(s, 512, seed=s * 100 + c)
                # the limit as bench.run takes it: the better of one ONNX Runtime thread and its default
                limit = max(in_process(seqs, c, batched=True, threads=1), in_process(seqs, c, batched=True, threads=0),
                            key=lambda r: r.rate)
                r = over_grpc(servers[store], api, seqs, c, api, 20)
                print(f"{label:7} {store:12} S={s:<4} C={c:<3} {r.rate:9,.0f} tok/s | limit {limit.rate:9,.0f} | "
                      f"ratio {r.rate / limit.rate:.2f}", flush=True)
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
