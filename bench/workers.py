"""`recur serve --workers 2` against `--workers 1`: throughput at S sessions, chunks of C tokens (C = 1).

Connections, not calls, are spread over the workers (the kernel's SO_REUSEPORT hash of each new
connection), so every row here drives the server over K connections, each carrying its own S / K
sessions (two workers must not run the same session's chunks: that would be a race between them, not
throughput). Which worker took which connection is chance; each row reports the share of chunks each
worker answered (recur_chunks_total{worker} from the supervisor's /metrics). Rows, on SQLite
(--durability sync) and on Redis (a local redis-server, as bench.redis_store runs it; skipped without
redis-server); --workers 2 needs a store the workers share:
  workers 1                     the single process, as today
  workers 1, --cache-size 0     (SQLite) the single process without its record cache: what every
                                worker of --workers 2 runs with on SQLite (each reads the file on every call)
  workers 2                     the supervisor and two workers (on Redis each keeps its hints)
Load generators:
  Python   bench.run's packed client (StreamPacked, sessions in messages of bench.run.GROUP, each
           session's next chunk sent when its reply came, offsets named and checked), one asyncio process
           with K connections of its own; the first session of each connection checked against the one-pass
           reference
  h2load   (when installed: deploy/ensure-packages h2load) K h2load processes at once, one connection each,
           -m M streams, resending one pre-serialised StepPacked of that connection's sessions (offsets
           unchecked: bench/capacity.py's body); every request checked applied (offsets advanced exactly)
CPU per process (user + system, /proc, over the measured window) is reported for each worker, the
supervisor, redis-server and the load generator, in cores (CPU seconds per second): on a machine of N
cores, what the workers can add is bounded by what the generator and everything else leave of the N.

    python -m bench.workers                 # S = 1024, C = 1; writes the "Workers" section of BENCHMARKS.md
    python -m bench.workers --quick         # a smoke run of a few seconds, nothing written
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import resource
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.capacity import HEADERS, STEP_PACKED, answered_offsets, create_sessions, frame, packed_request
from bench.redis_store import _free_port, _wait_port
from bench.run import GROUP, ROOT, TOL, Process, _prebuilt, _sequences, machine, recur_server, reference, write_section
from recur.v1 import recur_pb2_grpc

FRESH = [("grpc.use_local_subchannel_pool", 1)]  # a channel with a connection of its own
# (store, label, --workers, more flags): ratios are to "workers 1" on the same store
SERVERS = [("sqlite", "workers 1", 1, []), ("sqlite", "workers 1, --cache-size 0", 1, ["--cache-size", "0"]),
           ("sqlite", "workers 2", 2, []), ("redis", "workers 1", 1, []), ("redis", "workers 2", 2, [])]


@dataclass
class Row:
    store: str
    server: str
    generator: str
    sessions: int
    chunk: int
    rate: float  # tokens/s
    p50: float  # ms per message (Python) or request (h2load)
    p99: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> cores over the window
    shares: list[float] = field(default_factory=list)  # of the chunks, per worker (empty: one process)


def pids(server: Process) -> dict[str, int]:
    """The server's processes: `server` alone, or `supervisor` and `worker I` (its children, in start order)."""
    children: list[int] = []
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    if not children:
        return {"server": server.proc.pid}
    return {"supervisor": server.proc.pid, **{f"worker {i}": p for i, p in enumerate(sorted(children))}}


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # clock ticks: 100 a second on Linux


def chunks_per_worker(server: Process) -> dict[str, float]:
    """recur_chunks_total so far per worker, from the supervisor's /metrics (empty for a single process)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    per: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("recur_chunks_total{") and 'worker="' in line:
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            per[worker] = per.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return per


class Window:
    """CPU seconds of the server's processes and the generator over a measured window, as cores."""

    def __init__(self, server: Process, store_pid: int | None) -> None:
        self.pids = pids(server) | ({"redis-server": store_pid} if store_pid else {})
        self.before = {name: cpu_of(pid) for name, pid in self.pids.items()}
        self.server = server
        self.chunks = chunks_per_worker(server)
        self.children = self._children()
        self.own = time.process_time()
        self.t0 = time.perf_counter()

    @staticmethod
    def _children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)  # the h2load processes, once they ended
        return r.ru_utime + r.ru_stime

    def close(self, generator: str) -> tuple[float, dict[str, float], list[float]]:
        """Seconds, cores per process, and each worker's share of the chunks answered in the window."""
        seconds = time.perf_counter() - self.t0
        cores = {name: (cpu_of(pid) - self.before[name]) / seconds for name, pid in self.pids.items()}
        used = self._children() - self.children if generator == "h2load" else time.process_time() - self.own
        cores["generator"] = used / seconds
        chunks = {w: n - self.chunks.get(w, 0.0) for w, n in chunks_per_worker(self.server).items()}
        total = sum(chunks.values())
        return seconds, cores, [chunks[w] / total for w in sorted(chunks)] if total else []


