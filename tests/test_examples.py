"""The README's five-architecture example runs against a real server with the shipped models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import Server

ROOT = Path(__file__).resolve().parents[1]


def test_five_architectures_example(tmp_path: Path) -> None:
    server = Server(ROOT / "models", f"sqlite:{tmp_path / 'ex.db'}").start()
    try:
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "five_architectures.py"), "--target",
                              server.target], capture_output=True, text=True, timeout=120, check=True).stdout
    finally:
        server.kill()
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["one-to-one", "one-to-many", "many-to-one", "many-to-many",
                                                  "synced"]
    assert "(true 8) -> 8" in lines[2]
