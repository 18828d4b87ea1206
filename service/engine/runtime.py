"""A thin layer over onnxruntime.InferenceSession: batch-major inputs and states in, outputs out."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.errors import ActivationsUnavailable, ModelInvalid

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
    # calls of at least `large_rows` rows x steps run on a second session with this many intra-op
    # threads (0: no second session); small calls keep `intra_op_threads` (BENCHMARKS.md, settings)
    large_threads: int = 0
    large_rows: int = 512
    # a call that is the engine's only one takes the second session from this many rows x steps (0: never):
    # the other cores are idle then (a lone packed message at one token a session)
    alone_rows: int = 128
    log_severity: int = 3  # ONNX Runtime's own log lines: errors (4: fatal only, where the caller reports errors)


@dataclass(frozen=True)
class ActivationGraph:
    """The second graph of a model (activations.onnx): the same weights and inputs, with the per-step
    activations as extra outputs. A separate file because ONNX Runtime computes every node of a graph
    whatever outputs a run asks for: in model.onnx the extra branch would slow every request."""

    path: Path
    sha256: str  # checked again when the session is opened, since that happens after load
    outputs: tuple[str, ...]  # the activation outputs, in the manifest's order
    # (graph inputs, graph outputs) of the opened session -> None, or ModelInvalid saying how they disagree
    check: Callable[[dict[str, Any], dict[str, Any]], None] | None = None


def _session(blob: bytes, options: RuntimeOptions, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = n = options.intra_op_threads if threads is None else threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = options.log_severity
    if n > 1:  # idle pool threads sleep: between calls the cores are the event loop's (BENCHMARKS.md)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(blob, so, providers=execution_providers(options.provider))


class ModelRuntime:
    """Runs one exported graph. Thread-safe: ONNX Runtime sessions allow concurrent run(), and the
    activation session is opened once, under a lock, on the first request for activations."""

    def __init__(self, blob: bytes, options: RuntimeOptions, *, input_name: str, output_name: str,
                 state_inputs: list[str], state_outputs: list[str],
                 activations: ActivationGraph | None = None) -> None:
        self._options = options
        self._session = _session(blob, options)
        self._large = _session(blob, options, options.large_threads) \
            if options.large_threads and options.large_threads != options.intra_op_threads else None
        self._large_rows, self._alone_rows = options.large_rows, options.alone_rows
        self.provider = self._session.get_providers()[0]  # the one that runs the graph
        self.graph_inputs = {i.name: i for i in self._session.get_inputs()}
        self.graph_outputs = {o.name: o for o in self._session.get_outputs()}
        self._input, self._states = input_name, state_inputs
        self._outputs = [output_name, *state_outputs]
        self.activations = activations
        self._act_session: ort.InferenceSession | None = None
        self._act_lock = threading.Lock()

    def run(self, x: np.ndarray, states: list[np.ndarray], alone: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """x: (B, T) int64 or (B, T, D) float32; states: each (L, B, H). Returns (B, T, C) and new states.
        `alone`: no other call is running (the large session's threads have the cores to themselves)."""
        feed = {self._input: x, **dict(zip(self._states, states))}
        n = x.shape[0] * x.shape[1]
        large = self._large is not None and (n >= self._large_rows or (alone and 0 < self._alone_rows <= n))
        out = (self._large if large else self._session).run(self._outputs, feed)  # type: ignore[union-attr]
        return out[0], out[1:]

    def run_activations(self, x: np.ndarray, states: list[np.ndarray]
                        ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """As run, plus the per-step activations: each (B, T, H) float32, in the order of
        `activations.outputs` (the manifest's). Opens activations.onnx on first use."""
        session = self._activation_session()
        assert self.activations is not None
        feed = {self._input: x, **dict(zip(self._states, states))}
        out = session.run([*self._outputs, *self.activations.outputs], feed)
        n = len(self._outputs)
        return out[0], out[1:n], out[n:]

    def _activation_session(self) -> ort.InferenceSession:
        session = self._act_session
        if session is not None:
            return session
        graph = self.activations
        if graph is None:
            raise ActivationsUnavailable("this model was exported without activations; export it again "
                                         "(training.export.reexport) to serve them")
        with self._act_lock:
            if self._act_session is None:
                try:
                    blob = graph.path.read_bytes()
                except OSError as e:
                    raise ModelInvalid(f"{graph.path}: cannot read it ({e.__class__.__name__})") from e
                digest = hashlib.sha256(blob).hexdigest()
                if digest != graph.sha256:
                    raise ModelInvalid(f"{graph.path} has changed since the model was loaded (sha256 {digest}, "
                                       f"the manifest says {graph.sha256}); reload the model")
                try:
                    opened = _session(blob, self._options)
                except Exception as e:  # onnxruntime refusing the graph
                    raise ModelInvalid(f"{graph.path} cannot be loaded ({e.__class__.__name__}: "
                                       f"{str(e)[:200]})") from e
                if graph.check is not None:
                    graph.check({i.name: i for i in opened.get_inputs()}, {o.name: o for o in opened.get_outputs()})
                self._act_session = opened
            return self._act_session
