"""The state arena, measured before building it: what gathering a batch's states and scattering the
new ones back costs per chunk today (one small array per session, np.stack in, one copy per session
out) against a preallocated per-model arena [layers, capacity, hidden] (one fancy index in, one
assignment out), for pylm's state (2 tensors of 2 x 256) at S sessions per call.

    python -m bench.arena
"""

from __future__ import annotations

import sys
import time

import numpy as np

LAYERS, HIDDEN, TENSORS = 2, 256, 2


def per_session(s: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    states = [[rng.random((LAYERS, HIDDEN), dtype=np.float32) for _ in range(TENSORS)] for _ in range(s)]
    t0 = time.perf_counter()
    for _ in range(reps):
        batch = [np.stack([st[k] for st in states], axis=1) for k in range(TENSORS)]  # gather
        new = [b + 0 for b in batch]  # stands for ONNX Runtime's outputs
        states = [[np.ascontiguousarray(n[:, j]) for n in new] for j in range(s)]  # scatter: a copy each
    return (time.perf_counter() - t0) / reps / s


def arena(s: int, reps: int, capacity: int = 100_000) -> float:
    rng = np.random.default_rng(0)
    arenas = [np.zeros((LAYERS, capacity, HIDDEN), np.float32) for _ in range(TENSORS)]
    slots = rng.choice(capacity, size=s, replace=False)
    t0 = time.perf_counter()
    for _ in range(reps):
        batch = [a[:, slots] for a in arenas]  # gather: one fancy index per tensor
        new = [b + 0 for b in batch]
        for a, n in zip(arenas, new):  # scatter: one assignment per tensor
            a[:, slots] = n
    return (time.perf_counter() - t0) / reps / s


def main() -> None:
    reps = 50 if "--quick" in sys.argv else 400
    print("| S | per-session arrays µs/chunk | arena µs/chunk | saved µs/chunk |")
    print("|---:|---:|---:|---:|")
    for s in (64, 256):
        a = min(per_session(s, reps) for _ in range(3)) * 1e6
        b = min(arena(s, reps) for _ in range(3)) * 1e6
        print(f"| {s} | {a:.1f} | {b:.1f} | {a - b:.1f} |")


if __name__ == "__main__":
    main()
