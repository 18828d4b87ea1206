"""The Prometheus /metrics endpoint of a real server: exact counts after a scripted workload."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recur.kserve import grpc_service_pb2 as kpb
from recur.kserve import grpc_service_pb2_grpc
from recur.v1 import recur_pb2 as pb
from tests.helpers import Server

MODEL = "lstm-lm"


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _infer(tokens: list[int], seq: int, start: bool = False) -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(model_name=MODEL)
    r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)]).contents.int64_contents.extend(tokens)
    r.parameters["sequence_id"].int64_param = seq
    r.parameters["sequence_start"].bool_param = start
    return r


def test_exact_counts_after_a_scripted_workload(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:")
    assert server.metrics_port > 0
    with server.client() as c:
        a = c.create(MODEL, session_id="a").session_id
        c.step(a, tokens=[1, 2, 3], expected_offset=0)
        c.step(a, tokens=[4, 5], expected_offset=3)
        assert c.step(a, tokens=[4, 5], expected_offset=3).replayed  # a retry: replayed, nothing applied
        with pytest.raises(grpc.RpcError) as e:
            c.step(a, tokens=[6], expected_offset=0)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as e:
            c.step("missing", tokens=[1])
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        b = c.create(MODEL, session_id="b").session_id
        assert len(c.stream_sequence(b, list(range(1, 33)), chunk=16)) == 2
        assert len(list(c.generate(a, max_tokens=4))) == 4
        c.fork(a, new_session_id="a2")
        c.delete(b)
        batch = list(c.stub.StreamBatch(iter([pb.StepBatch(steps=[
            pb.StepRequest(session_id="a2", tokens=[7, 8]), pb.StepRequest(session_id="gone", tokens=[1])])])))
        assert batch[0].steps[1].status.code == grpc.StatusCode.NOT_FOUND.value[0]
    with grpc.insecure_channel(server.target) as ch:
        v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        v2.ModelInfer(_infer([1, 2, 3, 4], 7, start=True), timeout=10)
        v2.ModelInfer(_infer([5], 7), timeout=10)

    m = scrape(server)
    t = {"tenant": "default"}
    assert value(m, "recur_chunks_total", rpc="Step", **t) == 3
    assert value(m, "recur_tokens_total", rpc="Step", **t) == 5
    assert value(m, "recur_chunks_total", rpc="Stream", **t) == 2
    assert value(m, "recur_tokens_total", rpc="Stream", **t) == 32
    assert value(m, "recur_chunks_total", rpc="Generate", **t) == 1
    assert value(m, "recur_tokens_total", rpc="Generate", **t) == 4
    assert value(m, "recur_generated_tokens_total", **t) == 4
    assert value(m, "recur_chunks_total", rpc="StreamBatch", **t) == 1
    assert value(m, "recur_tokens_total", rpc="StreamBatch", **t) == 2
    assert value(m, "recur_chunks_total", rpc="ModelInfer", **t) == 2
    assert value(m, "recur_tokens_total", rpc="ModelInfer", **t) == 5
    mvt = {"model": MODEL, "version": "1", **t}
    assert value(m, "recur_replays_total", **mvt) == 1
    assert value(m, "recur_offset_conflicts_total", **mvt) == 1
    assert value(m, "recur_errors_total", rpc="Step", code="FAILED_PRECONDITION") == 1
    assert value(m, "recur_errors_total", rpc="Step", code="NOT_FOUND") == 1
    assert value(m, "recur_errors_total", rpc="StreamBatch", code="NOT_FOUND") == 1
    assert value(m, "recur_sessions_created_total", **mvt) == 4  # a, b, the fork a2, v2 sequence 7
    assert value(m, "recur_sessions_deleted_total", **t) == 1
    assert value(m, "recur_sessions_live") == 3  # a, a2, v2-7
    assert value(m, "recur_step_duration_seconds_count", rpc="Step") == 3
    assert value(m, "recur_engine_batch_sessions_count") >= 1
    assert value(m, "recur_engine_call_duration_seconds_count") == value(m, "recur_engine_batch_sessions_count")
    assert value(m, "recur_store_read_duration_seconds_count") > 0
    assert value(m, "recur_store_write_duration_seconds_count") > 0
    assert value(m, "recur_engine_queue_depth") == 0
    assert value(m, "recur_open_streams", rpc="Stream") == 0
    assert value(m, "recur_process_resident_memory_bytes") > 0
    assert not any(name.startswith("recur_sessions_evicted") for name, _ in m)  # recur never evicts: no such metric
    assert not any("session" in k for _, labels in m for k, _ in labels)  # never a session id as a label


def test_sqlite_group_commit_and_write_behind_lag(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store=f"sqlite:{tmp_path / 'm.db'}", extra=["--durability", "async"])
    with server.client() as c:
        s = c.create(MODEL).session_id
        c.step(s, tokens=[1, 2])
    m = scrape(server)
    assert value(m, "recur_store_group_commit_writes_count") >= 1
    assert value(m, "recur_store_group_commit_writes_sum") >= 1
    assert 0 <= value(m, "recur_store_write_behind_lag_seconds") < 60
    assert value(m, "recur_sessions_live") == 1


def test_metrics_port_zero_turns_the_endpoint_off(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:", extra=["--metrics-port", "0"])
    assert server.metrics_port == 0
    assert not any(line.startswith("metrics on port") for line in server.log)


def test_packed_messages_count_their_chunks_and_steps(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(store="memory:")
    with server.client() as c:
        sids = [c.create(MODEL).session_id for _ in range(3)]
        first = c.step_packed(sids, [np.array([1, 2, 3], np.int32)] * 3, expected_offsets=[0] * 3)
        assert not first.errors
        # chunk 0 replayed (0 steps), chunk 1 applied (2 steps), chunk 2 refused for its offset
        c.step_packed(sids, [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32), np.array([6], np.int32)],
                      expected_offsets=[0, 3, 0])
    m = scrape(server)
    assert value(m, "recur_chunks_total", rpc="StepPacked", tenant="default") == 5
    assert value(m, "recur_tokens_total", rpc="StepPacked", tenant="default") == 11
    assert value(m, "recur_errors_total", rpc="StepPacked", code="FAILED_PRECONDITION") == 1
    assert value(m, "recur_engine_cpu_seconds_total") > 0
