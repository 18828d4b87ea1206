"""A smoke run of the benchmark suite (make bench) so that it keeps working; not a measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--json", str(out)], cwd=ROOT, check=True,
                   timeout=180, capture_output=True)
    results = json.loads(out.read_text())
    modes = {r["mode"] for r in results}
    assert {"limit (1 thread)", "limit (default threads)", "per-call", "recur memory (Stream)",
            "recur memory (StreamBatch)", "recur memory (packed)", "recur sqlite-sync (packed)",
            "naive ort (unary)", "naive torch (unary)"} <= modes
    grpc_cells = [r for r in results if r["mode"].startswith("recur")]
    assert all(r["tokens"] == r["sessions"] * 32 and r["checked"] >= 1 for r in grpc_cells)
    # CPU times come from /proc in clock ticks (10 ms): a tiny cell may read 0, the run as a whole may not
    assert all(r["server_cpu"] >= 0 and r["ort_seconds"] >= 0 for r in grpc_cells)
    assert sum(r["server_cpu"] for r in grpc_cells) > 0 and sum(r["ort_seconds"] for r in grpc_cells) > 0


def test_soak_smoke() -> None:
    """The soak itself asserts that nothing acknowledged was lost; here it runs for a few seconds."""
    out = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", "3", "--sessions", "40", "--no-write"],
                         cwd=ROOT, check=True, timeout=180, capture_output=True, text=True).stdout
    assert "Lost: 0" in out and " OK " in out


def test_v2_bench_smoke() -> None:
    """The v2 row's load generator (tritonclient, in its own venv) against the native Stream."""
    out = subprocess.run([sys.executable, "-m", "bench.v2", "--sessions", "4", "--chunk", "4", "--length", "32",
                          "--no-write"], cwd=ROOT, check=True, timeout=300, capture_output=True, text=True).stdout
    assert "ModelStreamInfer (tritonclient, full logits)" in out and "v2 / native:" in out


def test_activations_bench_smoke() -> None:
    """Its four cells run and check their logits against the one-pass reference (a few seconds)."""
    out = subprocess.run([sys.executable, "-m", "bench.activations", "--quick"], cwd=ROOT, check=True, timeout=300,
                         capture_output=True, text=True).stdout
    assert "exported without | not asked" in out and "asked: every layer's h and c" in out


def test_arena_bench_smoke() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.arena", "--quick"], cwd=ROOT, check=True, timeout=120,
                         capture_output=True, text=True).stdout
    assert out.count("\n") == 4 and "| 64 |" in out and "| 256 |" in out
