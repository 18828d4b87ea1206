"""The benchmark suite: recur against what ONNX Runtime can do in process, in one run.

For S concurrent sessions each streaming a sequence in chunks of C tokens (every chunk from the
state its session's previous chunk left):
  limit      in-process ONNX Runtime, all S sessions batched per call (batch S, time C), with one
             intra-op thread and with ONNX Runtime's default; the better of the two is the limit
  per-call   in-process ONNX Runtime, one call per session per chunk
  recur      recur over loopback gRPC: StepPacked/StreamPacked (packed), Stream, StreamBatch, and
             Step for S = 1; memory store and SQLite sync
  naive      bench/naive_server.py: grpcio, unary calls, dict of states, no batching; PyTorch eager
             and ONNX Runtime
  yardstick  bench/yardstick.py (not recur): grpc.aio answering StreamPacked with nothing but a gather,
             one ONNX Runtime call and a scatter, driven by the packed rows' client: what the Python
             gRPC stack itself allows
Every gRPC row asks every chunk's full logits back (return_logits, compact), and the load generator
builds all its request messages before the clock starts. For each recur row the server process's
own CPU time per chunk (user + system, /proc) is recorded next to ONNX Runtime's CPU time per chunk
(its threads', /proc/PID/task), over the measured window.
Writes BENCHMARKS.md and bench/throughput.png.

    python -m bench.run                 # the full suite (make bench)
    python -m bench.run --quick         # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "pylm" / "1"
TOL = 1e-5
GROUP = 32  # sessions per batch message: S = 64 sends two messages per tick (see _drive)


@dataclass
class Result:
    mode: str
    sessions: int
    chunk: int
    tokens: int
    seconds: float
    latencies: list[float]  # per chunk (per call for in-process batched)
    rss_mb: float = 0.0
    checked: int = 0  # sessions compared with their one-pass reference
    chunks: int = 0  # chunks answered
    server_cpu: float = 0.0  # seconds of the server process's CPU over the window
    ort_seconds: float = 0.0  # seconds inside ONNX Runtime calls over the window (recur only)
    client_cpu: float = 0.0  # seconds of the load generator's CPU (this process, every thread) over the window

    def per_chunk_us(self, seconds: float) -> float:
        return 1e6 * seconds / self.chunks if self.chunks else float("nan")

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")


def _session(threads: int = 1) -> ort.InferenceSession:
    """threads 0: ONNX Runtime's default (one per core)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(MODEL_DIR / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _sequences(sessions: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 98, (sessions, length)).astype(np.int64)


def reference(seq: np.ndarray) -> np.ndarray:
    """One pass over one whole sequence: logits (T, V)."""
    s = _session()
    zeros = np.zeros((2, 1, 256), np.float32)
    return s.run(["logits"], {"tokens": seq[None], "state_h": zeros, "state_c": zeros})[0][0]


