"""The README and docs/ stay true: every relative link resolves (file and heading), and every command
in their `sh` blocks is one the project knows: `recur ...` parses with recur's own argument parser,
`make X` names a target, a path it names exists. Commands that can run here, run (`recur --help`,
`recur keys`, `python -m pytest --collect-only`)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from recur.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def _blocks(page: Path, kind: str) -> list[list[str]]:
    blocks, current, lang = [], None, ""
    for line in page.read_text().splitlines():
        m = FENCE.match(line)
        if m and current is None:
            current, lang = [], m.group(1)
        elif m:
            if lang == kind:
                blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _commands(page: Path) -> list[str]:
    """Each command of the page's sh blocks: continuation lines joined, comments dropped, the command in
    `VAR=$(...)` taken out, optional `[...]` parts dropped, `$VAR` as a plain id."""
    out = []
    for block in _blocks(page, "sh"):
        text = "\n".join(block).replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if not line or line.startswith("#") or "..." in line:
                continue
            m = re.fullmatch(r"\w+=\$\((.*)\)", line)
            line = m.group(1) if m else line
            line = re.sub(r"\s\[[^\]]*\]", "", line)
            line = re.sub(r"\$\w+|\$\{\w+\}", "s1", line)
            quoted = "'" in line or '"' in line  # an && inside quotes belongs to the quoted command
            out.extend([line] if quoted else [part.strip() for part in line.split("&&")])
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here (no network)
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_are_ones_the_project_knows(page: Path) -> None:
    parser = build_parser()
    makefile = (ROOT / "Makefile").read_text().replace("$(VENV)", ".venv").replace("$(BIN)", ".venv/bin")
    make_targets = set(re.findall(r"^([\w./-]+):", makefile, re.M))
    for command in _commands(page):
        if command.split()[0] in ("docker", "sh", "kill"):  # the container tests run compose for real
            continue
        words = shlex.split(command)
        while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value before the command
            words = words[1:]
        if not words:
            continue
        head = words[0]
        if head in ("recur", ".venv/bin/recur"):
            try:
                parser.parse_args(words[1:])
            except SystemExit as e:
                if e.code == 0:  # --help
                    continue
                raise AssertionError(f"{page.name}: `{command}` does not parse: exit {e.code}") from None
        elif head == "make":
            for target in words[1:]:
                assert target in make_targets or target.startswith("-"), f"{page.name}: no make target {target}"
        elif head in (".venv/bin/python", "python") and words[1:3] == ["-m", "pytest"]:
            for path in words[3:]:
                assert (ROOT / path).exists(), f"{page.name}: `{command}`: no {path}"


def test_the_commands_that_can_run_here_run(tmp_path: Path) -> None:
    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "recur.cli", *args], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "serve" in run("--help")
    key = run("keys", "add", "--file", "keys.json", "--tenant", "acme").strip()
    assert len(key) > 20 and "acme" in run("keys", "list", "--file", "keys.json")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", str(ROOT / "tests" / "core")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "tests collected" in out.stdout
