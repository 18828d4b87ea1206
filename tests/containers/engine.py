"""A private Docker engine for the container tests: Debian's dockerd with its own data root, exec
root, socket and pid file, started and stopped by the test session; the iptables rules and chains it
added and the forwarding switch it turned on are put back afterwards. The data root is kept in the
cache folder between runs so that images and the build cache survive; containers do not."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("RECUR_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recur"))
TABLES = ("filter", "nat")
FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
LOCK = Path(tempfile.gettempdir()) / "recur-docker.lock"


def _rules() -> dict[str, list[str]]:
    """iptables-save's lines per table: chain declarations (':NAME ...') and rules ('-A ...')."""
    out: dict[str, list[str]] = {}
    for table in TABLES:
        text = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True, check=True).stdout
        out[table] = [line for line in text.splitlines() if line.startswith((":", "-A "))]
    return out


def _client() -> str:
    """The docker.io package's client (/usr/bin/docker), which speaks its daemon's API version."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker") or "docker"


@dataclass
class Engine:
    data_root: Path = CACHE / "docker"
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="recur-docker-")))
    proc: subprocess.Popen | None = None
    _lock: int = -1
    _before: dict[str, list[str]] = field(default_factory=dict)
    _forward: str = "0"

    @property
    def host(self) -> str:
        return f"unix://{self.run_dir}/docker.sock"

    @property
    def env(self) -> dict[str, str]:
        """The environment for docker and docker-compose: this engine, the classic builder."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    def start(self) -> Engine:
        self.data_root.mkdir(parents=True, exist_ok=True)
        # One test engine on the machine at a time: each puts back the iptables rules it found.
        self._lock = os.open(LOCK, os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._before, self._forward = _rules(), FORWARD.read_text().strip()
        # No default bridge (docker0): compose makes its own networks and the builds use the host's.
        with open(self.run_dir / "dockerd.log", "w") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
                 "--pidfile", str(self.run_dir / "docker.pid"), "-H", self.host, "--storage-driver", "overlay2",
                 "--bridge", "none"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.run(["version"], check=False).returncode != 0:
            assert self.proc.poll() is None, (self.run_dir / "dockerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dockerd did not answer in 60 s"
            time.sleep(0.2)
        return self

    def run(self, args: list[str], check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
        out = subprocess.run([_client(), *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check:
            assert out.returncode == 0, f"docker {' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # dockerd stops its containers and its containerd
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._restore_network()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in reversed([m for m in mounts if m.startswith(f"{self.run_dir}/")]):  # netns bind mounts
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._lock >= 0:
            os.close(self._lock)

    def _restore_network(self) -> None:
        """Delete the rules, then the chains, that were not there before the engine started."""
        after = _rules()
        for table in TABLES:
            before = set(self._before.get(table, []))
            for rule in after[table]:
                if rule.startswith("-A ") and rule not in before:
                    subprocess.run(["sh", "-c", f"iptables -t {table} -D {rule[3:]}"], capture_output=True)
            chains = {line.split()[0][1:] for line in before if line.startswith(":")}
            policies = {line.split()[0][1:]: line.split()[1] for line in before if line.startswith(":")}
            for line in after[table]:  # dockerd sets FORWARD's policy to DROP
                chain, policy = line.split()[0][1:], line.split()[1]
                if line.startswith(":") and policy != "-" and policy != policies.get(chain, "ACCEPT"):
                    subprocess.run(["iptables", "-t", table, "-P", chain, policies.get(chain, "ACCEPT")],
                                   capture_output=True)
            for line in after[table]:
                chain = line.split()[0][1:]
                if line.startswith(":") and chain not in chains:
                    subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
                    subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)
        FORWARD.write_text(self._forward + "\n")
