"""`recur report gradients` (being written)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/gradients", help="output directory")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("recur report gradients: not written yet")
