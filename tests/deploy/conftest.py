"""The compose topology with local processes: redis-server (append-only file), two `recur serve`
replicas on the Redis store, and nginx rendered from the very template and settings the compose
file gives it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.service.conftest import Server, reference  # noqa: F401 - the one-pass reference fixture

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (deploy/ensure-packages)")
    return path


@dataclass
class Redis:
    directory: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.port = self.port or free_port()
        self.proc = subprocess.Popen([_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync",
                                      "everysec", "--save", ""], stdout=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Nginx:
    directory: Path
    upstreams: list[int]
    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self) -> Nginx:
        """Render deploy/nginx/recur.conf.template with the compose file's nginx environment, its
        replica addresses pointed at the local processes."""
        env = yaml.safe_load(COMPOSE.read_text())["services"]["nginx"]["environment"]
        self.port = free_port()
        servers = env["RECUR_UPSTREAM_SERVERS"]
        for i, port in enumerate(self.upstreams, 1):
            servers = servers.replace(f"replica{i}:50051", f"127.0.0.1:{port}")
        values = {"RECUR_UPSTREAM_SERVERS": servers, "RECUR_LB_PORT": str(self.port)}
        template = (ROOT / "deploy" / "nginx" / "recur.conf.template").read_text()
        for name, value in values.items():  # what the nginx image's envsubst does with defined names
            template = template.replace("${" + name + "}", value)
        assert "${" not in template
        d = self.directory
        (d / "recur.conf").write_text(template)
        (d / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n"
            f"  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n"
            f"  include {d}/recur.conf;\n}}\n")
        self.proc = subprocess.Popen([_binary("nginx"), "-c", str(d / "nginx.conf"), "-p", str(d)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Topology:
    redis: Redis
    replicas: list[Server]
    nginx: Nginx


@pytest.fixture
def topology(tiny_models: Path, tmp_path: Path) -> Iterator[Topology]:
    (tmp_path / "redis").mkdir()
    (tmp_path / "nginx").mkdir()
    redis = Redis(tmp_path / "redis").start()
    replicas: list[Server] = []
    nginx: Nginx | None = None
    try:
        for name in ("replica1", "replica2"):
            replicas.append(Server(tiny_models, redis.url, ["--replica-id", name]).start())
        nginx = Nginx(tmp_path / "nginx", [r.port for r in replicas]).start()
        yield Topology(redis, replicas, nginx)
    finally:
        if nginx:
            nginx.stop()
        for r in replicas:
            r.kill()
        redis.kill()
