"""Server settings: one typed object, built in main from flags and RECUR_* variables.

Every field is a flag (`--max-chunk`) and an environment variable (`RECUR_MAX_CHUNK`);
a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    models_dir: Path = Path("models")
    """Model repository: NAME/VERSION/{model.onnx, manifest.json}."""
    host: str = "[::]"
    """Address to listen on."""
    port: int = 50051
    """gRPC port (0: any free port; the bound port is logged)."""
    store: str = "sqlite:var/recur.db"
    """Where session state lives: memory:, sqlite:PATH or redis://HOST:PORT/DB (shared by replicas)."""
    durability: str = "sync"
    """sync: reply after the state is on disk; async: write-behind within async_window; none: memory only."""
    async_window: float = 0.05
    """async durability: the most a crash can lose, in seconds of acknowledged writes."""
    session_ttl: float = 86400.0
    """Idle seconds after which a session expires (per-session ttl_seconds overrides)."""
    max_ttl: float = 30 * 86400.0
    """Largest ttl_seconds a client may ask for."""
    tombstone_seconds: float = 2 * 86400.0
    """How long an expired session's id is remembered, to answer 'expired at ...'."""
    sweep_interval: float = 60.0
    """Seconds between sweeps that remove expired sessions."""
    max_chunk: int = 4096
    """Most steps in one chunk."""
    max_sessions: int = 0
    """Most live sessions (0: no limit); creating more is RESOURCE_EXHAUSTED."""
    memory_capacity: int = 100_000
    """memory store: sessions kept; the least recently used beyond this are evicted."""
    cache_size: int = 100_000
    """sqlite store: records cached in process."""
    max_generate_tokens: int = 4096
    """Most tokens one Generate call may ask for."""
    max_stream_inflight: int = 256
    """Most chunks of one Stream being processed at once; more wait (flow control)."""
    ort_threads: int = 1
    """ONNX Runtime intra-op threads per call."""
    inference_threads: int = 1
    """ONNX Runtime calls that may run at once, each on its own thread beside the event loop."""
    max_batch: int = 256
    """Most sessions' chunks in one batched ONNX Runtime call."""
    slice_steps: int = 64
    """Most steps of one chunk per batched call; longer chunks advance a slice at a time."""
    batch_window: float = 0.0
    """Seconds an idle engine waits for more chunks before a call (0: batch only what queued up)."""
    replica_id: str = ""
    """This replica's name, sent as x-recur-replica metadata on every reply (default: host:port)."""
    grace: float = 10.0
    """Seconds in-flight calls get to finish on SIGTERM."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _doc(name: str) -> str:
    import inspect
    import re

    src = inspect.getsource(Settings)
    m = re.search(rf"^\s+{name}: .*\n\s+\"\"\"(.*?)\"\"\"", src, re.M)
    return m.group(1) if m else ""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting, defaulting to RECUR_<NAME> when that variable is set."""
    defaults = Settings()
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        kind = type(value)
        env = "RECUR_" + f.name.upper()
        if env in os.environ:
            value = kind(os.environ[env])
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=value,
                            help=f"{_doc(f.name)} [{env}; default: {value}]")
