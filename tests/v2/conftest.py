"""A real `recur serve` process (SQLite store) and a runner for the tritonclient scripts in clients/,
which run in .venv-tritonclient: tritonclient needs protobuf < 7, the server's stubs >= 7.35."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, Server

TRITON_PYTHON = ROOT / ".venv-tritonclient" / "bin" / "python"
CLIENTS = Path(__file__).resolve().parent / "clients"


@pytest.fixture(scope="module")
def v2_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a module's tests, each on sequences of its own; a test that restarts a server starts its own."""
    s = Server(tiny_models, f"sqlite:{tmp_path_factory.mktemp('v2') / 'recur.db'}")
    try:
        yield s.start()
    finally:
        s.kill()


@pytest.fixture
def triton() -> Callable[..., str]:
    """triton(script, **args) -> the script's stdout; it fails the test, with its output, if the script fails."""
    if not TRITON_PYTHON.exists():
        pytest.fail(f"{TRITON_PYTHON} is missing: `make test` builds it (make .venv-tritonclient/.done)")

    def run(script: str, **args: object) -> str:
        out = subprocess.run([str(TRITON_PYTHON), str(CLIENTS / script), json.dumps(args)], capture_output=True,
                             text=True, timeout=240, check=False)
        assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    return run
