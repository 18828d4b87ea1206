"""`recur report cells MODEL`: which hidden units track features of the text, drawn the way Karpathy, Johnson
and Fei-Fei's "Visualizing and Understanding Recurrent Networks" (the lecture's "interpretable cells" slide)
draws them: each character's background coloured by one unit's activation after reading it.

Why: the lecture claims that some LSTM cells track a quote being open, the indentation, the position in
the line. This measures that claim on the user's own exported model, honestly: the best unit for a
feature is chosen on one half of the text (fit) and its |Pearson r| is reported on the other half
(held-out), beside the same unit's r against the feature's labels randomly permuted (a baseline that
should be near 0). A feature no unit tracks shows a low held-out score; nothing is tuned to look good.

Activations come from the exported graph itself (onnxruntime, in process, no torch): the text is run one
character at a time, the state outputs fed back, so after character t the state outputs ([layers, 1,
hidden] each: h, and c for an LSTM) are every layer's h (and c) at step t. Units are named like
"h layer 1 unit 37"; layers and units are counted from 0, in the name and in cells.json. The state runs on
across the whole text (from zeros at its start).

Text: by default chunks of stdlib Python files from the lm data set's test split (training.data: files
assigned by a hash of their path, so never seen in training), or --text FILE.

Features, one value per character position t, describing the text as read up to and including t:
  in_string        1 from the first quote character of a string literal (prefix letters such as r, b, f
                   excluded) up to, not including, the literal's last character: the opening quote counts as
                   inside, the closing quote (the last one of a triple quote) as outside. That is what a
                   reader going left to right knows after reading the character.
  in_comment       1 from "#" to the end of its line; the newline is outside.
  in_keyword       1 on the characters of a Python keyword (only where the tagger's labels exist).
  indent_depth     width of the current line's leading whitespace (tabs to multiples of 8), on every
                   character of the line, its newline included.
  position_in_line column of the character: 0 for a line's first character; a newline gets its line's length.
  bracket_depth    nesting of (), [] and {} outside strings and comments after reading the character (an
                   opening bracket is at its inner depth, a closing one at the outer), never below 0.
  next_is_newline  1 where the next character is a newline.
Strings, comments and keywords come from training.data.char_tags, the tagger task's labels (the stdlib
tokenizer); text that does not tokenize as Python gets a small scanner instead (quotes ' and " with
backslash escapes, no triple quotes; # comments; no keywords). A feature that is constant on the text (or
on one of its halves) has no correlation to measure and is skipped, with the reason in cells.json.

Colours: blue (-1) through white (0) to red (+1): h as it is (tanh bounds it), c divided by the unit's 99th
percentile |c| on the whole text (c is unbounded: a counter-like cell would saturate any fixed scale).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("in_string", "in_comment", "in_keyword", "indent_depth", "position_in_line", "bracket_depth",
            "next_is_newline")
DESCRIBE = {
    "in_string": "inside a string literal (opening quote inside, closing quote outside)",
    "in_comment": "inside a # comment (newline outside)",
    "in_keyword": "on a Python keyword",
    "indent_depth": "leading-whitespace width of the current line",
    "position_in_line": "column of the character",
    "bracket_depth": "(), [] and {} nesting outside strings and comments",
    "next_is_newline": "the next character is a newline",
}
_OPEN, _CLOSE = "([{", ")]}"
_QUOTES = "'\""
TOP = 5  # units listed per feature
PNG_CHARS = 600  # characters per panel of cells.png: about its 12 rows of code
PER_FILE = 2500  # characters taken from each stdlib file, so the text spans several files


# -- ranking ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitScore:
    """One unit (a column of the activations) against one feature."""

    column: int
    r: float  # Pearson r on the held-out steps
    fit_r: float  # Pearson r on the fit steps, which chose the unit
    baseline: float  # held-out r against the feature's labels randomly permuted

    @property
    def score(self) -> float:
        return abs(self.r)

    @property
    def sign(self) -> int:
        return 1 if self.r >= 0 else -1


def correlations(acts: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """Pearson r of every column of acts [steps, units] with feature [steps]; 0 for a constant column."""
    a = acts.astype(np.float64) - acts.mean(axis=0, dtype=np.float64)
    f = feature.astype(np.float64) - feature.mean(dtype=np.float64)
    num = a.T @ f
    den = np.sqrt((a * a).sum(axis=0) * float(f @ f))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def rank_units(acts: np.ndarray, feature: np.ndarray, fit: slice, held: slice, seed: int = 0,
               top: int = TOP) -> list[UnitScore]:
    """The `top` units whose activation best tracks `feature` on the fit steps (by |r|), best first, each
    scored on the held-out steps with a shuffled-label baseline. ValueError if the feature is constant
    on either part (no correlation to measure)."""
    for part, where in ((fit, "fit"), (held, "held-out")):
        if np.ptp(feature[part]) == 0:
            raise ValueError(f"constant on the {where} part of the text")
    fit_r = correlations(acts[fit], feature[fit])
    order = np.argsort(-np.abs(fit_r), kind="stable")[:top]
    held_acts = acts[held][:, order]
    held_r = correlations(held_acts, feature[held])
    shuffled = np.random.default_rng(seed).permutation(feature[held])
    base_r = correlations(held_acts, shuffled)
    return [UnitScore(int(c), float(r), float(fit_r[c]), float(b)) for c, r, b in zip(order, held_r, base_r)]


# -- text and features -------------------------------------------------------------------------------------


def _try_tags(source: str) -> np.ndarray | None:
    from training.data import char_tags

    try:
        return char_tags(source)
    except (SyntaxError, tokenize.TokenError, IndentationError):
        return None


def stdlib_text(chars: int, per_file: int = PER_FILE) -> tuple[str, np.ndarray]:
    """`chars` characters of the lm data set's test split (stdlib files never trained on) and their tags:
    from each file, whole lines from its middle, up to `per_file` characters, so the text spans files."""
    from training.data import split_of, stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    tags: list[np.ndarray] = []
    total = 0
    for rel in stdlib_files():
        if total >= chars:
            break
        if split_of(rel) != "test":
            continue
        try:
            source = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        file_tags = _try_tags(source)  # the whole file: a chunk alone may cut a string in two
        if file_tags is None or not source:
            continue
        start = 0
        if len(source) > per_file:
            start = source.rfind("\n", 0, (len(source) - per_file) // 2) + 1
        end = source.rfind("\n", start, start + per_file) + 1 or min(len(source), start + per_file)
        parts.append(source[start:end])
        tags.append(file_tags[start:end])
        total += end - start
    if not parts:
        raise ValueError("no stdlib test-split file could be read and tokenized")
    return "".join(parts)[:chars], np.concatenate(tags)[:chars]


def _scan(text: str) -> tuple[np.ndarray, np.ndarray]:
    """in_string (as defined above) and in_comment for text that is not Python: a small scanner."""
    s = np.zeros(len(text), dtype=np.float32)
    com = np.zeros(len(text), dtype=np.float32)
    quote, escape, comment = "", False, False
    for i, ch in enumerate(text):
        if comment:
            comment = ch != "\n"
            com[i] = comment
        elif quote:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch in (quote, "\n"):  # closing quote (or an unterminated line): outside
                quote = ""
                continue
            s[i] = 1
        elif ch in _QUOTES:
            quote, s[i] = ch, 1
        elif ch == "#":
            comment, com[i] = True, 1
    return s, com


def _strings_from_tags(text: str, is_string: np.ndarray) -> np.ndarray:
    """The tagger marks whole string tokens; keep from the first quote to before the last character."""
    out = np.zeros(len(text), dtype=np.float32)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_string.astype(np.int8), [0]])))
    for a, b in zip(edges[::2], edges[1::2]):  # each run [a, b) of string characters
        while a < b and text[a] not in _QUOTES:  # prefix letters: not yet known to be a string
            a += 1
        out[a : b - 1] = 1
    return out


def text_features(text: str, tags: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every feature of FEATURES that the text allows (in_keyword needs tags), float32 [len(text)] each."""
    from training.data import TAGS

    n = len(text)
    feats: dict[str, np.ndarray] = {}
    if tags is not None:
        feats["in_string"] = _strings_from_tags(text, tags == TAGS.index("string"))
        feats["in_comment"] = (tags == TAGS.index("comment")).astype(np.float32)
        feats["in_keyword"] = (tags == TAGS.index("keyword")).astype(np.float32)
    else:
        feats["in_string"], feats["in_comment"] = _scan(text)
    indent = np.zeros(n, dtype=np.float32)
    column = np.zeros(n, dtype=np.float32)
    pos = 0
    for line in text.split("\n"):
        width = len(line[: len(line) - len(line.lstrip(" \t"))].expandtabs(8))
        end = min(n, pos + len(line) + 1)  # the line and its newline
        indent[pos:end] = width
        column[pos:end] = np.arange(end - pos)
        pos = end
    feats["indent_depth"], feats["position_in_line"] = indent, column
    code = (feats["in_string"] == 0) & (feats["in_comment"] == 0)
    depth = np.zeros(n, dtype=np.float32)
    d = 0
    for i, ch in enumerate(text):
        if code[i]:
            if ch in _OPEN:
                d += 1
            elif ch in _CLOSE:
                d = max(0, d - 1)
        depth[i] = d
    feats["bracket_depth"] = depth
    nl = np.zeros(n, dtype=np.float32)
    nl[:-1] = np.frombuffer(text[1:].encode("utf-32-le"), dtype="<u4") == ord("\n")
    feats["next_is_newline"] = nl
    return {k: feats[k] for k in FEATURES if k in feats}


