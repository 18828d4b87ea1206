"""`recur report compare`: vanilla RNN, LSTM and GRU at (near-)equal parameter counts, trained on the
same text with the same steps, seed and schedule, compared on validation bits per character and speed.

Why: the lecture claims gated cells model long text better than a vanilla RNN of the same size. This
report measures that claim on the project's own trainer and data (stdlib Python source, task lm)
instead of asserting it. Each cell gets the hidden size that brings its total parameter count (embedding,
recurrent layers and head) closest to one target, so no cell wins by being bigger. Training speed is
PyTorch's (train steps only); serving speed is the exported ONNX graph in an in-process ONNX Runtime
session, the way `recur serve` runs it.

Outputs in --out: compare.png (validation bpc against step), compare.md (the table), compare.json
(the table and curves), and runs/CELL and runs/models/CELL/1 (the runs and the exported models).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

CELLS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # weight blocks per recurrent layer (nn.RNN/LSTM/GRU layout)
VOCAB = 98  # characters of training.data.VOCAB (checked against it when training)
TOLERANCE = 0.05  # parameter counts must lie within this fraction of their mean

# Serving measurement: what the table's last column reports.
SERVE_BATCH, SERVE_CHUNK = 64, 16
SERVE_WHAT = (f"in-process ONNX Runtime (CPUExecutionProvider, 1 intra-op thread), batch {SERVE_BATCH}, "
              f"chunks of {SERVE_CHUNK} tokens, state carried between chunks")


def parameter_count(cell: str, hidden: int, *, layers: int, embed: int, vocab: int = VOCAB,
                    classes: int = VOCAB) -> int:
    """Parameters of a token-input SequenceModel: embedding, recurrent layers (two biases each), head."""
    g = GATES[cell]
    recurrent = g * (embed * hidden + hidden * hidden + 2 * hidden)
    recurrent += (layers - 1) * g * (2 * hidden * hidden + 2 * hidden)
    return vocab * embed + recurrent + hidden * classes + classes


def hidden_for(cell: str, params: int, *, layers: int, embed: int, vocab: int = VOCAB, classes: int = VOCAB) -> int:
    """The hidden size whose parameter count is closest to `params` (the count grows with hidden)."""
    lo, hi = 1, 1
    while parameter_count(cell, hi, layers=layers, embed=embed, vocab=vocab, classes=classes) < params:
        hi *= 2
    while hi - lo > 1:  # count(lo) < params <= count(hi), or hi == 1
        mid = (lo + hi) // 2
        if parameter_count(cell, mid, layers=layers, embed=embed, vocab=vocab, classes=classes) < params:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda h: abs(parameter_count(cell, h, layers=layers, embed=embed, vocab=vocab,
                                                           classes=classes) - params))


def spread(counts: list[int]) -> float:
    """Largest relative distance of a count from the counts' mean."""
    mean = sum(counts) / len(counts)
    return max(abs(c - mean) / mean for c in counts)


