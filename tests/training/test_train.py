"""Truncated BPTT carries state across windows; training learns; resume continues exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.train import Trainer


def _cfg(out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(task="lm", cell="lstm", out=str(out), layers=2, hidden=16, embed=8, batch=4, bptt=8,
                       max_steps=3, warmup=1, train_chars=5_000, val_chars=500, log_every=1)
    return replace(base, **changes)


@pytest.mark.parametrize("reset", [False, True])
def test_state_is_carried_between_windows(tmp_path: Path, reset: bool) -> None:
    """With lr 0 the weights stay fixed, so after three windows the carried state must equal one
    pass over all three from zeros; with --reset-state it must not."""
    trainer = Trainer(_cfg(tmp_path, lr=0.0, reset_state=reset))
    for i in range(3):
        trainer.train_step(i)
    x, _ = trainer._batch(0)
    rows = torch.cat([trainer._batch(i)[0] for i in range(3)], dim=1)  # (B, 3T)
    trainer.model.eval()
    with torch.no_grad():
        _, one_pass = trainer.model(rows)
    carried = trainer.state
    assert carried is not None and rows.shape == (4, 24) and x.shape == (4, 8)
    diff = max((a - b).abs().max().item() for a, b in zip(carried, one_pass))
    if reset:
        assert diff > 1e-3
    else:
        assert diff <= 1e-5


def test_training_lowers_the_loss_and_writes_its_records(tmp_path: Path) -> None:
    metrics = Trainer(_cfg(tmp_path, max_steps=40, lr=1e-2)).run(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < train[0] - 0.5
    assert {"val_loss", "val_bpc", "test_bpc"} <= metrics.keys()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = torch.load(tmp_path / "best.pt", weights_only=False)
    assert ckpt["model_config"]["cell"] == "lstm" and ckpt["vocabulary"][0] == "<unk>"


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    straight = Trainer(_cfg(tmp_path / "a", max_steps=6, epochs=1))
    straight.run(progress=False)
    first = Trainer(_cfg(tmp_path / "b", max_steps=6, epochs=1))
    assert first.run(progress=False, until=3) == {}  # interrupted: ckpt.pt at step 3
    resumed = Trainer(_cfg(tmp_path / "b", max_steps=6, epochs=1), resume=True)
    assert resumed.step == 3
    resumed.run(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_digits_resume_mid_epoch(tmp_path: Path) -> None:
    """A digits run stopped mid-epoch resumes where it stopped (the shuffle is a function of seed
    and epoch), whether it finished a shorter run or was interrupted."""
    short = Trainer(_cfg(tmp_path / "a", task="digits", batch=8, max_steps=4))
    assert short.steps_per_epoch > 8  # so both runs end mid-epoch
    short.run(progress=False)
    longer = Trainer(_cfg(tmp_path / "a", task="digits", batch=8, max_steps=8), resume=True)
    assert longer.step == 4 and longer.epoch == 0
    assert "test_accuracy" in longer.run(progress=False) and longer.step == 8

    straight = Trainer(_cfg(tmp_path / "b", task="digits", batch=8, max_steps=8))
    straight.run(progress=False)
    assert Trainer(_cfg(tmp_path / "c", task="digits", batch=8, max_steps=8)).run(progress=False, until=4) == {}
    resumed = Trainer(_cfg(tmp_path / "c", task="digits", batch=8, max_steps=8), resume=True)
    resumed.run(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
