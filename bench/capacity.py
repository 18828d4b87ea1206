"""Server capacity under a load generator outside Python: h2load (nghttp2) resending one pre-serialised
gRPC request, so that a ratio is bounded by the server and not by a Python client sharing its cores.

For S sessions and chunks of C tokens, one PackedStepBatch (S chunks, offsets unchecked, every chunk's
logits asked back) is serialised once and framed for gRPC (a 0 flag byte, a 4-byte big-endian length,
the message). h2load POSTs it to /recur.v1.Recur/StepPacked with `c` connections and `m` streams each
(c * m requests in flight), the same S sessions in every request. Rows:
  limit        in-process ONNX Runtime, all S sessions batched per call (bench.run's limit, the best of
               1 and the default intra-op threads), sampled before each server's rows and at the end of
               its S: the best sample
  h2load       recur StepPacked on memory and on SQLite, the yardstick (bench/yardstick.py, not recur),
               and the naive ONNX Runtime server's unary Step (one chunk a call, S calls in flight; S = 64)
  Python       recur memory and the yardstick on StreamPacked, driven by bench.run's client (as in
               bench.run's packed rows), for comparison with the same server under a native generator

Every h2load row is checked, not trusted: h2load counts HTTP 200 as success, and a gRPC error is an HTTP
200 too (grpc-status is in the trailers). So the body is first answered by one Python call (gRPC OK, no
chunk refused, S * C logits rows); every request h2load sent must count as succeeded; and, for recur and
the yardstick, every session's offset must have advanced by exactly C for every request sent (warm-up,
measured, and the two Python calls), which only a request that was answered OK and applied can do.

    python -m bench.capacity                # S = 64, 256, 1024; C = 1 (make bench; writes BENCHMARKS.md)
    python -m bench.capacity --quick        # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.run import (
    GROUP,
    ROOT,
    Process,
    Result,
    _sequences,
    in_process,
    limits,
    machine,
    naive_server,
    over_grpc,
    recur_server,
    write_section,
    yardstick_server,
)
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc

STEP_PACKED = "/recur.v1.Recur/StepPacked"  # package recur.v1, service Recur (protos/recur/v1/recur.proto)
STEP = "/recur.v1.Recur/Step"
HEADERS = ["content-type: application/grpc", "te: trailers"]  # bench.run's servers take no API key
INFLIGHT = [(1, 1), (1, 4), (4, 4)]  # (h2load -c connections, -m streams per connection)
LIMIT_CALLS = 64  # in-process calls in one sample of the limit
NAIVE_SESSIONS = 64  # the naive row: S unary calls in flight (-c 4 -m 16), each one chunk of one session


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed (0), its length (4 bytes, big-endian), the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def packed_request(session_ids: list[str], tokens: np.ndarray) -> pb.PackedStepBatch:
    """One chunk per session, tokens (S, C); offsets unchecked so that the same bytes can be resent."""
    return pb.PackedStepBatch(session_ids=session_ids, lengths=[tokens.shape[1]] * len(session_ids),
                              tokens=np.ascontiguousarray(tokens, dtype="<i4").tobytes(), return_logits=True)


def create_sessions(port: int, n: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        return [stub.CreateSession(pb.CreateSessionRequest(model="pylm")).session_id for _ in range(n)]


def call(port: int, method: str, message: bytes) -> bytes:
    """One unary call with pre-serialised bytes, as h2load sends them; raises grpc.RpcError unless OK."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply: bytes = ch.unary_unary(method)(message, timeout=60)
        return reply


def answered_offsets(port: int, method: str, message: bytes, rows: int) -> np.ndarray:
    """Send the body once from Python and check the reply: gRPC OK, nothing refused, `rows` logits rows.
    The sessions' offsets after it."""
    if method == STEP:
        step = pb.StepResponse.FromString(call(port, method, message))
        assert tuple(step.logits_shape)[:1] == (rows,), step.logits_shape
        return np.array([step.offset])
    reply = pb.PackedStepBatchResponse.FromString(call(port, method, message))
    assert not reply.failed, reply.statuses[0].message
    assert tuple(reply.logits_shape)[:1] == (rows,), reply.logits_shape
    return np.array(reply.offsets)


@dataclass
class H2Run:
    requests: int
    succeeded: int
    seconds: float
    traffic: int  # bytes received, headers and data
    latencies: list[float]  # seconds per request, from h2load's --log-file
    cpu: float  # h2load's user + system seconds

    @property
    def rate(self) -> float:
        return self.succeeded / self.seconds


