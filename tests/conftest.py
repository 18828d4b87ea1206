"""Fixtures shared by every test folder: tiny models trained for a few steps and exported once per
test run, for every cell and head, and the one-pass reference for each of them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from service.store.write_queue import CHECK_VARIABLE
from tests.helpers import CELLS, HEADS, Reference  # tests/training imports CELLS and HEADS from here too

# The SQLite store's write queue checks its invariants after every operation in the tests: in process,
# and in the servers they start (which inherit this environment).
os.environ.setdefault(CHECK_VARIABLE, "1")

_TASK = {"lm": "lm", "tagger": "tagger", "classifier": "digits"}


def _train_and_export(run_dir: Path, models_dir: Path, cell: str, head: str) -> None:
    from training.config import TrainConfig
    from training.export import export
    from training.train import Trainer

    cfg = TrainConfig(task=_TASK[head], cell=cell, out=str(run_dir), layers=2, hidden=16, embed=8, batch=8,
                      bptt=16, max_steps=6, warmup=2, train_chars=20_000, val_chars=2_000, test_chars=2_000,
                      log_every=2)
    Trainer(cfg, command=f"tests: tiny {cell} {head}").run(progress=False)
    export(run_dir / "best.pt", name=f"{cell}-{head}", version=1, models_dir=models_dir)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding `{cell}-{head}` version 1 for every cell and head."""
    os.environ.setdefault("RECUR_DATA_DIR", str(Path(__file__).resolve().parents[1] / "data"))
    root = tmp_path_factory.mktemp("tiny")
    models = root / "models"
    for cell in CELLS:
        for head in HEADS:
            _train_and_export(root / "runs" / f"{cell}-{head}", models, cell, head)
    return models


@pytest.fixture(scope="session")
def reference(tiny_models: Path) -> Callable[[str], Reference]:
    """reference(name) -> the one-pass Reference of tiny model `name`, loaded once per test run."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = Reference(tiny_models / name / "1")
        return cache[name]

    return get
