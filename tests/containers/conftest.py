"""The compose topology on a real Docker engine: a private dockerd for the session, the stand-in base
images built locally (deploy/testing/), the serving image built from deploy/Dockerfile by compose, and
docker-compose.yml run with the documented test override (deploy/testing/docker-compose.test.yml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.engine import Engine
from tests.containers.project import Project

ROOT = Path(__file__).resolve().parents[2]
TESTING = ROOT / "deploy" / "testing"
STAND_INS = {"python": "python:3.11-slim", "redis": "redis:7-alpine", "nginx": "nginx:1.27-alpine",
             "prometheus": "prom/prometheus:v2.53.0"}
TIMINGS: dict[str, float] = {}  # printed at the end of the session: what the bring-up cost


def _needs_engine() -> None:
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("debootstrap"):
        pytest.skip("needs root, dockerd and debootstrap (`make test` installs them: deploy/ensure-packages)")


def _base_images(engine: Engine, tmp: Path) -> None:
    t0 = time.monotonic()
    tarball = subprocess.run([str(TESTING / "rootfs")], capture_output=True, text=True, check=True).stdout.strip()
    TIMINGS["rootfs_s"] = time.monotonic() - t0
    base = "recur-testing/bookworm:" + Path(tarball).stem.rsplit("-", 1)[-1]
    if engine.run(["image", "inspect", base], check=False).returncode != 0:
        engine.run(["import", tarball, base])
    engine.run(["tag", base, "recur-testing/bookworm:latest"])
    t0 = time.monotonic()
    for folder, tag in STAND_INS.items():
        context = tmp / folder
        shutil.copytree(TESTING / folder, context)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", context / "ca-certificates.crt")
        engine.run(["build", "-q", "-t", tag, str(context)])
    TIMINGS["stand_ins_s"] = time.monotonic() - t0


@pytest.fixture(scope="package")  # down before the rest of the suite runs
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    _needs_engine()
    t0 = time.monotonic()
    e = Engine().start()
    TIMINGS["dockerd_s"] = time.monotonic() - t0
    try:
        _base_images(e, tmp_path_factory.mktemp("stand-ins"))
        yield e
    finally:
        e.run(["image", "prune", "-f"], check=False)  # earlier builds' images, kept by the cached data root
        e.stop()
        print("\ncontainers:", {k: round(v, 1) for k, v in TIMINGS.items()})


@pytest.fixture(scope="package")  # down before the rest of the suite runs
def project(engine: Engine) -> Iterator[Project]:
    """The topology up (redis, two replicas, nginx, Prometheus; no Grafana stand-in), healthy."""
    p = Project(engine)
    p.compose(["down", "-v", "--remove-orphans"], check=False)  # what a crashed run left
    t0 = time.monotonic()
    p.compose(["build", "replica"])
    TIMINGS["image_build_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    try:
        p.compose(["up", "-d", "redis", "replica", "nginx", "prometheus"])
        p.wait_healthy()
        TIMINGS["up_healthy_s"] = time.monotonic() - t0
        yield p
    finally:
        p.compose(["down", "-v", "--remove-orphans"], check=False)
