"""The baselines: the server a typical user would write first. grpcio, one unary call per chunk,
a dict of states, no batching; the model in PyTorch eager (--engine torch) or in ONNX Runtime with
its default threads (--engine ort). Kept here to measure recur against.

    python -m bench.naive_server --model models/pylm/1 --port 50061 [--engine ort]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--engine", choices=["torch", "ort"], default="torch")
    args = p.parse_args()
    torch.set_num_threads(1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = NaiveServicer(args.model) if args.engine == "torch" else NaiveOrtServicer(args.model)
    recur_pb2_grpc.add_RecurServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"recur listening on port {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
