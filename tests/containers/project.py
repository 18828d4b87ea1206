"""docker-compose.yml run on the test engine as project `recurtest`, with the test override."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.containers.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
FILES = ["docker-compose.yml", "deploy/testing/docker-compose.test.yml"]
NAME = "recurtest"
METRICS_PORT = 9464


@dataclass
class Project:
    engine: Engine
    files: list[str] = field(default_factory=lambda: list(FILES))

    def compose(self, args: list[str], check: bool = True, timeout: float = 600,
                files: list[str] | None = None) -> subprocess.CompletedProcess:
        compose = shutil.which("docker-compose")
        assert compose, "docker-compose is not installed: `make test` installs it (deploy/ensure-packages)"
        argv = [compose, "-p", NAME, *[a for f in files or self.files for a in ("-f", f)], *args]
        out = subprocess.run(argv, cwd=ROOT, env=self.engine.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert out.returncode == 0, f"docker-compose {' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
        return out

    def containers(self, service: str, everything: bool = False) -> list[str]:
        """The ids of the service's containers (running ones unless `everything`), oldest first."""
        args = ["ps", "-q", "--filter", f"label=com.docker.compose.project={NAME}",
                "--filter", f"label=com.docker.compose.service={service}"] + (["-a"] if everything else [])
        ids = self.engine.run(args).stdout.split()
        return sorted(ids, key=lambda c: self.inspect(c)["Created"])

    def inspect(self, container: str) -> dict:
        return json.loads(self.engine.run(["inspect", container]).stdout)[0]

    def ip(self, container: str) -> str:
        (net,) = self.inspect(container)["NetworkSettings"]["Networks"].values()
        return net["IPAddress"]

    def health(self, container: str) -> str:
        state = self.inspect(container)["State"]
        return state["Health"]["Status"] if "Health" in state else state["Status"]

    def wait_healthy(self, services: tuple[str, ...] = ("redis", "replica", "nginx"), timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {c: self.health(c) for s in services for c in self.containers(s)}
            if states and all(v == "healthy" for v in states.values()):
                return
            assert time.monotonic() < deadline, f"not healthy in {timeout} s: {states}"
            time.sleep(0.5)

    def chunks(self, container: str) -> float:
        """recur_chunks_total summed over its labels, read from the replica's metrics port."""
        with urllib.request.urlopen(f"http://{self.ip(container)}:{METRICS_PORT}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(m) for m in re.findall(r"^recur_chunks_total\{[^}]*\} (\S+)$", text, re.M))

    def nginx_workers(self) -> set[str]:
        """The pids of nginx's serving workers (not those of an old configuration, shutting down)."""
        script = ('for f in /proc/[0-9]*/cmdline; do '
                  'printf "%s %s\\n" "$f" "$(tr "\\0" " " <"$f" 2>/dev/null)"; done')
        out = self.compose(["exec", "-T", "nginx", "sh", "-c", script]).stdout
        return {m.group(1) for m in re.finditer(r"^/proc/(\d+)/cmdline nginx: worker process\s*$", out, re.M)}

    def reload_nginx(self, timeout: float = 30) -> None:
        """`nginx -s reload` only signals the master: wait until every worker serving connections is
        a new one, so the next call is routed by the new configuration."""
        old = self.nginx_workers()
        self.compose(["exec", "-T", "nginx", "nginx", "-s", "reload"])
        deadline = time.monotonic() + timeout
        while True:
            now = self.nginx_workers()
            if now and not now & old:
                return
            assert time.monotonic() < deadline, f"nginx did not reload in {timeout} s: {old} -> {now}"
            time.sleep(0.1)
