"""Server settings: one typed object, built in main from flags and RECUR_* variables.

Every field is a flag (`--max-chunk`) and an environment variable (`RECUR_MAX_CHUNK`);
a flag wins over the variable, the variable over the default. Each field's help text is
its metadata["help"] (recur/flags.py turns fields into flags).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from recur.flags import add_dataclass_arguments, from_args
from service.engine import EngineOptions
from service.store.base import DEFAULT_CAPACITY, DEFAULT_TOMBSTONE_SECONDS

_ENGINE = EngineOptions()  # the engine's defaults are the server's


@dataclass(frozen=True)
class Settings:
    models_dir: Path = field(default=Path("models"), metadata={
        "help": "Model repository: NAME/VERSION/{model.onnx, manifest.json}."})
    host: str = field(default="[::]", metadata={"help": "Address to listen on."})
    port: int = field(default=50051, metadata={"help": "gRPC port (0: any free port; the bound port is logged)."})
    store: str = field(default="sqlite:var/recur.db", metadata={
        "help": "Where session state lives: memory:, sqlite:PATH or redis://HOST:PORT/DB (shared by replicas)."})
    durability: str = field(default="sync", metadata={
        "help": "sync: reply after the state is on disk; async: write-behind within async_window; none: memory only."})
    async_window: float = field(default=0.05, metadata={
        "help": "async durability: the most a crash can lose, in seconds of acknowledged writes."})
    session_ttl: float = field(default=86400.0, metadata={
        "help": "Idle seconds after which a session expires (per-session ttl_seconds overrides)."})
    max_ttl: float = field(default=30 * 86400.0, metadata={"help": "Largest ttl_seconds a client may ask for."})
    tombstone_seconds: float = field(default=DEFAULT_TOMBSTONE_SECONDS, metadata={
        "help": "How long an expired session's id is remembered, to answer 'expired at ...'."})
    sweep_interval: float = field(default=60.0, metadata={
        "help": "Seconds between sweeps that remove expired sessions."})
    max_chunk: int = field(default=4096, metadata={"help": "Most steps in one chunk."})
    max_sessions: int = field(default=0, metadata={
        "help": "Most live sessions (0: no limit); creating more is RESOURCE_EXHAUSTED."})
    memory_capacity: int = field(default=DEFAULT_CAPACITY, metadata={
        "help": "memory store: sessions kept; the least recently used beyond this are evicted."})
    cache_size: int = field(default=DEFAULT_CAPACITY, metadata={"help": "sqlite store: records cached in process."})
    max_generate_tokens: int = field(default=4096, metadata={"help": "Most tokens one Generate call may ask for."})
    max_stream_inflight: int = field(default=256, metadata={
        "help": "Most chunks of one Stream being processed at once; more wait (flow control)."})
    ort_threads: int = field(default=1, metadata={"help": "ONNX Runtime intra-op threads per call."})
    inference_threads: int = field(default=_ENGINE.threads, metadata={
        "help": "ONNX Runtime calls that may run at once, each on its own thread beside the event loop."})
    max_batch: int = field(default=_ENGINE.max_batch, metadata={
        "help": "Most sessions' chunks in one batched ONNX Runtime call."})
    slice_steps: int = field(default=_ENGINE.slice_steps, metadata={
        "help": "Most steps of one chunk per batched call; longer chunks advance a slice at a time."})
    batch_window: float = field(default=_ENGINE.window, metadata={
        "help": "Seconds an idle engine waits for more chunks before a call (0: batch only what queued up)."})
    replica_id: str = field(default="", metadata={
        "help": "This replica's name, sent as x-recur-replica metadata on every reply (default: host:port)."})
    grace: float = field(default=10.0, metadata={"help": "Seconds in-flight calls get to finish on SIGTERM."})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return from_args(cls, args)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting, defaulting to RECUR_<NAME> when that variable is set."""
    add_dataclass_arguments(parser, Settings, env_prefix="RECUR_")
