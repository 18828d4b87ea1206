"""The load generator for the v2 row, run in the tritonclient venv (tritonclient needs protobuf < 7):
S sequences on one ModelStreamInfer stream, each sending its next C-token chunk (full logits asked
for) when the previous reply arrives. Prints one JSON line: tokens, seconds, latencies (ms).

    .venv-tritonclient/bin/python bench/v2_client.py TARGET S C LENGTH
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as tc


def main() -> None:
    target, sessions, chunk, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    seqs = np.random.default_rng(0).integers(0, 98, (sessions, length))
    client = tc.InferenceServerClient(target)
    pos, sent_at, latencies, errors = [0] * sessions, [0.0] * sessions, [], []
    finished = threading.Event()
    remaining = [sessions]

    def send(i: int) -> None:
        tokens = seqs[i : i + 1, pos[i] : pos[i] + chunk].astype(np.int64)
        inp = tc.InferInput("tokens", list(tokens.shape), "INT64")
        inp.set_data_from_numpy(tokens)
        sent_at[i] = time.perf_counter()
        client.async_stream_infer("pylm", [inp], outputs=[tc.InferRequestedOutput("logits")],
                                  request_id=f"{i}:{pos[i]}", sequence_id=i + 1, sequence_start=pos[i] == 0,
                                  sequence_end=pos[i] + chunk >= length)

    def on_reply(result: tc.InferResult | None, error: Exception | None) -> None:
        if error is not None or result is None:
            errors.append(str(error))
            finished.set()
            return
        i = int(result.get_response().id.split(":")[0])
        latencies.append((time.perf_counter() - sent_at[i]) * 1e3)
        assert result.as_numpy("logits").shape == (1, chunk, 98)
        pos[i] += chunk
        if pos[i] < length:
            send(i)
        else:
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.set()

    client.start_stream(callback=on_reply)
    t0 = time.perf_counter()
    for i in range(sessions):
        send(i)
    finished.wait(600)
    seconds = time.perf_counter() - t0
    client.stop_stream()
    if errors:
        raise SystemExit(f"v2 errors: {errors[:3]}")
    print(json.dumps({"tokens": sum(pos), "seconds": seconds, "latencies_ms": latencies}))


if __name__ == "__main__":
    main()
