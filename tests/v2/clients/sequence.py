"""Feed x[from:to] of one sequence with `infer` in random chunks, Triton's sequence parameters on each
request; each chunk is also retried once with the same request id (a replay). Writes an .npz: the
logits of the fed steps, the offsets the server reported, the replays' logits and the final states."""

from __future__ import annotations

import numpy as np
from common import args, client, make_input, offset_of, outputs

a = args()
c = client(a)
x = np.load(a["input"])
rng = np.random.default_rng(a["seed"])
pos, stop = a["from"], a["to"]
logits, offsets, replay_diffs = [], [], []
states: dict[str, np.ndarray] = {}
first = True
while pos < stop:
    n = int(min(stop - pos, rng.integers(1, a.get("max_chunk", 300) + 1)))
    last = pos + n == stop
    inp = make_input(a["input_name"], x[pos : pos + n], a.get("dtype", "INT64"))
    names = ["logits", *a["states"]] if last else ["logits"]
    kw = dict(sequence_id=a["sequence_id"], sequence_start=first and a["start"], sequence_end=last and a["end"],
              request_id=f"r{pos}", outputs=outputs(names))
    r = c.infer(a["model"], [inp], **kw)
    logits.append(r.as_numpy("logits")[0])
    offsets.append(offset_of(r))
    if not (last and a["end"]):  # a retry of the same request id is answered again, not applied again
        again = c.infer(a["model"], [inp], **kw)
        replay_diffs.append(float(np.abs(again.as_numpy("logits") - r.as_numpy("logits")).max()))
        assert offset_of(again) == offsets[-1], (offset_of(again), offsets[-1])
    if last:
        states = {s: r.as_numpy(s) for s in a["states"]}
    first = False
    pos += n
np.savez(a["out"], logits=np.concatenate(logits), offsets=np.array(offsets), replay_diffs=np.array(replay_diffs),
         **{f"state_{k}": v for k, v in states.items()})
