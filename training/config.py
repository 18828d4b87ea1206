"""Training settings (no torch here: the command line reads them to build its flags)."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("lm", "tagger", "digits")


@dataclass
class TrainConfig:
    task: str = "lm"  # lm: next character; tagger: token class per character; digits: many-to-one
    out: str = "runs/lm"
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embed: int = 64
    dropout: float = 0.0
    batch: int = 64  # rows walked in parallel (text) or sequences per step (digits)
    bptt: int = 128  # truncated-BPTT window: steps back-propagated through
    reset_state: bool = False  # start every window at zeros (for comparison with carrying)
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimiser steps (0: no limit)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient-norm clipping; 0 disables
    train_chars: int = 0  # use only the first N training characters (0: all); for quick runs
    val_chars: int = 0  # validate on the first N characters (0: all)
    test_chars: int = 0  # report test metrics on the first N characters (0: all, as for the shipped models)
    seed: int = 1337
    threads: int = 0  # torch intra-op threads (0: all cores)
    log_every: int = 20
