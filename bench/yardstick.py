"""The yardstick: NOT recur. The least a grpc.aio server must do to answer recur.v1's packed calls
(CreateSession, StepPacked, StreamPacked) on one model, so that the benchmarks show what the Python
gRPC stack itself allows next to what recur does.

Everything a real server adds is taken away: no store, no replay record, no locks, no metrics, no
auth, no limits, no health. The states live in one preallocated array per state tensor (a row per
session, up to --capacity sessions); a message costs one dict lookup per session id, one offset
compare over the column, one gather, one ONNX Runtime call (default threads), one scatter.

The ONNX Runtime call runs on the event loop on purpose: nothing awaits between the gather and the
scatter, so two messages naming the same session cannot interleave, and no lock is needed. The
price is that parsing the next message waits for the call (recur overlaps them).

What it does not do (a message that needs it is answered wrongly or refused whole, never per chunk):
chunks of different lengths in one message, a session named twice in one message, features, top_k,
final_only, activations, replays of a retried chunk. An offset mismatch refuses the whole message
(FAILED_PRECONDITION), an unknown session NOT_FOUND.

    python -m bench.yardstick --model models/pylm/1 --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc


class Refused(Exception):
    """A message the yardstick will not run, with the gRPC code to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Yardstick(recur_pb2_grpc.RecurServicer):
    """One model's sessions as rows of preallocated state arrays; see the module docstring for what
    it leaves out."""

    def __init__(self, model_dir: Path, capacity: int) -> None:
        manifest = json.loads((model_dir / "manifest.json").read_text())
        self.name, self.version = manifest["name"], manifest["version"]
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.input = manifest["input"]["name"]
        self.outputs = [manifest["head"]["output"], *(s["output"] for s in manifest["state"])]
        self.state_names = [s["name"] for s in manifest["state"]]
        self.axes = [s["shape"].index("batch") for s in manifest["state"]]
        # one array per state tensor, the batch axis `capacity` long: e.g. (layers, capacity, hidden)
        self.states = [np.zeros([capacity if d == "batch" else d for d in s["shape"]], np.float32)
                       for s in manifest["state"]]
        self.offsets = np.zeros(capacity, np.int64)
        self.rows: dict[str, int] = {}

    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
                            ) -> pb.Session:
        if len(self.rows) == len(self.offsets):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the yardstick is full (--capacity)")
        sid = request.session_id or uuid.uuid4().hex
        self.rows[sid] = len(self.rows)
        return pb.Session(session_id=sid, model=self.name, version=self.version)

    def step(self, r: pb.PackedStepBatch) -> pb.PackedStepBatchResponse:
        n = len(r.session_ids)
        if n == 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "no chunks")
        try:
            rows = np.fromiter((self.rows[s] for s in r.session_ids), np.intp, n)
            tokens = np.frombuffer(r.tokens, "<i4").reshape(n, r.lengths[0])  # (S, C): all chunks one length
        except KeyError as e:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no session {e}") from None
        except (ValueError, IndexError):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "tokens do not fit S chunks of lengths[0]") from None
        start = self.offsets[rows]
        if r.expected_offsets:
            expected = np.asarray(r.expected_offsets)
            if ((expected >= 0) & (expected != start)).any():
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "offset mismatch")
        feeds = {self.input: tokens.astype(np.int64)}
        feeds.update((name, np.take(state, rows, axis)) for name, state, axis in
                     zip(self.state_names, self.states, self.axes))
        logits, *new = self.session.run(self.outputs, feeds)  # logits (S, C, classes)
        for state, axis, value in zip(self.states, self.axes, new):
            state[(slice(None),) * axis + (rows,)] = value
        end = start + tokens.shape[1]
        self.offsets[rows] = end
        logits = logits.reshape(n * tokens.shape[1], -1)  # (S * C, classes): chunk i's rows in order
        out = pb.PackedStepBatchResponse(offsets=end.tolist(), start_offsets=start.tolist(), request_id=r.request_id,
                                         argmax=logits.argmax(-1).astype("<i4").tobytes())
        if r.return_logits:
            out.logits = logits.astype("<f4", copy=False).tobytes()
            out.logits_shape.extend(logits.shape)
        return out

    async def StepPacked(self, request: pb.PackedStepBatch, context: grpc.aio.ServicerContext
                         ) -> pb.PackedStepBatchResponse:
        try:
            return self.step(request)
        except Refused as e:
            await context.abort(e.code, str(e))
            raise  # abort raises; this line is for the type checker

    async def StreamPacked(self, request_iterator: AsyncIterator[pb.PackedStepBatch],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PackedStepBatchResponse]:
        async for request in request_iterator:
            try:
                yield self.step(request)
            except Refused as e:
                await context.abort(e.code, str(e))


async def serve(model_dir: Path, port: int, capacity: int) -> None:
    server = grpc.aio.server()
    recur_pb2_grpc.add_RecurServicer_to_server(Yardstick(model_dir, capacity), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"yardstick listening on port {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a model version folder: model.onnx, manifest.json")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--capacity", type=int, default=8192, help="sessions; the state arrays are allocated for this many")
    args = p.parse_args()
    asyncio.run(serve(args.model, args.port, args.capacity))


if __name__ == "__main__":
    main()
