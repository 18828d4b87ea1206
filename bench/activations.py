"""What asking for activations costs, and that not asking costs nothing measurable: S = 64 sessions,
C = 16, the packed batch with full logits, on the shipped pylm (which carries activations.onnx)
against the same model exported without activations, in one run, alternating.

    python -m bench.activations            # writes its section of BENCHMARKS.md
    python -m bench.activations --quick    # a smoke run (8 sessions, 32 tokens, one round), nothing written
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.run import ROOT, _drive, _sequences, machine, recur_server, write_section


def _without_activations(models: Path) -> None:
    """models/pylm/1 as exported before activations: no activations section, no activations.onnx."""
    shutil.copytree(ROOT / "models" / "pylm", models / "pylm")
    manifest_path = models / "pylm" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("activations", None)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (models / "pylm" / "1" / "activations.onnx").unlink(missing_ok=True)


def main() -> None:
    quick = "--quick" in sys.argv
    rounds = 1 if quick else 3
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    seqs = _sequences(8, 32, seed=3) if quick else _sequences(64, 256, seed=3)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "models"
        _without_activations(old)
        servers = {"with activations.onnx": recur_server("memory:"),
                   "exported without": recur_server("memory:", models=old)}
        cells = [("exported without", "not asked", None), ("with activations.onnx", "not asked", None),
                 ("with activations.onnx", "asked: last layer's h", {"return_activations": True,
                                                                     "activation_layers": [-1],
                                                                     "activation_states": ["h"]}),
                 ("with activations.onnx", "asked: every layer's h and c", {"return_activations": True})]
        try:
            for _ in range(rounds):
                for name, label, options in cells:
                    r = asyncio.run(_drive(servers[name], seqs, 16, "packed", check=1, budget=60, options=options))
                    rows.setdefault(f"{name} | {label}", []).append(r.rate)
                    print(f"{name:22} {label:30} {r.rate:10,.0f} tok/s", flush=True)
        finally:
            for s in servers.values():
                s.stop()
    base = sorted(rows["exported without | not asked"])[rounds // 2]
    table = [f"| model | activations | tokens/s (median of {rounds}) | ratio to the model exported without |",
             "|---|---|---:|---:|"]
    for key, rates in rows.items():
        median = sorted(rates)[rounds // 2]
        table.append(f"| {key} | {median:,.0f} | {median / base:.2f} |")
    if not quick:
        write_section(ROOT / "BENCHMARKS.md", "## Activations", (
            f"## Activations\n\nMeasured {started} on {machine()}. Command: `python -m bench.activations`. "
            "64 sessions, 16-token chunks, the packed batch with full logits, memory store; the shipped pylm "
            "(model.onnx and activations.onnx) against a copy exported without activations, the cells "
            f"alternated {rounds} times. A request that does not ask runs model.onnx alone on either; one that "
            "asks runs the activation graph, which recomputes the LSTM's gates to give c at every step.\n\n"
            + "\n".join(table) + "\n"))
    print("\n".join(table))


if __name__ == "__main__":
    main()