async def _connection(port: int, sids: list[str], seqs: np.ndarray, chunk: int, deadline: float,
                      lat: list[float]) -> tuple[int, np.ndarray]:
    """One connection's sessions through StreamPacked until `deadline`: tokens applied, and the first
    session's logits."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FRESH) as ch:
        call = recur_pb2_grpc.RecurStub(ch).StreamPacked()
        bounds = [*range(0, len(sids), GROUP), len(sids)]
        groups = [_prebuilt(sids[a:b], seqs[a:b], chunk, "packed") for a, b in itertools.pairwise(bounds)]
        sent = [time.perf_counter()] * len(groups)
        for g, msgs in enumerate(groups):
            sent[g] = time.perf_counter()
            await call.write(msgs[0])
        tick, first, tokens = [1] * len(groups), [], 0
        live = set(range(len(groups)))
        g = 0
        while live:  # replies come in the order the messages were sent: round robin over the live groups
            reply = await call.read()
            lat.append(time.perf_counter() - sent[g])
            assert not reply.failed, reply.statuses[0].message
            tokens += int(sum(o - s for o, s in zip(reply.offsets, reply.start_offsets)))
            if g == 0:
                rows = np.frombuffer(reply.logits, "<f4").reshape(tuple(reply.logits_shape))
                first.append(rows[: rows.shape[0] // len(reply.offsets)])
            if tick[g] < len(groups[g]) and time.perf_counter() < deadline:
                sent[g] = time.perf_counter()
                await call.write(groups[g][tick[g]])
                tick[g] += 1
            else:
                live.discard(g)
            g = next((h for h in [*range(g + 1, len(groups)), *range(g + 1)] if h in live), g)
        await call.done_writing()
    return tokens, np.concatenate(first)


async def _python(port: int, sids: list[str], seqs: np.ndarray, chunk: int, connections: int, seconds: float,
                  lat: list[float]) -> int:
    parts = np.array_split(np.arange(len(sids)), connections)
    deadline = time.perf_counter() + seconds
    done = await asyncio.gather(*(_connection(port, [sids[i] for i in p], seqs[p], chunk, deadline, lat)
                                  for p in parts))
    for p, (_, logits) in zip(parts, done):  # each connection's first session against the one-pass reference
        err = float(np.abs(logits - reference(seqs[p[0]])[: len(logits)]).max())
        assert err <= TOL, f"logits differ from the one-pass reference by {err}"
    return sum(tokens for tokens, _ in done)


def python_row(server: Process, store: tuple[str, int | None], name: str, seqs: np.ndarray, chunk: int,
               connections: int, seconds: float) -> Row:
    sids = create_sessions(server.port, len(seqs))
    lat: list[float] = []
    window = Window(server, store[1])
    tokens = asyncio.run(_python(server.port, sids, seqs, chunk, connections, seconds, lat))
    took, cpu, shares = window.close("python")
    return Row(store[0], name, f"Python, {connections} connections", len(seqs), chunk, tokens / took,
               float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3), cpu, shares)


def _h2load(port: int, body: Path, streams: int, requests: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["h2load", "-t", "1", "-c", "1", "-m", str(streams), "-n", str(requests), "-d", str(body),
                             "--log-file", str(log), *(a for h in HEADERS for a in ("-H", h)),
                             f"http://127.0.0.1:{port}{STEP_PACKED}"], stdout=subprocess.PIPE, text=True)


def _h2load_all(port: int, bodies: list[Path], streams: int, requests: int) -> tuple[int, list[float]]:
    """One h2load per body at once; requests that succeeded, and every request's latency."""
    procs = [_h2load(port, b, streams, requests, b.with_suffix(".log")) for b in bodies]
    succeeded = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
        ok = int(out.split(" succeeded")[0].rsplit(" ", 1)[1])
        assert ok == requests, f"h2load: {requests - ok} of {requests} requests failed"
        succeeded += ok
    lat = [int(line.split("\t")[2]) / 1e6 for b in bodies for line in b.with_suffix(".log").read_text().splitlines()]
    return succeeded, lat


def h2load_row(server: Process, store: tuple[str, int | None], name: str, seqs: np.ndarray, connections: int,
               streams: int, seconds: float, tmp: Path) -> Row:
    """K h2load processes, each one connection resending its sessions' StepPacked; every request checked
    applied: each session's offset advanced by C for each request sent, and the two Python calls."""
    n, c = seqs.shape
    sids = create_sessions(server.port, n)
    parts = np.array_split(np.arange(n), connections)
    messages = [packed_request([sids[i] for i in p], seqs[p]).SerializeToString() for p in parts]
    bodies = []
    for k, m in enumerate(messages):
        bodies.append(tmp / f"body{k}.grpc")
        bodies[-1].write_bytes(frame(m))
    first = [answered_offsets(server.port, STEP_PACKED, m, len(p) * c) for m, p in zip(messages, parts)]
    warm_t = time.perf_counter()
    warm, _ = _h2load_all(server.port, bodies, streams, 4 * streams)
    per_second = warm / (time.perf_counter() - warm_t) / connections
    requests = max(4 * streams, int(per_second * seconds))
    window = Window(server, store[1])
    done, lat = _h2load_all(server.port, bodies, streams, requests)
    took, cpu, shares = window.close("h2load")
    for m, p, before in zip(messages, parts, first):
        after = answered_offsets(server.port, STEP_PACKED, m, len(p) * c)
        assert (after - before == c * (requests + 4 * streams + 1)).all(), "a request was not applied"
    return Row(store[0], name, f"h2load x {connections}, -m {streams}", n, c, done * (n // connections) * c / took,
               float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3), cpu, shares)


