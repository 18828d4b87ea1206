"""The generated gRPC stubs in recur/v1 are exactly what protos/ makes today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "recur/v1/recur.proto"],
                   check=True, cwd=ROOT)
    for name in ("recur_pb2.py", "recur_pb2.pyi", "recur_pb2_grpc.py"):
        fresh = (tmp_path / "recur" / "v1" / name).read_text()
        assert fresh == (ROOT / "recur" / "v1" / name).read_text(), f"recur/v1/{name} is stale: run `make proto`"


def test_serving_code_never_imports_torch() -> None:
    code = "import sys, service.server, recur.cli, recur.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