def h2load(port: int, method: str, body: Path, connections: int, streams: int, requests: int, log: Path) -> H2Run:
    """One h2load run of `requests` POSTs of `body` (one thread, h2c with prior knowledge)."""
    cmd = ["h2load", "-t", "1", "-c", str(connections), "-m", str(streams), "-n", str(requests), "-d", str(body),
           "--log-file", str(log), *(a for h in HEADERS for a in ("-H", h)), f"http://127.0.0.1:{port}{method}"]
    log.unlink(missing_ok=True)  # h2load appends to it
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    took = re.search(r"finished in ([\d.]+)(us|ms|s),", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
    traffic = re.search(r"traffic: \S+ \((\d+)\) total", out)
    if not (took and counts and traffic):
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[took[2]]
    lat = [int(line.split("\t")[2]) / 1e6 for line in log.read_text().splitlines() if line]
    return H2Run(int(counts[1]), int(counts[2]), float(took[1]) * scale, int(traffic[1]), lat,
                 after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


@dataclass
class Row:
    sessions: int
    chunk: int
    mode: str
    generator: str  # "in process", "h2load -c C -m M", "Python (StreamPacked)"
    rate: float  # tokens/s
    p50: float  # ms per request (per call for the limit)
    p99: float
    server_cpu: float = 0.0  # µs per chunk
    generator_cpu: float = 0.0  # µs per chunk


def measure(server: Process, mode: str, seqs: np.ndarray, connections: int, streams: int, seconds: float,
            tmp: Path, exact: bool = True) -> Row:
    """h2load against `server` for about `seconds`: a short warm-up run sizes the measured one. `exact`:
    check every session's offset (the naive server's unsynchronised offsets are not)."""
    n, c = seqs.shape
    if mode.startswith("naive"):  # unary Step, one session: n calls in flight stand for n sessions
        sid = create_sessions(server.port, 1)[0]
        method, message = STEP, pb.StepRequest(session_id=sid, tokens=seqs[0].tolist(), return_logits=True,
                                               compact=True).SerializeToString()
        rows, chunks_per_request = c, 1
    else:
        method, message = STEP_PACKED, packed_request(create_sessions(server.port, n), seqs).SerializeToString()
        rows, chunks_per_request = n * c, n
    body = tmp / "body.grpc"
    body.write_bytes(frame(message))
    first = answered_offsets(server.port, method, message, rows)
    inflight = connections * streams
    warm = h2load(server.port, method, body, connections, streams, max(8, 4 * inflight), tmp / "warm.log")
    requests = max(4 * inflight, int(warm.rate * seconds))
    cpu0 = server.cpu_seconds()
    run = h2load(server.port, method, body, connections, streams, requests, tmp / "run.log")
    cpu = server.cpu_seconds() - cpu0
    last = answered_offsets(server.port, method, message, rows)
    sent = warm.requests + run.requests
    if warm.succeeded != warm.requests or run.succeeded != run.requests:
        raise AssertionError(f"{mode}: h2load counted {sent - warm.succeeded - run.succeeded} failures")
    if exact and not (last - first == c * (sent + 1)).all():
        raise AssertionError(f"{mode}: offsets advanced {sorted(set((last - first).tolist()))}, "
                             f"not {c} x {sent + 1} requests")
    chunks = run.succeeded * chunks_per_request
    return Row(n, c, mode, f"h2load -c {connections} -m {streams}", chunks * c / run.seconds,
               float(np.percentile(run.latencies, 50) * 1e3), float(np.percentile(run.latencies, 99) * 1e3),
               1e6 * cpu / chunks, 1e6 * run.cpu / chunks)


def from_result(r: Result, generator: str) -> Row:
    per = 1e6 / r.chunks if r.chunks else float("nan")
    return Row(r.sessions, r.chunk, r.mode, generator, r.rate, r.p(50), r.p(99), r.server_cpu * per,
               r.client_cpu * per)


def limit_sample(seqs: np.ndarray, chunk: int) -> list[Result]:
    """In-process batched runs of LIMIT_CALLS calls, with 1 and with the default threads. Taken before
    each server's rows and at the end, the best kept as the limit: the machine is shared, and a busy
    moment lowers one sample, not every one."""
    return [in_process(seqs[:, : LIMIT_CALLS * chunk], chunk, batched=True, threads=t) for t in (1, 0)]


def cell(servers: dict[str, Process], seqs: np.ndarray, c: int, seconds: float, budget: float, tmp: Path
         ) -> list[Row]:
    """Every row of one (S, C), the limit first."""
    s = len(seqs)
    rows: list[Row] = []
    tried: list[Result] = []
    for name in ("recur memory", "recur sqlite-sync", "yardstick"):
        tried += limit_sample(seqs, c)
        rows += [measure(servers[name], f"{name} (StepPacked)", seqs[:, :c], conns, streams, seconds, tmp)
                 for conns, streams in INFLIGHT]
    if s == NAIVE_SESSIONS:
        tried += limit_sample(seqs, c)
        rows.append(measure(servers["naive ort"], "naive ort (Step)", seqs[:, :c], 4, s // 4, seconds, tmp,
                            exact=False))
    for name in ("recur memory", "yardstick"):
        tried += limit_sample(seqs, c)
        python = over_grpc(servers[name], f"{name} (StreamPacked)", seqs, c, "packed", budget)
        rows.append(from_result(python, f"Python, {-(-s // GROUP)} in flight"))
    best = limits(tried + limit_sample(seqs, c))[(s, c)]
    return [Row(s, c, best.mode, "in process", best.rate, best.p(50), best.p(99)), *rows]


def run(sessions: list[int], chunks: list[int], seconds: float, length: int, budget: float) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        servers = {"recur memory": recur_server("memory:"), "recur sqlite-sync": recur_server(f"sqlite:{tmp}/b.db"),
                   "yardstick": yardstick_server(), "naive ort": naive_server("ort")}
        try:
            for c in chunks:
                for s in sessions:
                    for row in cell(servers, _sequences(s, length, seed=s * 100 + c), c, seconds, budget, tmp):
                        rows.append(row)
                        print(f"S={s:<5} C={c:<3} {row.mode:30} {row.generator:20} {row.rate:>10,.0f} tok/s  "
                              f"p50 {row.p50:7.3f} ms  p99 {row.p99:7.3f} ms  server {row.server_cpu:6.1f} us/chunk  "
                              f"generator {row.generator_cpu:6.1f} us/chunk", flush=True)
        finally:
            for p in servers.values():
                p.stop()
    return rows


def table(rows: list[Row]) -> str:
    """Ratios to the limit of the same (S, C), and to the yardstick under the same generator and load."""
    limit = {(r.sessions, r.chunk): r.rate for r in rows if r.generator == "in process"}
    yard = {(r.sessions, r.chunk, r.generator): r.rate for r in rows if r.mode.startswith("yardstick")}
    out = ["| S | C | server (call) | load generator | tokens/s | p50 ms | p99 ms | server CPU µs/chunk | "
           "generator CPU µs/chunk | ratio to limit | ratio to yardstick |",
           "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        y = yard.get((r.sessions, r.chunk, r.generator))
        to_yard = f"{r.rate / y:.2f}" if y and not r.mode.startswith("naive") else "-"
        cpu = f"{r.server_cpu:.1f}" if r.server_cpu else "-"
        gen = f"{r.generator_cpu:.1f}" if r.generator_cpu else "-"
        mode = f"**{r.mode}**" if r.generator == "in process" else r.mode
        out.append(f"| {r.sessions} | {r.chunk} | {mode} | {r.generator} | {r.rate:,.0f} | {r.p50:.3f} | "
                   f"{r.p99:.3f} | {cpu} | {gen} | {r.rate / limit[(r.sessions, r.chunk)]:.2f} | {to_yard} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: S = 4, C = 1, half a second a row")
    p.add_argument("--sessions", default="64,256,1024", help="comma-separated S values")
    p.add_argument("--chunks", default="1", help="comma-separated C values")
    p.add_argument("--seconds", type=float, default=4.0, help="about how long each h2load row measures")
    p.add_argument("--length", type=int, default=256, help="tokens per session for the limit and Python rows")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per Python row before it stops early")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only; BENCHMARKS.md is not written")
    args = p.parse_args()
    sessions, chunks = [int(v) for v in args.sessions.split(",")], [int(v) for v in args.chunks.split(",")]
    seconds, length = args.seconds, args.length
    if args.quick:
        sessions, chunks, seconds, length = [4], [1], 0.5, 16
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = run(sessions, chunks, seconds, length, args.budget)
    text = table(rows)
    print(text)
    if args.quick or args.no_write:
        return
    cmd = "python -m bench.capacity" + (f" --sessions {args.sessions}" if args.sessions != "64,256,1024" else "")
    section = (f"## Server capacity (h2load)\n\nMeasured {started} on {machine()}; {h2load_version()}.\n"
               f"Command: `make bench` (`{cmd}`); how each row is made and checked: bench/capacity.py's docstring. "
               f"h2load rows: `h2load -t 1 -c C -m M -n N -d body.grpc -H 'content-type: application/grpc' "
               f"-H 'te: trailers' http://127.0.0.1:PORT{STEP_PACKED}` (the naive row: {STEP}), N sized for about "
               f"{seconds:.0f} s after a warm-up run; latency is per request. Python rows: bench.run's packed "
               f"client on StreamPacked ({length} tokens a session, sessions in messages of {GROUP}). "
               "Generator CPU: h2load's user + system time, or the Python client's process time, per chunk. "
               f"Limit (bold): bench.run's in-process batched ONNX Runtime, the best of samples of {LIMIT_CALLS} "
               "calls with 1 and with the default threads, taken before each server's rows and after the last; "
               "ratios are to it, and to the yardstick under the same load generator.\n\n" + text + "\n")
    write_section(args.out, "## Server capacity (h2load)", section)


def h2load_version() -> str:
    return subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    main()
