"""The images' build context and contents (no Docker engine runs here): .dockerignore keeps local
state out of the context, and the training image's COPY lines hold everything `recur train` and
`recur export` need: the test lays out /app as the Dockerfile does and runs its documented usage
there (a few steps), the export landing in the models folder the usage mounts."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ignored() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _copies(dockerfile: str) -> list[str]:
    """The sources of a Dockerfile's COPY lines (from the build context, so no --from)."""
    sources: list[str] = []
    for line in (ROOT / "deploy" / dockerfile).read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    return sources


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = _ignored()
    for local in (".git", ".venv", ".venv-tritonclient", "var", "runs", "data", "certs", "recur.egg-info",
                  ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis", "service/__pycache__"):
        assert any(fnmatch.fnmatch(local, p.rstrip("/").removeprefix("**/"))
                   or fnmatch.fnmatch(local.split("/")[-1], p.rstrip("/").removeprefix("**/")) for p in patterns), local
    # ... and nothing an image copies is ignored.
    for source in {s for d in ("Dockerfile", "Dockerfile.train") for s in _copies(d)}:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, p.rstrip("/")) for p in patterns), source


def test_training_image_copies_only_what_training_needs() -> None:
    text = (ROOT / "deploy" / "Dockerfile.train").read_text()
    sources = _copies("Dockerfile.train")
    assert "." not in sources and "models" not in sources  # no `COPY . .`; models come from a volume
    assert set(sources) >= {"pyproject.toml", "README.md", "recur", "service", "training"}
    assert "'.[train]'" in text and "download.pytorch.org/whl/cpu" in text


def _usage() -> tuple[list[str], str]:
    """The Dockerfile's documented `docker run`: its volume targets and the shell command it runs."""
    text = (ROOT / "deploy" / "Dockerfile.train").read_text()
    lines = [line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("docker run"))
    run = ""
    for line in lines[start:]:
        run += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            break
    argv = shlex.split(run.replace('"$(id -u):$(id -g)"', "1000:1000"))
    volumes = [argv[i + 1].split(":")[1] for i, a in enumerate(argv) if a == "-v"]
    assert argv[-3:-1] == ["sh", "-c"], argv
    return volumes, argv[-1]


def test_training_image_usage_exports_into_the_mounted_volume(tmp_path: Path) -> None:
    volumes, command = _usage()
    assert "/app/models" in volumes and "/app/runs" in volumes
    # /app as the image lays it out: only what the Dockerfile copies.
    app = tmp_path / "app"
    app.mkdir()
    for source in _copies("Dockerfile.train"):
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, app / source, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            (app / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, app / source)
    # The documented command, cut down to a few steps of a tiny model, run with `recur` from /app.
    command = re.sub(r"--max-steps \d+", "--max-steps 3 --layers 1 --hidden 8 --embed 4 --batch 4 --bptt 8 "
                     "--train-chars 20000 --val-chars 2000 --test-chars 2000 --log-every 1 --quiet", command)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "recur").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m recur.cli "$@"\n')
    (shim / "recur").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PYTHONPATH": str(app),
           "RECUR_DATA_DIR": str(ROOT / "data")}
    out = subprocess.run(["sh", "-c", command], cwd=app, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    model = next((app / "models").glob("*/1"))  # under the mounted /app/models, not elsewhere
    assert (model / "manifest.json").exists() and (model / "model.onnx").exists()
    assert list((app / "runs").glob("*/best.pt"))
    # the code that ran was the image's copy
    probe = subprocess.run([sys.executable, "-c", "import training.export, recur.cli; print(training.export.__file__)"],
                           cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().startswith(str(app)), probe.stdout + probe.stderr
