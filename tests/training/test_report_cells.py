"""`recur report cells`: a unit planted by hand to track "inside a string" is found (and scored on held-out
text near 1, its shuffled baseline near 0); the report's files on real tiny models; the ranking alone."""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from training.report import cells
from training.report.cells import FEATURES, rank_units, stdlib_text, text_features

PLANT_LAYER, PLANT_UNIT = 1, 2
VOCAB = ["<unk>", "\n", " ", '"', "=", "+", "(", ")", "#", "a", "b", "c", "d", "e", "x"]


def report(*argv: str) -> int:
    """`recur report cells ARGV`, in process (its own parser: the other reports are not needed here)."""
    parser = argparse.ArgumentParser(prog="recur report cells")
    cells.add_arguments(parser)
    return cells.run(parser.parse_args(list(argv)))


def planted_model(models_dir: Path) -> Path:
    """A 2-layer LSTM (hidden 4) exported as models_dir/planted/1 where h layer 1 unit 2 flips sign on every
    quote: layer 0 unit 0 says "this is a quote" (+0.76, else -0.76); at a quote, layer 1 unit 2 forgets (f ~ 0)
    and writes g = tanh(-20 h_prev + 5), the opposite of its previous sign; elsewhere it keeps c (f ~ 1, i ~ 0).
    Everything else is small and random, and nothing else reads the planted unit."""
    import torch

    from training.export import export
    from training.model import ModelConfig, SequenceModel

    h, big = 4, 30.0
    cfg = ModelConfig(cell="lstm", head="lm", vocab_size=len(VOCAB), embed_dim=3, hidden=h, layers=2,
                      classes=len(VOCAB))
    model = SequenceModel(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        assert model.embed is not None
        model.embed.weight[:, 0] = torch.tensor([float(t == '"') for t in VOCAB])
        rnn = model.rnn
        i, f, g, o = (k * h for k in range(4))  # PyTorch's gate rows: i, f, g, o
        # layer 0 unit 0: a memoryless quote detector, h = tanh(+-1)
        u = 0
        for w in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0):
            w[[i + u, f + u, g + u, o + u]] = 0
        rnn.bias_ih_l0[i + u], rnn.bias_ih_l0[f + u], rnn.bias_ih_l0[o + u] = big, -big, big
        rnn.weight_ih_l0[g + u, 0], rnn.bias_ih_l0[g + u] = 2 * big, -big
        # layer 1 unit 2: the flip-flop, reading only the detector and itself
        u = PLANT_UNIT
        for w in (rnn.weight_ih_l1, rnn.weight_hh_l1, rnn.bias_ih_l1, rnn.bias_hh_l1):
            w[[i + u, f + u, g + u, o + u]] = 0
        rnn.weight_ih_l1[i + u, 0], rnn.weight_ih_l1[f + u, 0] = big, -big
        rnn.weight_hh_l1[g + u, u], rnn.bias_ih_l1[g + u] = -20.0, 5.0
        rnn.bias_ih_l1[o + u] = big
        rnn.weight_hh_l1[:, u] = 0  # no other unit (nor its own gates but g) reads it
        rnn.weight_hh_l1[g + u, u] = -20.0
    ckpt = models_dir.parent / "planted.pt"
    torch.save({"model_config": cfg.to_dict(), "model": model.state_dict(), "vocabulary": VOCAB, "unk_id": 0,
                "labels": None, "command": "tests: planted"}, ckpt)
    return export(ckpt, name="planted", version=1, models_dir=models_dir)


def planted_text(lines: int = 260) -> str:
    """Python lines with string literals (double quotes only), names, parentheses and comments."""
    rng = np.random.default_rng(1)

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choice(list("abcde"), size=int(rng.integers(lo, hi))))

    out = []
    for _ in range(lines):
        terms = []
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.integers(3)
            if kind == 0:
                terms.append('"' + " ".join(word(0, 6) for _ in range(int(rng.integers(1, 4)))) + '"')
            elif kind == 1:
                terms.append(word(1, 5))
            else:
                terms.append(f'({word(1, 4)} + "{word(0, 5)}")')
        line = f"x{word(0, 3)} = " + " + ".join(terms)
        if rng.random() < 0.2:
            line += "  # " + word(1, 6) + " " + word(1, 6)
        out.append(line)
    return "\n".join(out) + "\n"


def pre_blocks(page: str) -> list[str]:
    """The characters of each <pre> block of the report, tags stripped, entities decoded."""
    return [html.unescape(re.sub(r"<[^>]+>", "", b)) for b in re.findall(r"<pre>(.*?)</pre>", page, re.S)]


