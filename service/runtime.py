"""A thin layer over onnxruntime.InferenceSession: batch-major inputs and states in, outputs out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

PROVIDERS = ("cpu", "cuda", "auto")
_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderUnavailable(RuntimeError):
    pass


def execution_providers(provider: str) -> list[str]:
    """ONNX Runtime's provider list for --provider: cpu; cuda (refused when this ONNX Runtime build has
    no CUDA, as with the plain `onnxruntime` package); auto (CUDA when it is there, else CPU)."""
    if provider not in PROVIDERS:
        raise ProviderUnavailable(f"--provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    available = ort.get_available_providers()
    if provider == "cuda" and _ORT_NAMES["cuda"] not in available:
        raise ProviderUnavailable("--provider cuda: this ONNX Runtime has no CUDAExecutionProvider (available: "
                                  f"{', '.join(available)}); install the gpu extra (onnxruntime-gpu) in place of "
                                  "onnxruntime, or use --provider cpu")
    if provider == "cpu" or _ORT_NAMES["cuda"] not in available:
        return [_ORT_NAMES["cpu"]]
    return [_ORT_NAMES["cuda"], _ORT_NAMES["cpu"]]


@dataclass(frozen=True)
class RuntimeOptions:
    intra_op_threads: int = 1  # per call; calls run in a thread pool beside the event loop
    inter_op_threads: int = 1
    provider: str = "cpu"  # cpu, cuda or auto (see execution_providers)


class ModelRuntime:
    """Runs one exported graph. Thread-safe: ONNX Runtime sessions allow concurrent run()."""

    def __init__(self, blob: bytes, options: RuntimeOptions, *, input_name: str, output_name: str,
                 state_inputs: list[str], state_outputs: list[str]) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self._session = ort.InferenceSession(blob, so, providers=execution_providers(options.provider))
        self.provider = self._session.get_providers()[0]  # the one that runs the graph
        self.graph_inputs = {i.name: i for i in self._session.get_inputs()}
        self.graph_outputs = {o.name: o for o in self._session.get_outputs()}
        self._input, self._states = input_name, state_inputs
        self._outputs = [output_name, *state_outputs]

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """x: (B, T) int64 or (B, T, D) float32; states: each (L, B, H). Returns (B, T, C) and new states."""
        feed = {self._input: x, **dict(zip(self._states, states))}
        out = self._session.run(self._outputs, feed)
        return out[0], out[1:]
