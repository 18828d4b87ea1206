"""`recur report compare` (being written)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/compare", help="output directory")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("recur report compare: not written yet")
