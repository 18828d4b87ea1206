"""`recur report gradients` measures what it claims: on a vanilla RNN held in its linear regime the
gradient reaching h_{t-k} is exactly scale**k times the one at h_t, it agrees with autograd through the
fused PyTorch module, and the report writes its plots and numbers."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import CELLS, ROOT
from training.model import ModelConfig, SequenceModel
from training.report import gradients


def _linear_rnn(scale: float) -> SequenceModel:
    """A vanilla RNN whose inputs and biases are ~0, so tanh' ~ 1 and d h_s / d h_{s-1} = scale * Q
    (Q orthogonal): the gradient k steps back is scale**k times the gradient at k = 0."""
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(cell="rnn", vocab_size=98, embed_dim=4, hidden=8, layers=1, classes=98))
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(8, 8))
        model.rnn.weight_hh_l0.copy_(scale * q)
        model.rnn.bias_ih_l0.zero_()
        model.rnn.bias_hh_l0.zero_()
        model.embed.weight.mul_(1e-4)  # type: ignore[union-attr]
    return model.eval()


@pytest.mark.parametrize("scale", [1.2, 0.3])
def test_linear_regime_grows_or_decays_as_scale_to_the_k(scale: float) -> None:
    x = torch.randint(1, 98, (4, 23))
    norms = gradients.gradient_by_distance(_linear_rnn(scale), x, 20)
    assert norms.shape == (21,)
    ratios = norms[1:] / norms[:-1]
    assert ratios == pytest.approx([scale] * 20, rel=1e-3)
    if scale > 1:
        assert norms[20] > 30 * norms[0]  # 1.2**20 = 38
    else:
        assert norms[20] < 1e-9 * norms[0]  # 0.3**20 = 3.5e-11


@pytest.mark.parametrize("cell", CELLS)
def test_agrees_with_autograd_through_the_fused_module(cell: str) -> None:
    """Cut the sequence at t-k, make the state there a leaf, run nn.RNN/LSTM/GRU over the rest: the
    gradient norm on that leaf's h must equal the report's value for k."""
    torch.manual_seed(1)
    model = SequenceModel(ModelConfig(cell=cell, vocab_size=98, embed_dim=8, hidden=12, layers=2, classes=98)).eval()
    x = torch.randint(1, 98, (3, 32))
    inputs, target = x[:, :-1], x[:, -1]
    norms = gradients.gradient_by_distance(model, x, 25)
    t = inputs.shape[1] - 1
    for k in (0, 1, 7, 25):
        with torch.no_grad():
            _, state = model(inputs[:, : t - k + 1])  # the state after step t-k
        h = state[0].clone().requires_grad_()
        if k == 0:
            last = model.head(h[-1])
        else:
            logits, _ = model(inputs[:, t - k + 1 :], (h, *state[1:]))
            last = logits[:, -1]
        loss = torch.nn.functional.cross_entropy(last, target, reduction="sum")
        (g,) = torch.autograd.grad(loss, [h])
        expected = g.pow(2).sum(dim=(0, 2)).sqrt().mean().item()  # norm over layers and units, mean over rows
        assert norms[k] == pytest.approx(expected, rel=1e-4, abs=1e-12), k
    assert all(p.grad is None for p in model.parameters())


def test_the_report_writes_plots_and_curves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECUR_DATA_DIR", os.environ.get("RECUR_DATA_DIR", str(ROOT / "data")))
    parser = argparse.ArgumentParser()
    gradients.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--out", str(tmp_path)])
    assert gradients.run(args) == 0
    for name in ("gradients.png", "clipping.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    report = json.loads((tmp_path / "gradients.json").read_text())
    k_max = report["settings"]["k_max"]
    assert set(report["cells"]) == set(CELLS)
    for cell in CELLS:
        for phase in ("init", "trained"):
            curve = report["cells"][cell][phase]
            assert len(curve) == k_max + 1 and all(v is not None and v >= 0 for v in curve)
            assert report["cells"][cell]["summary"][phase]["verdict"]
    clip = report["clipping"]
    assert len(clip["with_clip"]["grad_norm"]) == len(clip["with_clip"]["loss"]) == report["settings"]["clip_steps"]
    assert "clipping_tamed_explosion" in clip["summary"] and report["summary"]