def redis_server(directory: Path) -> tuple[subprocess.Popen, str]:
    """A local redis-server as bench.redis_store runs it (append-only, fsync every second)."""
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                            stdout=subprocess.DEVNULL)
    _wait_port(port, proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def run(sessions: int, chunk: int, connections: int, streams: int, seconds: float, length: int,
        stores: list[str]) -> list[Row]:
    rows: list[Row] = []
    seqs = _sequences(sessions, length, seed=7)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for k, (store, label, workers, extra) in enumerate(SERVERS):
            if store not in stores:
                continue
            redis = redis_server(tmp) if store == "redis" else None  # a new one each time: the same start
            url = redis[1] if redis else f"sqlite:{tmp}/{k}.db"
            server = recur_server(url, "--workers", str(workers), *extra)
            where = (store, redis[0].pid if redis else None)
            first = len(rows)
            try:
                rows.append(python_row(server, where, label, seqs, chunk, connections, seconds))
                if shutil.which("h2load"):
                    rows.append(h2load_row(server, where, label, seqs[:, :chunk], connections, streams, seconds, tmp))
            finally:
                server.stop()
                if redis:
                    redis[0].terminate()
                    redis[0].wait(30)
            for r in rows[first:]:
                print(f"{r.store:6} {r.server:26} {r.generator:26} {r.rate:>10,.0f} tok/s  p50 {r.p50:8.3f} ms  "
                      f"cores {', '.join(f'{k} {v:.2f}' for k, v in r.cpu.items())}  shares {r.shares}", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    """Ratios to `workers 1` on the same store under the same load generator, from the same run; and recur's
    CPU per chunk (its processes' cores over chunks a second), which the machine's other load does not change."""
    base = {(r.store, r.generator): r.rate for r in rows if r.server == "workers 1"}
    out = ["| store | server | load generator | tokens/s | ratio to workers 1 | p50 ms | p99 ms | recur CPU µs/chunk | "
           "cores used, per process | chunks per worker |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        cores = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items()) + f" (total {sum(r.cpu.values()):.2f})"
        recur = sum(v for k, v in r.cpu.items() if k not in ("generator", "redis-server"))
        shares = " / ".join(f"{s:.0%}" for s in r.shares) if len(r.shares) > 1 else "-"
        ratio = r.rate / base[r.store, r.generator]
        out.append(f"| {r.store} | {r.server} | {r.generator} | {r.rate:,.0f} | {ratio:.2f} | {r.p50:.2f} | "
                   f"{r.p99:.2f} | {1e6 * recur / (r.rate / r.chunk):,.0f} | {cores} | {shares} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: S = 8, 2 connections, a second a row")
    p.add_argument("--sessions", type=int, default=1024, help="S")
    p.add_argument("--chunk", type=int, default=1, help="C, tokens a chunk")
    p.add_argument("--connections", type=int, default=8, help="K: connections (and h2load processes)")
    p.add_argument("--streams", type=int, default=2, help="h2load -m: requests in flight on each connection")
    p.add_argument("--seconds", type=float, default=8.0, help="about how long each row measures")
    p.add_argument("--length", type=int, default=512, help="tokens a session has to send (Python rows)")
    p.add_argument("--stores", default="sqlite,redis", help="comma-separated: sqlite, redis (needs redis-server)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    if args.quick:
        args.sessions, args.connections, args.seconds, args.length = 8, 2, 1.0, 64
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[1]  # the machine may be shared: what else ran, as the 5-minute load average
    stores = args.stores.split(",") if shutil.which("redis-server") else ["sqlite"]
    rows = run(args.sessions, args.chunk, args.connections, args.streams, args.seconds, args.length, stores)
    text = table(rows)
    print(text)
    if args.quick:
        return
    section = (f"## Workers\n\nMeasured {started} on {machine()}; load average {load:.1f} before the run.\n"
               "Command: `python -m bench.workers` (S = "
               f"{args.sessions}, C = {args.chunk}, K = {args.connections} connections, h2load -m {args.streams}, "
               f"about {args.seconds:.0f} s a row); how each row is made and checked: bench/workers.py's docstring. "
               "Ratios are to `--workers 1` under the same load generator in this run. Cores: CPU seconds per "
               "second of each process over the window (/proc; h2load's from its rusage).\n\n" + text + "\n")
    write_section(args.out, "## Workers", section)


if __name__ == "__main__":
    main()