# -- the model ---------------------------------------------------------------------------------------------


class Refused(Exception):
    """The report cannot run on this model or text; the message says why (exit code 2)."""


def resolve(model: str, models_dir: Path, version: int | None) -> Path:
    """MODEL as a version directory (holding manifest.json), or as a NAME under models_dir."""
    direct = Path(model)
    if (direct / "manifest.json").is_file():
        return direct
    base = models_dir / model
    if version is not None:
        if not (base / str(version) / "manifest.json").is_file():
            raise Refused(f"no model {model} version {version} in {models_dir}")
        return base / str(version)
    versions = sorted(int(d.name) for d in base.glob("*") if d.name.isdigit() and (d / "manifest.json").is_file())
    if not versions:
        raise Refused(f"{model} is neither a model version directory (with manifest.json) nor a model in "
                      f"{models_dir}")
    return base / str(versions[-1])


@dataclass
class Activations:
    """Every unit's activation after every character, one column per unit."""

    values: np.ndarray  # [steps, units] float32
    units: list[tuple[str, int, int]]  # column -> (state, layer, index)
    seconds: float

    def name(self, column: int) -> str:
        state, layer, index = self.units[column]
        return f"{state} layer {layer} unit {index}"


def run_model(model: Any, ids: np.ndarray) -> Activations:
    """Run the graph one character at a time, feeding the state back; collect each state per step."""
    t0 = time.perf_counter()
    states = [np.zeros((s.layers, 1, s.hidden), dtype=np.float32) for s in model.states]
    per_state = [np.empty((len(ids), s.layers, s.hidden), dtype=np.float32) for s in model.states]
    x = ids.reshape(1, -1)
    for t in range(len(ids)):
        _, states = model.runtime.run(x[:, t : t + 1], states)
        for acc, s in zip(per_state, states):
            acc[t] = s[:, 0]
    units = [(spec.name.removeprefix("state_"), layer, i)
             for spec in model.states for layer in range(spec.layers) for i in range(spec.hidden)]
    values = np.concatenate([a.reshape(len(ids), -1) for a in per_state], axis=1)
    return Activations(values, units, time.perf_counter() - t0)


