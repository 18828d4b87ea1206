"""`recur serve --workers N`: N serving processes on one port, under a supervisor.

Each worker is `python -m service.workers INDEX PARENT_PID`: the whole server of service/server.py in a
process of its own (its own event loop, engine and ONNX Runtime sessions). The workers share --port
through SO_REUSEPORT, the kernel spreading new connections over them, and share the store: sqlite:PATH
with --durability sync (each worker's record cache off: every read is the file's, and the file's
compare-and-set on the offset decides every write) or redis (replica-local hints, the write script
deciding, as between replicas). The supervisor, this process:

- refuses what cannot work before anything starts (the memory store lives in one process; SQLite's
  write-behind holds acknowledged records in one process until they commit), holds the port with a
  socket bound with SO_REUSEPORT and never listening (nothing else takes it while a worker restarts;
  --port 0 picks the port the workers share), and opens the store once (its schema made once: workers
  making a new file at the same time would race);
- hands the settings over as RECUR_* variables: a command line is readable by every user of the
  machine, and a store URL may hold a password;
- prints `recur listening on port N` once every worker serves (each says so only after its models are
  loaded and its store is open, and answers SERVING from its first connection);
- restarts a worker that dies, after a backoff that doubles with each death in a row; a worker that
  served for STABLE_SECONDS starts a new row. After MAX_DEATHS deaths in a row it stops the other
  workers and exits 1; a worker failing at the first start stops everything at once (the settings are
  wrong: the worker said why on stderr);
- on SIGTERM or SIGINT sends SIGTERM to every worker, which drains as a single server does, and exits 0
  when every worker did; forwards SIGHUP (API keys reloaded);
- serves /metrics on --metrics-port: every worker's series with a `worker` label (service/fanout.py);
- serves --admin-port: every admin call is made on every worker, so models load and unload everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from recur.flags import to_environment
from service.config import Settings
from service.errors import RecurError
from service.store import open_store, redact_url

log = logging.getLogger(__name__)

MAX_DEATHS = 5  # deaths in a row of one worker after which the supervisor gives up (exit 1)
FIRST_BACKOFF = 0.25  # seconds before restarting after a first death; doubled for each death in a row
MAX_BACKOFF = 8.0
STABLE_SECONDS = 10.0  # a worker that served this long and died starts a new row of deaths
START_SECONDS = 120.0  # a worker not serving by then is killed: a death
STOP_MARGIN = 30.0  # seconds past --grace a draining worker gets (the store's flush) before SIGKILL


@dataclass
class Worker:
    """One worker slot: its current process and what it printed."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_port: int = 0  # its /metrics on 127.0.0.1 (0: none)
    admin_port: int = 0  # its admin API on 127.0.0.1 (0: none)
    serving_since: float = 0.0  # monotonic time it said it serves (0: not serving)
    deaths: int = 0  # in a row
    restarts: int = 0  # in all, for recur_worker_restarts_total

    @property
    def serving(self) -> bool:
        return self.serving_since > 0


def check(settings: Settings) -> None:
    """What cannot work with several workers, refused in one line before anything starts."""
    n = settings.workers
    if n < 1:
        raise SystemExit(f"recur serve: --workers must be 1 or more, not {n}")
    if settings.store == "memory:" or settings.durability == "none":
        raise SystemExit(f"recur serve: --workers {n} needs a store the workers share (sqlite:PATH or redis://...); "
                         "the memory store (and --durability none) lives in one process")
    if settings.store.startswith("sqlite:") and settings.durability != "sync":
        raise SystemExit(f"recur serve: --workers {n} with a sqlite store needs --durability sync: write-behind "
                         "keeps acknowledged records in one worker's memory until they commit, unseen by the others")


def worker_settings(settings: Settings, port: int) -> Settings:
    """A worker's settings: the shared port. Its store is opened shared (server.create_server): on SQLite
    its record cache is a hint, read again from the file whenever an offset disagrees or a
    compare-and-set fails, as Redis's is."""
    return dataclasses.replace(settings, port=port)


def reserve(host: str, port: int) -> socket.socket:
    """host:port bound with SO_REUSEPORT and never listening: the port stays the workers' while they come
    and go (each binds it beside this socket; only listening sockets are given connections)."""
    name = host.strip("[]") or "::"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise SystemExit(f"recur serve: cannot bind {host}:{port} ({e.strerror})") from None
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as gRPC binds [::]: IPv4 too
    try:
        s.bind(address)
    except OSError as e:
        s.close()
        raise SystemExit(f"recur serve: cannot bind {host}:{port} ({e.strerror})") from None
    return s


