"""`recur report compare`: hidden sizes that equalise parameter counts, and a tiny end-to-end run whose
table holds the three cells at near-equal sizes with finite bits per character."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

from tests.helpers import CELLS, ROOT
from training.model import ModelConfig, SequenceModel
from training.report import compare


@pytest.mark.parametrize("layers", [1, 2])
def test_parameter_count_is_the_models(layers: int) -> None:
    for cell in CELLS:
        hidden = compare.hidden_for(cell, 50_000, layers=layers, embed=16)
        model = SequenceModel(ModelConfig(cell=cell, vocab_size=98, embed_dim=16, hidden=hidden, layers=layers,
                                          classes=98))
        count = sum(p.numel() for p in model.parameters())
        assert count == compare.parameter_count(cell, hidden, layers=layers, embed=16)
        assert abs(count - 50_000) / 50_000 < 0.02
        assert abs(compare.parameter_count(cell, hidden + 1, layers=layers, embed=16) - 50_000) >= abs(count - 50_000)


def test_tiny_compare_writes_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECUR_DATA_DIR", os.environ.get("RECUR_DATA_DIR", str(ROOT / "data")))
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    assert compare.run(parser.parse_args(["--tiny", "--out", str(tmp_path)])) == 0
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split("|")[1:-1] for line in (tmp_path / "compare.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| cell")]
    cells = [r[0].strip() for r in rows]
    assert sorted(cells) == sorted(CELLS)
    params = [int(r[3].replace(",", "")) for r in rows]
    mean = sum(params) / len(params)
    assert all(abs(p - mean) / mean <= compare.TOLERANCE for p in params)
    assert all(math.isfinite(float(r[4])) and 0 < float(r[4]) < 10 for r in rows)
    report = json.loads((tmp_path / "compare.json").read_text())
    for r in report["cells"]:
        assert r["serve_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0
        assert [p["step"] for p in r["curve"]][-1] == report["settings"]["steps"]
