"""Shared by the tritonclient scripts (run in .venv-tritonclient, never imported by pytest)."""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def args() -> dict:
    """The script's arguments: one JSON object on the command line."""
    return json.loads(sys.argv[1])


def client(a: dict) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(a["target"])


def make_input(model_input: str, x: np.ndarray, dtype: str) -> grpcclient.InferInput:
    """A [1, T] (tokens) or [1, T, D] (features) input from x (T,) or (T, D)."""
    data = x[None].astype({"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}[dtype])
    i = grpcclient.InferInput(model_input, list(data.shape), dtype)
    i.set_data_from_numpy(data)
    return i


def outputs(names: list[str]) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(n) for n in names]


def offset_of(result: grpcclient.InferResult) -> int:
    return result.get_response().parameters["sequence_offset"].int64_param
