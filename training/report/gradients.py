"""`recur report gradients`: how the gradient reaching h_{t-k} shrinks or grows with k, per cell, at
initialisation and after training; and what gradient clipping does to a vanilla RNN's training.

Why: the lecture claims a vanilla RNN's gradients vanish (or explode) over long distances while the
LSTM's and GRU's gates keep them alive longer, and that clipping tames explosions. This report measures
both on the project's models and data (stdlib Python source) and says plainly where the claim does not
show.

The measurement (`gradient_by_distance`): run the model step by step over real text with its own weights
(one torch cell per layer, so every per-step state is a node of the graph), take the loss of the
prediction at the last step t, and read |d loss_t / d h_{t-k}| for k = 0..k_max, h_s being the state
carried out of step s (every layer's h), averaged over sequences. For an LSTM this is the gradient to
h with c held fixed (c is a separate state); every path from h_{t-k} to the loss, through the gates
and the cell state, counts.

The clipping experiment owns a short training loop (the Trainer does not record gradient norms): the
same truncated-BPTT walk as `recur train`, a constant, deliberately high learning rate, and the norm of
the whole gradient recorded before any clipping, once with clipping and once without.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from training.report.compare import CELLS, hidden_for

if TYPE_CHECKING:
    import numpy as np
    import torch

    from training.model import SequenceModel, State


def gradient_by_distance(model: SequenceModel, x: torch.Tensor, k_max: int, *, target: torch.Tensor | None = None,
                         state: State | None = None) -> np.ndarray:
    """Mean over the batch of |d loss_t / d h_{t-k}| for k = 0..k_max, t the last step.

    x: (B, T) token ids (or (B, T, D) features). Without `target` the model reads x[:, :-1] and the
    loss is the cross-entropy of its last prediction against x[:, -1]; with `target` (B,) it reads all
    of x. The steps read must number at least k_max + 1. `state` is the state before the first step
    (default zeros). h_s is the hidden state after step s, every layer's h together, as the variable
    through which steps <= s reach step t (as if the sequence were cut after s and resumed from h_s,
    with c_s held fixed for an LSTM). Computed in float64 so that norms far below float32's range (1e-38)
    do not underflow to zero. The model's parameters receive no gradient.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    cfg = model.config
    if target is None:
        x, target = x[:, :-1], x[:, -1]
    steps = x.shape[1]
    if steps < k_max + 1:
        raise ValueError(f"k_max {k_max} needs at least {k_max + 1} steps read; got {steps}")
    cell_cls = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[cfg.cell]
    cells = []
    for layer in range(cfg.layers):
        weight_ih = getattr(model.rnn, f"weight_ih_l{layer}").detach()
        cell = cell_cls(weight_ih.shape[1], cfg.hidden, dtype=torch.float64)  # the stacked module's gate layout
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(model.rnn, f"{name}_l{layer}"))
        cell.requires_grad_(False)
        cells.append(cell)
    head_w, head_b = model.head.weight.detach().double(), model.head.bias.detach().double()
    with torch.no_grad():
        inputs = (model.embed(x) if model.embed is not None else x.float()).double()  # (B, T, In)
    if state is None:
        state = model.initial_state(x.shape[0])
    # The start state is a leaf needing grad, so every later state is a node of the graph.
    h = [state[0][layer].detach().double().requires_grad_() for layer in range(cfg.layers)]
    c = [state[1][layer].detach().double().requires_grad_() for layer in range(cfg.layers)] if len(state) > 1 else []

    with torch.enable_grad():
        per_step: list[list[torch.Tensor]] = []  # per_step[s][layer]: (B, H)
        for s in range(steps):
            inp = inputs[:, s]
            for layer, cell in enumerate(cells):
                if cfg.cell == "lstm":
                    h[layer], c[layer] = cell(inp, (h[layer], c[layer]))
                else:
                    h[layer] = cell(inp, h[layer])
                inp = h[layer]
            # The state carried on is a node of its own, so its gradient is that of the future steps
            # alone, not of the layer above at this same step (as when the state is cut at s).
            h = [v * 1.0 for v in h]
            if s >= steps - 1 - k_max:
                per_step.append(list(h))
        logits = F.linear(h[-1], head_w, head_b)
        loss = F.cross_entropy(logits, target, reduction="sum")  # sum: each row's gradient is its own loss's
        flat = [t for step in per_step for t in step]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    norms = np.zeros(k_max + 1)
    for j in range(len(per_step)):
        k = len(per_step) - 1 - j
        g = grads[j * cfg.layers : (j + 1) * cfg.layers]
        sq = sum((gl.pow(2).sum(-1) if gl is not None else torch.zeros(x.shape[0], dtype=torch.float64)) for gl in g)
        norms[k] = float(torch.as_tensor(sq).sqrt().mean())
    return norms



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/gradients", help="output directory")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells to measure")
    p.add_argument("--params", type=int, default=0,
                   help="parameters per model, as recur report compare (default 300000; 3000 with --tiny)")
    p.add_argument("--layers", type=int, default=1, help="stacked recurrent layers")
    p.add_argument("--embed", type=int, default=0, help="character embedding size (default 64; 8 with --tiny)")
    p.add_argument("--k-max", type=int, default=0, help="largest distance k measured (default 200; 20 with --tiny)")
    p.add_argument("--sequences", type=int, default=0,
                   help="val-split sequences averaged over (default 16; 2 with --tiny)")
    p.add_argument("--warm", type=int, default=0,
                   help="characters read before the measured window, so it starts from a typical state "
                   "(default 100; 5 with --tiny)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="brief training per cell with recur train's Trainer (default 300; 3 with --tiny)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="a trained lm checkpoint (best.pt) to measure instead of the brief training of its cell; "
                   "repeatable")
    p.add_argument("--batch", type=int, default=0, help="rows per training step (default 32; 4 with --tiny)")
    p.add_argument("--bptt", type=int, default=0, help="truncated-BPTT window (default 64; 16 with --tiny)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the brief training")
    p.add_argument("--clip-steps", type=int, default=0,
                   help="steps of each clipping run (default 300; 4 with --tiny); 0 with --no-clipping")
    p.add_argument("--clip-lr", type=float, default=0.0,
                   help="constant learning rate of the clipping runs, high on purpose (default: see "
                   "--clip-optimizer)")
    p.add_argument("--clip-optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="optimiser of the clipping runs: sgd (default lr 1.0: the update follows the gradient's "
                   "size, so spikes show) or adamw (recur train's; default lr 0.03)")
    p.add_argument("--clip", type=float, default=1.0, help="the clipping run's gradient-norm limit")
    p.add_argument("--no-clipping", action="store_true", help="skip the clipping experiment")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--tiny", action="store_true", help="seconds-long run for tests: tiny models, few steps")


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    fill = {"params": (300_000, 3_000), "embed": (64, 8), "k_max": (200, 20), "sequences": (16, 2), "warm": (100, 5),
            "train_steps": (300, 3), "batch": (32, 4), "bptt": (64, 16), "clip_steps": (300, 4)}
    values = vars(args).copy()
    for key, (normal, small) in fill.items():
        if not values.get(key):
            values[key] = small if args.tiny else normal
    if not values["clip_lr"]:
        values["clip_lr"] = 1.0 if args.clip_optimizer == "sgd" else 0.03
    return argparse.Namespace(**values)


def _finite(values: object) -> object:
    """JSON without NaN or infinity (null instead)."""
    if isinstance(values, float):
        return values if math.isfinite(values) else None
    if isinstance(values, dict):
        return {k: _finite(v) for k, v in values.items()}
    if isinstance(values, list | tuple):
        return [_finite(v) for v in values]
    return values


def decay_summary(norms: np.ndarray) -> dict:
    """Ratio of the norm at k_max to the norm at k=1 (k=0 reaches the loss through the head alone),
    the first k where it is below 1e-3 of that, and a one-word verdict."""
    ref, last = float(norms[1]), float(norms[-1])
    ratio = last / ref if ref > 0 else math.nan
    below = [k for k in range(1, len(norms)) if norms[k] < 1e-3 * ref]
    if not math.isfinite(ratio):
        verdict = "undefined"
    elif ratio < 1e-3:
        verdict = "vanishes"
    elif ratio < 0.1:
        verdict = "decays"
    elif ratio > 10:
        verdict = "grows"
    else:
        verdict = "roughly flat"
    return {"norm_k0": float(norms[0]), "norm_k1": ref, "norm_kmax": last, "ratio_kmax_to_k1": ratio,
            "first_k_below_1e-3": below[0] if below else None, "verdict": verdict}


def _sequences(args: argparse.Namespace) -> torch.Tensor:
    import numpy as np
    import torch

    from training.data import load_text

    ids = load_text("val").ids
    length = args.warm + args.k_max + 2
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(ids) - length, size=args.sequences)
    return torch.from_numpy(np.stack([ids[s : s + length] for s in starts]))  # (N, warm + k_max + 2)


