"""The one place where wire messages meet the core's types, in paired to/from functions."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from recur.v1 import recur_pb2 as pb
from service.core.outputs import MAX_SELECTION, MAX_STOP_STRINGS, ActivationRequest, OutputOptions
from service.core.packed import PackedInput, PackedResult
from service.errors import InvalidInput
from service.repository.models import Model, Refusal
from service.store.base import SessionSummary
from service.types import GeneratedToken, GenerateInput, NamedTensor, SessionView, StepInput, StepResult


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


MAX_TENSOR_RANK = 8
MAX_TENSOR_DIM = 1 << 20  # no state dimension comes near; numpy refuses some huge empty shapes


def tensor_from_pb(t: pb.Tensor) -> NamedTensor:
    if len(t.shape) > MAX_TENSOR_RANK:
        raise InvalidInput(f"tensor {t.name[:64]!r} has {len(t.shape)} dimensions; at most {MAX_TENSOR_RANK}")
    shape = tuple(int(d) for d in t.shape)
    n = math.prod(shape)  # Python integers: a huge declared shape cannot overflow
    if any(d < 0 or d > MAX_TENSOR_DIM for d in shape) or len(t.data) != 4 * n:
        raise InvalidInput(f"tensor {t.name[:64]!r}: {len(t.data)} bytes do not hold float32 of shape "
                           f"{list(shape)}")
    return NamedTensor(t.name, np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32))


def tensor_to_pb(t: NamedTensor) -> pb.Tensor:
    return pb.Tensor(name=t.name, shape=list(t.value.shape), data=np.ascontiguousarray(t.value, dtype="<f4").tobytes())


def model_to_pb(m: Model, live_sessions: int = -1) -> pb.ModelInfo:
    return pb.ModelInfo(
        live_sessions=live_sessions,
        name=m.name, version=m.version, cell=m.cell, head=m.head, input_kind=m.input_kind,
        feature_dim=m.feature_dim, vocabulary=m.vocab, unk_id=-1 if m.unk_id is None else m.unk_id,
        labels=m.labels, layers=m.states[0].layers, hidden_size=m.states[0].hidden, classes=m.classes,
        state=[pb.TensorSpec(name=s.name, shape=[s.layers, -1, s.hidden], dtype="float32") for s in m.states],
        metrics=m.metrics,
    )


def live_sessions(counts: dict[tuple[str, int], int] | None, m: Model) -> int:
    """A version's live sessions from a store's count_by_model (-1: the store does not count them)."""
    return -1 if counts is None else counts.get((m.name, m.version), 0)


def refusal_to_pb(r: Refusal) -> pb.RefusedModel:
    return pb.RefusedModel(path=r.path, name=r.name, version=r.version, reason=r.reason)


def session_to_pb(v: SessionView) -> pb.Session:
    return pb.Session(
        session_id=v.session_id, tenant=v.tenant, model=v.model, version=v.version, offset=v.offset,
        created_at=_ts(v.created_at), updated_at=_ts(v.updated_at), expires_at=_ts(v.expires_at),
        state=[tensor_to_pb(t) for t in v.state or []],
    )


def summary_to_pb(v: SessionSummary) -> pb.Session:
    return pb.Session(session_id=v.session_id, model=v.model, version=v.version, offset=v.offset,
                      created_at=_ts(v.created_at), updated_at=_ts(v.updated_at), expires_at=_ts(v.expires_at))


def sessions_to_pb(page: list[SessionSummary], next_token: str) -> pb.ListSessionsResponse:
    return pb.ListSessionsResponse(sessions=[summary_to_pb(v) for v in page], next_page_token=next_token)


def step_from_pb(r: pb.StepRequest, deadline: float | None = None) -> StepInput:
    return StepInput(
        session_id=r.session_id, tokens=r.tokens, text=r.text, features=r.features,
        expected_offset=r.expected_offset if r.HasField("expected_offset") else None,
        options=OutputOptions(top_k=r.top_k, return_logits=r.return_logits, final_only=r.final_only,
                              return_state=r.return_state, compact=r.compact, activations=_activations_from_pb(r)),
        deadline=deadline,
    )


def step_to_pb(r: StepResult, request_id: str = "") -> pb.StepResponse:
    out = pb.StepResponse(
        session_id=r.session_id, offset=r.offset, start_offset=r.start_offset, replayed=r.replayed, text=r.text,
        request_id=request_id, argmax=r.argmax,
        outputs=[pb.StepOutput(argmax=o.argmax, top_ids=o.top_ids, top_probs=o.top_probs, label=o.label, text=o.text)
                 for o in r.outputs],
        state=[tensor_to_pb(t) for t in r.state or []], activations=[tensor_to_pb(t) for t in r.activations or []],
    )
    if r.logits is not None:
        out.logits = np.ascontiguousarray(r.logits, dtype="<f4").tobytes()
        out.logits_shape.extend(r.logits.shape)
    return out


def _activations_from_pb(r: pb.StepRequest | pb.PackedStepBatch) -> ActivationRequest | None:
    if not r.return_activations:
        if r.activation_layers or r.activation_units or r.activation_states:
            raise InvalidInput("activation_layers, activation_units and activation_states need return_activations")
        return None
    n = max(len(r.activation_layers), len(r.activation_units), len(r.activation_states))
    if n > MAX_SELECTION:  # before copying them
        raise InvalidInput(f"an activation selection names at most {MAX_SELECTION} layers, units or states")
    return ActivationRequest(tuple(r.activation_layers), tuple(r.activation_units), tuple(r.activation_states))


def step_error_to_pb(r: pb.StepRequest, code: int, message: str) -> pb.StepResponse:
    return pb.StepResponse(session_id=r.session_id, request_id=r.request_id,
                           status=pb.ChunkStatus(code=code, message=message))


def packed_from_pb(r: pb.PackedStepBatch, deadline: float | None = None) -> PackedInput:
    return PackedInput(session_ids=r.session_ids, lengths=r.lengths, tokens=r.tokens, features=r.features,
                       expected_offsets=r.expected_offsets, return_logits=r.return_logits, final_only=r.final_only,
                       top_k=r.top_k, deadline=deadline, activations=_activations_from_pb(r))


def packed_to_pb(r: PackedResult, request_id: str, status: Callable[[Exception], tuple[int, str]]
                 ) -> pb.PackedStepBatchResponse:
    """The columnar reply; `status` maps a refused chunk's error to its (code, message)."""
    failed = sorted(r.errors)
    statuses = [pb.ChunkStatus(code=code, message=message) for code, message in (status(r.errors[i]) for i in failed)]
    out = pb.PackedStepBatchResponse(offsets=r.offsets.tolist(), start_offsets=r.start_offsets.tolist(), failed=failed,
                                     statuses=statuses, replayed=sorted(r.replayed), request_id=request_id,
                                     argmax=r.argmax.astype("<i4", copy=False).tobytes())
    if r.logits is not None:
        out.logits = np.ascontiguousarray(r.logits, dtype="<f4").tobytes()
        out.logits_shape.extend(r.logits.shape)
    out.activations.extend(tensor_to_pb(t) for t in r.activations or [])
    if r.top_ids is not None and r.top_probs is not None:
        out.top_ids = np.ascontiguousarray(r.top_ids, dtype="<i4").tobytes()
        out.top_probs = np.ascontiguousarray(r.top_probs, dtype="<f4").tobytes()
    return out


