"""docker-compose.yml's companions on a real engine: the TLS overlay (docker-compose.tls.yml) serving a
client that trusts the CA, and Prometheus discovering every replica by the service name."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from recur.client import RecurClient
from tests.containers.project import FILES, Project
from tests.helpers import make_pki


def test_tls_overlay(project: Project, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "certs")
    # The overlay mounts ./certs; the test's certificates go to the same target instead of the
    # repository's certs/ (a user's may be there).
    certs = tmp_path / "docker-compose.certs.yml"
    certs.write_text("services:\n  nginx:\n    volumes:\n"
                     f"      - {pki.directory}:/etc/nginx/certs:ro\n")
    tls = [*FILES, "docker-compose.tls.yml", str(certs)]
    try:
        project.compose(["up", "-d", "nginx"], files=tls)
        project.wait_healthy(("nginx",))
        with RecurClient("localhost:50051", tls_ca=pki.ca) as c:
            sid = c.create("pytag").session_id
            assert c.step(sid, text="def f(x):", expected_offset=0).offset == 9
        with RecurClient("localhost:50051") as plain:  # plaintext is not served any more
            with pytest.raises(grpc.RpcError) as e:
                plain.models()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        project.compose(["up", "-d", "nginx"])
        project.wait_healthy(("nginx",))


def test_prometheus_discovers_every_replica(project: Project) -> None:
    replicas = {project.ip(c) for c in project.containers("replica")}
    deadline = time.monotonic() + 60  # DNS refresh and scrape interval: 15 s each
    while True:
        with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=10) as r:
            targets = json.load(r)["data"]["activeTargets"]
        up = {t["labels"]["instance"].split(":")[0] for t in targets
              if t["labels"]["job"] == "recur" and t["health"] == "up"}
        if up == replicas:
            return
        assert time.monotonic() < deadline, (up, replicas)
        time.sleep(1)