def measure(model: SequenceModel, seqs: torch.Tensor, *, warm: int, k_max: int) -> np.ndarray:
    """gradient_by_distance after `warm` characters read without gradient."""
    import torch

    model.eval()
    state = None
    if warm:
        with torch.no_grad():
            _, state = model(seqs[:, :warm])
    return gradient_by_distance(model, seqs[:, warm:], k_max, state=state)


def _models(cell: str, args: argparse.Namespace, out: Path, checkpoints: dict) -> tuple[SequenceModel, SequenceModel]:
    """(model at initialisation, trained model) of one cell."""
    import torch

    from training.config import TrainConfig
    from training.model import ModelConfig, SequenceModel
    from training.train import Trainer

    if cell in checkpoints:
        ckpt = checkpoints[cell]
        trained = SequenceModel(ModelConfig(**ckpt["model_config"]))
        trained.load_state_dict(ckpt["model"])
        torch.manual_seed(args.seed)
        return SequenceModel(ModelConfig(**ckpt["model_config"])), trained
    hidden = hidden_for(cell, args.params, layers=args.layers, embed=args.embed)
    run_dir = out / "runs" / cell
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl appends: start afresh
    cfg = TrainConfig(task="lm", cell=cell, out=str(run_dir), layers=args.layers, hidden=hidden, embed=args.embed,
                      batch=args.batch, bptt=args.bptt, max_steps=args.train_steps, lr=args.lr,
                      warmup=max(1, min(50, args.train_steps // 10)), train_chars=args.batch * args.bptt *
                      args.train_steps + 1, val_chars=20_000 if not args.tiny else 1_000,
                      test_chars=20_000 if not args.tiny else 1_000, seed=args.seed, threads=args.threads,
                      log_every=max(1, args.train_steps // 10))
    trainer = Trainer(cfg, command=f"recur report gradients ({cell})")
    init = SequenceModel(trainer.model.config)
    init.load_state_dict(trainer.model.state_dict())  # the weights before the first step
    trainer.run(progress=False)
    return init, trainer.model


def clipping_run(args: argparse.Namespace, clip: float) -> dict:
    """A vanilla RNN trained `clip_steps` steps at a constant, high learning rate; per step the gradient
    norm before clipping and the loss. Stops early if the loss stops being finite."""
    import torch
    import torch.nn.functional as F

    from training.data import VOCAB, load_text
    from training.evaluate import text_rows
    from training.model import ModelConfig, SequenceModel, detach

    torch.manual_seed(args.seed)
    hidden = hidden_for("rnn", args.params, layers=args.layers, embed=args.embed)
    model = SequenceModel(ModelConfig(cell="rnn", head="lm", vocab_size=len(VOCAB), embed_dim=args.embed,
                                      hidden=hidden, layers=args.layers, classes=len(VOCAB)))
    ids = load_text("train").ids[: args.batch * args.bptt * args.clip_steps + 1]
    x, y = text_rows(ids[:-1], args.batch), text_rows(ids[1:], args.batch)
    windows = x.shape[1] // args.bptt
    params = list(model.parameters())
    opt: torch.optim.Optimizer
    if args.clip_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.clip_lr)
    else:
        opt = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.01)
    state = None
    norms: list[float] = []
    losses: list[float] = []
    for step in range(args.clip_steps):
        i = step % windows
        if i == 0:
            state = None
        span = slice(i * args.bptt, (i + 1) * args.bptt)
        model.train()
        logits, new_state = model(x[:, span], state)
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, span].flatten())
        state = detach(new_state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)  # the norm before clipping
        norms.append(float(norm))
        losses.append(loss.item())
        if not (math.isfinite(losses[-1]) and math.isfinite(norms[-1])):
            break
        opt.step()
    return {"clip": clip, "grad_norm": norms, "loss": losses, "steps_run": len(losses),
            "diverged": not all(math.isfinite(v) for v in losses + norms)}