async def prepare_store(settings: Settings) -> None:
    """Open a SQLite store once and close it: a new file gets its schema here, not in N workers at once
    (Redis needs nothing made: each worker connects as a replica does)."""
    if not settings.store.startswith("sqlite:"):
        return
    try:
        store = await open_store(settings.store, durability=settings.durability, memory_capacity=1, cache_size=0,
                                 async_window=settings.async_window, tombstone_seconds=settings.tombstone_seconds)
    except (ValueError, OSError, RecurError) as e:  # their messages never hold the URL's secrets
        raise SystemExit(f"recur serve: cannot open the store {redact_url(settings.store)}: {e}") from None
    await store.close()


class Supervisor:
    """Starts the workers, keeps them running, and stops them."""

    def __init__(self, settings: Settings, port: int, environment: dict[str, str]) -> None:
        self.settings, self.port, self.environment = settings, port, environment
        self.workers = [Worker(i) for i in range(settings.workers)]
        self.stopping = asyncio.Event()
        self.gave_up = False
        self._tasks: list[asyncio.Task] = []

    async def _spawn(self, w: Worker) -> bool:
        """Start worker `w`; True once it serves, False when it died (or was killed) before."""
        w.ready.clear()
        w.serving_since, w.metrics_port, w.admin_port = 0.0, 0, 0
        w.proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.workers", str(w.index), str(os.getpid()),
            stdout=asyncio.subprocess.PIPE, env=self.environment)
        reader = asyncio.create_task(self._read(w, proc), name=f"worker-{w.index}-stdout")
        self._tasks.append(reader)
        ready, exited = asyncio.create_task(w.ready.wait()), asyncio.create_task(proc.wait())
        await asyncio.wait({ready, exited}, timeout=START_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        for t in (ready, exited):
            t.cancel()
        if w.ready.is_set() and proc.returncode is None:
            w.serving_since = time.monotonic()
            log.info("worker %d (pid %d) serving", w.index, proc.pid)
            print(f"worker {w.index} (pid {proc.pid}) serving", flush=True)
            return True
        if proc.returncode is None:
            log.error("worker %d (pid %d) did not serve within %.0f s; killing it", w.index, proc.pid, START_SECONDS)
            proc.kill()
        await proc.wait()
        return False

    async def _read(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        """The lines a worker prints about its ports (service/server.py's serve), then anything else, passed on."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("metrics on port "):
                w.metrics_port = int(line.split()[-1])
            elif line.startswith("admin on port "):
                w.admin_port = int(line.split()[-1])
            elif line.startswith("recur listening on port "):
                w.ready.set()
            else:
                print(line, flush=True)

    async def start(self) -> bool:
        """Every worker at once; False (the others stopped) when one fails to start."""
        started = await asyncio.gather(*(self._spawn(w) for w in self.workers))
        if all(started):
            return True
        failed = [w for w, ok in zip(self.workers, started) if not ok]
        codes = ", ".join(f"worker {w.index}: {w.proc.returncode if w.proc else None}" for w in failed)
        log.error("workers failed to start (%s); stopping", codes)
        return False

    async def _keep(self, w: Worker) -> None:
        """Restart worker `w` whenever it dies, until stopping; give up after MAX_DEATHS deaths in a row."""
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self.stopping.is_set():
                return
            lived = time.monotonic() - w.serving_since if w.serving else 0.0
            w.deaths = 1 if lived >= STABLE_SECONDS else w.deaths + 1
            w.serving_since = 0.0
            if w.deaths >= MAX_DEATHS:
                log.error("worker %d died %d times in a row (last exit %s); giving up", w.index, w.deaths, code)
                self.gave_up = True
                self.stopping.set()
                return
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (w.deaths - 1))
            log.warning("worker %d (pid %d) exited with %s; restarting in %.2f s", w.index, w.proc.pid, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            w.restarts += 1
            await self._spawn(w)

    def keep(self) -> None:
        self._tasks += [asyncio.create_task(self._keep(w), name=f"worker-{w.index}") for w in self.workers]

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(sig)

    async def stop(self) -> bool:
        """SIGTERM to every worker (each drains); True when every one exited 0 within --grace and a margin."""
        self.stopping.set()
        for t in self._tasks:
            if not t.get_name().endswith("-stdout"):
                t.cancel()
        self.signal_all(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        _, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs],
                                     timeout=self.settings.grace + STOP_MARGIN)
        if late:
            log.error("%d workers still draining after %.0f s; killing them", len(late),
                      self.settings.grace + STOP_MARGIN)
            self.signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        for t in self._tasks:
            t.cancel()
        # a worker that was not serving (starting, or failed to) had nothing to drain
        failed = [w for w in self.workers if w.proc is not None and w.proc.returncode and w.serving]
        for w in failed:
            log.error("worker %d exited with %s while draining", w.index, w.proc.returncode if w.proc else None)
        return not late and not failed


def environment(settings: Settings, log_level: str, log_format: str) -> dict[str, str]:
    return {**os.environ, **to_environment(settings, "RECUR_"), "RECUR_LOG_LEVEL": log_level,
            "RECUR_LOG_FORMAT": log_format, "PYTHONUNBUFFERED": "1"}


async def _until(stop: asyncio.Event, work: asyncio.Future) -> bool:
    """Wait for `work` unless `stop` is set first (then `work` is cancelled); whether `work` finished."""
    asked = asyncio.create_task(stop.wait())
    await asyncio.wait({work, asked}, return_when=asyncio.FIRST_COMPLETED)
    asked.cancel()
    if not work.done():
        work.cancel()
    return work.done() and not work.cancelled()


async def _supervise(settings: Settings, log_level: str, log_format: str) -> int:
    from service.fanout import AdminFanOut, GatheredMetrics

    check(settings)
    reservation = reserve(settings.host, settings.port)
    port = reservation.getsockname()[1]
    await prepare_store(settings)
    if settings.store.startswith("sqlite:"):
        log.info("sqlite store with %d workers: each reads the file on every call (no record cache)", settings.workers)
    sup = Supervisor(settings, port, environment(worker_settings(settings, port), log_level, log_format))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, sup.signal_all, signal.SIGHUP)
    metrics = GatheredMetrics.serve(sup.workers, settings)  # both answer for the workers serving at the time
    admin = None
    try:
        admin = await AdminFanOut.serve(sup.workers, settings)
        starting = asyncio.ensure_future(sup.start())
        if not await _until(stop, starting):  # SIGTERM while starting: stop what started
            return 0 if await sup.stop() else 1
        if not starting.result():
            await sup.stop()
            return 1
        sup.keep()
        log.info("recur listening on port %d (%d workers)", port, settings.workers)
        print(f"recur listening on port {port}", flush=True)
        await _until(stop, asyncio.ensure_future(sup.stopping.wait()))
        log.info("stopping %d workers", settings.workers)
        clean = await sup.stop()
        return 1 if sup.gave_up or not clean else 0
    finally:
        if admin is not None:
            await admin.stop(1.0)
        if metrics is not None:
            metrics.stop()
        reservation.close()


def supervise(settings: Settings, *, log_level: str, log_format: str) -> int:
    """Run `settings.workers` workers until SIGTERM; the exit status (0: every worker drained)."""
    return asyncio.run(_supervise(settings, log_level, log_format))


def _follow_parent(parent: int) -> None:
    """SIGTERM this worker when its supervisor dies, even killed (Linux's PR_SET_PDEATHSIG): it drains and
    exits rather than hold the port."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        raise SystemExit(f"recur worker: the supervisor (pid {parent}) is gone")


def worker_main(argv: list[str]) -> int:
    """One worker: `python -m service.workers INDEX PARENT_PID`, its settings in RECUR_* variables."""
    import argparse

    from service.config import add_serve_arguments
    from service.logs import configure
    from service.server import WorkerRole, serve

    index, parent = int(argv[0]), int(argv[1])
    _follow_parent(parent)
    parser = argparse.ArgumentParser(prog=f"recur worker {index}")
    add_serve_arguments(parser)
    settings = Settings.from_args(parser.parse_args([]))
    configure(os.environ.get("RECUR_LOG_LEVEL", "INFO"), os.environ.get("RECUR_LOG_FORMAT", "text"))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))
    asyncio.run(serve(settings, WorkerRole(index)))
    return 0


class _WorkerField(logging.Filter):
    """Every log line of a worker names it (`worker=N`; in JSON, "worker": N)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
