"""The Open Inference Protocol (KServe v2) messages and the core's types: the one place they meet.

Tensors follow each model's manifest: the input `tokens` (INT64 or INT32, shape [1, T]) or `features`
(FP32, [1, T, D]), in typed contents or raw_input_contents; the outputs `logits` (FP32 [1, T, V]) and
the state tensors under the manifest's state names (`state_h`, `state_c`: FP32 [layers, 1, hidden], the
state after the request), returned in raw_output_contents as Triton does. A request names the
outputs it wants; none named means `logits` alone.

Sequence parameters are Triton's: `sequence_id` (int64, uint64 or string; 0 or "" for none),
`sequence_start` and `sequence_end` (bool)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from recur.kserve import grpc_service_pb2 as pb
from service.core.outputs import OutputOptions
from service.errors import InvalidInput
from service.repository.models import Model
from service.types import StepResult

LOGITS = "logits"
PLATFORM = "onnxruntime_onnx"
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END = "sequence_id", "sequence_start", "sequence_end"
SEQUENCE_OFFSET = "sequence_offset"  # response parameter: the sequence's offset after the request
SESSION_PREFIX = "v2-"  # a sequence is the recur session "v2-<sequence_id>" of the caller's tenant
_INT_DTYPES = {"INT64": "<i8", "INT32": "<i4"}
MAX_RANK = 8


@dataclass(frozen=True)
class Sequence:
    """A request's sequence parameters; `id` is "" for a stateless (one-shot) request."""

    id: str
    start: bool
    end: bool

    @property
    def session_id(self) -> str:
        return SESSION_PREFIX + self.id


@dataclass(frozen=True)
class Chunk:
    """A request's input as the core takes it, and what it asked back."""

    tokens: list[int]
    features: bytes
    steps: int
    outputs: list[str]  # output names, in the order asked


def _param(p: pb.InferParameter) -> bool | int | float | str | None:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def version_from_pb(version: str) -> int:
    """A v2 model version string ("" for the latest) as the core's number (0 for the latest)."""
    if not version:
        return 0
    if not version.isdigit() or len(version) > 9:
        raise InvalidInput(f"model_version must be a positive integer or empty (the latest), not {version[:32]!r}")
    return int(version)


def sequence_from_pb(r: pb.ModelInferRequest) -> Sequence:
    params = r.parameters
    raw = _param(params[SEQUENCE_ID]) if SEQUENCE_ID in params else None
    if raw is None or raw == 0 or raw == "":
        seq_id = ""
    elif isinstance(raw, bool) or not isinstance(raw, int | str):
        raise InvalidInput("parameter sequence_id must be an int64, uint64 or string")
    else:
        seq_id = str(raw)
        if len(seq_id) > 120 or not all(c.isascii() and (c.isalnum() or c in "._:@-") for c in seq_id):
            raise InvalidInput("a string sequence_id must be 1-120 characters of letters, digits and . _ : @ -")
    flags = []
    for name in (SEQUENCE_START, SEQUENCE_END):
        value = _param(params[name]) if name in params else False
        if not isinstance(value, bool):
            raise InvalidInput(f"parameter {name} must be a bool")
        flags.append(value)
    return Sequence(seq_id, flags[0], flags[1])


def _input_spec(model: Model) -> tuple[str, str, list[int]]:
    """The model's input as v2 describes it: name, datatype, shape (-1 for the time axis)."""
    if model.input_kind == "features":
        return "features", "FP32", [1, -1, model.feature_dim]
    return "tokens", "INT64", [1, -1]


def output_specs(model: Model) -> list[tuple[str, str, list[int]]]:
    return [(LOGITS, "FP32", [1, -1, model.classes]),
            *((s.name, "FP32", [s.layers, 1, s.hidden]) for s in model.states)]


def model_metadata_to_pb(model: Model, versions: list[int]) -> pb.ModelMetadataResponse:
    name, dtype, shape = _input_spec(model)
    T = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name, versions=[str(v) for v in versions], platform=PLATFORM,
        inputs=[T(name=name, datatype=dtype, shape=shape)],
        outputs=[T(name=n, datatype=d, shape=s) for n, d, s in output_specs(model)],
    )


