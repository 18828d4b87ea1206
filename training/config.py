"""Training settings (no torch here: the command line reads them to build its flags).

Each field's metadata["help"] is its `recur train --help` text (see recur/flags.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("lm", "tagger", "digits", "classify")


@dataclass
class TrainConfig:
    task: str = field(default="lm", metadata={
        "help": "lm: next-character language model on stdlib text; tagger: Python token class of every character; "
        "digits: sklearn's 8x8 digits read as 8 steps of 8 features, one label per sequence; "
        "classify: one label per sequence of feature vectors, from --data FILE.npz. With --data, lm and tagger "
        "read your data instead of stdlib text (and digits means classify)"})
    data: str = field(default="", metadata={
        "help": "your own data (empty: the built-in data set): lm: a text file, a directory of text files or a "
        "glob (UTF-8); tagger: a JSONL file of {text, tags} (a label per character) or {tokens, tags} (a label "
        "per token) records; classify: an .npz with X [n, time, dim] and y [n] (integers or strings). Split "
        "90/5/5 by sha256 of each unit's key (lm: 50-line block of a file; tagger: record; classify: index)"})
    max_vocab: int = field(default=0, metadata={
        "help": "with --data (lm, tagger): keep at most N vocabulary entries, the unknown one included, the "
        "most frequent characters first; the rest read as unknown (0: no cap)"})
    out: str = field(default="runs/lm", metadata={
        "help": "run directory: checkpoints (ckpt.pt, best.pt), metrics.jsonl, curves.png, summary.json"})
    cell: str = field(default="lstm", metadata={"help": "recurrent cell: rnn (vanilla tanh), lstm or gru"})
    layers: int = field(default=2, metadata={"help": "stacked recurrent layers"})
    hidden: int = field(default=256, metadata={"help": "hidden state size"})
    embed: int = field(default=64, metadata={"help": "character embedding size (text tasks)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout between stacked layers"})
    batch: int = field(default=64, metadata={
        "help": "rows walked in parallel (text) or sequences per step (digits)"})
    bptt: int = field(default=128, metadata={
        "help": "truncated-BPTT window: steps back-propagated through before the state is detached"})
    reset_state: bool = field(default=False, metadata={
        "help": "start every window from zeros instead of the previous window's final state (to compare with "
        "carrying it)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data (validation after each)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimiser steps (0: no limit)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine schedule decays to lr times this"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    clip: float = field(default=1.0, metadata={
        "help": "clip the gradient norm to this (0: off); tames exploding gradients"})
    train_chars: int = field(default=0, metadata={
        "help": "train on only the first N characters (0: all); for quick runs"})
    val_chars: int = field(default=0, metadata={"help": "validate on only the first N characters (0: all)"})
    test_chars: int = field(default=0, metadata={
        "help": "report test metrics on only the first N characters (0: all, as for the shipped models)"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)"})
    log_every: int = field(default=20, metadata={"help": "steps between lines of metrics.jsonl"})
