"""`recur train --data`: your own text (lm), JSONL (tagger) and npz (classify) train, export and
serve with the vocabulary and labels of the data; bad data names the file and line."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from recur.cli import main
from service.engine.runtime import RuntimeOptions
from service.repository.models import Model, load_model
from training.config import TrainConfig
from training.export import export
from training.train import Trainer
from training.userdata import UNK, DataError, load

WORDS = ["the", "cat", "sat", "on", "a", "mat", "café", "naïve", "λόγος", "river", "stone"]


def _cfg(task: str, data: Path, out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(task=task, data=str(data), cell="gru", out=str(out), layers=1, hidden=16, embed=8, batch=8,
                       bptt=16, max_steps=6, warmup=2, log_every=2)
    return replace(base, **changes)


def _train_export_load(cfg: TrainConfig, models: Path, name: str) -> tuple[Model, dict]:
    Trainer(cfg, command=f"tests: user {name}").run(progress=False)
    out = Path(cfg.out)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["source"] == cfg.data and "sha256" in summary["data"]["split"]
    d = export(out / "best.pt", name=name, version=1, models_dir=models)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["training"]["data"] == summary["data"]
    return load_model(d, RuntimeOptions()), manifest


def _names(path: Path, rest: str) -> pytest.RaisesExc:
    """Expect a DataError whose message starts with `path` then `rest` (a line number, a reason)."""
    return pytest.raises(DataError, match="^" + re.escape(f"{path}{rest}"))


def _zeros(model: Model) -> list[np.ndarray]:
    return [s[:, None] for s in model.zero_state()]  # (L, 1, H)


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    rng = random.Random(0)
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").write_bytes(b"\xff skipped")
    for name in ("a.txt", "b.md", "sub/c.txt"):
        lines = (" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(120))
        (d / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def test_lm_on_a_directory_of_text_files(text_dir: Path, tmp_path: Path) -> None:
    model, manifest = _train_export_load(_cfg("lm", text_dir, tmp_path / "run"), tmp_path / "models", "mylm")
    chars = set("".join(p.read_text(encoding="utf-8") for p in text_dir.rglob("*.*") if p.name != ".hidden"))
    assert model.vocab[0] == UNK and model.unk_id == 0 and set(model.vocab[1:]) == chars
    assert (model.head, model.classes) == ("lm", len(model.vocab))
    units = manifest["training"]["data"]["units"]
    assert all(units[s] >= 1 for s in ("train", "val", "test")) and sum(units.values()) == 9  # 3 files x 120 lines
    ids = model.encode("café λόγος")
    assert 0 not in ids
    logits, _ = model.runtime.run(ids[None], _zeros(model))
    assert logits.shape == (1, len(ids), len(model.vocab))


def test_max_vocab_caps_the_vocabulary(text_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("lm", text_dir / "**" / "*.txt", tmp_path / "run", max_vocab=6)  # a glob: a.txt and sub/c.txt
    model, manifest = _train_export_load(cfg, tmp_path / "models", "capped")
    assert len(model.vocab) == 6 and model.vocab[:2] == [UNK, " "]
    assert manifest["training"]["data"]["files"] == 2 and manifest["training"]["data"]["unknown_chars"] > 0
    assert model.encode("λ")[0] == 0  # rare: unknown


def test_the_split_is_deterministic(text_dir: Path) -> None:
    a, b = load("lm", str(text_dir)), load("lm", str(text_dir))
    assert a.description == b.description
    for s in ("train", "val", "test"):
        assert np.array_equal(a.inputs[s], b.inputs[s])


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _tagged_records(n: int) -> list[dict]:
    rng = random.Random(1)
    records: list[dict] = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(6)]
        if i % 2:  # per token
            records.append({"tokens": words, "tags": ["LONG" if len(w) > 3 else "SHORT" for w in words]})
        else:  # per character
            text = " ".join(words) + "\n"
            records.append({"text": text, "tags": ["VOWEL" if ch in "aeiou" else "OTHER" for ch in text]})
    return records


def test_tagger_on_jsonl(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "tags.jsonl", _tagged_records(60))
    model, _ = _train_export_load(_cfg("tagger", data, tmp_path / "run"), tmp_path / "models", "mytag")
    assert model.labels == ["LONG", "O", "OTHER", "SHORT", "VOWEL"]  # "O": the space between tokens
    assert model.head == "tagger" and model.vocab[0] == UNK
    ids = model.encode("the river")
    logits, _ = model.runtime.run(ids[None], _zeros(model))
    assert logits.shape == (1, 9, 5)


def test_token_tags_expand_to_characters(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "t.jsonl", [{"tokens": ["ab", "c"], "tags": ["X", "Y"]}] * 3)
    user = load("tagger", str(data))
    assert user.labels == ["O", "X", "Y"]
    text = "".join(user.vocabulary[i] for s in ("train", "val", "test") for i in user.inputs[s])
    tags = [user.labels[i] for s in ("train", "val", "test") for i in user.targets[s]]
    assert text == "ab c" * 3 and tags == ["X", "X", "O", "Y"] * 3


def test_classifier_on_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.choice(np.array(["cat", "dog", "eel"]), size=80)
    x = rng.normal(size=(80, 5, 3)).astype(np.float32) + (y == "dog")[:, None, None]
    np.savez(tmp_path / "seq.npz", X=x, y=y)
    model, manifest = _train_export_load(_cfg("classify", tmp_path / "seq.npz", tmp_path / "run"),
                                         tmp_path / "models", "mycls")
    assert model.labels == ["cat", "dog", "eel"] and (model.input_kind, model.feature_dim) == ("features", 3)
    assert manifest["input"]["shape"] == ["batch", "time", 3] and manifest["vocabulary"] is None
    logits, _ = model.runtime.run(x[:2], [np.zeros((1, 2, 16), np.float32)])
    assert logits.shape == (2, 5, 3)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["labels"] == ["cat", "dog", "eel"] and "test_accuracy" in ckpt["metrics"]


def test_integer_labels_and_digits_alias(tmp_path: Path) -> None:
    np.savez(tmp_path / "ints.npz", X=np.zeros((30, 4, 2)), y=np.arange(30) % 3 + 7)
    user = load("digits", str(tmp_path / "ints.npz"))
    assert user.labels == ["7", "8", "9"] and user.feature_dim == 2
    assert sum(len(user.targets[s]) for s in ("train", "val", "test")) == 30


def test_classify_needs_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--task classify needs --data"):
        Trainer(TrainConfig(task="classify", out=str(tmp_path)))


# -- errors name the file and the line ------------------------------------------------------------------


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    recs = _tagged_records(2)
    data = _jsonl(tmp_path / "bad.jsonl", [recs[0], recs[1], '{"text": "ab", "tags": [}'])
    with _names(data, ":3: not valid JSON"):
        Trainer(_cfg("tagger", data, tmp_path / "run"))


def test_tag_length_mismatch_names_file_and_line(tmp_path: Path) -> None:
    recs = _tagged_records(4)
    data = _jsonl(tmp_path / "short.jsonl", [recs[0], "", {"text": "abc", "tags": ["X", "Y"]}, recs[1]])
    with _names(data, ":3: 'tags' has 2 labels but 'text' has 3 characters"):
        load("tagger", str(data))
    data = _jsonl(tmp_path / "tok.jsonl", [recs[1], {"tokens": ["a", "b"], "tags": ["X"]}])
    with _names(data, ":2: 'tags' has 1 labels but 'tokens' has 2 tokens"):
        load("tagger", str(data))


def test_npz_missing_or_misshapen_arrays_name_file_and_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", X=np.zeros((10, 4, 2)))
    with _names(tmp_path / "nox.npz", ": missing array 'y'"):
        load("classify", str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "shape.npz", X=np.zeros((10, 4, 2)), y=np.zeros(9, dtype=int))
    with _names(tmp_path / "shape.npz", ": array 'y' has shape [9] but 'X' has 10"):
        load("classify", str(tmp_path / "shape.npz"))
    np.savez(tmp_path / "flat.npz", X=np.zeros((10, 4)), y=np.zeros(10, dtype=int))
    with _names(tmp_path / "flat.npz", ": array 'X' has shape [10, 4]"):
        load("classify", str(tmp_path / "flat.npz"))


def test_a_file_that_is_not_utf8_is_named(text_dir: Path) -> None:
    (text_dir / "sub" / "latin1.txt").write_bytes("first line\ncaf\u00e9\n".encode("latin-1"))
    with _names(text_dir / "sub" / "latin1.txt", ":2: not UTF-8"):
        load("lm", str(text_dir))


def test_too_little_data_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("just a line\n")
    with pytest.raises(DataError, match="need at least 3"):
        load("lm", str(tmp_path / "one.txt"))
    with pytest.raises(DataError, match="no such file or directory"):
        load("lm", str(tmp_path / "absent"))


def test_the_command_line_reports_bad_data_without_a_traceback(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = _jsonl(tmp_path / "bad.jsonl", [_tagged_records(1)[0], "[1, 2]"])
    rc = main(["train", "--task", "tagger", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"recur: error: {data}:2: a record must be a JSON object" in err and "Traceback" not in err


def test_resume_on_user_data_and_refusal_when_it_changed(text_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("lm", text_dir, tmp_path / "run")
    assert Trainer(cfg).run(progress=False, until=3) == {}
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 3 and "test_bpc" in resumed.run(progress=False)
    (text_dir / "new.txt").write_text("\u2603 a snowman\n" * 60, encoding="utf-8")  # a new character
    with pytest.raises(DataError, match="vocabulary or labels differ"):
        Trainer(cfg, resume=True)
