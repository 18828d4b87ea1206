"""The manifest's JSON Schema (published as docs/manifest.schema.json) and a tiny validator.

The serving image has no jsonschema package, so this validates the subset of JSON Schema the
manifest schema uses: type (a name or a list of names), required, properties, items, enum and
minimum. A problem is reported with the path of the field it is about (`state[1].shape[0]`).

The schema lives here, not only in docs/, because the serving image ships `service/` but not
`docs/`; a test keeps docs/manifest.schema.json equal to MANIFEST_SCHEMA
(regenerate it with `python -m service.repository.schema > docs/manifest.schema.json`).
"""

from __future__ import annotations

import json
from typing import Any

_DIM = {"type": ["integer", "string"], "description": "a fixed size (integer) or a dynamic axis (its name)"}
_SHAPE = {"type": "array", "items": _DIM}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "recur model manifest, format 1",
    "description": "models/NAME/VERSION/manifest.json: the contract between a model.onnx and the server "
                   "(docs/architecture.md, 'The model repository'). Written by `recur export` and `recur import`.",
    "type": "object",
    "required": ["format", "name", "version", "cell", "layers", "hidden_size", "input", "head", "state", "opset",
                 "sha256"],
    "properties": {
        "format": {"type": "integer", "enum": [1], "description": "the manifest layout"},
        "name": {"type": "string", "description": "the model's name; equals the NAME directory"},
        "version": {"type": "integer", "minimum": 1, "description": "equals the VERSION directory"},
        "cell": {"type": "string", "description": "rnn, lstm, gru (or custom, for an imported graph without "
                                                  "ONNX's own RNN operators)"},
        "layers": {"type": "integer", "minimum": 1},
        "hidden_size": {"type": "integer", "minimum": 1},
        "input": {
            "type": "object",
            "required": ["kind", "name", "dtype", "shape"],
            "properties": {
                "kind": {"type": "string", "enum": ["tokens", "features"]},
                "name": {"type": "string", "description": "the graph input"},
                "dtype": {"type": "string", "enum": ["int64", "int32", "float32"]},
                "shape": {**_SHAPE, "description": "[batch, time] for tokens, [batch, time, D] for features"},
                "vocab_size": {"type": "integer", "minimum": 1, "description": "tokens only"},
            },
        },
        "vocabulary": {
            "type": ["object", "null"],
            "required": ["tokens"],
            "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}},
                "unk_id": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "head": {
            "type": "object",
            "required": ["kind", "output", "shape"],
            "properties": {
                "kind": {"type": "string", "enum": ["lm", "tagger", "classifier"]},
                "output": {"type": "string", "description": "the graph output of per-step float32 outputs"},
                "shape": {**_SHAPE, "description": "[batch, time, classes]"},
                "labels": {"type": ["array", "null"], "items": {"type": "string"}},
            },
        },
        "state": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "output", "dtype", "shape", "initial"],
                "properties": {
                    "name": {"type": "string", "description": "the graph input"},
                    "output": {"type": "string", "description": "the graph output carrying the new value"},
                    "dtype": {"type": "string", "enum": ["float32"]},
                    "shape": {**_SHAPE, "description": "[layers, batch, hidden]"},
                    "initial": {"type": "string", "description": "how a new session's state starts: zeros"},
                },
            },
        },
        "opset": {"type": "integer", "minimum": 1, "description": "the default-domain opset the graph imports"},
        "model_config": {"type": ["object", "null"], "description": "the training configuration, if any"},
        "training": {
            "type": ["object", "null"],
            "properties": {"metrics": {"type": ["object", "null"]}},
        },
        "sha256": {"type": "string", "description": "of model.onnx, hex"},
        "exported_at": {"type": "string"},
        "activations": {
            "type": "object",
            "description": "per-step activations, served from a second graph beside model.onnx (the same "
                           "weights, with extra outputs); absent in models exported before them",
            "required": ["file", "sha256", "outputs"],
            "properties": {
                "file": {"type": "string", "description": "the graph's file name in the version directory"},
                "sha256": {"type": "string", "description": "of that file, hex"},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["output", "state", "layer", "units"],
                        "properties": {
                            "output": {"type": "string", "description": "the graph output, float32 "
                                                                        "[batch, time, units]"},
                            "state": {"type": "string", "enum": ["h", "c"]},
                            "layer": {"type": "integer", "minimum": 0},
                            "units": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        },
    },
}


def _is(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "integer":
        if isinstance(value, float):
            return value.is_integer()
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    raise ValueError(f"unsupported type {name!r} in the schema")


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key


def problem(instance: Any, schema: dict[str, Any] = MANIFEST_SCHEMA, path: str = "") -> tuple[str, str] | None:
    """The first way `instance` breaks `schema`, as (field path, what is wrong); None when it conforms."""
    where = path or "(the manifest)"
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is(instance, n) for n in names):
            return where, f"must be {' or '.join(names)}, not {json.dumps(instance)}"
    if "enum" in schema and not any(_same(instance, v) for v in schema["enum"]):
        return where, f"must be one of {json.dumps(schema['enum'])}, not {json.dumps(instance)}"
    if "minimum" in schema and _is(instance, "number") and instance < schema["minimum"]:
        return where, f"must be at least {schema['minimum']}, not {json.dumps(instance)}"
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                return _join(path, key), "is missing"
        for key, sub in schema.get("properties", {}).items():
            if key in instance:
                found = problem(instance[key], sub, _join(path, key))
                if found:
                    return found
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            found = problem(item, schema["items"], _join(path, i))
            if found:
                return found
    return None


if __name__ == "__main__":
    print(json.dumps(MANIFEST_SCHEMA, indent=2))
