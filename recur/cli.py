"""The `recur` command line: serve, train, export, and talk to a server.

Training imports torch lazily, so `recur serve` and `recur client` work in the
serving image, which has no torch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from recur.flags import add_dataclass_arguments, from_args


def _add_train(sub: argparse._SubParsersAction) -> None:
    from training.config import TrainConfig  # no torch

    p = sub.add_parser(
        "train",
        help="train a recurrent model with truncated BPTT",
        description="Train an RNN/LSTM/GRU on real data (nothing downloaded). Example:\n"
        "  recur train --task lm --cell lstm --layers 2 --hidden 256 --max-steps 3000 --out runs/pylm\n"
        "then: recur export runs/pylm/best.pt --name pylm --version 1\n"
        "Your own data: --task lm --data DIR_OR_FILE_OR_GLOB, --task tagger --data FILE.jsonl, "
        "--task classify --data FILE.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.train import Trainer
    from training.userdata import DataError

    cfg = from_args(TrainConfig, args)
    try:
        trainer = Trainer(cfg, command=shlex.join(["recur", *sys.argv[1:]]), resume=args.resume)
    except DataError as e:  # bad user data: say where, without a traceback
        print(f"recur: error: {e}", file=sys.stderr)
        return 2
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

    out = export(args.checkpoint, name=args.name, version=args.version, models_dir=args.models_dir,
                 command=shlex.join(["recur", *sys.argv[1:]]))
    print(out)
    return 0


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="bring your own ONNX model: check it and write models/NAME/VERSION/ (manifest included)",
        description="Inspect an ONNX graph (e.g. from torch.onnx.export with dynamic batch and time), pair its "
        "state inputs with its state outputs, write the manifest, load it as the server does and check that "
        "chunked runs equal one pass. See README, 'Serve your own model'.")
    p.add_argument("model", type=Path, help="the ONNX file")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--version", type=int, required=True, help="model version, a positive integer")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="model repository (default: models)")
    p.add_argument("--head", choices=["lm", "tagger", "classifier"],
                   help="what the output is (default: lm, or tagger with --labels)")
    p.add_argument("--vocab", type=Path, help="tokens, one per line or a JSON list (for text input)")
    p.add_argument("--labels", type=Path, help="class labels, one per line or a JSON list (tagger, classifier)")
    p.add_argument("--state-pairs", help="IN:OUT,... state inputs and the outputs carrying their new values, "
                   "when pairing by shape and name is ambiguous")


def _run_import(args: argparse.Namespace) -> int:
    from training.importer import ImportRefused, import_model

    try:
        result = import_model(args.model, name=args.name, version=args.version, models_dir=args.models_dir,
                              vocab=args.vocab, labels=args.labels, state_pairs=args.state_pairs, head=args.head,
                              command=shlex.join(["recur", *sys.argv[1:]]))
    except ImportRefused as e:
        print(f"recur import: refused: {e}", file=sys.stderr)
        return 1
    m, p = result.manifest, result.parity
    states = ", ".join(f"{s['name']}->{s['output']} {s['shape']}" for s in m["state"])
    print(f"{m['input']['kind']} {m['input']['name']} {m['input']['shape']} -> {m['head']['kind']} "
          f"{m['head']['output']} {m['head']['shape']}; cell {m['cell']}; states {states}; opset {m['opset']}")
    print(f"parity: {p['chunks']} chunks vs one pass over {p['steps']} steps: max |diff| {p['max_abs_diff']:.2e}; "
          f"one row vs batch: {p['batch_max_abs_diff']:.2e} (tolerance {p['tolerance']:g}): ok")
    print(result.directory)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recur", description="Stateful sequence inference with recurrent models.")
    parser.add_argument("--log-level", default=os.environ.get("RECUR_LOG_LEVEL", "INFO"),
                        help="logging level [RECUR_LOG_LEVEL; default: INFO]")
    parser.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("RECUR_LOG_FORMAT", "text"),
                        help="log lines as text or as JSON objects [RECUR_LOG_FORMAT; default: text]")
    sub = parser.add_subparsers(dest="command", required=True)
    from recur.client_cli import add_client_arguments
    from service.config import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve the model repository over gRPC"))
    add_client_arguments(sub.add_parser("client", help="talk to a running server"))
    from recur.keys import add_keys_arguments

    add_keys_arguments(sub.add_parser("keys", help="manage the API key file of --auth-keys"))
    _add_train(sub)
    _add_export(sub)
    _add_import(sub)
    from training.report import add_report_arguments  # no torch at import

    add_report_arguments(sub.add_parser("report", help="look inside models: cells, compare, gradients"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ValueError as e:  # a malformed RECUR_* variable: say which, without a traceback
        print(f"recur: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from service.logs import configure

    try:
        configure(args.log_level, args.log_format)
    except ValueError as e:  # a bad RECUR_LOG_FORMAT or RECUR_LOG_LEVEL
        print(f"recur: error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        return _run_train(args)
    if args.command == "export":
        return _run_export(args)
    if args.command == "import":
        return _run_import(args)
    if args.command == "report":
        from training.report import run_report

        return run_report(args)
    if args.command == "keys":
        from recur.keys import run_keys

        return run_keys(args)
    if args.command == "serve":
        from service.server import run

        return run(args)
    from recur.client_cli import run_client

    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
