"""Server settings: one typed object, built in main from flags and RECUR_* variables.

Every field is a flag (`--max-chunk`) and an environment variable (`RECUR_MAX_CHUNK`);
a flag wins over the variable, the variable over the default. Each field's help text is
its metadata["help"] (recur/flags.py turns fields into flags).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from recur.flags import add_dataclass_arguments, from_args
from service.engine.engine import EngineOptions
from service.store.base import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_PENDING_WRITES,
    DEFAULT_MAX_REPLAY_BYTES,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MEMORY_BYTES,
    DEFAULT_TOMBSTONE_SECONDS,
)

_ENGINE = EngineOptions()  # the engine's defaults are the server's
_CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    models_dir: Path = field(default=Path("models"), metadata={
        "help": "Model repository: NAME/VERSION/{model.onnx, manifest.json}."})
    model_poll: float = field(default=0.0, metadata={
        "help": "Seconds between looks at --models-dir for new or changed versions, loaded without a restart "
        "(refused ones are logged); 0: off (the admin API's ReloadRepository does it on demand)."})
    host: str = field(default="[::]", metadata={"help": "Address to listen on."})
    port: int = field(default=50051, metadata={"help": "gRPC port (0: any free port; the bound port is logged)."})
    workers: int = field(default=1, metadata={
        "help": "Serving processes sharing --port (SO_REUSEPORT), each with its own event loop, engine and ONNX "
        "Runtime sessions, under a supervisor that restarts one that dies, gathers /metrics (a worker label) and "
        "applies --admin-port's calls to every worker. 1: this process serves, no supervisor. More needs a store "
        "the workers share: sqlite:PATH with --durability sync, or redis."})
    admin_port: int = field(default=0, metadata={
        "help": "A second gRPC port serving only the admin API (recur.v1.RecurAdmin), on --admin-host; 0: off. "
        "Without --auth-keys this is the only place the admin API is served; with keys it is also on --port, "
        "for admin keys only."})
    admin_host: str = field(default="127.0.0.1", metadata={
        "help": "Address of --admin-port (default: this machine only)."})
    store: str = field(default="sqlite:var/recur.db", metadata={
        "help": "Where session state lives: memory:, sqlite:PATH, or shared by replicas: redis://HOST:PORT/DB, "
        "redis+sentinel://HOST:PORT,.../SERVICE (failover followed) or redis+cluster://HOST:PORT,.../."})
    durability: str = field(default="sync", metadata={
        "help": "sync: reply after the state is on disk; async: write-behind within async_window; none: memory only."})
    async_window: float = field(default=0.05, metadata={
        "help": "async durability: the most a crash can lose, in seconds of acknowledged writes."})
    redis_min_replicas: int = field(default=0, metadata={
        "help": "redis store: acknowledge a write only after Redis WAIT reports this many replicas have it, "
        "within --redis-wait-timeout; fewer is UNAVAILABLE and the retry is answered as a replay (0: after the "
        "primary alone)."})
    redis_wait_timeout: float = field(default=1.0, metadata={
        "help": "redis store with --redis-min-replicas: seconds a write waits for its replicas."})
    session_ttl: float = field(default=86400.0, metadata={
        "help": "Idle seconds after which a session expires (per-session ttl_seconds overrides)."})
    max_ttl: float = field(default=30 * 86400.0, metadata={"help": "Largest ttl_seconds a client may ask for."})
    tombstone_seconds: float = field(default=DEFAULT_TOMBSTONE_SECONDS, metadata={
        "help": "How long an expired session's id is remembered, to answer 'expired at ...'."})
    sweep_interval: float = field(default=60.0, metadata={
        "help": "Seconds between sweeps that remove expired sessions."})
    max_chunk: int = field(default=4096, metadata={"help": "Most steps in one chunk."})
    max_sessions: int = field(default=DEFAULT_MAX_SESSIONS, metadata={
        "help": "Most live sessions (0: no limit); creating more is RESOURCE_EXHAUSTED (checked atomically)."})
    memory_capacity: int = field(default=DEFAULT_CAPACITY, metadata={
        "help": "memory store: most sessions held; creating more is RESOURCE_EXHAUSTED (none is evicted)."})
    memory_bytes: int = field(default=DEFAULT_MEMORY_BYTES, metadata={
        "help": "memory store: most bytes of session records held; a create beyond is RESOURCE_EXHAUSTED."})
    cache_size: int = field(default=DEFAULT_CAPACITY, metadata={
        "help": "sqlite store: records cached in process; redis store: records kept as replica-local hints "
        "(the write script still decides; 0: none)."})
    cache_bytes: int = field(default=DEFAULT_CACHE_BYTES, metadata={
        "help": "sqlite store: most bytes of committed records cached in process; redis store: of hints."})
    max_pending_writes: int = field(default=DEFAULT_MAX_PENDING_WRITES, metadata={
        "help": "sqlite store, async durability: most sessions with an acknowledged write not yet committed; "
        "beyond, replies wait for the commit (backpressure, never loss)."})
    health_interval: float = field(default=2.0, metadata={
        "help": "Seconds between pings of the session store; health is NOT_SERVING while it fails."})
    max_generate_tokens: int = field(default=4096, metadata={"help": "Most tokens one Generate call may ask for."})
    max_stream_inflight: int = field(default=256, metadata={
        "help": "Most chunks of one Stream being processed at once; more wait (flow control)."})
    ort_threads: int = field(default=1, metadata={"help": "ONNX Runtime intra-op threads of a small call."})
    ort_threads_batch: int = field(default=_CORES, metadata={
        "help": "ONNX Runtime intra-op threads of a call of at least --ort-batch-rows rows x steps (default: the "
        "machine's cores; 0: as --ort-threads). Chosen by measurement (BENCHMARKS.md)."})
    ort_batch_rows: int = field(default=512, metadata={
        "help": "Rows x steps from which a call is large enough for --ort-threads-batch."})
    ort_alone_rows: int = field(default=128, metadata={
        "help": "Rows x steps from which a call takes --ort-threads-batch when it is the engine's only call "
        "(the other cores are idle then; 0: never; off with --workers over 1)."})
    provider: str = field(default="cpu", metadata={
        "help": "ONNX Runtime execution provider: cpu; cuda (needs the gpu extra, onnxruntime-gpu, and a CUDA "
        "device; refused otherwise); auto (cuda when ONNX Runtime reports it, else cpu)."})
    inference_threads: int = field(default=_ENGINE.threads, metadata={
        "help": "ONNX Runtime calls that may run at once, each on its own thread beside the event loop."})
    max_batch: int = field(default=_ENGINE.max_batch, metadata={
        "help": "Most rows (chunks) in one ONNX Runtime call, packed batches included: a larger block is split."})
    slice_steps: int = field(default=_ENGINE.slice_steps, metadata={
        "help": "Most steps of one chunk per batched call; longer chunks advance a slice at a time."})
    batch_window: float = field(default=_ENGINE.window, metadata={
        "help": "Seconds an idle engine waits for more chunks before a call (0: batch only what queued up)."})
    replica_id: str = field(default="", metadata={
        "help": "This replica's name, sent as x-recur-replica metadata on every reply (default: host:port)."})
    grace: float = field(default=10.0, metadata={"help": "Seconds in-flight calls get to finish on SIGTERM."})
    max_replay_bytes: int = field(default=DEFAULT_MAX_REPLAY_BYTES, metadata={
        "help": "Largest per-step outputs kept with a session for replaying its last chunk; a larger chunk's "
        "replay recomputes them from the stored state before it."})
    max_batch_chunks: int = field(default=1024, metadata={
        "help": "Most chunks in one StepBatch or PackedStepBatch message; the engine still runs at most --max-batch "
        "in one call."})
    inline_rows: int = field(default=_ENGINE.inline_rows, metadata={
        "help": "A chunk of at most this many rows x steps, when it is the server's only call, runs on the event "
        "loop's thread instead of an inference thread: a lone token skips the thread hop (0: never)."})
    max_queue: int = field(default=_ENGINE.max_queue, metadata={
        "help": "Most chunks queued or running in the engine; past it a chunk is shed with RESOURCE_EXHAUSTED."})
    max_concurrent_rpcs: int = field(default=10_000, metadata={
        "help": "Most calls the server runs at once (all connections); more are refused with RESOURCE_EXHAUSTED."})
    max_streams_per_connection: int = field(default=0, metadata={
        "help": "Most concurrent calls on one HTTP/2 connection (grpc.max_concurrent_streams; 0: no limit of its "
        "own). Over it, HTTP/2 resets the call (REFUSED_STREAM), which clients see as UNAVAILABLE: the server's "
        "bound is --max-concurrent-rpcs, answered with RESOURCE_EXHAUSTED."})
    max_reply_bytes: int = field(default=32 * 1024 * 1024, metadata={
        "help": "Most bytes one reply may hold (a StepBatch's or packed batch's replies together), computed from "
        "the request's shapes before anything runs; over it, RESOURCE_EXHAUSTED. At most --stream-buffer-bytes."})
    stream_buffer_bytes: int = field(default=64 * 1024 * 1024, metadata={
        "help": "Most bytes of replies one stream holds, running or waiting for its client to read them (each "
        "counted at its reply budget); past it the stream stops reading until the client reads."})
    connection_idle_timeout: float = field(default=300.0, metadata={
        "help": "Seconds a connection with no call in progress is kept open (0: for ever)."})
    stream_idle_timeout: float = field(default=300.0, metadata={
        "help": "Seconds a Stream or StreamBatch may go without a message from its client before the server "
        "ends it with DEADLINE_EXCEEDED (0: for ever)."})
    keepalive_min_interval: float = field(default=60.0, metadata={
        "help": "Fewest seconds between a client's keepalive pings; a client pinging more often is disconnected."})
    auth_keys: str = field(default="", metadata={
        "help": "API key file (JSON: sha256 of each key -> tenant, per-tenant limits; `recur keys add` writes it). "
        "Empty: open server, every call is tenant 'default'."})
    auth_keys_poll: float = field(default=5.0, metadata={
        "help": "Seconds between looks at --auth-keys for changes (a revoked key is refused from the next look; "
        "SIGHUP reloads at once); 0: only on SIGHUP."})
    metrics_port: int = field(default=9464, metadata={
        "help": "HTTP port of the Prometheus /metrics endpoint (0: off; -1: any free port); the bound port is "
        "printed as 'metrics on port N'."})
    tracing: bool = field(default=False, metadata={
        "help": "Export OpenTelemetry traces over OTLP gRPC (needs the tracing extra); also on when "
        "OTEL_EXPORTER_OTLP_ENDPOINT is set. The standard OTEL_* variables set the endpoint, service name and "
        "sampler (parent-based by default)."})
    tls_cert: str = field(default="", metadata={
        "help": "PEM certificate (chain) to serve TLS with; needs --tls-key (empty: plaintext)."})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert."})
    tls_client_ca: str = field(default="", metadata={
        "help": "PEM CA bundle: require client certificates signed by it (mutual TLS; needs --tls-cert)."})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return from_args(cls, args)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting, defaulting to RECUR_<NAME> when that variable is set."""
    add_dataclass_arguments(parser, Settings, env_prefix="RECUR_")