def in_process(seqs: np.ndarray, chunk: int, batched: bool, threads: int = 1) -> Result:
    s = _session(threads)
    n, length = seqs.shape
    h = np.zeros((2, n, 256), np.float32)
    c = np.zeros((2, n, 256), np.float32)
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(0, length, chunk):
        if batched:
            t1 = time.perf_counter()
            _, h, c = s.run(None, {"tokens": seqs[:, i : i + chunk], "state_h": h, "state_c": c})
            lat.append(time.perf_counter() - t1)
        else:
            for j in range(n):
                t1 = time.perf_counter()
                _, h[:, j : j + 1], c[:, j : j + 1] = s.run(None, {"tokens": seqs[j : j + 1, i : i + chunk],
                                                                   "state_h": h[:, j : j + 1],
                                                                   "state_c": c[:, j : j + 1]})
                lat.append(time.perf_counter() - t1)
    mode = f"limit ({'default' if threads == 0 else threads} thread{'s' if threads != 1 else ''})" if batched \
        else "per-call"
    return Result(mode, n, chunk, seqs.size, time.perf_counter() - t0, lat, chunks=len(lat) if not batched
                  else n * len(lat))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Process:
    """A server process on a free port (it prints "... listening on port N"), with its peak RSS readable."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        self.metrics_port = 0
        for line in self.proc.stdout:
            if line.startswith("metrics on port "):
                self.metrics_port = int(line.split()[-1])
            if listening := re.fullmatch(r"\S+ listening on port (\d+)\s*", line):
                self.port = int(listening[1])
                break
        else:
            raise RuntimeError(f"{cmd} did not start")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        return cpu_seconds(self.proc.pid)

    def ort_seconds(self) -> float:
        """CPU seconds so far of ONNX Runtime's threads: the server's inference thread (named recur-ort)
        and the intra-op pool threads ONNX Runtime started (unnamed: "python", not the main thread);
        not gRPC's threads, not the SQLite writer (recur-sqlite). 0 for a process without recur-ort."""
        total, ours = 0.0, False
        tick = os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            ours = ours or comm == "recur-ort"
            if comm == "recur-ort" or (comm == "python" and task.name != str(self.proc.pid)):
                total += (int(fields[11]) + int(fields[12])) / tick
        return total if ours else 0.0

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def recur_server(store: str, *extra: str, models: Path = ROOT / "models") -> Process:
    return Process([sys.executable, "-m", "recur.cli", "--log-level", "WARNING", "serve", "--models-dir",
                    str(models), "--store", store, "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                    "-1", *extra])


def naive_server(engine: str = "torch", *extra: str) -> Process:
    return Process([sys.executable, "-m", "bench.naive_server", "--model", str(MODEL_DIR), "--port", "0",
                    "--engine", engine, *extra])


def yardstick_server() -> Process:
    return Process([sys.executable, "-m", "bench.yardstick", "--model", str(MODEL_DIR), "--port", "0"])


def _prebuilt(sids: list[str], seqs: np.ndarray, chunk: int, api: str, options: dict | None = None) -> list:
    """Every request message of the run, built before the clock starts: per session (step, stream)
    or per tick (batch, packed), each asking its full logits back."""
    n, length = seqs.shape
    ticks = range(0, length, chunk)
    if api in ("step", "stream"):
        return [[pb.StepRequest(session_id=sids[i], tokens=seqs[i, a : a + chunk].tolist(), expected_offset=a,
                                return_logits=True, compact=True, request_id=str(i), **(options or {}))
                 for a in ticks] for i in range(n)]
    if api == "batch":
        return [pb.StepBatch(steps=[pb.StepRequest(session_id=sids[i], tokens=seqs[i, a : a + chunk].tolist(),
                                                   expected_offset=a, return_logits=True, compact=True)
                                    for i in range(n)]) for a in ticks]
    return [pb.PackedStepBatch(session_ids=sids, expected_offsets=[a] * n,
                               lengths=[min(chunk, length - a)] * n,
                               tokens=np.ascontiguousarray(seqs[:, a : a + chunk], dtype="<i4").tobytes(),
                               return_logits=True, **(options or {})) for a in ticks]


async def _drive(server: Process | int, seqs: np.ndarray, chunk: int, api: str, check: int, budget: float,
                 options: dict | None = None, on_start: Callable[[], None] | None = None) -> Result:
    """S sessions, each sending its next chunk when the previous reply arrives (the batch APIs: all
    sessions' next chunks in one message per tick). `server`: a Process (its CPU is measured) or a port.
    `on_start` runs once the sessions exist, as the measured window opens."""
    proc = server if isinstance(server, Process) else None
    port = server.port if isinstance(server, Process) else server
    n = len(seqs)
    lat: list[float] = []
    logits: dict[int, list[np.ndarray]] = {i: [] for i in range(check)}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        sids = [(await stub.CreateSession(pb.CreateSessionRequest(model="pylm"))).session_id for _ in range(n)]
        requests = _prebuilt(sids, seqs, chunk, api, options)
        pos = [0] * n
        done = 0
        if on_start is not None:
            on_start()
        cpu0, ort0 = (proc.cpu_seconds(), proc.ort_seconds()) if proc else (0.0, 0.0)
        client0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + budget

        def record(i: int, reply: pb.StepResponse, sent: float) -> None:
            lat.append(time.perf_counter() - sent)
            if i < check:
                logits[i].append(np.frombuffer(reply.logits, "<f4").reshape(tuple(reply.logits_shape)))
            pos[i] = reply.offset

        if api in ("batch", "packed"):
            # sessions in groups of at most GROUP, each group one message per tick: several messages in
            # flight on the stream, each session still sending its next chunk only after its reply
            bounds = [*range(0, n, GROUP), n]
            groups = [(a, b, _prebuilt(sids[a:b], seqs[a:b], chunk, api, options))
                      for a, b in itertools.pairwise(bounds)]
            call = stub.StreamBatch() if api == "batch" else stub.StreamPacked()
            sent_at: list[float] = []
            ticks = [0] * len(groups)
            finished = [False] * len(groups)
            for group in groups:
                sent_at.append(time.perf_counter())
                await call.write(group[2][0])
            live = len(groups)
            g = 0
            while live:  # replies come in the order the messages were sent: round robin over the groups
                a, b, msgs = groups[g]
                reply = await call.read()
                now = time.perf_counter() - sent_at[g]
                if api == "batch":
                    for i, r in enumerate(reply.steps, start=a):
                        assert not r.HasField("status"), r.status.message
                        lat.append(now)
                        if i < check:
                            logits[i].append(np.frombuffer(r.logits, "<f4").reshape(tuple(r.logits_shape)))
                        pos[i] = r.offset
                else:
                    assert not reply.failed, reply.statuses[0].message
                    lat.extend([now] * (b - a))
                    pos[a:b] = reply.offsets
                    if a < check:
                        rows = np.frombuffer(reply.logits, "<f4").reshape(tuple(reply.logits_shape))
                        steps = len(rows) // (b - a)
                        for i in range(a, min(b, check)):
                            logits[i].append(rows[(i - a) * steps : (i - a + 1) * steps])
                ticks[g] += 1
                if ticks[g] < len(msgs) and time.perf_counter() < deadline:
                    sent_at[g] = time.perf_counter()
                    await call.write(msgs[ticks[g]])
                else:
                    finished[g] = True
                    live -= 1
                g = (g + 1) % len(groups)
                while live and finished[g]:
                    g = (g + 1) % len(groups)
            await call.done_writing()
        elif api == "step":
            async def one(i: int) -> None:
                for req in requests[i]:
                    if time.perf_counter() >= deadline:
                        return
                    sent = time.perf_counter()
                    record(i, await stub.Step(req), sent)

            await asyncio.gather(*(one(i) for i in range(n)))
        else:
            call = stub.Stream()
            sent_at = [0.0] * n
            k = [0] * n
            for i in range(n):
                sent_at[i] = time.perf_counter()
                await call.write(requests[i][0])
            async for reply in call:
                assert not reply.HasField("status"), reply.status.message
                i = int(reply.request_id)
                record(i, reply, sent_at[i])
                k[i] += 1
                if k[i] < len(requests[i]) and time.perf_counter() < deadline:
                    sent_at[i] = time.perf_counter()
                    await call.write(requests[i][k[i]])
                else:
                    done += 1
                    if done == n:
                        await call.done_writing()
        seconds = time.perf_counter() - t0
        client_cpu = time.process_time() - client0
        cpu, ort_s = (proc.cpu_seconds() - cpu0, proc.ort_seconds() - ort0) if proc else (0.0, 0.0)
    checked = 0
    for i, parts in logits.items():
        if parts:
            got = np.concatenate(parts)
            want = reference(seqs[i])[: len(got)]
            err = float(np.abs(got - want).max())
            if err > TOL:
                raise AssertionError(f"session {i}: logits differ from the one-pass reference by {err}")
            checked += 1
    return Result(api, n, chunk, sum(pos), seconds, lat, checked=checked, chunks=len(lat), server_cpu=cpu,
                  ort_seconds=ort_s, client_cpu=client_cpu)


def over_grpc(server: Process, mode: str, seqs: np.ndarray, chunk: int, api: str, budget: float) -> Result:
    server.reset_peak()
    r = asyncio.run(_drive(server, seqs, chunk, api, check=min(2, len(seqs)), budget=budget))
    r.mode, r.rss_mb = mode, server.peak_mb()
    return r


def run_suite(sessions: list[int], chunks: list[int], length: int, budget: float, naive: bool,
              only: set[str] | None = None) -> list[Result]:
    """`only`: a subset of the row labels (packed, Stream, StreamBatch, Step, naive) for a spot check
    (packed takes the yardstick's row with it)."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"recur memory": recur_server("memory:"), "recur sqlite-sync": recur_server(f"sqlite:{tmp}/b.db"),
                   "yardstick": yardstick_server()}
        if naive:
            servers["naive torch"] = naive_server("torch")
            servers["naive ort"] = naive_server("ort")
        try:
            for c in chunks:
                for s in sessions:
                    seqs = _sequences(s, length, seed=s * 100 + c)
                    first = len(results)
                    results.append(in_process(seqs, c, batched=True, threads=1))
                    results.append(in_process(seqs, c, batched=True, threads=0))
                    results.append(in_process(seqs, c, batched=False))
                    cells = [("recur memory", "packed", "packed"), ("yardstick", "packed", "packed"),
                             ("recur sqlite-sync", "packed", "packed"),
                             ("recur memory", "Stream", "stream"), ("recur sqlite-sync", "Stream", "stream"),
                             ("recur memory", "StreamBatch", "batch")]
                    if s == 1:
                        cells.append(("recur memory", "Step", "step"))
                    if naive and s <= 64:
                        cells += [("naive ort", "naive", "step"), ("naive torch", "naive", "step")]
                    for name, label, api in cells:
                        if only is None or label in only:
                            shown = "unary" if label == "naive" else label
                            results.append(over_grpc(servers[name], f"{name} ({shown})", seqs, c, api, budget))
                    for r in results[first:]:
                        extra = ""
                        if r.server_cpu:
                            extra = (f"  server CPU {r.per_chunk_us(r.server_cpu):6.1f} us/chunk"
                                     f"  ORT {r.per_chunk_us(r.ort_seconds):6.1f} us/chunk")
                        print(f"S={s:<4} C={c:<3} {r.mode:30} {r.rate:>10,.0f} tok/s  p50 {r.p(50):7.3f} ms  "
                              f"p99 {r.p(99):7.3f} ms{extra}", flush=True)
        finally:
            for p in servers.values():
                p.stop()
    return results


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"ONNX Runtime {ort.__version__}, grpcio {grpc.__version__}")


def limits(results: list[Result]) -> dict[tuple[int, int], Result]:
    """The limit of each (S, C): the best in-process batched run over the thread settings tried."""
    best: dict[tuple[int, int], Result] = {}
    for r in results:
        key = (r.sessions, r.chunk)
        if r.mode.startswith("limit") and (key not in best or r.rate > best[key].rate):
            best[key] = r
    return best


def table(results: list[Result]) -> str:
    best = limits(results)
    rows = ["| S | C | mode | tokens/s | p50 chunk ms | p99 chunk ms | server CPU µs/chunk | ORT µs/chunk | "
            "ORT share of server CPU | server peak RSS MB | ratio to limit |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rss = f"{r.rss_mb:.0f}" if r.rss_mb else "-"
        cpu = f"{r.per_chunk_us(r.server_cpu):.1f}" if r.server_cpu else "-"
        ort_us = f"{r.per_chunk_us(r.ort_seconds):.1f}" if r.ort_seconds else "-"
        share = f"{r.ort_seconds / r.server_cpu:.2f}" if r.ort_seconds and r.server_cpu else "-"
        limit = best[(r.sessions, r.chunk)]
        mode = f"**{r.mode}**" if r is limit else r.mode
        rows.append(f"| {r.sessions} | {r.chunk} | {mode} | {r.rate:,.0f} | {r.p(50):.3f} | {r.p(99):.3f} | {cpu} | "
                    f"{ort_us} | {share} | {rss} | {r.rate / limit.rate:.2f} |")
    return "\n".join(rows)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = sorted({r.chunk for r in results})
    fig, axes = plt.subplots(1, len(chunks), figsize=(6 * len(chunks), 4), squeeze=False)
    for ax, c in zip(axes[0], chunks):
        for mode in dict.fromkeys(r.mode for r in results):
            pts = sorted((r.sessions, r.rate) for r in results if r.mode == mode and r.chunk == c)
            if len(pts) > 1:
                ax.plot(*zip(*pts), "o-", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"chunks of C = {c} tokens")
        ax.set_xlabel("concurrent sessions S")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: S = 1, 4; C = 1, 4; 32 tokens")
    p.add_argument("--length", type=int, default=512, help="tokens per session")
    p.add_argument("--budget", type=float, default=30.0, help="seconds per gRPC cell before it stops early")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--sessions", help="comma-separated S values (a spot check; BENCHMARKS.md is not written)")
    p.add_argument("--chunks", help="comma-separated C values (a spot check)")
    p.add_argument("--only", help="comma-separated rows: packed (with the yardstick), Stream, StreamBatch, Step, "
                   "naive (a spot check)")
    args = p.parse_args()
    if args.quick:
        sessions, chunks, length, budget = [1, 4], [1, 4], 32, 10.0
    else:
        sessions, chunks, length, budget = [1, 16, 64, 256], [1, 16], args.length, args.budget
    spot = bool(args.sessions or args.chunks or args.only)
    if args.sessions:
        sessions = [int(v) for v in args.sessions.split(",")]
    if args.chunks:
        chunks = [int(v) for v in args.chunks.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    only = set(args.only.split(",")) if args.only else None
    results = run_suite(sessions, chunks, length, budget, naive=True, only=only)
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "rate": r.rate, "p50": r.p(50), "p99": r.p(99),
                                          "latencies": None} for r in results], indent=1))
    if args.quick or spot:
        return
    plot(results, ROOT / "bench" / "throughput.png")
    section = (f"## Throughput and latency\n\nMeasured {started} on {machine()}.\n"
               f"Command: `make bench` (`python -m bench.run`). Each session streams {length} tokens; "
               f"a gRPC cell stops early after {budget:.0f} s and counts what completed. Every gRPC row asks "
               "every chunk's full logits back, from request messages built before the clock starts. The limit "
               "(bold) is the better of the in-process batched runs with 1 and with the default ONNX Runtime "
               "threads; ratios are to it. The yardstick (bench/yardstick.py, not recur) answers the packed rows' "
               "messages with nothing but a gather, one ONNX Runtime call and a scatter: what the Python gRPC "
               "stack itself allows. Server CPU: the server process's user + system time per chunk over "
               "the window (/proc); ORT: the CPU time per chunk of its ONNX Runtime threads (the inference "
               "thread and ONNX Runtime's intra-op pool, read per thread from /proc).\n\n"
               + table(results) + "\n\n![throughput](bench/throughput.png)\n")
    write_section(args.out, "## Throughput and latency", section)


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace one `## ` section of BENCHMARKS.md, keeping the others (the analysis is written by hand)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n\n" + (text[end + 1 :] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()