@dataclass
class CellResult:
    cell: str
    hidden: int
    layers: int
    parameters: int
    final_val_bpc: float = math.nan
    train_tokens_per_s: float = math.nan
    serve_tokens_per_s: float = math.nan
    train_seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)  # [{"step", "val_bpc"}]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/compare", help="output directory")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells to compare")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--params", type=int, default=0,
                      help="target total parameter count per model (default 300000; 6000 with --tiny)")
    size.add_argument("--hidden-target", type=int, default=0,
                      help="instead of --params: the LSTM's hidden size; its parameter count is the target")
    p.add_argument("--layers", type=int, default=1, help="stacked recurrent layers")
    p.add_argument("--embed", type=int, default=64, help="character embedding size")
    p.add_argument("--steps", type=int, default=0, help="optimiser steps per model (default 800; 6 with --tiny)")
    p.add_argument("--batch", type=int, default=0, help="rows per step (default 32; 4 with --tiny)")
    p.add_argument("--bptt", type=int, default=0, help="truncated-BPTT window (default 64; 16 with --tiny)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (default 50; 1 with --tiny)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, as recur train (0: off)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between validations (default 50; 2 with --tiny)")
    p.add_argument("--val-chars", type=int, default=0,
                   help="validate on the first N characters of the val split (default 100000; 2000 with --tiny)")
    p.add_argument("--seed", type=int, default=1337, help="random seed, the same for every cell")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the speeds compare cells, not machines, and stay comparable "
                   "on a busy machine)")
    p.add_argument("--serve-seconds", type=float, default=0.0,
                   help="time spent measuring serving throughput per model (default 2; 0.2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="seconds-long run for tests: tiny models, few steps")


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    tiny = args.tiny
    fill = {"params": (300_000, 6_000), "steps": (800, 6), "batch": (32, 4), "bptt": (64, 16), "warmup": (50, 1),
            "eval_every": (50, 2), "val_chars": (100_000, 2_000), "serve_seconds": (2.0, 0.2)}
    values = vars(args).copy()
    for key, (normal, small) in fill.items():
        if not values.get(key):
            values[key] = small if tiny else normal
    if tiny and args.embed == 64:
        values["embed"] = 8
    return argparse.Namespace(**values)


def _train(cell: str, hidden: int, args: argparse.Namespace, out: Path) -> CellResult:
    import torch

    from training.config import TrainConfig
    from training.data import VOCAB as vocabulary
    from training.train import Trainer

    run_dir = out / "runs" / cell
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl appends: start each report afresh
    cfg = TrainConfig(task="lm", cell=cell, out=str(run_dir), layers=args.layers, hidden=hidden, embed=args.embed,
                      batch=args.batch, bptt=args.bptt, max_steps=args.steps, lr=args.lr, warmup=args.warmup,
                      clip=args.clip, train_chars=args.batch * args.bptt * args.steps + 1, val_chars=args.val_chars,
                      test_chars=args.val_chars, seed=args.seed, threads=args.threads, log_every=args.eval_every)
    trainer = Trainer(cfg, command=f"recur report compare ({cell})")
    if len(vocabulary) != VOCAB:
        raise RuntimeError(f"the vocabulary has {len(vocabulary)} characters; compare.VOCAB says {VOCAB}")
    params = sum(p.numel() for p in trainer.model.parameters())
    expected = parameter_count(cell, hidden, layers=args.layers, embed=args.embed)
    if params != expected:
        raise RuntimeError(f"{cell}: the model has {params} parameters; parameter_count says {expected}")
    result = CellResult(cell=cell, hidden=hidden, layers=args.layers, parameters=params)
    result.curve.append({"step": 0, "val_bpc": trainer.validate()["bpc"]})
    for step in range(args.steps):  # Trainer.run's loop, with validation every --eval-every steps
        i = step % trainer.steps_per_epoch
        if i == 0:
            trainer.state = None
        t0 = time.perf_counter()
        trainer.train_step(i)
        result.train_seconds += time.perf_counter() - t0
        if trainer.step % args.eval_every == 0 or trainer.step == args.steps:
            bpc = trainer.validate()["bpc"]
            result.curve.append({"step": trainer.step, "val_bpc": bpc})
            print(f"  {cell}: step {trainer.step:5d}  val bpc {bpc:.3f}", flush=True)
    trainer.seconds = result.train_seconds
    torch.save({"model_config": trainer.model.config.to_dict(), "model": trainer.model.state_dict(),
                "vocabulary": vocabulary, "unk_id": 0, "labels": None, "step": trainer.step,
                "seconds": result.train_seconds, "command": trainer.command,
                "metrics": {"val_bpc": result.curve[-1]["val_bpc"]}}, run_dir / "final.pt")
    result.final_val_bpc = result.curve[-1]["val_bpc"]
    result.train_tokens_per_s = args.steps * args.batch * args.bptt / max(result.train_seconds, 1e-9)
    return result


def serving_throughput(model_dir: Path, tokens: np.ndarray, *, seconds: float) -> float:
    """Tokens per second of the exported graph in ONNX Runtime (1 intra-op thread), fed SERVE_BATCH rows
    in chunks of SERVE_CHUNK tokens with the state carried, as a server streams them."""
    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((model_dir / "manifest.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ids = np.asarray(tokens, dtype=np.int64)
    n = len(ids) // SERVE_BATCH // SERVE_CHUNK * SERVE_CHUNK
    if n < SERVE_CHUNK:
        raise ValueError(f"need at least {SERVE_BATCH * SERVE_CHUNK} tokens to measure serving")
    rows = ids[: SERVE_BATCH * n].reshape(SERVE_BATCH, n)
    shape = (manifest["layers"], SERVE_BATCH, manifest["hidden_size"])
    fresh = {s["name"]: np.zeros(shape, dtype=np.float32) for s in manifest["state"]}
    outputs = ["logits"] + [s["output"] for s in manifest["state"]]
    state, done, pos = dict(fresh), 0, 0
    start = None
    while True:
        if pos + SERVE_CHUNK > n:
            state, pos = dict(fresh), 0
        result = session.run(outputs, {"tokens": rows[:, pos : pos + SERVE_CHUNK], **state})
        state = {s["name"]: v for s, v in zip(manifest["state"], result[1:])}
        pos += SERVE_CHUNK
        if start is None:  # the first call warms the session up; time the rest
            start = time.perf_counter()
            continue
        done += SERVE_BATCH * SERVE_CHUNK
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= 4 * SERVE_BATCH * SERVE_CHUNK:
            return done / elapsed


def plot(results: list[CellResult], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot([p["step"] for p in r.curve], [p["val_bpc"] for p in r.curve], "o-", ms=2.5,
                label=f"{r.cell} (hidden {r.hidden}, {r.parameters:,} params)")
    finals = [r.final_val_bpc for r in results if math.isfinite(r.final_val_bpc)]
    if finals:  # the first validations (~6.6 bpc at random init) would squash the interesting end
        ax.set_ylim(min(finals) - 0.2, max(finals) + 1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per character")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: list[CellResult], settings: dict) -> str:
    lines = [
        f"Setup: task lm (stdlib Python source), {settings['steps']} steps x batch {settings['batch']} x bptt "
        f"{settings['bptt']} = {settings['chars_per_model']:,} training characters per model, seed "
        f"{settings['seed']}, torch threads {settings['threads']}; validation on the first {settings['val_chars']:,} "
        f"characters of the val split. Parameter counts within {settings['spread'] * 100:.1f}% of their mean "
        f"(tolerance {TOLERANCE * 100:.0f}%).",
        "",
        f"Training tokens/s: PyTorch train steps only (forward, backward, optimiser). Serving tokens/s: {SERVE_WHAT}.",
        "",
        "| cell | hidden | layers | parameters | final val bpc | training tokens/s | serving tokens/s (ORT, 1 thread, "
        f"batch {SERVE_BATCH}, {SERVE_CHUNK}-token chunks) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.cell} | {r.hidden} | {r.layers} | {r.parameters:,} | {r.final_val_bpc:.3f} | "
                     f"{r.train_tokens_per_s:,.0f} | {r.serve_tokens_per_s:,.0f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    from training.data import load_text
    from training.export import export

    args = _defaults(args)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise SystemExit(f"--cells: unknown {unknown}; choose from {', '.join(CELLS)}")
    torch.set_num_threads(args.threads)
    target = args.params
    if args.hidden_target:
        target = parameter_count("lstm", args.hidden_target, layers=args.layers, embed=args.embed)
    hidden = {c: hidden_for(c, target, layers=args.layers, embed=args.embed) for c in cells}
    counts = {c: parameter_count(c, hidden[c], layers=args.layers, embed=args.embed) for c in cells}
    print(f"target {target:,} parameters: " + ", ".join(f"{c} hidden {hidden[c]} -> {counts[c]:,}" for c in cells))
    dev = spread(list(counts.values()))
    if dev > TOLERANCE:
        raise SystemExit(f"parameter counts differ by {dev:.1%} > {TOLERANCE:.0%}; choose a larger --params")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val_ids = load_text("val").ids
    results: list[CellResult] = []
    for cell in cells:
        t0 = time.perf_counter()
        r = _train(cell, hidden[cell], args, out)
        model_dir = export(out / "runs" / cell / "final.pt", name=cell, version=1, models_dir=out / "runs" / "models",
                           command="recur report compare")
        r.serve_tokens_per_s = serving_throughput(model_dir, val_ids, seconds=args.serve_seconds)
        print(f"{cell}: final val bpc {r.final_val_bpc:.3f}, train {r.train_tokens_per_s:,.0f} tok/s, serve "
              f"{r.serve_tokens_per_s:,.0f} tok/s ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append(r)

    settings = {"steps": args.steps, "batch": args.batch, "bptt": args.bptt, "lr": args.lr, "warmup": args.warmup,
                "clip": args.clip, "embed": args.embed, "layers": args.layers, "seed": args.seed,
                "threads": args.threads, "val_chars": args.val_chars, "target_parameters": target,
                "chars_per_model": args.steps * args.batch * args.bptt, "spread": dev, "tolerance": TOLERANCE,
                "serving": SERVE_WHAT}
    title = (f"{args.steps} steps x {args.batch}x{args.bptt} chars, ~{target:,} parameters each, "
             f"{args.layers} layer{'s' if args.layers > 1 else ''}")
    plot(results, out / "compare.png", title=title)
    md = table(results, settings)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({"settings": settings, "cells": [vars(r) for r in results]},
                                                 indent=2) + "\n")
    print()
    print(md)
    print(f"wrote {out / 'compare.png'}, {out / 'compare.md'}, {out / 'compare.json'}")
    return 0
