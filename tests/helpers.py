"""The one home of the tests' helpers: real `recur serve` processes, the compose topology's local
processes (redis-server, nginx), the one-pass ONNX reference, and small assertions. The conftest
files hold only fixtures built from these."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recur.client import RecurClient, open_channel
from recur.v1 import recur_pb2 as pb
from service.store import SessionRecord, Store
from service.store.base import SessionSummary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"

CELLS = ("rnn", "lstm", "gru")
HEADS = ("lm", "tagger", "classifier")
TOL = 1e-5  # largest difference allowed between served and one-pass logits or states
START_TIMEOUT = 60.0


def refused(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> str:
    """Assert that `call` fails with status `code` and details holding each of `words`; returns the details."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    details = e.value.details()
    assert e.value.code() == code, f"{e.value.code()}: {details}"
    for w in words:
        assert w in details, details
    return details


# -- the one-pass reference ------------------------------------------------------------------------


class Reference:
    """One pass over a whole sequence through ONNX Runtime in process."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest = json.loads((model_dir / "manifest.json").read_text())
        self.sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """x: (T,) tokens or (T, D) features -> logits (T, C) and states, each (L, H)."""
        m = self.manifest
        feed = {m["input"]["name"]: x[None]}
        for s in m["state"]:
            feed[s["name"]] = np.zeros((s["shape"][0], 1, s["shape"][2]), dtype=np.float32)
        out = self.sess.run([m["head"]["output"]] + [s["output"] for s in m["state"]], feed)
        return out[0][0], [s[:, 0] for s in out[1:]]


def logits_of(reply) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.frombuffer(reply.logits, dtype="<f4").reshape(tuple(reply.logits_shape))


def state_of(msg) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return [np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)) for t in msg.state]


# -- server processes ------------------------------------------------------------------------------


@dataclass
class Server:
    """One server process; `start` again after `kill` to restart it on the same store."""

    models_dir: Path
    store: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0
    log_args: list[str] = field(default_factory=lambda: ["--log-level", "WARNING"])  # before `serve`
    metrics_port: int = 0  # the /metrics HTTP port ("metrics on port N"; any free one unless extra names one)
    log: list[str] = field(default_factory=list)
    tls: dict | None = None  # the client's TLS keyword arguments (open_channel / RecurClient) for a TLS port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "recur.cli", *self.log_args, "serve", "--models-dir",
               str(self.models_dir), "--store", self.store, "--host", "127.0.0.1", "--port", "0",
               *([] if "--metrics-port" in self.extra else ["--metrics-port", "-1"]), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if line.startswith("metrics on port "):
                    self.metrics_port = int(line.split()[-1])
                if line.startswith("recur listening on port "):
                    self.port = int(line.split()[-1])
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_TIMEOUT):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        with open_channel(self.target, **(self.tls or {})) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=20,
                                                          wait_for_ready=True).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def client(self, tls: dict | None = None) -> RecurClient:
        """A client with these TLS options (default: the server's own, `self.tls`)."""
        return RecurClient(self.target, **(self.tls or {} if tls is None else tls))


def race(targets: list[str], session_id: str, tokens: list[int], chunk: int) -> tuple[list[int], list[str]]:
    """One client per target feeds the same sequence into one session at once, each chunk at the
    offset it believes current. Returns the start offsets applied (not replayed) and the refusals."""
    applied: list[int] = []
    refusals: list[str] = []
    lock = threading.Lock()

    def feed(target: str) -> None:
        with RecurClient(target) as c:
            offset = 0
            while offset < len(tokens):
                try:
                    r = c.step(session_id, tokens=tokens[offset : offset + chunk], expected_offset=offset)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
                    with lock:
                        refusals.append(e.details())
                    offset = int(re.search(r"is at offset (\d+)", e.details()).group(1))  # type: ignore[union-attr]
                    continue
                if not r.replayed:
                    with lock:
                        applied.append(r.start_offset)
                offset = r.offset

    threads = [threading.Thread(target=feed, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return applied, refusals


# -- the compose topology with local processes -----------------------------------------------------


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
    password: str = ""  # --requirepass

    @property
    def url(self) -> str:
        return f"redis://{f':{self.password}@' if self.password else ''}127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.port = self.port or free_port()
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen([_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync",
                                      "everysec", "--save", "", *auth], stdout=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def redis_cli(port: int, *args: str, password: str = "", timeout: float = 120.0) -> str:
    env = {**os.environ, "REDISCLI_AUTH": password} if password else None  # never on a command line
    out = subprocess.run([_binary("redis-cli"), "-p", str(port), *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def replicated(port: int, password: str = "", timeout: float = 10.0) -> None:
    """Wait until every replica of the Redis primary on `port` has all it wrote (its replication offset):
    what a test must do before a failover that is not about the window of unreplicated writes."""
    def caught_up() -> bool:
        info = redis_cli(port, "INFO", "replication", password=password)
        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
        master = int(fields.get("master_repl_offset", "0"))
        replicas = [v for k, v in fields.items() if k.startswith("slave") and k[5:].isdigit()]
        offsets = [int(dict(kv.split("=") for kv in r.split(","))["offset"]) for r in replicas]
        return bool(offsets) and min(offsets) >= master

    until(caught_up, timeout, "the replicas to catch up with the primary")


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@dataclass
class RedisNode:
    """One redis-server with extra settings (cluster mode, replica of...); `start` again after `kill`
    restarts it on the same port and data directory."""

    directory: Path
    args: list[str] = field(default_factory=list)
    port: int = 0
    bus_port: int = 0  # cluster bus (default port + 10000 may not exist above 55535)
    proc: subprocess.Popen | None = None

    def start(self) -> RedisNode:
        self.port = self.port or free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        cluster = ["--cluster-port", str(self.bus_port)] if self.bus_port else []
        self.proc = subprocess.Popen([_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync",
                                      "everysec", "--save", "", "--repl-diskless-sync-delay", "0", *cluster,
                                      *self.args], stdout=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def info(self, section: str = "replication") -> dict[str, str]:
        text = redis_cli(self.port, "info", section, timeout=5)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def role(self) -> str:
        """"master", "slave", or "" while it does not answer (starting, loading, switching roles)."""
        try:
            return self.info().get("role", "").strip()
        except (AssertionError, subprocess.TimeoutExpired):
            return ""


def wait_linked(nodes: list[RedisNode], timeout: float = 30.0) -> None:
    """Until every live replica among `nodes` has its primary's data and follows it."""
    def linked() -> bool:
        try:
            infos = [n.info() for n in nodes if n.proc is not None and n.proc.poll() is None]
        except (AssertionError, subprocess.TimeoutExpired):  # one switching roles: not yet
            return False
        return all(i.get("master_link_status", "up").strip() == "up" and i.get("master_sync_in_progress", "0")
                   .strip() == "0" for i in infos if i.get("role", "").strip() == "slave")
    until(linked, timeout, "the replicas did not finish their sync")


@dataclass
class RedisCluster:
    """A Redis Cluster of `primaries` primaries, each with `replicas` replicas, on loopback ports;
    node timeout `node_timeout_ms` (a dead primary's replica is promoted about twice that later)."""

    directory: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    nodes: list[RedisNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2]) + "/"

    def start(self) -> RedisCluster:
        for i in range(self.primaries * (1 + self.replicas)):
            node = RedisNode(self.directory / f"node{i}", ["--cluster-enabled", "yes", "--cluster-config-file",
                                                           "nodes.conf", "--cluster-node-timeout",
                                                           str(self.node_timeout_ms)], bus_port=free_port())
            self.nodes.append(node.start())
        if len(self.nodes) == 1:  # `--cluster create` wants three primaries: one node takes every slot itself
            redis_cli(self.nodes[0].port, "cluster", "addslotsrange", "0", "16383")
        else:
            redis_cli(self.nodes[0].port, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                      "--cluster-replicas", str(self.replicas), "--cluster-yes")
        self.wait_ok()
        wait_linked(self.nodes)
        return self

    def alive(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and agrees there are `primaries` primaries."""
        def ok() -> bool:
            try:
                return all("cluster_state:ok" in redis_cli(n.port, "cluster", "info", timeout=5)
                           and self.role_count(n, "master") == self.primaries for n in self.alive())
            except (AssertionError, subprocess.TimeoutExpired):
                return False
        until(ok, timeout, "the cluster did not become ok")

    @staticmethod
    def role_count(node: RedisNode, role: str) -> int:
        lines = redis_cli(node.port, "cluster", "nodes", timeout=5).splitlines()
        return sum(1 for line in lines if role in line.split()[2] and "fail" not in line.split()[2])

    def primary_of(self, key: str) -> RedisNode:
        """The node serving `key`'s slot now, by its own word (another node's view may lag a failover)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        for node in self.alive():
            if slot in self.slots_of(node):
                return node
        raise LookupError(f"no primary serves slot {slot}")

    def slots_of(self, node: RedisNode) -> list[int]:
        """The slots `node` says it serves, in order (none unless it says it is a primary)."""
        for line in redis_cli(node.port, "cluster", "nodes", timeout=5).splitlines():
            parts = line.split()
            if "myself" in parts[2]:
                slots: list[int] = []
                if "master" in parts[2]:
                    for r in parts[8:]:
                        if not r.startswith("["):
                            lo, _, hi = r.partition("-")
                            slots.extend(range(int(lo), int(hi or lo) + 1))
                return sorted(slots)
        return []

    def node_id(self, node: RedisNode) -> str:
        return redis_cli(node.port, "cluster", "myid", timeout=5).strip()

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


@dataclass
class RedisSentinels:
    """A primary, `replicas` replicas and three sentinels monitoring them as `service`; the sentinels
    say a primary is down after `down_after_ms` and fail over (quorum 2)."""

    directory: Path
    replicas: int = 1
    down_after_ms: int = 1000
    service: str = "recur"
    password: str = ""
    nodes: list[RedisNode] = field(default_factory=list)
    sentinels: list[RedisNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return (f"redis+sentinel://{auth}" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
                + f"/{self.service}")

    def start(self) -> RedisSentinels:
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        primary = RedisNode(self.directory / "node0", auth).start()
        self.nodes.append(primary)
        for i in range(self.replicas):
            self.nodes.append(RedisNode(self.directory / f"node{i + 1}",
                                        [*auth, "--replicaof", "127.0.0.1", str(primary.port)]).start())
        for i in range(3):
            d = self.directory / f"sentinel{i}"
            d.mkdir(parents=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {self.service} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                + (f"sentinel auth-pass {self.service} {self.password}\n" if self.password else ""))
            conf.chmod(0o600)
            s = RedisNode(d, [])
            s.port = free_port()
            s.proc = subprocess.Popen([_binary("redis-server"), str(conf), "--sentinel", "--port", str(s.port),
                                       "--bind", "127.0.0.1", "--dir", str(d)], stdout=subprocess.DEVNULL)
            wait_port(s.port)
            self.sentinels.append(s)
        wait_linked(self.nodes)
        until(lambda: all(int(self._replicas_seen(s)) >= self.replicas for s in self.sentinels), 30,
              "the sentinels did not find the replicas")
        return self

    def _replicas_seen(self, s: RedisNode) -> int:
        out = redis_cli(s.port, "sentinel", "replicas", self.service, timeout=5)
        return out.count("flags") if out.strip() else 0

    def primary(self) -> RedisNode:
        """The node the sentinels name as primary now."""
        host_port = redis_cli(self.sentinels[0].port, "sentinel", "get-master-addr-by-name", self.service,
                              timeout=5).split()
        return next(n for n in self.nodes if n.port == int(host_port[1]))

    def settled(self, timeout: float = 60.0) -> RedisNode:
        """Until every sentinel names the same primary, it alone says it is one, and every other live
        node is its synced replica (after a failover, the sentinels reconfigure the others one by one)."""
        def agreed() -> bool:
            names = {redis_cli(s.port, "sentinel", "get-master-addr-by-name", self.service, timeout=5)
                     for s in self.sentinels}
            if len(names) != 1:
                return False
            port = int(names.pop().split()[1])
            alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            return all(n.role() == ("master" if n.port == port else "slave") for n in alive)
        until(agreed, timeout, "the sentinels and the nodes did not settle on one primary")
        wait_linked(self.nodes)
        return self.primary()

    def stop(self) -> None:
        for n in [*self.sentinels, *self.nodes]:
            n.kill()


@dataclass
class Fed:
    """What a feeder saw: per session the offsets acknowledged (applied or replayed) and when."""

    acked: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the retried failures' codes
    lost: list[tuple[str, int, int]] = field(default_factory=list)  # (session, acknowledged offset, stored offset)
    failures: list[str] = field(default_factory=list)  # what went wrong in a feeding thread

    def last(self, session_id: str) -> int:
        return max((o for o, _ in self.acked.get(session_id, [])), default=0)

    def gap_over(self, t: float) -> float:
        """The longest wait any session had between two acknowledgements once time `t` had passed (what
        a client sees of an outage at t: a chunk acknowledged just after t may still be followed by the stall)."""
        gaps = []
        for acks in self.acked.values():
            times = sorted(at for _, at in acks)
            if times and times[0] <= t:
                gaps += [b - a for a, b in itertools.pairwise(times) if b > t]
        return max(gaps, default=0.0)


def feed(target: str, sequences: dict[str, np.ndarray], chunk: int, fed: Fed, stop: threading.Event | None = None,
         deadline: float = 90.0, pause: float = 0.0, losses: bool = False) -> None:
    """Feed each session its sequence `chunk` tokens at a time through Step (one thread per session),
    retrying a chunk that failed UNAVAILABLE, or FAILED_PRECONDITION because its own earlier try was
    applied (the retry is answered as a replay): a chunk is never applied twice, and each session ends
    at its sequence's length unless `stop` is set first. A store that lost acknowledged chunks (its
    offset behind the client's) is a failure, or with `losses` recorded in `fed.lost` and fed again."""
    lock = threading.Lock()

    def one(sid: str, seq: np.ndarray) -> None:
        try:
            run(sid, seq)
        except Exception as e:  # a thread's exception would go nowhere: the test asserts on these
            with lock:
                fed.failures.append(f"{sid}: {e!r}")

    def run(sid: str, seq: np.ndarray) -> None:
        end = time.monotonic() + deadline
        with RecurClient(target) as c:
            offset = 0
            while offset < len(seq) and not (stop and stop.is_set()):
                assert time.monotonic() < end, f"{sid} stuck at offset {offset}"
                part = [int(t) for t in seq[offset : offset + chunk]]
                try:
                    r = c.stub.Step(pb.StepRequest(session_id=sid, tokens=part, expected_offset=offset), timeout=10)
                except grpc.RpcError as e:
                    code = e.code()
                    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.DEADLINE_EXCEEDED), f"{code}: {e.details()}"
                    if code == grpc.StatusCode.FAILED_PRECONDITION:  # only its own try can have moved it
                        m = re.search(r"offset (\d+)", e.details() or "")
                        assert m, e.details()
                        stored = int(m.group(1))
                        if losses and stored < offset:
                            with lock:
                                fed.lost.append((sid, offset, stored))
                            offset = stored
                            continue
                        assert stored in (offset, offset + len(part)), e.details()
                    with lock:
                        fed.errors.append(code.name)
                    time.sleep(0.02)
                    continue
                assert r.start_offset == offset and r.offset == offset + len(part), (r.start_offset, r.offset)
                offset = r.offset
                with lock:
                    fed.acked.setdefault(sid, []).append((offset, time.monotonic()))
                if pause:
                    time.sleep(pause)

    threads = [threading.Thread(target=one, args=(sid, seq)) for sid, seq in sequences.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline + 30)


@dataclass
class Nginx:
    """nginx rendered from one of deploy/nginx's templates with a compose environment (default: the
    compose file's nginx environment), its replica addresses pointed at the local processes."""

    directory: Path
    upstreams: list[int]
    template: str = "recur.conf.template"
    environment: dict[str, str] | None = None
    extra: dict[str, str] = field(default_factory=dict)  # values set here rather than by compose
    port: int = 0  # 0: any free port
    proc: subprocess.Popen | None = None

    def start(self) -> Nginx:
        env = self.environment or yaml.safe_load(COMPOSE.read_text())["services"]["nginx"]["environment"]
        self.port = self.port or free_port()  # a restart listens on the same port
        # Compose's one `server replica:50051 ...;` line (nginx resolves the service name to every
        # replica's address) becomes one line per local replica, with the same parameters.
        servers, n = re.subn(r"server replica:50051([^;]*);", lambda m: " ".join(
            f"server 127.0.0.1:{port}{m.group(1)};" for port in self.upstreams), env["RECUR_UPSTREAM_SERVERS"])
        assert n == 1, env["RECUR_UPSTREAM_SERVERS"]
        values = {**env, "RECUR_UPSTREAM_SERVERS": servers, "RECUR_LB_PORT": str(self.port),
                  "RECUR_LB_HEALTH_PORT": str(free_port()), **self.extra}  # the container's fixed one may be taken here
        template = (ROOT / "deploy" / "nginx" / self.template).read_text()
        for name, value in values.items():  # what the nginx image's envsubst does with defined names
            template = template.replace("${" + name + "}", str(value))
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


def compose_config(*files: str) -> dict:
    """`docker-compose -f FILE ... config` (files relative to the repository): what compose itself makes of them."""
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is not installed: `make test` installs it (deploy/ensure-packages)"
    args = [a for f in files for a in ("-f", str(ROOT / f))]
    out = subprocess.run([compose, *args, "config"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@dataclass
class Topology:
    redis: Redis
    replicas: list[Server]
    nginx: Nginx


class ManualClock:
    """A clock the test moves by hand, for the stores' and the core's injected time."""

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() if start is None else start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class HintedStore(Store):
    """One replica's view of a shared store, with hints as the Redis store keeps them (in process, no
    Redis): `get` and `get_many` answer from the record this view last wrote or read, which another
    view may have advanced since (a stale hint); `fresh` reads the shared store. Writes are the shared
    store's compare-and-set. `replica()` is another view of the same shared store: what another
    replica's hints would be. `hint_reads` counts the reads a hint answered."""

    hints = True

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.clock = inner.clock
        self._hints: dict[tuple[str, str], SessionRecord] = {}
        self.hint_reads = 0

    def replica(self) -> HintedStore:
        return HintedStore(self.inner)

    def _remember(self, rec: SessionRecord) -> None:
        self._hints[(rec.tenant, rec.session_id)] = rec

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        hint = self._hints.get((tenant, session_id))
        if hint is not None and hint.expires_at > self.clock():
            self.hint_reads += 1
            return hint
        return await self.fresh(tenant, session_id)

    async def fresh(self, tenant: str, session_id: str) -> SessionRecord:
        self._hints.pop((tenant, session_id), None)
        rec = await self.inner.get(tenant, session_id)
        self._remember(rec)
        return rec

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_tenant_sessions: int = 0) -> None:
        await self.inner.create(record, max_sessions=max_sessions, max_tenant_sessions=max_tenant_sessions)
        self._remember(record)

    async def put(self, record: SessionRecord, prev_offset: int) -> None:
        try:
            await self.inner.put(record, prev_offset)
        except Exception:
            self._hints.pop((record.tenant, record.session_id), None)
            raise
        self._remember(record)

    async def delete(self, tenant: str, session_id: str) -> None:
        self._hints.pop((tenant, session_id), None)
        await self.inner.delete(tenant, session_id)

    async def count(self, tenant: str | None = None) -> int:
        return await self.inner.count(tenant)

    async def count_by_model(self, tenant: str | None = None) -> dict[tuple[str, int], int] | None:
        return await self.inner.count_by_model(tenant)

    async def list_sessions(self, tenant: str, model: str = "", after_id: str = "",
                            limit: int = 100) -> list[SessionSummary]:
        return await self.inner.list_sessions(tenant, model, after_id, limit)

    async def ping(self) -> None:
        await self.inner.ping()

    async def sweep(self) -> int:
        return await self.inner.sweep()

    async def flush(self) -> None:
        await self.inner.flush()


def another_replica(store: Store) -> Store:
    """What another replica on the same store reads through: its own hints where the store keeps them."""
    return store.replica() if isinstance(store, HintedStore) else store


# -- a throwaway PKI for TLS tests ---------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: ca.pem (the CA), server.pem/.key (localhost, 127.0.0.1), client.pem/.key (signed by
    the CA, for mutual TLS) and stranger.pem/.key (a client certificate from another CA)."""

    directory: Path

    def __getattr__(self, name: str) -> str:  # pki.ca -> ".../ca.pem", pki.server_key -> ".../server.key"
        stem, _, kind = name.partition("_")
        return str(self.directory / f"{stem}.{'key' if kind == 'key' else 'pem'}")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, *,
          ca: bool = False, sans: list[x509.GeneralName] | None = None,
          usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(signer, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for localhost and 127.0.0.1, and client certificates (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    keys = {name: ec.generate_private_key(ec.SECP256R1())
            for name in ("ca", "server", "client", "other-ca", "stranger")}
    write("ca", _cert("recur test CA", keys["ca"], "recur test CA", keys["ca"], ca=True), keys["ca"])
    write("server", _cert("localhost", keys["server"], "recur test CA", keys["ca"],
                          sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                          usage=ExtendedKeyUsageOID.SERVER_AUTH), keys["server"])
    write("client", _cert("test client", keys["client"], "recur test CA", keys["ca"],
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH), keys["client"])
    write("stranger", _cert("stranger", keys["stranger"], "another CA", keys["other-ca"],
                            usage=ExtendedKeyUsageOID.CLIENT_AUTH), keys["stranger"])
    return Pki(directory)


class Prometheus:
    """A real prometheus server scraping `targets` with the compose scrape config (deploy/prometheus);
    skips the test with the reason when the binary is not installed."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/sbin:/usr/bin")
        if binary is None:
            pytest.skip("the prometheus binary is not installed (Debian package `prometheus`; "
                        "deploy/ensure-packages installs it where apt-get can)")
        # The compose scrape config with the DNS discovery of `replica` replaced by the local targets.
        config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "500ms"
        job = next(j for j in config["scrape_configs"] if j["job_name"] == "recur")
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": targets}]
        config["scrape_configs"] = [job]
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = open(directory / "prometheus.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=60)
        deadline = time.monotonic() + 60  # the port opens before the storage is ready (503 until then)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except urllib.error.URLError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("prometheus did not become ready:\n" + (directory / "prometheus.log").read_text())
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


def torch_layers(model_dir: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Each layer's per-step h (and c for an LSTM) from PyTorch over `tokens` (T,) from zero states, named as
    the API names them ("h_l0", ...); the last layer's h is also checked to be the model's own output."""
    import torch

    from training.export import model_from_repository

    model = model_from_repository(model_dir)
    cfg = model.config
    x = tokens.astype(np.int64)[None]
    zeros = [np.zeros((cfg.layers, 1, cfg.hidden), np.float32) for _ in model.state_names]
    out = {f"{state}_l{layer}": v[0] for (state, layer), v in torch_activations(model, x, zeros).items()}
    assert model.embed is not None, "a tokens model"
    with torch.no_grad():
        y, _ = model.rnn(model.embed(torch.from_numpy(x)))
    assert np.abs(out[f"h_l{cfg.layers - 1}"] - y[0].numpy()).max() <= TOL
    return out


def torch_activations(net, x: np.ndarray, states: list[np.ndarray]) -> dict:  # type: ignore[no-untyped-def]
    """Every layer's h (and c) at every step of `x` (B, T[, D]) from `states` (each (L, B, H)), keyed
    (state, layer), from a training.model.SequenceModel run one layer and one step at a time in PyTorch."""
    import torch  # only the tests that compare with PyTorch pay for importing it

    cell, hidden = net.config.cell, net.config.hidden
    out = {}
    with torch.no_grad():
        seq = torch.from_numpy(x)
        if net.embed is not None:
            seq = net.embed(seq)
        for layer in range(net.config.layers):
            module = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](
                seq.shape[-1], hidden, batch_first=True)
            module.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in net.rnn.state_dict().items()
                                    if k.endswith(f"_l{layer}")})
            h = torch.from_numpy(states[0][layer : layer + 1])
            c = torch.from_numpy(states[1][layer : layer + 1]) if cell == "lstm" else None
            hs, cs = [], []
            for t in range(seq.shape[1]):
                if cell == "lstm":
                    _, (h, c) = module(seq[:, t : t + 1], (h, c))
                    cs.append(c[0])
                else:
                    _, h = module(seq[:, t : t + 1], h)
                hs.append(h[0])
            seq = torch.stack(hs, 1)
            out[("h", layer)] = seq.numpy()
            if cell == "lstm":
                out[("c", layer)] = torch.stack(cs, 1).numpy()
    return out