# -- drawing -----------------------------------------------------------------------------------------------

_RED, _BLUE = (239, 59, 44), (33, 113, 181)


def shown(state: str, values: np.ndarray, column: np.ndarray) -> np.ndarray:
    """The activation as coloured, in [-1, 1]: h as it is, c scaled by its unit's 99th percentile |c|
    over `column` (all the unit's values)."""
    if state == "c":
        values = values / max(float(np.percentile(np.abs(column), 99)), 1e-6)
    return np.clip(values, -1.0, 1.0)


def rgb(v: np.ndarray) -> np.ndarray:
    """[n] values in [-1, 1] -> [n, 3] uint8: blue, white at 0, red."""
    v = np.asarray(v, dtype=np.float64)[:, None]
    end = np.where(v >= 0, np.array(_RED, dtype=np.float64), np.array(_BLUE, dtype=np.float64))
    return np.rint(255 + np.abs(v) * (end - 255)).astype(np.uint8)


def excerpt(text: str, feature: np.ndarray, lo: int, hi: int, size: int) -> tuple[int, int]:
    """[a, b) within [lo, hi), whole lines, about `size` characters, where the feature varies the most."""
    # full-size windows only: a short one at the end would win on variance with a line or two
    starts = [lo] + [i + 1 for i in range(lo, hi - size) if text[i] == "\n"]
    f = feature[lo:hi].astype(np.float64)
    c1, c2 = np.concatenate([[0], np.cumsum(f)]), np.concatenate([[0], np.cumsum(f * f)])
    best, best_var = (lo, min(hi, lo + size)), -1.0
    for a in starts:
        b = min(hi, a + size)
        m = b - a
        if m <= 0:
            break
        var = (c2[b - lo] - c2[a - lo]) / m - ((c1[b - lo] - c1[a - lo]) / m) ** 2
        if var > best_var + 1e-9:
            best, best_var = (a, b), var
    a, b = best
    cut = text.rfind("\n", a, b)
    return (a, cut + 1) if cut >= a and b < hi else (a, b)


