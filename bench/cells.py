"""A few key cells of the throughput table, for an A/B between two checkouts on one machine (run it
from each, alternately: the machines are noisy). Memory store, pylm, 512 tokens a session.

    python -m bench.cells
"""

from __future__ import annotations

from bench.run import _sequences, in_process, over_grpc, recur_server

CELLS = [(1, 1, "stream"), (64, 1, "batch"), (64, 1, "stream"), (64, 16, "batch"), (64, 16, "stream")]


def main() -> None:
    server = recur_server("memory:")
    try:
        for s, c, api in CELLS:
            seqs = _sequences(s, 512, seed=s * 100 + c)
            limit = in_process(seqs, c, batched=True)
            r = over_grpc(server, api, seqs, c, api, 30)
            print(f"S={s} C={c} {api:7} {r.rate:8,.0f} tok/s p50 {r.p(50):7.3f} ms | limit {limit.rate:8,.0f} "
                  f"tok/s | ratio {r.rate / limit.rate:.2f}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
