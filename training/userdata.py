"""Your own data for `recur train --data PATH` (no torch here).

- lm: a text file, a directory of text files (recursive; hidden files skipped) or a glob. Every file
  must be UTF-8. The vocabulary is built from all the data: id 0 is "<unk>", then characters by
  descending count (ties by code point); `max_vocab` caps the entries (with "<unk>"), the rest map to 0.
- tagger: JSONL, one record a line (blank lines skipped), either
  {"text": "...", "tags": [one label per character]} or
  {"tokens": ["...", ...], "tags": [one label per token]}; tokens are joined by single spaces, each
  character takes its token's label and each joining space the label "O". Records are concatenated
  into one stream. Labels are the sorted set of the labels seen.
- classify: .npz with `X` [n, time, dim] (numbers) and `y` [n] (integers or strings); labels are
  the sorted distinct values of `y` (as strings), class i being the i-th.

The split is deterministic: each unit (lm: a block of BLOCK_LINES lines of a file, keyed by
"relative/path:block"; tagger: a record, keyed by its line number; classify: a sequence, keyed by
its index) goes to train/val/test by sha256 of its key, 90/5/5. A split left empty takes the unit
with the highest hash from the largest split, so each split gets at least one.

Errors in the data raise DataError naming the file (and the line, where there is one).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data import SPLITS, split_of

UNK = "<unk>"
UNK_ID = 0
BLOCK_LINES = 50
SPACE_TAG = "O"  # the label of the space joining two tokens (tokens + tags records)
SPLIT_RULE = "sha256 of the unit's key, 90/5/5; a split left empty takes one unit from the largest"


class DataError(ValueError):
    """User data that cannot be used; the message names the file (and line)."""


@dataclass
class UserData:
    """A user data set, loaded and split: per split, inputs and targets as the trainer wants them."""

    task: str  # lm, tagger, classify
    inputs: dict[str, np.ndarray]  # split -> (N,) ids or (N, T, D) float32
    targets: dict[str, np.ndarray]  # split -> (N,) int64
    vocabulary: list[str] | None = None
    labels: list[str] | None = None
    feature_dim: int = 0
    description: dict = field(default_factory=dict)

    @property
    def unk_id(self) -> int | None:
        return UNK_ID if self.vocabulary is not None else None


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def assign_splits(keys: list[str], where: str) -> list[str]:
    """The split of each unit (see the module docstring); at least three units are needed."""
    if len(keys) < 3:
        raise DataError(f"{where}: {len(keys)} unit(s) of data (see --help of --data); need at least 3 "
                        "to split into train/val/test")
    splits = [split_of(k) for k in keys]
    for need in ("train", "test", "val"):
        if need in splits:
            continue
        counts = Counter(splits)
        largest = max(SPLITS, key=lambda s: (counts[s], s == "train"))
        i = max((i for i, s in enumerate(splits) if s == largest), key=lambda i: _hash(keys[i]))
        splits[i] = need
    return splits


def build_vocabulary(counts: Counter[str], max_vocab: int) -> list[str]:
    chars = sorted(counts, key=lambda ch: (-counts[ch], ord(ch)))
    if max_vocab:
        if max_vocab < 2:
            raise DataError(f"--max-vocab {max_vocab}: need at least 2 (the unknown token and one character)")
        chars = chars[: max_vocab - 1]
    return [UNK, *chars]


def _encode(text: str, ids: dict[str, int]) -> np.ndarray:
    return np.fromiter((ids.get(ch, UNK_ID) for ch in text), dtype=np.int64, count=len(text))


# -- text ------------------------------------------------------------------------------------------


def text_files(spec: str) -> tuple[list[Path], Path]:
    """The files `spec` names (sorted) and the root their keys are relative to."""
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: no files match")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        return files, root
    path = Path(spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
        if not files:
            raise DataError(f"{spec}: the directory holds no files")
        return sorted(files), path
    raise DataError(f"{spec}: no such file or directory")


def read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                        "convert it or leave it out") from None
    return text.replace("\r\n", "\n")


def load_lm(spec: str, max_vocab: int = 0) -> UserData:
    files, root = text_files(spec)
    keys: list[str] = []
    blocks: list[str] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        lines = read_utf8(f).splitlines(keepends=True)
        for b in range(0, len(lines), BLOCK_LINES):
            block = "".join(lines[b : b + BLOCK_LINES])
            if block:
                keys.append(f"{rel}:{b // BLOCK_LINES}")
                blocks.append(block)
    splits = assign_splits(keys, spec)
    texts = {s: "".join(b for b, sp in zip(blocks, splits) if sp == s) for s in SPLITS}
    vocab = build_vocabulary(Counter("".join(blocks)), max_vocab)
    ids = {ch: i for i, ch in enumerate(vocab) if i != UNK_ID}
    inputs, targets = {}, {}
    for s in SPLITS:
        stream = _encode(texts[s], ids)
        if len(stream) < 2:
            raise DataError(f"{spec}: the {s} split has {len(stream)} character(s); need at least 2")
        inputs[s], targets[s] = stream[:-1], stream[1:]
    unknown = sum(c for ch, c in Counter("".join(blocks)).items() if ch not in ids)
    description = {
        "source": spec, "format": "text", "files": len(files),
        "split": f"blocks of {BLOCK_LINES} lines keyed by 'relative/path:block'; {SPLIT_RULE}",
        "units": {s: splits.count(s) for s in SPLITS},
        "chars": {s: len(texts[s]) for s in SPLITS},
        "vocabulary": len(vocab), "max_vocab": max_vocab, "unknown_chars": unknown,
    }
    return UserData("lm", inputs, targets, vocabulary=vocab, description=description)


# -- tagged text (JSONL) ---------------------------------------------------------------------------


def _record(path: Path, lineno: int, raw: bytes) -> tuple[str, list[str]]:
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object with 'text' or 'tokens' and 'tags'")
    tags = rec.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError(f"{where}: 'tags' must be a list of label strings")
    if "text" in rec:
        text = rec["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string")
        if len(tags) != len(text):
            raise DataError(f"{where}: 'tags' has {len(tags)} labels but 'text' has {len(text)} characters "
                            "(one label per character)")
        return text, tags
    tokens = rec.get("tokens")
    if tokens is None:
        raise DataError(f"{where}: a record needs 'text' (one tag per character) or 'tokens' (one tag per token)")
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise DataError(f"{where}: 'tokens' must be a list of non-empty strings")
    if len(tags) != len(tokens):
        raise DataError(f"{where}: 'tags' has {len(tags)} labels but 'tokens' has {len(tokens)} tokens "
                        "(one label per token)")
    chars: list[str] = []
    for i, (tok, tag) in enumerate(zip(tokens, tags)):
        if i:
            chars.append(SPACE_TAG)
        chars.extend([tag] * len(tok))
    return " ".join(tokens), chars


def load_tagger(spec: str, max_vocab: int = 0) -> UserData:
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: no such file (--task tagger reads one JSONL file)")
    keys: list[str] = []
    records: list[tuple[str, list[str]]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            text, tags = _record(path, lineno, raw)
            if text:
                keys.append(f"line {lineno}")
                records.append((text, tags))
    splits = assign_splits(keys, spec)
    vocab = build_vocabulary(Counter(ch for text, _ in records for ch in text), max_vocab)
    labels = sorted({t for _, tags in records for t in tags})
    ids = {ch: i for i, ch in enumerate(vocab) if i != UNK_ID}
    label_ids = {t: i for i, t in enumerate(labels)}
    inputs, targets = {}, {}
    for s in SPLITS:
        chosen = [r for r, sp in zip(records, splits) if sp == s]
        inputs[s] = _encode("".join(t for t, _ in chosen), ids)
        targets[s] = np.array([label_ids[t] for _, tags in chosen for t in tags], dtype=np.int64)
    description = {
        "source": spec, "format": "jsonl", "records": len(records),
        "split": f"one record a unit, keyed by 'line N' (its line number); {SPLIT_RULE}",
        "units": {s: splits.count(s) for s in SPLITS},
        "chars": {s: len(inputs[s]) for s in SPLITS},
        "vocabulary": len(vocab), "max_vocab": max_vocab, "labels": len(labels),
    }
    return UserData("tagger", inputs, targets, vocabulary=vocab, labels=labels, description=description)


# -- sequences (npz) -------------------------------------------------------------------------------


def load_classify(spec: str) -> UserData:
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: no such file (--task classify reads one .npz file)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{spec}: not a readable .npz file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{spec}: not an .npz archive (save it with numpy.savez(path, X=..., y=...))")
    with z:
        for name in ("X", "y"):
            if name not in z.files:
                raise DataError(f"{spec}: missing array '{name}' (the file has {sorted(z.files)}; "
                                "need X [n, time, dim] and y [n])")
        try:
            x, y = z["X"], z["y"]
        except ValueError as e:  # object arrays need pickle, which is refused
            raise DataError(f"{spec}: cannot read the arrays ({e})") from None
    if x.ndim != 3 or 0 in x.shape:
        raise DataError(f"{spec}: array 'X' has shape {list(x.shape)}; need [n, time, dim], none of them 0")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{spec}: array 'X' has dtype {x.dtype}; need numbers")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{spec}: array 'y' has shape {list(y.shape)} but 'X' has {len(x)} sequences; "
                        f"need y [{len(x)}]")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{spec}: array 'X' has a NaN or infinite value in sequence {bad}")
    if y.dtype.kind in "US":
        values = y.astype(str)
    elif y.dtype.kind in "biu" or (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()):
        values = y.astype(np.int64)
    else:
        raise DataError(f"{spec}: array 'y' has dtype {y.dtype}; need integers or strings")
    classes, target = np.unique(values, return_inverse=True)
    labels = [str(c) for c in classes]
    splits = assign_splits([str(i) for i in range(len(x))], spec)
    which = {s: np.array([sp == s for sp in splits]) for s in SPLITS}
    description = {
        "source": spec, "format": "npz", "sequences": len(x), "time": int(x.shape[1]), "feature_dim": int(x.shape[2]),
        "split": f"one sequence a unit, keyed by its index; {SPLIT_RULE}",
        "units": {s: int(which[s].sum()) for s in SPLITS}, "labels": len(labels),
    }
    return UserData("classify", {s: x[which[s]] for s in SPLITS},
                    {s: target.astype(np.int64)[which[s]] for s in SPLITS},
                    labels=labels, feature_dim=int(x.shape[2]), description=description)


def load(task: str, spec: str, max_vocab: int = 0) -> UserData:
    """The data set `spec` for `task` (lm, tagger, classify; digits means classify)."""
    if task == "lm":
        return load_lm(spec, max_vocab)
    if task == "tagger":
        return load_tagger(spec, max_vocab)
    if task in ("classify", "digits"):
        return load_classify(spec)
    raise DataError(f"--task {task} does not read --data")
