"""The Open Inference Protocol at the boundary: outputs are a set, replays are kept in the store (they
survive a restart and another replica; any other tenant's load is tests/core/test_sequences.py's), and
hundreds of concurrent calls on one tritonclient channel are served."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from recur.kserve import grpc_service_pb2 as pb
from recur.kserve import grpc_service_pb2_grpc
from tests.helpers import Redis, Server, refused

MODEL = "gru-lm"


def _infer(tokens: list[int], seq: int | str, start: bool = False, rid: str = "",
           outputs: list[str] | None = None) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=MODEL, id=rid)
    r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)]).contents.int64_contents.extend(tokens)
    r.parameters["sequence_id"].string_param = str(seq)
    r.parameters["sequence_start"].bool_param = start
    for name in outputs or []:
        r.outputs.add(name=name)
    return r


def _offset(r: pb.ModelInferResponse) -> int:
    return r.parameters["sequence_offset"].int64_param


def _stub(target: str) -> tuple[grpc.Channel, grpc_service_pb2_grpc.GRPCInferenceServiceStub]:
    ch = grpc.insecure_channel(target)
    return ch, grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)


def test_an_output_named_twice_is_refused_before_anything_runs(v2_server: Server) -> None:
    ch, stub = _stub(v2_server.target)
    with ch:
        stub.ModelInfer(_infer([1, 2], "twice", start=True), timeout=10)
        for names in (["logits"] * 4000, ["logits", "state_h", "logits"]):
            t = time.perf_counter()
            refused(lambda: stub.ModelInfer(_infer([1] * 4096, "twice", outputs=names), timeout=10),  # noqa: B023
                    grpc.StatusCode.INVALID_ARGUMENT)
            assert time.perf_counter() - t < 1.0
        assert _offset(stub.ModelInfer(_infer([3], "twice", outputs=["logits", "state_h"]), timeout=10)) == 3


def _retry_is_replayed(stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, seq: str,
                       md: tuple = ()) -> None:
    """Sequence `seq` got request "b" (offset 2 -> 5) last: its retry answers offset 5, applies nothing."""
    again = stub.ModelInfer(_infer([4, 5, 6], seq, rid="b"), metadata=md, timeout=10)
    assert _offset(again) == 5
    assert _offset(stub.ModelInfer(_infer([7], seq, rid="c"), metadata=md, timeout=10)) == 6


def _start(stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, seq: str, md: tuple = ()) -> np.ndarray:
    stub.ModelInfer(_infer([1, 2], seq, start=True, rid="a"), metadata=md, timeout=10)
    b = stub.ModelInfer(_infer([4, 5, 6], seq, rid="b"), metadata=md, timeout=10)
    assert _offset(b) == 5
    return np.frombuffer(b.raw_output_contents[0], "<f4")


def test_a_retry_after_a_restart_is_replayed(tiny_models: Path, tmp_path: Path) -> None:
    server = Server(tiny_models, f"sqlite:{tmp_path / 'recur.db'}").start()
    try:
        ch, stub = _stub(server.target)
        with ch:
            first = _start(stub, "r1")
            # the same id with other inputs is not a retry: refused, nothing applied
            refused(lambda: stub.ModelInfer(_infer([9], "r1", rid="b"), timeout=10),
                    grpc.StatusCode.FAILED_PRECONDITION, "other inputs")
        server.kill()
        server.start()
        ch, stub = _stub(server.target)
        with ch:
            again = stub.ModelInfer(_infer([4, 5, 6], "r1", rid="b"), timeout=10)
            assert _offset(again) == 5
            assert np.abs(np.frombuffer(again.raw_output_contents[0], "<f4") - first).max() <= 1e-6
            # a retry of a start that was applied is a replay too, not a reset
            stub.ModelInfer(_infer([1, 2], "r2", start=True, rid="s"), timeout=10)
            assert _offset(stub.ModelInfer(_infer([1, 2], "r2", start=True, rid="s"), timeout=10)) == 2
            assert _offset(stub.ModelInfer(_infer([1], "r2", rid="t"), timeout=10)) == 3
    finally:
        server.kill()


def test_a_retry_on_another_replica_is_replayed(tiny_models: Path, tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = Redis(tmp_path / "redis").start()
    a, b = Server(tiny_models, redis.url).start(), Server(tiny_models, redis.url).start()
    try:
        cha, stub_a = _stub(a.target)
        chb, stub_b = _stub(b.target)
        with cha, chb:
            _start(stub_a, "moved")
            _retry_is_replayed(stub_b, "moved")
    finally:
        a.kill()
        b.kill()
        redis.kill()


def test_120_concurrent_tritonclient_calls_on_one_channel(v2_server: Server, triton: Callable[..., str]) -> None:
    out = triton("many_calls.py", target=v2_server.target, model=MODEL, calls=120, steps=4)
    assert json.loads(out) == [8] * 120