def _spans(text: str, values: np.ndarray, raw: np.ndarray) -> str:
    """Each character a span coloured by `values`, its title the raw activation."""
    colours = rgb(values)
    out = []
    for ch, v, (r, g, b) in zip(text, raw, colours):
        cls = ' class="nl"' if ch == "\n" else ""
        out.append(f'<span{cls} style="background:#{r:02x}{g:02x}{b:02x}" title="{v:+.2f}">'
                   f"{html.escape(ch)}</span>")
    return "".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.35;padding:.6em;
border:1px solid #ddd;white-space:pre;overflow-x:auto}
.nl::before{content:"\\21b5";color:#999}
table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #eee}
.scale span{display:inline-block;width:2.2em;text-align:center}
"""


def write_html(path: Path, title: str, intro: str, blocks: list[dict], skipped: dict[str, str]) -> None:
    scale = "".join(f'<span style="background:#{r:02x}{g:02x}{b:02x}">{v:+.1f}</span>'
                    for v, (r, g, b) in zip(np.linspace(-1, 1, 9), rgb(np.linspace(-1, 1, 9))))
    rows = "".join(
        f"<tr><td>{html.escape(b['feature'])}</td><td>{html.escape(b['unit'])}</td><td>{b['r']:+.3f}</td>"
        f"<td>{b['baseline']:+.3f}</td></tr>" for b in blocks)
    parts = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
             f'<p class="scale">activation: {scale}</p>',
             "<table><tr><th>feature</th><th>best unit</th><th>held-out r</th><th>shuffled baseline r</th></tr>",
             rows, "</table>"]
    if skipped:
        parts.append("<p>Skipped: " + html.escape("; ".join(f"{k} ({v})" for k, v in skipped.items())) + "</p>")
    for b in blocks:
        others = ", ".join(f"{u['unit']} {u['r']:+.2f}" for u in b["top"][1:])
        parts.append(
            f"<h2>{html.escape(b['feature'])}: {html.escape(b['unit'])}</h2>"
            f"<p>{html.escape(DESCRIBE[b['feature']])}. Held-out r = {b['r']:+.3f} (|r| = {b['score']:.3f}); "
            f"shuffled-label baseline r = {b['baseline']:+.3f}; r on the fit half = {b['fit_r']:+.3f}. "
            f"Next best: {html.escape(others)}.</p><pre>{b['spans']}</pre>")
    parts.append("</body></html>\n")
    path.write_text("".join(parts), encoding="utf-8")


def write_png(path: Path, panels: list[dict], cols: int = 80, rows: int = 12) -> None:
    """A grid of characters per panel, each cell coloured by the unit's activation (like the lecture's slide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(cols * 0.095, len(panels) * (rows * 0.17 + 0.45)),
                             squeeze=False)
    for ax, p in zip(axes[:, 0], panels):
        grid = np.full((rows, cols, 3), 255, dtype=np.uint8)
        chars: list[tuple[int, int, str]] = []
        r = c = 0
        colours = rgb(p["values"])
        for ch, colour in zip(p["text"], colours):
            if r >= rows:
                break
            if c < cols:
                grid[r, c] = colour
                glyph = "\u21b5" if ch == "\n" else " " if ch == "\t" else ch
                if not glyph.isspace():
                    chars.append((r, c, glyph))
            c += 1
            if ch == "\n":
                r, c = r + 1, 0
        ax.imshow(grid, aspect="auto", interpolation="nearest", extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
        for rr, cc, glyph in chars:
            ax.text(cc, rr, glyph, ha="center", va="center", family="monospace", fontsize=6.5,
                    color="#999" if glyph == "\u21b5" else "black")
        ax.set_title(p["title"], fontsize=8, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.4)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model version directory (models/NAME/VERSION) or a model NAME")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="model repository (default: models)")
    p.add_argument("--version", type=int, default=None, help="version of a NAME (default: the latest)")
    p.add_argument("--text", type=Path, default=None,
                   help="text to read (default: stdlib Python files of the lm data set's test split)")
    p.add_argument("--chars", type=int, default=20_000,
                   help="characters to read: the first half picks each feature's unit, the second scores it "
                        "(default: 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled-label baseline (default: 0)")
    p.add_argument("--show", type=int, default=1500, help="characters drawn per feature in cells.html (default: 1500)")
    p.add_argument("--png-features", type=int, default=4, help="features drawn in cells.png (default: 4)")
    p.add_argument("--out", type=Path, default=Path("reports/cells"), help="output directory (default: reports/cells)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except Refused as e:
        print(f"recur report cells: {e}", file=sys.stderr)
        return 2


def _load(directory: Path) -> Any:
    from service.engine.runtime import RuntimeOptions
    from service.errors import ModelInvalid
    from service.repository.models import load_model

    try:
        model = load_model(directory, RuntimeOptions())
    except ModelInvalid as e:
        raise Refused(str(e)) from e
    if model.input_kind != "tokens":
        raise Refused(f"model {model.name} version {model.version} reads {model.input_kind} (real-valued vectors), "
                      "not tokens; cells needs a model that reads text, one token per character")
    return model


def _text(args: argparse.Namespace) -> tuple[str, np.ndarray | None, str]:
    if args.chars < 4:
        raise Refused("--chars must be at least 4 (two halves, each with a feature that varies)")
    if args.text is None:
        text, stdlib_tags = stdlib_text(args.chars)
        return text, stdlib_tags, "stdlib Python files of the lm data set's test split (never trained on)"
    try:
        source = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Refused(f"cannot read {args.text}: {e}") from e
    if len(source) < 4:
        raise Refused(f"{args.text} holds too little text")
    tags = _try_tags(source)  # the whole file, then cut: a cut could split a string
    return source[: args.chars], None if tags is None else tags[: args.chars], str(args.text)


def _run(args: argparse.Namespace) -> int:
    from service.errors import InvalidInput

    directory = resolve(args.model, args.models_dir, args.version)
    model = _load(directory)
    text, tags, source = _text(args)
    try:
        ids = model.encode(text)
    except InvalidInput as e:
        raise Refused(str(e)) from e
    acts = run_model(model, ids)
    n = len(text)
    fit, held = slice(0, n // 2), slice(n // 2, n)
    feats = text_features(text, tags)
    skipped: dict[str, str] = {k: "needs the tagger's labels: the text does not tokenize as Python"
                               for k in FEATURES if k not in feats}
    results: dict[str, dict] = {}
    blocks: list[dict] = []
    for name, f in feats.items():
        if np.ptp(f) == 0:
            skipped[name] = f"constant ({f[0]:g}) on this text"
            continue
        try:
            ranked = rank_units(acts.values, f, fit, held, seed=args.seed)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        top = [_unit_json(acts, u) for u in ranked]
        results[name] = {**top[0], "baseline": round(ranked[0].baseline, 4), "top": top}
        best = ranked[0]
        state = acts.units[best.column][0]
        a, b = excerpt(text, f, held.start, held.stop, args.show)
        values = shown(state, acts.values[a:b, best.column], acts.values[:, best.column])
        spans = _spans(text[a:b], values, acts.values[a:b, best.column])
        pa, pb = excerpt(text, f, held.start, held.stop, PNG_CHARS)  # what fits the picture's rows
        blocks.append({"feature": name, **results[name], "spans": spans, "text": text[pa:pb],
                       "values": shown(state, acts.values[pa:pb, best.column], acts.values[:, best.column])})

    args.out.mkdir(parents=True, exist_ok=True)
    label = f"{model.name} version {model.version}"
    states = " and ".join(s.name.removeprefix("state_") for s in model.states)
    intro = (f"{label} ({model.cell}, states {states}, {acts.values.shape[1]} units) read {n} "
             f"characters of {source}, one at a time. Each feature's unit is the one whose activation best "
             f"correlates with it on the first {fit.stop} characters; its r is measured on the last "
             f"{n - held.start}, beside its r with the feature's labels shuffled; each block shows the stretch of "
             f"that held-out text where the feature varies the most. Layers and units "
             f"count from 0; colours show h as it is and c scaled by its 99th percentile |c|; hover a character "
             f"for the raw activation.")
    write_html(args.out / "cells.html", f"Interpretable cells: {label}", intro, blocks, skipped)
    ranked_blocks = sorted(blocks, key=lambda b: -b["score"])[: max(0, args.png_features)]
    if ranked_blocks:
        write_png(args.out / "cells.png", [
            {"text": b["text"], "values": b["values"],
             "title": f"{b['feature']}: {b['unit']}   held-out r = {b['r']:+.2f}, shuffled {b['baseline']:+.2f}"}
            for b in ranked_blocks])
    report = {"model": model.name, "version": model.version, "directory": str(directory), "cell": model.cell,
              "text": source, "chars": n, "fit": [fit.start, fit.stop], "held_out": [held.start, held.stop],
              "layers_counted_from": 0, "seed": args.seed, "seconds_running_model": round(acts.seconds, 3),
              "features": results, "skipped": skipped}
    (args.out / "cells.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"{label}: {n} characters, one step at a time, in {acts.seconds:.1f} s; "
          f"units chosen on [0, {fit.stop}), scored on [{held.start}, {n})")
    print(f"{'feature':<17} {'best unit':<22} {'held-out r':>10} {'shuffled r':>10}  runner-up")
    for name, res in results.items():
        second = res["top"][1] if len(res["top"]) > 1 else None
        runner = f"{second['unit']} ({second['r']:+.2f})" if second else "-"
        print(f"{name:<17} {res['unit']:<22} {res['r']:>+10.3f} {res['baseline']:>+10.3f}  {runner}")
    for name, why in skipped.items():
        print(f"{name:<17} skipped: {why}")
    print(f"wrote {args.out / 'cells.html'}, {args.out / 'cells.png'}, {args.out / 'cells.json'}")
    return 0


def _unit_json(acts: Activations, u: UnitScore) -> dict:
    state, layer, index = acts.units[u.column]
    return {"unit": acts.name(u.column), "state": state, "layer": layer, "index": index,
            "score": round(u.score, 4), "r": round(u.r, 4), "sign": u.sign, "fit_r": round(u.fit_r, 4)}
