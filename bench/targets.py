"""The hot path's targets in one run (BENCHMARKS.md, "Hot path, third pass"): each cell's ratio to
the in-process batched ONNX Runtime limit measured beside it (the better of one thread and ONNX
Runtime's default, as bench.run takes it), and a unary Step's p50 against the naive ONNX Runtime
server's. pylm, 512 tokens a session, full logits returned; C is the tokens of a chunk.

    python -m bench.targets
"""

from __future__ import annotations

import tempfile

from bench.run import _sequences, in_process, naive_server, over_grpc, recur_server

# (label, store, S, C, api)
CELLS = [("packed", "memory", 64, 1, "packed"), ("packed", "memory", 256, 1, "packed"),
         ("Stream", "memory", 64, 1, "stream"), ("packed", "memory", 64, 16, "packed"),
         ("packed", "sqlite-sync", 64, 16, "packed")]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"memory": recur_server("memory:"), "sqlite-sync": recur_server(f"sqlite:{tmp}/t.db"),
                   "naive": naive_server("ort")}
        try:
            one = _sequences(1, 2048, seed=7)
            for _ in range(2):
                naive = over_grpc(servers["naive"], "step", one, 1, "step", 8)
                ours = over_grpc(servers["memory"], "step", one, 1, "step", 8)
                print(f"unary Step S=1 C=1 p50: recur {ours.p(50):.3f} ms, naive ort {naive.p(50):.3f} ms, "
                      f"ratio {ours.p(50) / naive.p(50):.2f}", flush=True)
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
