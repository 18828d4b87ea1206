"""The generated gRPC stubs in recur/v1 and recur/kserve are exactly what protos/ makes today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Each .proto under protos/ and the stubs `make proto` makes from it.
PROTOS = {
    "recur/v1/recur.proto": ("recur_pb2.py", "recur_pb2.pyi", "recur_pb2_grpc.py"),
    "recur/kserve/grpc_service.proto": ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py"),
}


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *PROTOS],
                   check=True, cwd=ROOT)
    for proto, names in PROTOS.items():
        package = Path(proto).parent
        for name in names:
            fresh = (tmp_path / package / name).read_text()
            assert fresh == (ROOT / package / name).read_text(), f"{package / name} is stale: run `make proto`"


def test_every_proto_has_its_stubs() -> None:
    assert sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto")) == sorted(PROTOS)


def test_serving_code_never_imports_torch() -> None:
    code = "import sys, service.server, recur.cli, recur.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