def test_planted_unit_is_found(tmp_path: Path) -> None:
    directory = planted_model(tmp_path / "models")
    text = planted_text()
    (tmp_path / "text.py").write_text(text)
    out = tmp_path / "out"
    assert report(str(directory), "--text", str(tmp_path / "text.py"), "--out", str(out)) == 0
    result = json.loads((out / "cells.json").read_text())
    best = result["features"]["in_string"]
    assert (best["layer"], best["index"]) == (PLANT_LAYER, PLANT_UNIT), best  # h or c of the planted unit
    planted_h = next(u for u in best["top"] if u["unit"] == f"h layer {PLANT_LAYER} unit {PLANT_UNIT}")
    assert planted_h["score"] >= 0.99 and best["score"] >= 0.99, best
    assert best["sign"] == 1 and abs(best["baseline"]) < 0.1, best
    others = [u for u in best["top"] if (u["layer"], u["index"]) != (PLANT_LAYER, PLANT_UNIT)]
    assert all(u["score"] < 0.9 for u in others), best["top"]  # nothing else tracks it
    assert "in_keyword" in result["skipped"] and "constant" in result["skipped"]["in_keyword"]  # no keywords
    page = (out / "cells.html").read_text()
    blocks = pre_blocks(page)
    assert "&quot;" in page and len(blocks) == len(result["features"]) and all(b and b in text for b in blocks)


@pytest.mark.parametrize("name", ["lstm-lm", "gru-lm"])
def test_report_files(tiny_models: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    chars = 3000
    assert report(name, "--models-dir", str(tiny_models), "--chars", str(chars), "--out", str(out)) == 0
    result = json.loads((out / "cells.json").read_text())
    text, tags = stdlib_text(chars)
    feats = text_features(text, tags)
    half = chars // 2
    varying = {k for k, f in feats.items() if np.ptp(f[:half]) > 0 and np.ptp(f[half:]) > 0}
    assert set(result["features"]) == varying and varying | set(result["skipped"]) == set(FEATURES)
    assert {"in_string", "indent_depth", "position_in_line", "next_is_newline"} <= varying
    layers = result.get("layers_counted_from")
    for res in result["features"].values():
        assert res["unit"] == f"{res['state']} layer {res['layer']} unit {res['index']}" and layers == 0
        assert res["state"] in (("h", "c") if name.startswith("lstm") else ("h",))
        assert 0 <= res["layer"] < 2 and 0 <= res["index"] < 16 and len(res["top"]) == 5
        assert 0 <= res["score"] <= 1 and abs(res["baseline"]) < 0.2
    page = (out / "cells.html").read_text()
    blocks = pre_blocks(page)  # the text itself, escaped
    assert len(blocks) == len(varying) and all(b and b in text for b in blocks)
    shown = "".join(blocks)
    assert page.count('style="background:#') >= len(shown)  # a colour per character
    for ch, entity in (("<", "&lt;"), ("&", "&amp;"), ('"', "&quot;")):
        assert (ch in shown) == (entity in page)
    png = (out / "cells.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 1000 < len(png) < 300_000


def test_features_model_is_refused(tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report("lstm-classifier", "--models-dir", str(tiny_models), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "reads features" in err and "not tokens" in err
    assert not (tmp_path / "o").exists()
    assert report("no-such-model", "--models-dir", str(tiny_models), "--out", str(tmp_path / "o")) == 2


def test_rank_units_synthetic() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    feature = (np.cumsum(rng.random(n) < 0.05) % 2).astype(np.float32)  # runs of 0s and 1s
    acts = rng.normal(size=(n, 6)).astype(np.float32)
    acts[:, 3] = -2.0 * feature + 0.5  # tracks it exactly, negatively
    acts[:, 5] = feature + rng.normal(scale=1.0, size=n)  # tracks it loosely
    acts[:, 1] = 0.0  # constant: r 0, not nan
    ranked = rank_units(acts, feature, slice(0, n // 2), slice(n // 2, n), seed=3, top=6)
    assert [u.column for u in ranked[:2]] == [3, 5]
    assert ranked[0].score == pytest.approx(1.0, abs=1e-6) and ranked[0].sign == -1
    assert abs(ranked[0].baseline) < 0.1
    assert 0.2 < ranked[1].score < 0.8
    noise = [u for u in ranked if u.column in (0, 2, 4)]
    assert len(noise) == 3 and all(u.score < 0.1 for u in noise)
    assert next(u for u in ranked if u.column == 1).score == 0.0
    with pytest.raises(ValueError, match="constant"):
        rank_units(acts, np.r_[feature[: n // 2], np.zeros(n - n // 2, np.float32)], slice(0, n // 2),
                   slice(n // 2, n))


@pytest.mark.parametrize("python", [True, False])
def test_feature_definitions(python: bool) -> None:
    """The module docstring's definitions, from the tagger's labels and from the fallback scanner alike."""
    from training.data import char_tags

    text = 'x = r"a(b" # c(\n\tf(a[1],\n  "")\n'
    feats = text_features(text, char_tags(text) if python else None)
    at = {k: "".join(ch for ch, v in zip(text, f) if v) for k, f in feats.items() if k.startswith("in_")}
    assert at["in_string"] == '"a(b' + '"'  # opening quotes inside (prefix r not), closing quotes outside
    assert at["in_comment"] == "# c("
    assert ("in_keyword" in feats) == python
    depth = "".join(str(int(d)) for d in feats["bracket_depth"])
    assert depth == "0000000000000000" + "001122111" + "111100"  # brackets in strings and comments don't count
    assert list(feats["indent_depth"]) == [0] * 16 + [8] * 9 + [2] * 6
    assert list(feats["position_in_line"][:17]) == [*range(16), 0]
    assert [i for i, v in enumerate(feats["next_is_newline"]) if v] == [14, 23, 29]
