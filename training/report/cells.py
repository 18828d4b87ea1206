"""`recur report cells` (being written)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/cells", help="output directory")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("recur report cells: not written yet")
