"""`recur report cells|compare|gradients`: the lecture's claims measured on the user's own models.

Each report is a module with `add_arguments(parser)` and `run(args) -> int`; torch and matplotlib
are imported only when a report runs, so the serving image (no torch) can still build the parser.
"""

from __future__ import annotations

import argparse
import importlib

REPORTS = {
    "cells": "which hidden units track features of the text (strings, comments, indentation, ...)",
    "compare": "vanilla RNN, LSTM and GRU at equal parameter counts: validation bits per character",
    "gradients": "how the gradient reaching h_{t-k} shrinks or grows with k, and what clipping does",
}


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="report", required=True)
    for name, help_text in REPORTS.items():
        module = importlib.import_module(f"training.report.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))


def run_report(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"training.report.{args.report}")
    return int(module.run(args))
