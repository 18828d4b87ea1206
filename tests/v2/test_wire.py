"""The v2 service over the wire with the project's own stubs (recur/kserve): typed contents, one port
with recur.v1, health and reflection, API keys and tenants, and the sequence rules."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recur.client import RecurClient
from recur.kserve import grpc_service_pb2 as pb
from recur.kserve import grpc_service_pb2_grpc
from service.auth import add_key
from tests.helpers import TOL, Server, refused

MODEL = "gru-lm"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("v2auth") / "keys.json"
    return path, {"acme": add_key(path, "acme"), "globex": add_key(path, "globex")}


@pytest.fixture(scope="module")
def server(tiny_models: Path, keys: tuple[Path, dict[str, str]]) -> Iterator[Server]:
    s = Server(tiny_models, "memory:", ["--auth-keys", str(keys[0])]).start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def _stub(channel: grpc.Channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _infer(tokens: list[int], seq: int | str | None = None, start: bool = False, end: bool = False, rid: str = "",
           model: str = MODEL) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, id=rid)
    r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)]).contents.int64_contents.extend(tokens)
    if seq is not None:
        if isinstance(seq, str):
            r.parameters["sequence_id"].string_param = seq
        else:
            r.parameters["sequence_id"].int64_param = seq
        r.parameters["sequence_start"].bool_param = start
        r.parameters["sequence_end"].bool_param = end
    return r


def _logits(r: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(r.raw_output_contents[0], "<f4").reshape(tuple(r.outputs[0].shape))


def test_same_port_health_and_reflection(server: Server, channel: grpc.Channel) -> None:
    assert _stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live  # no key needed
    assert _stub(channel).ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    listing = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert {"inference.GRPCInferenceService", "recur.v1.Recur"} <= names


def test_api_keys_and_tenants(channel: grpc.Channel, keys: tuple[Path, dict[str, str]], reference) -> None:  # type: ignore[no-untyped-def]
    stub, acme, globex = _stub(channel), _auth(keys[1]["acme"]), _auth(keys[1]["globex"])
    refused(lambda: stub.ModelInfer(_infer([1, 2]), timeout=10), grpc.StatusCode.UNAUTHENTICATED, "API key")
    refused(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED)
    x = np.random.default_rng(3).integers(0, reference(MODEL).manifest["input"]["vocab_size"], 30).tolist()
    first = stub.ModelInfer(_infer(x[:10], seq=1, start=True), metadata=acme, timeout=10)
    # another tenant's sequence 1 does not exist for globex, and globex may start its own
    refused(lambda: stub.ModelInfer(_infer(x[10:], seq=1), metadata=globex, timeout=10), grpc.StatusCode.NOT_FOUND,
            "sequence_start")
    other = stub.ModelInfer(_infer(x[:3], seq=1, start=True), metadata=globex, timeout=10)
    assert other.parameters["sequence_offset"].int64_param == 3
    rest = stub.ModelInfer(_infer(x[10:], seq=1, end=True), metadata=acme, timeout=10)
    assert rest.parameters["sequence_offset"].int64_param == 30
    want, _ = reference(MODEL).run(np.array(x))
    got = np.concatenate([_logits(first)[0], _logits(rest)[0]])
    assert np.abs(got - want).max() <= TOL


def test_sequence_rules(server: Server, channel: grpc.Channel, keys: tuple[Path, dict[str, str]]) -> None:
    stub, key = _stub(channel), _auth(keys[1]["acme"])
    stub.ModelInfer(_infer([1, 2, 3], seq="rules", start=True, rid="a"), metadata=key, timeout=10)
    # the same request id with other content is not a replay: refused, and nothing changes
    refused(lambda: stub.ModelInfer(_infer([4, 4, 4], seq="rules", rid="a"), metadata=key, timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION, "offset")
    # a continuing request names the sequence's model
    refused(lambda: stub.ModelInfer(_infer([1], seq="rules", model="lstm-lm"), metadata=key, timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "runs on model gru-lm")
    r = stub.ModelInfer(_infer([5], seq="rules", rid="b"), metadata=key, timeout=10)
    assert r.parameters["sequence_offset"].int64_param == 4 and r.id == "b"
    # a start resets the sequence
    r = stub.ModelInfer(_infer([5, 6], seq="rules", start=True, rid="c"), metadata=key, timeout=10)
    assert r.parameters["sequence_offset"].int64_param == 2
    with RecurClient(server.target, api_key=keys[1]["acme"]) as c:  # the native API sees the session v2-<id>
        assert c.get("v2-rules").offset == 2
    one = stub.ModelInfer(_infer([7, 8, 9]), metadata=key, timeout=10)
    assert one.parameters["sequence_offset"].int64_param == 3 and len(_logits(one)[0]) == 3
    stub.ModelInfer(_infer([1], seq="rules", end=True), metadata=key, timeout=10)
    refused(lambda: stub.ModelInfer(_infer([1], seq="rules"), metadata=key, timeout=10), grpc.StatusCode.NOT_FOUND,
            "sequence_start")


def test_stream_refusals_and_idle_timeout(tiny_models: Path) -> None:
    """On ModelStreamInfer a refusal is an error_message and the stream goes on; a stream with no
    message for --stream-idle-timeout is ended with DEADLINE_EXCEEDED."""
    server = Server(tiny_models, "memory:", ["--stream-idle-timeout", "1"]).start()
    done = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        yield _infer([1, 2], seq=9, rid="missing-start")
        yield _infer([1, 2], seq=9, start=True, rid="started")
        done.wait(10)  # then nothing: the server ends the stream

    try:
        with grpc.insecure_channel(server.target) as ch:
            replies = _stub(ch).ModelStreamInfer(requests(), timeout=30)
            first, second = next(replies), next(replies)
            assert "sequence_start" in first.error_message and first.infer_response.id == "missing-start"
            assert second.error_message == "" and second.infer_response.id == "started"
            assert second.infer_response.parameters["sequence_offset"].int64_param == 2
            refused(lambda: next(replies), grpc.StatusCode.DEADLINE_EXCEEDED, "--stream-idle-timeout")
    finally:
        done.set()
        server.kill()
