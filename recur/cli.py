"""The `recur` command line: serve, train, export, and talk to a server.

Training imports torch lazily, so `recur serve` and `recur client` work in the
serving image, which has no torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

TRAIN_HELP = {
    "task": "lm: next-character language model on stdlib text; tagger: Python token class of every "
    "character; digits: sklearn's 8x8 digits read as 8 steps of 8 features, one label per sequence",
    "out": "run directory: checkpoints (ckpt.pt, best.pt), metrics.jsonl, curves.png, summary.json",
    "cell": "recurrent cell: rnn (vanilla tanh), lstm or gru",
    "layers": "stacked recurrent layers",
    "hidden": "hidden state size",
    "embed": "character embedding size (text tasks)",
    "dropout": "dropout between stacked layers",
    "batch": "rows walked in parallel (text) or sequences per step (digits)",
    "bptt": "truncated-BPTT window: steps back-propagated through before the state is detached",
    "reset_state": "start every window from zeros instead of the previous window's final state",
    "epochs": "passes over the training data (validation after each)",
    "max_steps": "stop after this many optimiser steps (0: no limit)",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine schedule decays to lr times this",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "clip": "clip the gradient norm to this (0: off); tames exploding gradients",
    "train_chars": "train on only the first N characters (0: all)",
    "val_chars": "validate on only the first N characters (0: all)",
    "test_chars": "report test metrics on only the first N characters (0: all)",
    "seed": "random seed",
    "threads": "torch threads (0: all cores)",
    "log_every": "steps between lines of metrics.jsonl",
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    from training.config import TrainConfig  # no torch

    p = sub.add_parser(
        "train",
        help="train a recurrent model with truncated BPTT",
        description="Train an RNN/LSTM/GRU on real data (nothing downloaded). Example:\n"
        "  recur train --task lm --cell lstm --layers 2 --hidden 256 --max-steps 3000 --out runs/pylm\n"
        "then: recur export runs/pylm/best.pt --name pylm --version 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(TrainConfig):
        name, default = f.name, f.default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=TRAIN_HELP[name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"{TRAIN_HELP[name]} (default: {default})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.train import Trainer

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    trainer = Trainer(cfg, command=shlex.join(["recur", *sys.argv[1:]]), resume=args.resume)
    metrics = trainer.run(progress=not args.quiet)
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to the model repository (ONNX + manifest)")
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by recur train (e.g. runs/pylm/best.pt)")
    p.add_argument("--name", required=True, help="model name, e.g. pylm")
    p.add_argument("--version", type=int, required=True, help="model version, a positive integer")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="model repository (default: models)")


def _run_export(args: argparse.Namespace) -> int:
    from training.export import export

    out = export(args.checkpoint, name=args.name, version=args.version, models_dir=args.models_dir)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recur", description="Stateful sequence inference with recurrent models.")
    parser.add_argument("--log-level", default=os.environ.get("RECUR_LOG_LEVEL", "INFO"),
                        help="logging level [RECUR_LOG_LEVEL; default: INFO]")
    sub = parser.add_subparsers(dest="command", required=True)
    from recur.client_cli import add_client_arguments
    from service.config import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve the model repository over gRPC"))
    add_client_arguments(sub.add_parser("client", help="talk to a running server"))
    _add_train(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        return _run_train(args)
    if args.command == "export":
        return _run_export(args)
    if args.command == "serve":
        from service.server import run

        return run(args)
    from recur.client_cli import run_client

    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
