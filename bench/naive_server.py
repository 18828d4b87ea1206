"""The baselines: the server a typical user would write first. grpcio, one unary call per chunk,
a dict of states, no batching; the model in PyTorch eager (--engine torch) or in ONNX Runtime with
its default threads (--engine ort). Kept here to measure recur against.

    python -m bench.naive_server --model models/pylm/1 --port 50061 [--engine ort] [--aio [--header]]

`--aio` serves the same methods from grpc.aio's server (each runs on the event loop, as recur's do),
and `--header` adds what recur sends every caller it knows: an `x-recur-replica` initial-metadata
header, which grpc.aio sends as an operation of its own. Together they split a unary Step's latency
into the server framework's share, the header's and recur's own (bench.targets).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from training.export import model_from_repository


class NaiveServicer(recur_pb2_grpc.RecurServicer):
    def __init__(self, model_dir: Path) -> None:
        self.model = model_from_repository(model_dir)
        self.name = model_dir.parent.name
        self.states: dict[str, tuple] = {}
        self.offsets: dict[str, int] = {}

    def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        sid = request.session_id or uuid.uuid4().hex
        self.states[sid] = self.model.initial_state(1)
        self.offsets[sid] = 0
        return pb.Session(session_id=sid, model=self.name, version=1)

    def Step(self, request, context):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            x = torch.tensor([list(request.tokens)], dtype=torch.long)
            logits, self.states[request.session_id] = self.model(x, self.states[request.session_id])
        self.offsets[request.session_id] += x.shape[1]
        argmax = logits[0].argmax(-1).tolist()
        out = pb.StepResponse(session_id=request.session_id, offset=self.offsets[request.session_id], argmax=argmax)
        if not request.compact:
            out.outputs.extend(pb.StepOutput(argmax=a) for a in argmax)
        if request.return_logits:
            out.logits = logits[0].numpy().astype("<f4").tobytes()
            out.logits_shape.extend(logits[0].shape)
        return out


class NaiveOrtServicer(recur_pb2_grpc.RecurServicer):
    """The same, with ONNX Runtime: a dict of numpy states, one session.run per unary call."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.name = model_dir.parent.name
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.shapes = [(i.shape[0], 1, i.shape[2]) for i in self.session.get_inputs()[1:]]
        self.states: dict[str, list[np.ndarray]] = {}
        self.offsets: dict[str, int] = {}

    def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        sid = request.session_id or uuid.uuid4().hex
        self.states[sid] = [np.zeros(s, np.float32) for s in self.shapes]
        self.offsets[sid] = 0
        return pb.Session(session_id=sid, model=self.name, version=1)

    def Step(self, request, context):  # type: ignore[no-untyped-def]
        sid = request.session_id
        x = np.array([list(request.tokens)], dtype=np.int64)
        logits, *self.states[sid] = self.session.run(None, dict(zip(self.inputs, [x, *self.states[sid]])))
        self.offsets[sid] += x.shape[1]
        out = pb.StepResponse(session_id=sid, offset=self.offsets[sid], argmax=logits[0].argmax(-1).tolist())
        if request.return_logits:
            out.logits = logits[0].astype("<f4").tobytes()
            out.logits_shape.extend(logits[0].shape)
        return out


class AioServicer(recur_pb2_grpc.RecurServicer):
    """A naive servicer's CreateSession and Step on grpc.aio: run inline on the event loop."""

    def __init__(self, inner: recur_pb2_grpc.RecurServicer, header: bool) -> None:
        self.inner, self.header = inner, (("x-recur-replica", "naive"),) if header else None

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        return self.inner.CreateSession(request, context)

    async def Step(self, request, context):  # type: ignore[no-untyped-def]
        if self.header is not None:
            await context.send_initial_metadata(self.header)
        return self.inner.Step(request, context)


async def serve_aio(servicer: recur_pb2_grpc.RecurServicer, port: int) -> None:
    server = grpc.aio.server()
    recur_pb2_grpc.add_RecurServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"recur listening on port {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--engine", choices=["torch", "ort"], default="torch")
    p.add_argument("--aio", action="store_true", help="serve from grpc.aio's server, not grpcio's thread pool")
    p.add_argument("--header", action="store_true", help="with --aio: send an x-recur-replica header per call")
    args = p.parse_args()
    torch.set_num_threads(1)
    servicer = NaiveServicer(args.model) if args.engine == "torch" else NaiveOrtServicer(args.model)
    if args.aio:
        asyncio.run(serve_aio(AioServicer(servicer, args.header), args.port))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    recur_pb2_grpc.add_RecurServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"recur listening on port {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
