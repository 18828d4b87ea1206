"""Fuzzing a real server: generated requests for every RPC (valid and invalid mixed), raw bytes that
do not parse, and truncated HTTP/2 frames. No INTERNAL or UNKNOWN, the server never dies, and a
refused chunk never changes its session."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recur.client import RecurClient
from recur.v1 import recur_pb2 as pb
from tests.helpers import Server

BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SENT = {"requests": 0}
MODELS = ["lstm-lm", "gru-tagger", "rnn-classifier", "nope", ""]

int32 = st.integers(-(2**31), 2**31 - 1)
small = st.integers(-3, 120)
tokens = st.lists(st.one_of(st.integers(0, 97), small, int32), max_size=40)
texts = st.text(max_size=40)
floats = st.binary(max_size=80)


@pytest.fixture(scope="module")
def fuzzed(tiny_models, tmp_path_factory) -> Iterator[tuple[Server, RecurClient, list[str]]]:  # type: ignore[no-untyped-def]
    db = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    server = Server(tiny_models, f"sqlite:{db}", ["--max-chunk", "64", "--max-generate-tokens", "8",
                                                  "--max-sessions", "100000"]).start()
    client = RecurClient(server.target, timeout=20)
    ids = [client.create(m, session_id=f"f-{m}").session_id for m in MODELS[:3]]
    client.step(ids[0], text="x")
    yield server, client, ids
    client.close()
    assert server.proc is not None and server.proc.poll() is None, "the server died"
    server.kill()


def _ids(ids: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ids), st.text(max_size=12), st.sampled_from(["", "x" * 200, "a\n", "ghost"]))


# activation selections, repeats included (a repeated layer, unit or state is refused, never multiplied)
selections = st.tuples(st.booleans(), st.lists(st.integers(-4, 4), max_size=6),
                       st.lists(st.integers(-2, 20), max_size=6),
                       st.lists(st.sampled_from(["h", "c", "x", ""]), max_size=3))


def _step(ids: list[str]) -> st.SearchStrategy[pb.StepRequest]:
    return st.builds(
        lambda sid, kind, toks, text, feats, off, k, flags, acts: pb.StepRequest(
            session_id=sid, tokens=toks if kind & 1 else [], text=text if kind & 2 else "",
            features=feats if kind & 4 else b"", top_k=k, return_logits=flags[0], final_only=flags[1],
            return_state=flags[2], compact=flags[3], return_activations=acts[0], activation_layers=acts[1],
            activation_units=acts[2], activation_states=acts[3],
            **({} if off is None else {"expected_offset": off})),
        _ids(ids), st.integers(0, 7), tokens, texts, floats, st.one_of(st.none(), st.integers(-5, 70), int32),
        st.integers(-2, 200), st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()), selections)


def _tensor() -> st.SearchStrategy[pb.Tensor]:
    return st.builds(lambda n, shape, data: pb.Tensor(name=n, shape=shape, data=data),
                     st.sampled_from(["state_h", "state_c", "x", ""]),
                     st.lists(st.one_of(st.integers(-2, 20), st.integers(0, 2**62)), max_size=4),
                     st.one_of(st.binary(max_size=200), st.just(bytes(2 * 16 * 4))))


def _expect(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    SENT["requests"] += 1
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() not in BAD, f"{e.code()}: {e.details()}"
        return e.code()


def _offsets(c: RecurClient, ids: list[str]) -> list[tuple[int, bytes]]:
    out = []
    for sid in ids:
        s = c.get(sid, include_state=True)
        out.append((s.offset, b"".join(t.data for t in s.state)))
    return out


def test_generated_requests_for_every_rpc(fuzzed) -> None:  # type: ignore[no-untyped-def]
    server, c, ids = fuzzed
    stub = c.stub
    from recur.kserve import grpc_service_pb2 as v2
    from recur.kserve import grpc_service_pb2_grpc

    v2_stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(c.channel)

    @settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        step = data.draw(_step(ids))
        before = _offsets(c, ids)
        code = _expect(lambda: stub.Step(step, timeout=20))
        if code != grpc.StatusCode.OK:
            assert _offsets(c, ids) == before, (code, step)  # a refused chunk changed nothing
        batch = data.draw(st.lists(_step(ids), max_size=4))
        SENT["requests"] += len(batch)
        for reply in stub.Stream(iter(batch), timeout=20):
            assert reply.status.code not in {grpc.StatusCode.INTERNAL.value[0], grpc.StatusCode.UNKNOWN.value[0]}, \
                reply.status.message
        for r in stub.StreamBatch(iter([pb.StepBatch(steps=batch)]), timeout=20):
            assert all(s.status.code not in (13, 2) for s in r.steps)
        sid = data.draw(_ids(ids))
        _expect(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid, include_state=data.draw(
            st.booleans())), timeout=20))
        _expect(lambda: stub.CreateSession(pb.CreateSessionRequest(
            model=data.draw(st.sampled_from(MODELS)), version=data.draw(st.integers(-2, 3)),
            session_id=data.draw(st.one_of(st.just(""), st.text(max_size=10))),
            ttl_seconds=data.draw(st.one_of(st.integers(-10, 10**7), st.integers(-(2**63), 2**63 - 1))),
            initial_state=data.draw(st.lists(_tensor(), max_size=3))), timeout=20))
        _expect(lambda: stub.ForkSession(pb.ForkSessionRequest(
            session_id=sid, new_session_id=data.draw(st.text(max_size=8)),
            ttl_seconds=data.draw(st.integers(-5, 10**8))), timeout=20))
        _expect(lambda: list(stub.Generate(pb.GenerateRequest(
            session_id=sid, prompt=data.draw(texts), max_tokens=data.draw(st.integers(-1, 12)),
            temperature=data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32)),
            top_k=data.draw(st.integers(-3, 200)), top_p=data.draw(st.floats(-1, 2, width=32)),
            stop=data.draw(st.one_of(st.lists(texts, max_size=2), st.lists(st.text(max_size=200), max_size=80)))),
            timeout=20)))
        acts = data.draw(selections)
        packed_ids = data.draw(st.lists(_ids(ids), max_size=3))
        lengths = data.draw(st.lists(st.integers(0, 6), min_size=len(packed_ids), max_size=len(packed_ids)))
        _expect(lambda: stub.StepPacked(pb.PackedStepBatch(
            session_ids=packed_ids, lengths=lengths, tokens=bytes(4 * sum(lengths)), top_k=data.draw(small),
            return_logits=data.draw(st.booleans()), return_activations=acts[0], activation_layers=acts[1],
            activation_units=acts[2], activation_states=acts[3]), timeout=20))
        infer = v2.ModelInferRequest(model_name=data.draw(st.sampled_from(MODELS)))
        n = data.draw(st.integers(0, 5))
        infer.inputs.add(name="tokens", datatype="INT64", shape=[1, n]).contents.int64_contents.extend([1] * n)
        for name in data.draw(st.lists(st.sampled_from(["logits", "state_h", "state_c", "nope"]), max_size=5)):
            infer.outputs.add(name=name)
        _expect(lambda: v2_stub.ModelInfer(infer, timeout=20))
        if sid not in ids:
            _expect(lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=20))
        _expect(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=20))

    run()
    assert server.proc is not None and server.proc.poll() is None


def test_raw_bytes_and_truncated_frames(fuzzed) -> None:  # type: ignore[no-untyped-def]
    server, c, ids = fuzzed
    from recur.kserve import grpc_service_pb2 as v2

    methods = {f"/recur.v1.Recur/{name}": reply for name, reply in (
        ("Step", pb.StepResponse), ("CreateSession", pb.Session), ("GetSession", pb.Session),
        ("ForkSession", pb.Session), ("DeleteSession", pb.DeleteSessionResponse),
        ("ListModels", pb.ListModelsResponse))}
    methods.update({f"/inference.GRPCInferenceService/{name}": reply for name, reply in (
        ("ModelInfer", v2.ModelInferResponse), ("ModelMetadata", v2.ModelMetadataResponse),
        ("ModelReady", v2.ModelReadyResponse), ("ServerMetadata", v2.ServerMetadataResponse))})

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(method=st.sampled_from(sorted(methods)), blob=st.binary(max_size=64))
    def run(method: str, blob: bytes) -> None:
        call = c.channel.unary_unary(method, request_serializer=lambda b: b,
                                     response_deserializer=methods[method].FromString)
        _expect(lambda: call(blob, timeout=20))

    run()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    frames = [b"", preface, preface + b"\x00\x00\x12\x04", preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
              + b"\x00\x10\x00\x01\x05\x00\x00\x00\x01\x83\x86", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256))]
    for frame in frames:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                s.recv(4096)
        SENT["requests"] += 1
    assert server.proc is not None and server.proc.poll() is None
    assert c.get(ids[0]).offset >= 1  # still serving
    print(f"fuzz: {SENT['requests']} requests sent")
    assert SENT["requests"] >= 5000
