"""A thin layer over onnxruntime.InferenceSession: batch-major inputs and states in, outputs out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class RuntimeOptions:
    intra_op_threads: int = 1  # per call; calls run in a thread pool beside the event loop
    inter_op_threads: int = 1


class ModelRuntime:
    """Runs one exported graph. Thread-safe: ONNX Runtime sessions allow concurrent run()."""

    def __init__(self, blob: bytes, options: RuntimeOptions, *, input_name: str, output_name: str,
                 state_inputs: list[str], state_outputs: list[str]) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self._session = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        self.graph_inputs = {i.name: i for i in self._session.get_inputs()}
        self.graph_outputs = {o.name: o for o in self._session.get_outputs()}
        self._input, self._states = input_name, state_inputs
        self._outputs = [output_name, *state_outputs]

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """x: (B, T) int64 or (B, T, D) float32; states: each (L, B, H). Returns (B, T, C) and new states."""
        feed = {self._input: x, **dict(zip(self._states, states))}
        out = self._session.run(self._outputs, feed)
        return out[0], out[1:]
