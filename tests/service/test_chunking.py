"""Invariant 1: a sequence fed in any split, over Step, Stream, StreamBatch and the packed batch, gives one
pass's outputs and state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recur.client import RecurClient, packed_request
from recur.v1 import recur_pb2 as pb
from tests.helpers import TOL, Server, logits_of, state_of

MODELS = ["lstm-lm", "gru-tagger", "rnn-lm", "lstm-classifier", "gru-classifier"]


@pytest.fixture(scope="module")
def shared(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecurClient]:
    server = Server(tiny_models, f"sqlite:{tmp_path_factory.mktemp('chunking') / 'recur.db'}").start()
    with server.client() as c:
        yield c
    server.kill()


@st.composite
def splits(draw: st.DrawFn) -> tuple[str, int, list[int], list[str], int]:
    model = draw(st.sampled_from(MODELS))
    length = draw(st.integers(1, 120))
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=12))) if length > 1 else []
    apis = ["Step", "Stream", "StreamBatch", "StepPacked", "StreamPacked"]
    via = draw(st.lists(st.sampled_from(apis), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    return model, length, cuts, via, draw(st.integers(0, 2**31))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=splits())
def test_any_split_equals_one_pass(shared: RecurClient, reference, case) -> None:  # type: ignore[no-untyped-def]
    model, length, cuts, via, seed = case
    ref = reference(model)
    rng = np.random.default_rng(seed)
    features = ref.manifest["input"]["kind"] == "features"
    x = rng.random((length, 8), dtype=np.float32) if features else rng.integers(0, 98, length)
    sid = shared.create(model).session_id
    parts = []
    for (a, b), api in zip(zip([0, *cuts], [*cuts, length]), via):
        body = {"features": x[a:b].astype("<f4").tobytes()} if features else {"tokens": [int(t) for t in x[a:b]]}
        req = pb.StepRequest(session_id=sid, expected_offset=a, return_logits=True, return_state=True, **body)
        if api in ("StepPacked", "StreamPacked"):
            packed = packed_request([sid], [x[a:b]], expected_offsets=[a], return_logits=True)
            got = shared.stub.StepPacked(packed) if api == "StepPacked" else \
                next(shared.stub.StreamPacked(iter([packed])))
            assert not got.failed and list(got.offsets) == [b] and list(got.start_offsets) == [a]
            parts.append(logits_of(got))
            continue
        if api == "Step":
            reply = shared.stub.Step(req)
        elif api == "Stream":
            reply = next(shared.stub.Stream(iter([req])))
        else:
            reply = next(shared.stub.StreamBatch(iter([pb.StepBatch(steps=[req])]))).steps[0]
        assert not reply.HasField("status") and reply.offset == b
        parts.append(logits_of(reply))
    want_logits, want_state = ref.run(x.astype(np.float32) if features else x.astype(np.int64))
    assert np.abs(np.concatenate(parts) - want_logits).max() <= TOL
    for got, want in zip(state_of(shared.get(sid, include_state=True)), want_state):
        assert np.abs(got - want).max() <= TOL
