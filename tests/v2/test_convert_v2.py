"""In process: the v2 conversions (service/transport/convert_v2.py) over the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recur.kserve import grpc_service_pb2 as pb
from service.engine.runtime import RuntimeOptions
from service.errors import InvalidInput
from service.repository.models import ModelRepository
from service.transport import convert_v2
from service.types import NamedTensor, StepResult


@pytest.fixture(scope="module")
def models(tiny_models: Path) -> ModelRepository:
    return ModelRepository.load(tiny_models, RuntimeOptions())


def _request(name: str, datatype: str, shape: list[int], **fields: object) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="m", id="x")
    t = r.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in fields.items():
        if field == "raw":
            r.raw_input_contents.append(values)  # type: ignore[arg-type]
        else:
            getattr(t.contents, field).extend(values)
    return r


def test_tokens_in_every_form(models: ModelRepository) -> None:
    m = models.get("lstm-lm")
    ids = [3, 1, 4, 1, 5]
    forms = [_request("tokens", "INT64", [1, 5], int64_contents=ids),
             _request("tokens", "INT32", [1, 5], int_contents=ids),
             _request("tokens", "INT64", [1, 5], raw=np.array(ids, dtype="<i8").tobytes()),
             _request("tokens", "INT32", [1, 5], raw=np.array(ids, dtype="<i4").tobytes())]
    for r in forms:
        chunk = convert_v2.chunk_from_pb(r, m)
        assert chunk.tokens == ids and chunk.features == b"" and chunk.steps == 5 and chunk.outputs == ["logits"]


def test_features_typed_and_raw(models: ModelRepository) -> None:
    m = models.get("lstm-classifier")
    x = np.arange(3 * m.feature_dim, dtype=np.float32) / 7
    typed = convert_v2.chunk_from_pb(_request("features", "FP32", [1, 3, m.feature_dim], fp32_contents=x.tolist()), m)
    raw = convert_v2.chunk_from_pb(_request("features", "FP32", [1, 3, m.feature_dim], raw=x.tobytes()), m)
    assert typed.features == raw.features == x.tobytes() and typed.steps == 3


@pytest.mark.parametrize(("request_", "words"), [
    (_request("tokens", "FP32", [1, 2], fp32_contents=[1, 2]), ["INT64 or INT32", "'FP32'"]),
    (_request("tokens", "INT64", [2, 2], int64_contents=[1, 2, 3, 4]), ["[1, T]", "[2, 2]"]),
    (_request("tokens", "INT64", [1, 0]), ["[1, T]", "T >= 1"]),
    (_request("tokens", "INT64", [1, 3], int64_contents=[1, 2]), ["2 values", "int64_contents", "3 values"]),
    (_request("tokens", "INT64", [1, 3], raw=b"\0" * 20), ["20 bytes", "24 bytes"]),
    (_request("text", "BYTES", [1, 3]), ["takes one input 'tokens'", "'text'"]),
])
def test_refusals_name_the_problem(models: ModelRepository, request_: pb.ModelInferRequest, words: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        convert_v2.chunk_from_pb(request_, models.get("lstm-lm"))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_feature_width_is_checked(models: ModelRepository) -> None:
    m = models.get("lstm-classifier")
    with pytest.raises(InvalidInput, match=rf"\[1, T, {m.feature_dim}\]"):
        convert_v2.chunk_from_pb(_request("features", "FP32", [1, 2, m.feature_dim + 1], raw=b""), m)


def test_outputs_are_filtered_and_checked(models: ModelRepository) -> None:
    m = models.get("lstm-lm")
    r = _request("tokens", "INT64", [1, 1], int64_contents=[1])
    r.outputs.add(name="state_c")
    r.outputs.add(name="logits")
    assert convert_v2.chunk_from_pb(r, m).outputs == ["state_c", "logits"]
    r.outputs.add(name="nope")
    with pytest.raises(InvalidInput, match="no output 'nope'"):
        convert_v2.chunk_from_pb(r, m)


def test_response_holds_raw_outputs_and_the_offset(models: ModelRepository) -> None:
    m = models.get("lstm-lm")
    logits = np.random.default_rng(0).standard_normal((4, m.classes)).astype(np.float32)
    state = [NamedTensor(s.name, np.full((s.layers, s.hidden), i, np.float32)) for i, s in enumerate(m.states)]
    result = StepResult("v2-1", 6, 10, False, [], [], "", logits, state)
    out = convert_v2.infer_to_pb(pb.ModelInferRequest(id="abc"), m, result, ["logits", "state_c"])
    assert out.id == "abc" and out.model_name == "lstm-lm" and out.model_version == "1"
    assert out.parameters["sequence_offset"].int64_param == 10
    assert [(o.name, o.datatype, list(o.shape)) for o in out.outputs] == [
        ("logits", "FP32", [1, 4, m.classes]), ("state_c", "FP32", [m.states[1].layers, 1, m.states[1].hidden])]
    assert np.frombuffer(out.raw_output_contents[0], "<f4").reshape(1, 4, -1)[0].tolist() == logits.tolist()
    assert set(np.frombuffer(out.raw_output_contents[1], "<f4").tolist()) == {1.0}


def _seq(**params: object) -> convert_v2.Sequence:
    r = pb.ModelInferRequest()
    for k, v in params.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(v)]
        setattr(r.parameters[k], field, v)
    return convert_v2.sequence_from_pb(r)


def test_sequence_parameters() -> None:
    assert _seq() == convert_v2.Sequence("", False, False)
    assert _seq(sequence_id=0, sequence_start=True) == convert_v2.Sequence("", True, False)
    assert _seq(sequence_id="").id == ""
    s = _seq(sequence_id=42, sequence_start=True, sequence_end=True)
    assert (s.id, s.start, s.end, s.session_id) == ("42", True, True, "v2-42")
    assert _seq(sequence_id="user:7@x").session_id == "v2-user:7@x"
    r = pb.ModelInferRequest()
    r.parameters["sequence_id"].uint64_param = 2**63 + 5
    assert convert_v2.sequence_from_pb(r).id == str(2**63 + 5)
    for bad, words in [(dict(sequence_id="has space"), "letters, digits"), (dict(sequence_id="x" * 121), "1-120"),
                       (dict(sequence_id=1.5), "int64, uint64 or string"),
                       (dict(sequence_id=3, sequence_start=1), "sequence_start must be a bool")]:
        with pytest.raises(InvalidInput, match=words):
            _seq(**bad)


def test_model_versions() -> None:
    assert convert_v2.version_from_pb("") == 0 and convert_v2.version_from_pb("3") == 3
    for bad in ("latest", "-1", "1.0", "9" * 12):
        with pytest.raises(InvalidInput, match="model_version"):
            convert_v2.version_from_pb(bad)
