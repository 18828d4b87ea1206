"""The Grafana dashboard's main panels (deploy/grafana/dashboards/recur.json), drawn from a real scrape.

Starts a recur server on the shipped models (memory store) with its /metrics endpoint, a real
Prometheus scraping it (tests.helpers.Prometheus: the compose scrape config, local target), runs a
varied workload of about a minute over loopback gRPC (Stream and StreamBatch at a few session
counts, Generate, a few refused calls), then asks Prometheus for range queries of four panels
(Chunk latency, Throughput, Live sessions and open streams, Errors by gRPC code) with the
dashboard's own PromQL and draws them in one PNG. Everything it starts is stopped at the end.

    python -m bench.dashboard                       # writes docs/dashboard.png
    python -m bench.dashboard --seconds 20 --out /tmp/d.png
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from bench.run import ROOT, _drive, _sequences
from recur.v1 import recur_pb2 as pb
from recur.v1 import recur_pb2_grpc
from tests.helpers import Prometheus, Server

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "recur.json"
PANELS = ("Chunk latency", "Throughput", "Live sessions and open streams", "Errors by gRPC code")
UNITS = {"s": "", "ops": "per second", "none": ""}  # unit "s" is written on the ticks (ms)

# Phases of the workload, each a quarter of the run: (api, concurrent calls, sessions per call, chunk
# tokens, Generate alongside). Sessions are deleted after the second phase, so the gauge falls.
PHASES = [("stream", 2, 4, 4, False), ("batch", 1, 64, 16, False),
          ("stream", 4, 8, 8, True), ("batch", 2, 16, 1, True)]


def panels() -> list[dict]:
    """The four panels of the shipped dashboard, by title."""
    by_title = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    return [by_title[t] for t in PANELS]


async def _generate(stub: recur_pb2_grpc.RecurStub, until: float) -> int:
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="pylm"))).session_id
    calls, seed = 0, 0
    while time.monotonic() < until:
        seed += 1
        async for _ in stub.Generate(pb.GenerateRequest(session_id=sid, prompt="def ", max_tokens=24,
                                                        temperature=0.8, seed=seed)):
            pass
        calls += 1
    return calls


async def _refusals(stub: recur_pb2_grpc.RecurStub, until: float, every: float) -> dict[str, int]:
    """A few calls the server refuses: unknown session (NOT_FOUND), a token outside the vocabulary
    (INVALID_ARGUMENT), a chunk at the wrong offset (FAILED_PRECONDITION, an offset conflict)."""
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="pylm"))).session_id
    await stub.Step(pb.StepRequest(session_id=sid, tokens=[5, 6, 7], expected_offset=0))
    bad = [pb.StepRequest(session_id="no-such-session", tokens=[5]),
           pb.StepRequest(session_id=sid, tokens=[1000]),
           pb.StepRequest(session_id=sid, tokens=[5], expected_offset=0)]
    counts: dict[str, int] = {}
    i = 0
    while time.monotonic() < until:
        try:
            await stub.Step(bad[i % len(bad)])
        except grpc.aio.AioRpcError as e:
            counts[e.code().name] = counts.get(e.code().name, 0) + 1
        i += 1
        await asyncio.sleep(every)
    return counts


async def _delete_all(stub: recur_pb2_grpc.RecurStub) -> int:
    ids = [s.session_id for s in (await stub.ListSessions(pb.ListSessionsRequest(page_size=1000))).sessions]
    await asyncio.gather(*(stub.DeleteSession(pb.DeleteSessionRequest(session_id=i)) for i in ids))
    return len(ids)


async def workload(port: int, seconds: float) -> dict:
    """About `seconds` of load in four phases; returns what was sent."""
    phase = seconds / len(PHASES)
    summary: dict = {"phases": [], "generate_calls": 0, "refused": {}}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = recur_pb2_grpc.RecurStub(ch)
        for k, (api, calls, sessions, chunk, generate) in enumerate(PHASES):
            until = time.monotonic() + phase
            length = int(200_000 * phase) // (sessions * calls)  # more than a phase sends: its budget ends it
            drives = [_drive(port, _sequences(sessions, length, seed=k * 10 + j), chunk, api, 0, phase)
                      for j in range(calls)]
            refusals = asyncio.ensure_future(_refusals(stub, until, 0.5 if k == 2 else 1.5))
            generated = asyncio.ensure_future(_generate(stub, until)) if generate else None
            done = await asyncio.gather(*drives)
            for code, n in (await refusals).items():
                summary["refused"][code] = summary["refused"].get(code, 0) + n
            if generated is not None:
                summary["generate_calls"] += await generated
            summary["phases"].append({"api": "StreamBatch" if api == "batch" else "Stream", "calls": calls,
                                      "sessions": sessions * calls, "chunk": chunk,
                                      "chunks": sum(len(r.latencies) for r in done),
                                      "tokens": sum(r.tokens for r in done),
                                      "tokens_per_s": sum(r.tokens for r in done) / phase})
            if k == 1:
                summary["deleted"] = await _delete_all(stub)
    return summary


def query_range(port: int, promql: str, start: float, end: float, step: float) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": promql, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body["status"] != "success":
        raise RuntimeError(body)
    return body["data"]["result"]


def _legend(fmt: str | None, metric: dict) -> str:
    if not fmt:
        return ""
    for name, value in metric.items():
        fmt = fmt.replace("{{" + name + "}}", value)
    return fmt


def draw(series: list[tuple[dict, list[tuple[str, np.ndarray, np.ndarray]]]], t0: float, path: Path,
         subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (panel, lines) in zip(axes.flat, series):
        for label, t, v in lines:
            ax.plot(t - t0, v, label=label, linewidth=1.4, linestyle="--" if label == "offset conflicts" else "-")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "none")
        ax.set_title(panel["title"], fontsize=12, loc="left")
        if unit == "s":  # as Grafana shows unit "s" below a second
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y * 1e3:g} ms"))
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=9)
        ax.set_xlabel("seconds into the run", fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        top = max((float(np.nanmax(v)) for _, _, v in lines if np.isfinite(v).any()), default=1.0)
        ax.set_ylim(0, top * 1.3 or 1.0)  # room for the legend above the lines
        if any(label for label, *_ in lines):
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(subtitle, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    plt.close(fig)
    from PIL import Image  # a 64-colour palette: a third of the size, the same picture

    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="length of the workload")
    p.add_argument("--window", default="10s", help="rate window in place of the dashboard's [1m] (a short run)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(ROOT / "models", "memory:").start()
        prom = None
        try:
            (Path(tmp) / "prom").mkdir()
            prom = Prometheus(Path(tmp) / "prom", [f"127.0.0.1:{server.metrics_port}"])
            deadline = time.monotonic() + 60
            while prom.value("max(recur_sessions_live)") is None:  # the first scrape
                if time.monotonic() > deadline:
                    raise RuntimeError("prometheus scraped nothing in 60 s")
                time.sleep(0.2)
            time.sleep(3)  # a few scrapes of the idle server first
            start = time.time()
            summary = asyncio.run(asyncio.wait_for(workload(server.port, args.seconds), args.seconds + 60))
            time.sleep(3)  # the last scrapes
            end = time.time()
            series = []
            for panel in panels():
                lines = []
                for target in panel["targets"]:
                    expr = target["expr"].replace("[1m]", f"[{args.window}]")
                    for r in query_range(prom.port, expr, start - 2, end, 1.0):
                        t, v = np.array(r["values"], dtype=float).T
                        lines.append((_legend(target.get("legendFormat"), r["metric"]), t, v))
                series.append((panel, lines))
        finally:
            if prom is not None:
                prom.stop()
            server.terminate()
    draw(series, start, args.out,
         f"recur dashboard panels, one replica, {args.seconds:.0f} s workload "
         f"(rate windows {args.window}; the dashboard uses 1m), drawn by python -m bench.dashboard")
    for panel, lines in series:
        for label, _, v in lines:
            ok = v[np.isfinite(v)]
            if ok.size:
                print(f"{panel['title']:32} {label or '-':18} max {ok.max():10.4g}  mean {ok.mean():10.4g}")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