def _shape_text(shape: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def chunk_from_pb(r: pb.ModelInferRequest, model: Model) -> Chunk:
    """The request's one input tensor checked against the model: name, datatype, shape, then contents
    (sizes before any per-element work)."""
    name, _, spec_shape = _input_spec(model)
    shape_text = "[1, T]" if name == "tokens" else f"[1, T, {model.feature_dim}]"
    wants = f"{'INT64 or INT32' if name == 'tokens' else 'FP32'} {shape_text}"
    if len(r.inputs) != 1 or r.inputs[0].name != name:
        raise InvalidInput(f"model {model.name} takes one input {name!r} ({wants}); "
                           f"got {[i.name[:64] for i in r.inputs[:8]]}")
    t = r.inputs[0]
    if t.datatype not in (_INT_DTYPES if name == "tokens" else ("FP32",)):
        raise InvalidInput(f"input {name!r} of model {model.name} must be {wants}, not datatype {t.datatype[:16]!r}")
    shape = [int(d) for d in t.shape]
    if (len(shape) != len(spec_shape) or shape[0] != 1 or shape[1] < 1
            or any(w != -1 and d != w for d, w in zip(shape, spec_shape))):
        raise InvalidInput(f"input {name!r} of model {model.name} must have shape {shape_text} "
                           f"(one sequence of T >= 1 steps), got {_shape_text(shape[:MAX_RANK])}")
    n, steps = math.prod(shape), shape[1]
    itemsize = 4 if t.datatype in ("FP32", "INT32") else 8
    if r.raw_input_contents:
        if len(r.raw_input_contents) != 1 or t.HasField("contents"):
            raise InvalidInput("give the input's data once: one raw_input_contents entry, or typed contents")
        raw = r.raw_input_contents[0]
        if len(raw) != n * itemsize:
            raise InvalidInput(f"input {name!r}: {len(raw)} bytes of raw_input_contents do not hold {t.datatype} "
                               f"of shape {_shape_text(shape)} ({n * itemsize} bytes)")
        if name == "features":
            return Chunk([], bytes(raw), steps, _outputs(r, model))
        return Chunk(np.frombuffer(raw, dtype=_INT_DTYPES[t.datatype]).tolist(), b"", steps, _outputs(r, model))
    field = "fp32_contents" if name == "features" else "int64_contents" if t.datatype == "INT64" else "int_contents"
    count = len(getattr(t.contents, field))
    if count != n:
        raise InvalidInput(f"input {name!r}: {count} values in contents.{field} do not fill shape "
                           f"{_shape_text(shape)} ({n} values)")
    if name == "features":
        return Chunk([], np.asarray(t.contents.fp32_contents, dtype="<f4").tobytes(), steps, _outputs(r, model))
    ints = t.contents.int64_contents if t.datatype == "INT64" else t.contents.int_contents
    return Chunk(list(ints), b"", steps, _outputs(r, model))


def _outputs(r: pb.ModelInferRequest, model: Model) -> list[str]:
    """The outputs asked for: a set of the model's outputs (a name given twice is refused, as Triton does)."""
    known = [n for n, _, _ in output_specs(model)]
    if len(r.outputs) > len(known):  # a count before any loop over them: more must repeat or be unknown
        raise InvalidInput(f"model {model.name} has {len(known)} outputs {known}; the request names {len(r.outputs)}")
    names = [o.name for o in r.outputs] or [LOGITS]
    for n in names:
        if n not in known:
            raise InvalidInput(f"model {model.name} has no output {n[:64]!r}; its outputs are {known}")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidInput(f"outputs name each output at most once; {twice[:64]!r} is named more than once")
    return names


def options_of(outputs: list[str]) -> OutputOptions:
    """What the core is asked for to answer these outputs: the logits, and the state when one is named."""
    return OutputOptions(return_logits=True, compact=True, return_state=any(n != LOGITS for n in outputs))


def infer_to_pb(r: pb.ModelInferRequest, model: Model, result: StepResult, outputs: list[str]
                ) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=r.id)
    out.parameters[SEQUENCE_OFFSET].int64_param = result.offset
    states = {t.name: t.value for t in result.state or []}
    for name in outputs:
        if name == LOGITS:
            assert result.logits is not None
            value = result.logits[None]  # (1, T, V)
        else:
            value = states[name][:, None]  # (layers, 1, hidden)
        out.outputs.add(name=name, datatype="FP32", shape=list(value.shape))
        out.raw_output_contents.append(np.ascontiguousarray(value, dtype="<f4").tobytes())
    return out


def stream_error_to_pb(r: pb.ModelInferRequest | None, message: str) -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse()
    if r is not None:
        response.id, response.model_name, response.model_version = r.id, r.model_name, r.model_version
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)
