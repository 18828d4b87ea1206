"""What the shared Redis store costs against the in-process memory store, in one run: one replica,
a local redis-server with the compose file's persistence (append-only, fsync every second), 64
sessions, the packed batch and Stream. Needs redis-server (`make test` installs it).

    python -m bench.redis_store
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time

from bench.run import ROOT, Process, _drive, _sequences, machine, recur_server, write_section


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Until `port` accepts connections; fails if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise SystemExit(f"redis-server exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"redis-server does not accept connections on port {port} after {timeout:.0f} s")
        time.sleep(0.05)


def start_redis(directory: str) -> tuple[subprocess.Popen, int]:
    """A local redis-server keeping its files in `directory`, with the compose file's persistence (append-only,
    fsync every second), once it accepts connections: (its process, its port)."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (make test installs it)")
    port = _free_port()
    redis = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                              "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                             stdout=subprocess.DEVNULL)
    try:
        _wait_port(port, redis)
    except BaseException:
        redis.kill()
        raise
    return redis, port


def main() -> None:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        redis, port = start_redis(tmp)
        servers: dict[str, Process] = {}
        try:
            servers["memory"] = recur_server("memory:")
            servers["redis"] = recur_server(f"redis://127.0.0.1:{port}/0")
            for api in ("packed", "stream"):
                for chunk in (1, 16):
                    seqs = _sequences(64, 512 if chunk == 16 else 256, seed=chunk)
                    for name, server in servers.items():
                        r = asyncio.run(_drive(server, seqs, chunk, api, check=1, budget=60))
                        rows.append((api, chunk, name, r.rate, r.p(50), r.p(99)))
                        print(rows[-1], flush=True)
        finally:
            for s in servers.values():
                s.stop()
            redis.terminate()
    memory = {(api, c): rate for api, c, name, rate, _, _ in rows if name == "memory"}
    table = ["| API | C | store | tokens/s | p50 chunk ms | p99 chunk ms | ratio to memory |",
             "|---|---:|---|---:|---:|---:|---:|"]
    table += [f"| {api} | {c} | {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {rate / memory[api, c]:.2f} |"
              for api, c, name, rate, p50, p99 in rows]
    write_section(ROOT / "BENCHMARKS.md", "## Redis store", (
        f"## Redis store\n\nMeasured {started} on {machine()}. Command: `python -m bench.redis_store`. One replica, "
        "64 sessions streaming 512 tokens (256 with 1-token chunks) over the packed batch (StreamPacked, two "
        "messages of 32 sessions in flight) and over Stream, full logits returned; Redis on the same machine with "
        "an append-only file (fsync every second). A packed message's sessions are read from the replica's hints "
        "(else in one pipelined round trip) and written in one pipeline of EVALSHA compare-and-set scripts.\n\n"
        + "\n".join(table) + "\n"))


if __name__ == "__main__":
    main()
