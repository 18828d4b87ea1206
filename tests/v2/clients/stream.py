"""Several sequences interleaved on one ModelStreamInfer stream (start_stream + async_stream_infer),
each in random chunks with sequence_start / sequence_end; replies are matched by request id.
Writes an .npz with each sequence's logits (seq<i>) and its final states (seq<i>_<state>)."""

from __future__ import annotations

import queue

import numpy as np
from common import args, client, make_input, offset_of, outputs

a = args()
c = client(a)
xs = [np.load(p) for p in a["inputs"]]
ids = a["sequence_ids"]
rng = np.random.default_rng(a["seed"])
plans = []  # per sequence: its chunk boundaries
for x in xs:
    cuts, pos = [], 0
    while pos < len(x):
        n = int(min(len(x) - pos, rng.integers(1, 200)))
        cuts.append((pos, pos + n))
        pos += n
    plans.append(cuts)
results: queue.Queue = queue.Queue()
c.start_stream(callback=lambda result, error: results.put((result, error)))
sent = 0
for step in range(max(len(p) for p in plans)):
    for i, cuts in enumerate(plans):  # round robin: the sequences' chunks interleave on the stream
        if step >= len(cuts):
            continue
        lo, hi = cuts[step]
        last = step == len(cuts) - 1
        c.async_stream_infer(a["model"], [make_input(a["input_name"], xs[i][lo:hi], "INT64")],
                             request_id=f"{i}:{step}", sequence_id=ids[i], sequence_start=step == 0,
                             sequence_end=last, outputs=outputs(["logits", *a["states"]] if last else ["logits"]))
        sent += 1
got: dict[str, object] = {}
for _ in range(sent):
    result, error = results.get(timeout=120)
    assert error is None, str(error)
    got[result.get_response().id] = result
c.stop_stream()
out = {}
for i, cuts in enumerate(plans):
    rs = [got[f"{i}:{s}"] for s in range(len(cuts))]
    assert [offset_of(r) for r in rs] == [hi for _, hi in cuts]
    out[f"seq{i}"] = np.concatenate([r.as_numpy("logits")[0] for r in rs])
    for s in a["states"]:
        out[f"seq{i}_{s}"] = rs[-1].as_numpy(s)
np.savez(a["out"], **out)