def packed_error_to_pb(request_id: str, code: int, message: str, n: int) -> pb.PackedStepBatchResponse:
    """A whole PackedStepBatch refused (it does not parse, or its columns do not fit): every chunk
    gets the same status."""
    return pb.PackedStepBatchResponse(offsets=[-1] * n, start_offsets=[-1] * n, failed=list(range(n)),
                                      statuses=[pb.ChunkStatus(code=code, message=message)] * n,
                                      request_id=request_id)


def generate_from_pb(r: pb.GenerateRequest) -> GenerateInput:
    if len(r.stop) > MAX_STOP_STRINGS:  # before copying them
        raise InvalidInput(f"stop holds at most {MAX_STOP_STRINGS} strings; got {len(r.stop)}")
    return GenerateInput(
        session_id=r.session_id, prompt=r.prompt, prompt_tokens=list(r.prompt_tokens),
        max_tokens=r.max_tokens or 16, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        seed=r.seed if r.HasField("seed") else None, stop=list(r.stop),
        expected_offset=r.expected_offset if r.HasField("expected_offset") else None,
    )


def generated_to_pb(g: GeneratedToken) -> pb.GenerateResponse:
    return pb.GenerateResponse(token=g.token, text=g.text, offset=g.offset, done=g.done, finish_reason=g.finish_reason)
