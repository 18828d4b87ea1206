"""The deployment files describe the topology the tests run (no Docker engine runs here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_validates() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is not installed: `make test` installs it (deploy/ensure-packages)"
    out = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert set(yaml.safe_load(out.stdout)["services"]) == {"redis", "replica1", "replica2", "nginx"}


def test_compose_topology_is_the_tested_one() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "healthcheck" in redis
    for name in ("replica1", "replica2"):
        r = services[name]
        cmd = r["command"]
        assert cmd[:2] == ["recur", "serve"] and cmd[cmd.index("--store") + 1] == "redis://redis:6379/0"
        assert r["healthcheck"]["test"][-3:] == ["-m", "recur.healthcheck", "localhost:50051"]
        assert r["depends_on"]["redis"]["condition"] == "service_healthy"
        assert r["build"]["dockerfile"] == "deploy/Dockerfile"
    nginx = services["nginx"]
    assert nginx["ports"] == ["50051:50051"]
    assert "./deploy/nginx/recur.conf.template:/etc/nginx/templates/recur.conf.template:ro" in nginx["volumes"]
    assert {"replica1", "replica2"} <= set(nginx["depends_on"])
    assert all(d["condition"] == "service_healthy" for d in nginx["depends_on"].values())
    upstreams = nginx["environment"]["RECUR_UPSTREAM_SERVERS"]
    assert "server replica1:50051" in upstreams and "server replica2:50051" in upstreams


def test_serving_image_is_slim_and_unprivileged() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "torch" not in text.replace("No torch", "") and "[train" not in text
    assert "USER recur" in text and "HEALTHCHECK" in text and "recur.healthcheck" in text
