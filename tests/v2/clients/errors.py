"""Refusals as tritonclient surfaces them, printed as JSON: {case: [status, message]}; on a stream
the error_message arrives through the callback and the stream carries on."""

from __future__ import annotations

import json
import queue

import numpy as np
from common import args, client, make_input
from tritonclient.utils import InferenceServerException

a = args()
c = client(a)
model, name = a["model"], a["input_name"]
tokens = np.array([1, 2, 3], dtype=np.int64)
out: dict[str, list] = {}


def case(label: str, model_name: str, inputs: list, **kw: object) -> None:
    try:
        c.infer(model_name, inputs, **kw)
        out[label] = ["OK", ""]
    except InferenceServerException as e:
        out[label] = [e.status(), e.message()]


case("unknown model", "no-such-model", [make_input(name, tokens, "INT64")])
case("unknown model in a sequence", "no-such-model", [make_input(name, tokens, "INT64")], sequence_id=7,
     sequence_start=True)
case("missing start", model, [make_input(name, tokens, "INT64")], sequence_id=123456)
case("missing start (string id)", model, [make_input(name, tokens, "INT64")], sequence_id="never-started")
case("wrong dtype", model, [make_input(name, tokens, "FP32")])
bad = make_input(name, tokens, "INT64")
bad.set_shape([3])
bad.set_data_from_numpy(tokens)
case("wrong shape", model, [bad])
case("wrong input name", model, [make_input("features", tokens, "INT64")])
case("token out of range", model, [make_input(name, np.array([10**6]), "INT64")], sequence_id=99, sequence_start=True)
case("after a refused start", model, [make_input(name, tokens, "INT64")], sequence_id=99)

results: queue.Queue = queue.Queue()
c.start_stream(callback=lambda result, error: results.put((result, error)))
c.async_stream_infer(model, [make_input(name, tokens, "INT64")], request_id="s1", sequence_id=5555)
c.async_stream_infer(model, [make_input(name, tokens, "INT64")], request_id="s2", sequence_id=5555,
                     sequence_start=True)
c.async_stream_infer(model, [make_input(name, tokens, "FP32")], request_id="s3", sequence_id=5555)
c.async_stream_infer(model, [make_input(name, tokens, "INT64")], request_id="s4", sequence_id=5555,
                     sequence_end=True)
stream = []
for _ in range(4):
    result, error = results.get(timeout=60)
    stream.append(["error", str(error)] if error is not None else
                  ["ok", result.get_response().id, result.get_response().parameters["sequence_offset"].int64_param])
c.stop_stream()
out["stream"] = stream
print(json.dumps(out))
