"""Data sets built from what every machine has: the stdlib's own sources and
scikit-learn's bundled digits. Nothing is downloaded.

Text: each stdlib file is assigned to train/val/test by a stable hash of its
relative path, so the split never depends on the machine's file order.
"""

from __future__ import annotations

import hashlib
import io
import keyword
import logging
import os
import sysconfig
import token
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Vocabulary: id 0 is the unknown character, then tab, newline and printable ASCII.
UNK_ID = 0
VOCAB: list[str] = ["<unk>", "\t", "\n"] + [chr(c) for c in range(32, 127)]
_CHAR_TO_ID = {ch: i for i, ch in enumerate(VOCAB) if i != UNK_ID}

# Per-character tag classes, from the stdlib tokenizer.
TAGS: list[str] = ["whitespace", "comment", "string", "name", "keyword", "number", "operator"]
_TAG = {name: i for i, name in enumerate(TAGS)}

DIGIT_LABELS: list[str] = [str(d) for d in range(10)]

SPLITS = ("train", "val", "test")
_TEST_DIRS = {"test", "tests", "idle_test"}


def encode(text: str) -> np.ndarray:
    """Character ids of `text`; characters outside the vocabulary become UNK_ID."""
    return np.fromiter((_CHAR_TO_ID.get(ch, UNK_ID) for ch in text), dtype=np.int64, count=len(text))


def split_of(key: str) -> str:
    """Stable ~90/5/5 assignment by a hash of `key`."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def stdlib_files() -> list[str]:
    """Sorted relative paths of the stdlib's .py files, without site-packages or test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and (rel.parts[0] == "site-packages" or _TEST_DIRS & set(rel.parts)):
            dirnames[:] = []
            continue
        found.extend(str(rel / f) for f in filenames if f.endswith(".py"))
    return sorted(found)


def char_tags(source: str) -> np.ndarray:
    """Tag of every character of `source` (raises tokenize.TokenError/SyntaxError on bad input)."""
    lines = source.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(line) for line in lines])
    tags = np.full(len(source), _TAG["whitespace"], dtype=np.int64)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == token.COMMENT:
            tag = _TAG["comment"]
        elif tok.type == token.STRING:
            tag = _TAG["string"]
        elif tok.type == token.NAME:
            tag = _TAG["keyword"] if keyword.iskeyword(tok.string) else _TAG["name"]
        elif tok.type == token.NUMBER:
            tag = _TAG["number"]
        elif tok.type == token.OP:
            tag = _TAG["operator"]
        else:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        if r0 - 1 >= len(lines):
            continue
        tags[starts[r0 - 1] + c0 : starts[r1 - 1] + c1] = tag
    return tags


@dataclass
class TextSplit:
    """One split of the stdlib text: character ids and, aligned with them, tags."""

    ids: np.ndarray  # (N,) int64
    tags: np.ndarray  # (N,) int64
    files: int


def _cache_dir() -> Path:
    return Path(os.environ.get("RECUR_DATA_DIR", "data"))


def load_text(split: str) -> TextSplit:
    """The stdlib text of one split, cached as .npz under $RECUR_DATA_DIR (default ./data)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    files = stdlib_files()
    fingerprint = hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]
    cache = _cache_dir() / f"stdlib-{fingerprint}-{split}.npz"
    if cache.exists():
        z = np.load(cache)
        return TextSplit(ids=z["ids"], tags=z["tags"], files=int(z["files"]))
    root = Path(sysconfig.get_paths()["stdlib"])
    ids, tags, used, skipped = [], [], 0, 0
    for rel in files:
        if split_of(rel) != split:
            continue
        try:
            source = (root / rel).read_text(encoding="utf-8")
            file_tags = char_tags(source)
        except (UnicodeDecodeError, SyntaxError, tokenize.TokenError):
            skipped += 1
            continue
        ids.append(encode(source))
        tags.append(file_tags)
        used += 1
    log.info("stdlib %s split: %d files, %d skipped (did not tokenize)", split, used, skipped)
    out = TextSplit(ids=np.concatenate(ids), tags=np.concatenate(tags), files=used)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=out.ids, tags=out.tags, files=used)
    return out


@dataclass
class DigitsSplit:
    features: np.ndarray  # (N, 8, 8) float32: 8 steps of 8 features in [0, 1]
    labels: np.ndarray  # (N,) int64


def load_digits(split: str) -> DigitsSplit:
    """scikit-learn's bundled 8x8 digits read row by row, split 80/10/10 by a stable hash."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 8, 8)
    buckets = np.array([int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:4], "big") % 10
                        for i in range(len(x))])
    which = {"train": buckets < 8, "val": buckets == 8, "test": buckets == 9}[split]
    return DigitsSplit(features=x[which], labels=d.target[which].astype(np.int64))
