"""--provider: cpu is the default, auto falls back to CPU without CUDA, cuda is refused clearly without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from service.engine.runtime import ProviderUnavailable, RuntimeOptions, execution_providers
from service.repository.models import load_model

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_and_auto_run_on_cpu_without_cuda(tiny_models: Path) -> None:
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    m = load_model(tiny_models / "lstm-lm" / "1", RuntimeOptions(provider="cpu"))
    assert m.runtime.provider == "CPUExecutionProvider"
    if not HAS_CUDA:
        assert execution_providers("auto") == ["CPUExecutionProvider"]
        assert load_model(tiny_models / "lstm-lm" / "1", RuntimeOptions(provider="auto")).runtime.provider == \
            "CPUExecutionProvider"


def test_an_unknown_provider_is_refused() -> None:
    with pytest.raises(ProviderUnavailable, match="one of cpu, cuda, auto"):
        execution_providers("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has CUDA: the refusal cannot be shown")
def test_cuda_without_cuda_stops_the_server_with_the_reason(tiny_models: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "recur.cli", "serve", "--models-dir", str(tiny_models), "--store",
                        "memory:", "--port", "0", "--metrics-port", "0", "--provider", "cuda"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "no CUDAExecutionProvider" in r.stderr and "onnxruntime-gpu" in r.stderr


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_runs_the_graph_on_the_gpu_and_matches_cpu(tiny_models: Path) -> None:
    import numpy as np

    cpu = load_model(tiny_models / "lstm-lm" / "1", RuntimeOptions(provider="cpu"))
    gpu = load_model(tiny_models / "lstm-lm" / "1", RuntimeOptions(provider="cuda"))
    assert gpu.runtime.provider == "CUDAExecutionProvider"
    x = np.arange(12, dtype=np.int64).reshape(2, 6) % len(cpu.vocab)
    states = [np.zeros((s.layers, 2, s.hidden), np.float32) for s in cpu.states]
    a, b = cpu.runtime.run(x, states), gpu.runtime.run(x, states)
    assert np.abs(a[0] - b[0]).max() <= 1e-4
