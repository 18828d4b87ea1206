"""Metrics on a split: loss, bits per character (lm), accuracy (tagger, classifier)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.model import SequenceModel, State


@dataclass
class Batches:
    """Inputs and targets of one task, as the training loop and evaluation see them."""

    inputs: np.ndarray  # (N,) token ids for text; (N, T, D) features for sequences
    targets: np.ndarray  # (N,) per step for text; (N,) per sequence for sequences


def text_rows(a: np.ndarray, rows: int) -> torch.Tensor:
    """Cut a long stream into `rows` consecutive pieces: row b continues where it stopped."""
    n = len(a) // rows
    return torch.from_numpy(np.ascontiguousarray(a[: n * rows].reshape(rows, n)))  # (B, n)


@torch.no_grad()
def evaluate_text(model: SequenceModel, data: Batches, *, rows: int = 32, window: int = 256) -> dict[str, float]:
    """Mean loss over the whole stream, state carried across windows (as in serving)."""
    model.eval()
    x, y = text_rows(data.inputs, rows), text_rows(data.targets, rows)
    state: State | None = None
    total, correct, count = 0.0, 0, 0
    for i in range(0, x.shape[1], window):
        logits, state = model(x[:, i : i + window], state)  # (B, W, C)
        target = y[:, i : i + window]
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    loss = total / count
    metrics = {"loss": loss, "accuracy": correct / count}
    if model.config.head == "lm":
        metrics["bpc"] = loss / math.log(2)
    return metrics


@torch.no_grad()
def evaluate_sequences(model: SequenceModel, data: Batches, *, batch: int = 256) -> dict[str, float]:
    """Many-to-one: the label is read from the last step's output."""
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(data.inputs), batch):
        x = torch.from_numpy(data.inputs[i : i + batch])
        y = torch.from_numpy(data.targets[i : i + batch])
        logits, _ = model(x)
        last = logits[:, -1]  # (B, C)
        total += F.cross_entropy(last, y, reduction="sum").item()
        correct += (last.argmax(-1) == y).sum().item()
    return {"loss": total / len(data.inputs), "accuracy": correct / len(data.inputs)}


def majority_baseline(targets: np.ndarray) -> float:
    """Accuracy of always answering the most frequent label."""
    return float(np.bincount(targets).max() / len(targets))
