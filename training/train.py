"""Truncated-BPTT training of a recurrent model, with clipping, AdamW, cosine schedule,
per-epoch validation, self-describing checkpoints with resume, and a metrics log.

Text tasks cut the training stream into `batch` consecutive rows and walk them in
windows of `bptt` steps: the state a window ends with is (detached) the initial state
of the next window of the same row. `reset_state` starts every window at zeros instead.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import data as datasets
from training import userdata
from training.config import TASKS, TrainConfig
from training.evaluate import Batches, evaluate_sequences, evaluate_text, majority_baseline, text_rows
from training.model import ModelConfig, SequenceModel, State, detach

log = logging.getLogger(__name__)


def _sequences(cfg: TrainConfig) -> bool:
    """Many-to-one tasks: one label per sequence of feature vectors."""
    return cfg.task in ("digits", "classify")


def _task_data(cfg: TrainConfig, split: str, user: userdata.UserData | None = None) -> Batches:
    if user is not None:
        inputs, targets = user.inputs[split], user.targets[split]
        limit = cfg.train_chars if split == "train" else cfg.val_chars
        if limit and not _sequences(cfg):
            inputs, targets = inputs[:limit], targets[:limit]
        return Batches(inputs, targets)
    if cfg.task == "digits":
        d = datasets.load_digits(split)
        return Batches(d.features, d.labels)
    t = datasets.load_text(split)
    limit = cfg.train_chars if split == "train" else cfg.val_chars
    ids, tags = (t.ids[: limit + 1], t.tags[: limit + 1]) if limit else (t.ids, t.tags)
    if cfg.task == "lm":
        return Batches(ids[:-1], ids[1:])
    return Batches(ids, tags)


def _model_config(cfg: TrainConfig, user: userdata.UserData | None = None) -> ModelConfig:
    if user is not None:
        if user.task == "classify":
            return ModelConfig(cell=cfg.cell, head="classifier", input_kind="features", feature_dim=user.feature_dim,
                               hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout,
                               classes=len(user.labels or []))
        vocab = len(user.vocabulary or [])
        return ModelConfig(cell=cfg.cell, head=user.task, input_kind="tokens", vocab_size=vocab, embed_dim=cfg.embed,
                           hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout,
                           classes=vocab if user.task == "lm" else len(user.labels or []))
    if cfg.task == "digits":
        return ModelConfig(cell=cfg.cell, head="classifier", input_kind="features", feature_dim=8,
                           hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout, classes=10)
    classes = len(datasets.VOCAB) if cfg.task == "lm" else len(datasets.TAGS)
    return ModelConfig(cell=cfg.cell, head=cfg.task, input_kind="tokens", vocab_size=len(datasets.VOCAB),
                       embed_dim=cfg.embed, hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout, classes=classes)


def _evaluate(model: SequenceModel, cfg: TrainConfig, batches: Batches) -> dict[str, float]:
    if _sequences(cfg):
        return evaluate_sequences(model, batches)
    return evaluate_text(model, batches, rows=max(1, min(32, len(batches.inputs))))  # short user splits: fewer rows


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """Owns the model, optimiser, data position and carried state; `run` trains to the end."""

    def __init__(self, cfg: TrainConfig, command: str | None = None, resume: bool = False) -> None:
        self.cfg, self.command = cfg, command
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.task not in TASKS:
            raise ValueError(f"unknown task {cfg.task!r}; expected one of {TASKS}")
        if cfg.task == "classify" and not cfg.data:
            raise userdata.DataError("--task classify needs --data FILE.npz (the built-in classifier is --task digits)")
        self.user: userdata.UserData | None = None
        if cfg.data:
            self.user = userdata.load(cfg.task, cfg.data, cfg.max_vocab)
            log.info("data %s: split %s: %s", cfg.data, self.user.description["split"],
                     " ".join(f"{s}={n}" for s, n in self.user.description["units"].items()))
        self.train_data = _task_data(cfg, "train", self.user)
        self.val_data = _task_data(cfg, "val", self.user)
        self.model = SequenceModel(_model_config(cfg, self.user))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if _sequences(cfg):
            self.steps_per_epoch = math.ceil(len(self.train_data.inputs) / cfg.batch)
        else:
            self.x = text_rows(self.train_data.inputs, cfg.batch)  # (B, n)
            self.y = text_rows(self.train_data.targets, cfg.batch)
            self.steps_per_epoch = self.x.shape[1] // cfg.bptt
            if self.user is not None and self.steps_per_epoch == 0:
                raise userdata.DataError(
                    f"{cfg.data}: the train split has {len(self.train_data.inputs)} characters, fewer than "
                    f"--batch x --bptt = {cfg.batch * cfg.bptt}; give more data or a smaller --batch or --bptt")
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.step, self.epoch, self.seconds = 0, 0, 0.0
        self.state: State | None = None  # carried across windows
        self._order, self._order_epoch = torch.empty(0, dtype=torch.long), -1  # digits: see _epoch_order
        self.best = math.inf
        self.history: list[dict] = []
        if resume:
            self._load(self.out / "ckpt.pt")

    # -- checkpoints -------------------------------------------------------
    def _save(self, path: Path, metrics: dict) -> None:
        vocab, labels = self._vocabulary_and_labels()
        torch.save(
            {
                "model_config": self.model.config.to_dict(),
                "train_config": asdict(self.cfg),
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "step": self.step,
                "epoch": self.epoch,
                "seconds": self.seconds,
                "best_val_loss": self.best,
                "carried_state": self.state,
                "rng": torch.get_rng_state(),
                "metrics": metrics,
                "history": self.history,
                "vocabulary": vocab,
                "unk_id": (self.user.unk_id if self.user else datasets.UNK_ID) if vocab else None,
                "labels": labels,
                "command": self.command,
                "data": self._data_description(),
            },
            path,
        )

    def _vocabulary_and_labels(self) -> tuple[list[str] | None, list[str] | None]:
        if self.user is not None:
            return self.user.vocabulary, self.user.labels
        vocab = datasets.VOCAB if self.cfg.task != "digits" else None
        labels = {"lm": None, "tagger": datasets.TAGS, "digits": datasets.DIGIT_LABELS}[self.cfg.task]
        return vocab, labels

    def _load(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        vocab, labels = self._vocabulary_and_labels()
        if (ckpt.get("vocabulary"), ckpt.get("labels")) != (vocab, labels):
            raise userdata.DataError(f"{path}: the checkpoint's vocabulary or labels differ from those of the data "
                                     f"now ({self.cfg.data or self.cfg.task}); the data changed since it was written")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step, self.epoch, self.seconds = ckpt["step"], ckpt["epoch"], ckpt["seconds"]
        self.best, self.state, self.history = ckpt["best_val_loss"], ckpt["carried_state"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"])
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    def _data_description(self) -> dict:
        if self.user is not None:
            return self.user.description
        if self.cfg.task == "digits":
            return {"source": "sklearn.datasets.load_digits", "split": "stable hash of index, 80/10/10"}
        return {
            "source": "python stdlib .py files (no site-packages, no test suites)",
            "split": "sha256 of relative path, 90/5/5",
            "train_chars": len(self.train_data.inputs),
        }

    # -- training ----------------------------------------------------------
    def _batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if _sequences(self.cfg):
            idx = self._epoch_order()[i * self.cfg.batch : (i + 1) * self.cfg.batch]
            return torch.from_numpy(self.train_data.inputs)[idx], torch.from_numpy(self.train_data.targets)[idx]
        span = slice(i * self.cfg.bptt, (i + 1) * self.cfg.bptt)
        return self.x[:, span], self.y[:, span]  # (B, T)

    def _epoch_order(self) -> torch.Tensor:
        """This epoch's shuffle of the digits: a function of seed and epoch alone (not of the global
        RNG), so a run resumed mid-epoch walks the rest of the same order."""
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.cfg.seed, self.epoch])
            self._order = torch.from_numpy(rng.permutation(len(self.train_data.inputs)))
            self._order_epoch = self.epoch
        return self._order

    def train_step(self, i: int) -> float:
        self.model.train()
        x, y = self._batch(i)
        if _sequences(self.cfg):
            logits, _ = self.model(x)
            loss = F.cross_entropy(logits[:, -1], y)  # many-to-one: the last step's output
        else:
            state = None if self.cfg.reset_state else self.state
            logits, new_state = self.model(x, state)  # (B, T, C)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            self.state = detach(new_state)  # truncate BPTT here, keep the values
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.step, self.total_steps, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.step += 1
        return loss.item()

    def _log(self, row: dict) -> None:
        self.history.append(row)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def validate(self) -> dict[str, float]:
        metrics = _evaluate(self.model, self.cfg, self.val_data)
        self._log({"step": self.step, "epoch": self.epoch, "split": "val", **metrics, "time": self.seconds})
        if metrics["loss"] < self.best:
            self.best = metrics["loss"]
            self._save(self.out / "best.pt", {f"val_{k}": v for k, v in metrics.items()})
        return metrics

    def run(self, progress: bool = True, until: int = 0) -> dict[str, float]:
        """Train to the end and return test metrics; with `until`, stop at that step with a
        checkpoint to resume from (as an interruption would) and return {}."""
        from tqdm import tqdm

        stop_at = min(self.total_steps, until) if until else self.total_steps

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not progress, mininterval=1.0, unit="step")
        steps = self.train_data.inputs.shape[1] if _sequences(self.cfg) else self.cfg.bptt
        tokens_per_step = self.cfg.batch * steps
        window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
        while self.step < stop_at:
            start_i = self.step - self.epoch * self.steps_per_epoch
            if start_i == 0:
                self.state = None  # the stream starts again from its beginning
            for i in range(start_i, self.steps_per_epoch):
                t0 = time.perf_counter()
                loss = self.train_step(i)
                self.seconds += time.perf_counter() - t0
                window_loss, window_steps = window_loss + loss, window_steps + 1
                if self.step % self.cfg.log_every == 0:
                    rate = window_steps * tokens_per_step / (time.perf_counter() - window_start)
                    row = {"step": self.step, "epoch": self.epoch, "split": "train", "loss": window_loss / window_steps,
                           "lr": self.opt.param_groups[0]["lr"], "tokens_per_s": rate, "time": self.seconds}
                    self._log(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{rate:,.0f}")
                    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
                bar.update(1)
                if self.step >= stop_at:
                    break
            else:
                self.epoch += 1
                self._epoch_end()
        bar.close()
        if stop_at < self.total_steps:
            self._save(self.out / "ckpt.pt", {})
            return {}
        if not self.history or self.history[-1].get("split") != "val" or self.history[-1]["step"] != self.step:
            self._epoch_end()
        return self.finish()

    def _epoch_end(self) -> None:
        metrics = self.validate()
        log.info("step %d epoch %d val %s", self.step, self.epoch,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self._save(self.out / "ckpt.pt", {})
        plot_curves(self.history, self.out / "curves.png")

    def finish(self) -> dict[str, float]:
        """Evaluate the best checkpoint on the test split and record it in best.pt."""
        best = torch.load(self.out / "best.pt", map_location="cpu", weights_only=False)
        self.model.load_state_dict(best["model"])
        test_data = _task_data(TrainConfig(**{**asdict(self.cfg), "val_chars": self.cfg.test_chars}), "test", self.user)
        test = _evaluate(self.model, self.cfg, test_data)
        metrics = {**best["metrics"], **{f"test_{k}": v for k, v in test.items()}}
        if self.cfg.task != "lm":
            metrics["test_majority_baseline"] = majority_baseline(test_data.targets)
        best["metrics"] = metrics
        best["seconds"] = self.seconds
        torch.save(best, self.out / "best.pt")
        (self.out / "summary.json").write_text(json.dumps({"metrics": metrics, "seconds": self.seconds,
                                                           "steps": self.step, "command": self.command,
                                                           "data": self._data_description()}, indent=2))
        log.info("test %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in history if r["split"] == split]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
