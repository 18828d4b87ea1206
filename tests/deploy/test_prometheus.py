"""A real Prometheus server (Debian's prometheus package; `make test` installs it through
deploy/ensure-packages) scraping the local topology's two replicas on their metrics ports, as
deploy/prometheus/prometheus.yml has it scrape the compose replicas: the chunks sent through nginx
are all counted, across both replicas, in `sum(recur_chunks_total)`, and every query of the Grafana
dashboard (deploy/grafana/dashboards/recur.json) is one Prometheus evaluates over series that exist."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from recur.client import RecurClient
from tests.helpers import Prometheus, Topology, refused

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prometheus(topology: Topology, tmp_path: Path) -> Iterator[Prometheus]:
    (tmp_path / "prometheus").mkdir()
    ports = [r.metrics_port for r in topology.replicas]
    assert all(ports), ports
    p = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}" for port in ports])
    yield p
    p.stop()


def _wait_for(prometheus: Prometheus, promql: str, want: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = prometheus.value(promql)
        if got == want:
            return
        time.sleep(0.25)
    targets = prometheus.query("up")
    by_instance = prometheus.query("sum by (instance) (recur_chunks_total)")
    raise AssertionError(f"{promql} = {got}, wanted {want} (after {timeout:.0f} s); up: {targets}; "
                         f"chunks by instance: {by_instance}")


def test_prometheus_counts_every_chunk_on_every_replica(topology: Topology, prometheus: Prometheus) -> None:
    _wait_for(prometheus, 'count(up{job="recur"} == 1)', 2)  # both replicas scraped
    sent = 0
    # Sessions through nginx (spread by its hash on x-session-id), and one on each replica directly,
    # so that both replicas count chunks whatever the hash does with a dozen ids.
    for target in [topology.nginx.target] * 12 + [r.target for r in topology.replicas]:
        with RecurClient(target, timeout=10) as c:
            sid = c.create("gru-lm", session_id=f"prom-{sent}").session_id
            for offset in range(0, 12, 4):
                c.step(sid, tokens=[1, 2, 3, 4], expected_offset=offset)
                sent += 1
    _wait_for(prometheus, "sum(recur_chunks_total)", sent)
    # Both replicas answered some of them, and each is its own series (one target per replica).
    per_replica = prometheus.query('sum by (instance) (recur_chunks_total{job="recur"})')
    assert len(per_replica) == 2 and all(float(r["value"][1]) > 0 for r in per_replica), per_replica


def test_the_dashboard_queries_what_the_replicas_export(topology: Topology, prometheus: Prometheus) -> None:
    _wait_for(prometheus, 'count(up{job="recur"} == 1)', 2)
    with RecurClient(topology.nginx.target, timeout=10) as c:
        for i in range(4):
            sid = c.create("gru-lm", session_id=f"dash-{i}").session_id
            c.step(sid, tokens=[1, 2, 3], expected_offset=0)
            c.stream_sequence(sid, list(range(1, 9)), chunk=4)  # a Stream: recur_open_streams
        # an offset conflict: recur_errors_total and recur_offset_conflicts_total get their series
        refused(lambda: c.step(sid, tokens=[1], expected_offset=0), grpc.StatusCode.FAILED_PRECONDITION)
    _wait_for(prometheus, 'sum(recur_errors_total{code="FAILED_PRECONDITION"})', 1)
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "recur.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            prometheus.query(target["expr"])  # valid PromQL (the API answers status "success")
            for metric in set(re.findall(r"\b(recur_[a-z_]+)", target["expr"])):
                series = prometheus.query(f"count({metric})")
                assert series, f"panel {panel['title']!r}: no series {metric}"