def clipping_summary(without: dict, with_clip: dict) -> dict:
    import numpy as np

    def stats(r: dict) -> dict:
        n = np.array([v for v in r["grad_norm"] if math.isfinite(v)])
        loss = [v for v in r["loss"] if math.isfinite(v)]
        tail = loss[-max(1, len(loss) // 10) :]
        median = float(np.median(n)) if len(n) else math.nan
        final = float(np.mean(tail)) if tail else math.nan
        start = loss[0] if loss else math.nan
        return {"max_grad_norm": float(n.max()) if len(n) else math.nan, "median_grad_norm": median,
                "spikes": int((n > 10 * median).sum()) if len(n) else 0, "first_loss": start, "final_loss": final,
                "diverged": r["diverged"], "blew_up": bool(r["diverged"] or not final < start),
                "steps_run": r["steps_run"]}

    a, b = stats(without), stats(with_clip)
    tamed = not b["blew_up"] and (a["blew_up"] or b["final_loss"] < a["final_loss"] - 0.05)
    hurt = not a["blew_up"] and (b["blew_up"] or b["final_loss"] > a["final_loss"] + 0.05)
    return {"without_clip": a, "with_clip": b, "clipping_tamed_explosion": bool(tamed), "clipping_hurt": bool(hurt)}


def plot_gradients(curves: dict, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"rnn": "tab:red", "lstm": "tab:blue", "gru": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cell, c in curves.items():
        for phase, style in (("init", "--"), ("trained", "-")):
            y = c[phase]
            ax.plot(range(len(y)), [v if v > 0 else math.nan for v in y], style, color=colors.get(cell),
                    label=f"{cell} {phase}")
    ax.set_yscale("log")
    ax.set_xlabel("k (steps back from the predicted character)")
    ax.set_ylabel("mean |d loss_t / d h_{t-k}|")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_clipping(without: dict, with_clip: dict, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for r, label, color in ((without, "no clipping", "tab:red"), (with_clip, f"clip {with_clip['clip']:g}",
                                                                   "tab:blue")):
        top.plot(r["grad_norm"], color=color, lw=0.8, label=label)
        bottom.plot(r["loss"], color=color, lw=0.8, label=label)
    top.axhline(with_clip["clip"], color="gray", ls=":", lw=0.8)
    top.set_yscale("log")
    top.set_ylabel("gradient norm before clipping")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    bottom.set_xlabel("step")
    bottom.set_yscale("log")  # an exploding run's loss reaches hundreds of nats
    bottom.set_ylabel("training loss (nats, log scale)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import torch

    args = _defaults(args)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells or any(c not in CELLS for c in cells):
        raise SystemExit(f"--cells: choose from {', '.join(CELLS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints: dict = {}
    for path in args.checkpoint:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        mc = ckpt["model_config"]
        if mc["head"] != "lm" or mc["input_kind"] != "tokens" or mc["vocab_size"] != 98:
            raise SystemExit(f"{path}: not a stdlib-text language model (head lm, 98 tokens)")
        checkpoints[mc["cell"]] = ckpt

    seqs = _sequences(args)
    results: dict[str, dict] = {}
    lines: list[str] = []
    for cell in cells:
        t0 = time.perf_counter()
        init, trained = _models(cell, args, out, checkpoints)
        params = sum(p.numel() for p in trained.parameters())
        curves = {"init": measure(init, seqs, warm=args.warm, k_max=args.k_max),
                  "trained": measure(trained, seqs, warm=args.warm, k_max=args.k_max)}
        summary = {phase: decay_summary(v) for phase, v in curves.items()}
        results[cell] = {"hidden": trained.config.hidden, "layers": trained.config.layers, "parameters": params,
                         "source": "checkpoint" if cell in checkpoints else f"{args.train_steps} Trainer steps",
                         **{phase: v.tolist() for phase, v in curves.items()}, "summary": summary}
        for phase, s in summary.items():
            below = s["first_k_below_1e-3"]
            lines.append(f"{cell} {phase}: |grad| at k={args.k_max} is {s['ratio_kmax_to_k1']:.3g} x that at k=1 "
                         f"-> {s['verdict']}" + (f" (below 1e-3 of k=1 from k={below})" if below else ""))
        print(lines[-2] + "\n" + lines[-1] + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    claim: dict = {}
    if {"rnn", "lstm", "gru"} <= results.keys():
        ratio = {c: results[c]["summary"]["trained"]["ratio_kmax_to_k1"] for c in ("rnn", "lstm", "gru")}
        holds = ratio["rnn"] < min(ratio["lstm"], ratio["gru"])
        claim = {"trained_ratios": ratio, "vanilla_decays_fastest": bool(holds)}
        lines.append("claim 'LSTM/GRU keep the gradient longer than a vanilla RNN' (trained models): " +
                     ("shows" if holds else "does NOT show on these models") +
                     " (" + ", ".join(f"{c} {r:.3g}" for c, r in ratio.items()) + ")")

    report: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("func",)}, "cells": results,
                    "claim": claim}
    title = (f"{args.sequences} val sequences, {args.warm} chars of warm-up; trained: "
             + ("checkpoints / " if checkpoints else "") + f"{args.train_steps} steps of recur train's Trainer")
    plot_gradients({c: {p: results[c][p] for p in ("init", "trained")} for c in cells}, out / "gradients.png",
                   title=title)
    if not args.no_clipping:
        without, with_clip = clipping_run(args, 0.0), clipping_run(args, args.clip)
        clip_summary = clipping_summary(without, with_clip)
        report["clipping"] = {"optimizer": args.clip_optimizer, "lr": args.clip_lr, "without_clip": without,
                              "with_clip": with_clip, "summary": clip_summary}
        a, b = clip_summary["without_clip"], clip_summary["with_clip"]
        lines.append(f"clipping (vanilla RNN, {args.clip_optimizer} at constant lr {args.clip_lr:g}, "
                     f"{args.clip_steps} steps): " + "; ".join(
                         f"{name}: loss {r['first_loss']:.2f} -> {r['final_loss']:.2f} (mean of the last 10%)"
                         + (" BLEW UP" if r["blew_up"] else "") + f", |grad| median {r['median_grad_norm']:.3g} max "
                         f"{r['max_grad_norm']:.3g}, {r['spikes']} spikes > 10x median"
                         for name, r in (("without clipping", a), (f"clip {args.clip:g}", b))) + " -> "
                     + ("clipping tamed the explosion" if clip_summary["clipping_tamed_explosion"] else
                        "clipping made training worse" if clip_summary["clipping_hurt"] else
                        "clipping made no clear difference here"))
        plot_clipping(without, with_clip, out / "clipping.png",
                      title=f"vanilla RNN, {args.clip_optimizer} at constant lr {args.clip_lr:g}")
    report["summary"] = lines
    (out / "gradients.json").write_text(json.dumps(_finite(report), indent=1) + "\n")
    print()
    print("\n".join(lines))
    print(f"wrote {out / 'gradients.png'}" + ("" if args.no_clipping else f", {out / 'clipping.png'}") +
          f", {out / 'gradients.json'}")
    return 0
