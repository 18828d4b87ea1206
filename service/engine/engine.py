"""Cross-session batching: chunks of many sessions of one model run as one ONNX Runtime call.

A job is a block of B equal-length chunks gathered already (a single chunk is a block of one):
x (B, T[, D]) and states each (L, B, H). Jobs wait in a FIFO per model; whenever an inference
thread is free, the scheduler takes jobs from the front up to `max_batch` rows, cuts each to its
next slice of at most `slice_steps` steps, and runs the jobs whose slices have equal length (and
ask for activations alike) as one call, their rows concatenated. A block of more than `max_batch`
rows is split when it is submitted, so `max_batch` bounds the rows of every call. Nothing is
padded, so no padded step can reach a state. A job with steps left goes to the back of the queue
with its new state, so a long chunk advances a slice at a time and never holds up short ones.

While every thread is busy, arriving jobs queue up and form the next batch: batching comes
from load, not from waiting. `window` adds an optional wait to gather more when idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service.engine.runtime import ModelRuntime
from service.engine.threads import name_this_thread
from service.errors import DeadlineExceeded, LimitExceeded, RecurError
from service.tracing import OFF, now_ns

log = logging.getLogger(__name__)
T = TypeVar("T")
Ran = tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None]  # logits, states, activations


@dataclass(frozen=True)
class EngineOptions:
    """The engine's settings; their defaults are the server's (service.config.Settings reads them)."""

    max_batch: int = 256  # most rows (chunks) in one call
    slice_steps: int = 64  # most steps of one job in one call (fairness for long chunks)
    window: float = 0.0  # seconds to wait for more jobs when a thread is idle
    threads: int = 1  # concurrent ONNX Runtime calls
    max_queue: int = 4096  # most chunks admitted (queued or running); more are refused
    inline_rows: int = 4  # a lone block of at most this many rows x steps runs on the loop's thread
    inline_idle: float = 0.0003  # ... when no call ended for this long (seconds): under load, blocks batch


@dataclass
class _Job:
    x: np.ndarray  # (B, T) int64 or (B, T, D) float32
    states: list[np.ndarray]  # each (L, B, H)
    future: asyncio.Future
    deadline: float | None  # on the loop's clock; a job past it is not run
    activations: bool  # run on the activation graph, which also gives each step's activations
    done_steps: int = 0
    outputs: list[np.ndarray] = field(default_factory=list)  # (B, t, C) per slice
    acts: list[list[np.ndarray]] = field(default_factory=list)  # per slice, each (B, t, H)
    link: Any = None  # the span of the call it serves (tracing on), for the engine call's span to link

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def next_slice(self, slice_steps: int) -> int:
        return min(slice_steps, self.length - self.done_steps)


@dataclass
class EngineStats:
    calls: int = 0
    slices: int = 0  # rows run (a chunk longer than slice_steps counts once per slice)
    steps: int = 0
    max_rows: int = 0  # the most rows one call carried


class _ModelQueue:
    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.jobs: deque[_Job] = deque()


class Engine:
    """Runs blocks of chunks for all models (`submit`)."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.stats = EngineStats()
        self._pool = ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="ort",
                                        initializer=name_this_thread, initargs=("recur-ort",))
        self._queues: dict[int, _ModelQueue] = {}
        self._busy = 0  # calls in flight
        self._calls: set[asyncio.Task] = set()
        self._dispatch_pending = False
        self.admitted = 0  # chunks queued or running
        self._idle_since = 0.0  # when the last call ended, on the loop's clock
        # (sessions, seconds, cpu seconds) of each call, timed in the thread that ran it: metrics
        self.on_call: Callable[[int, float, float], None] | None = None
        self.tracing = OFF  # with tracing on, each call is a span linking the calls its chunks came from

    def submit(self, runtime: ModelRuntime, x: np.ndarray, states: list[np.ndarray],
               deadline: float | None = None, activations: bool = False, alone: bool = False) -> asyncio.Future[Ran]:
        """Queue B equal-length chunks: x (B, T[, D]), states each (L, B, H). The future gives
        (logits (B, T, C), new states each (L, B, H), and with `activations` the model's per-step
        activations each (B, T, H), else None). The block counts as B chunks of the queue bound; over
        it the block is refused at once (shed), never queued. `alone`: the caller knows of no other work
        in the server, so a tiny block may run at once (see _now); under load blocks wait to batch."""
        rows, cap = len(x), self.options.max_batch
        if self.admitted + rows > self.options.max_queue:
            raise LimitExceeded(f"the server is overloaded: {self.admitted} chunks are queued, its limit "
                                f"(--max-queue {self.options.max_queue}); retry shortly")
        loop = asyncio.get_running_loop()
        if (alone and rows * x.shape[1] <= self.options.inline_rows and x.shape[1] <= self.options.slice_steps
                and self._busy == 0 and not self._dispatch_pending
                and loop.time() - self._idle_since >= self.options.inline_idle):
            return self._now(loop, runtime, _Job(x, states, loop.create_future(), deadline, activations))
        parts = [self._queue(runtime, _Job(x[a : a + cap] if rows > cap else x,
                                           [s[:, a : a + cap] for s in states] if rows > cap else states,
                                           loop.create_future(), deadline, activations))
                 for a in range(0, max(rows, 1), cap)]
        return parts[0] if len(parts) == 1 else _joined(loop, parts)

    def _now(self, loop: asyncio.AbstractEventLoop, runtime: ModelRuntime, job: _Job) -> asyncio.Future[Ran]:
        """A tiny block on an idle engine runs here and now, on the event loop's thread: no task, no
        hop to an inference thread and back, no turn of the loop (a lone token's latency)."""
        if job.deadline is not None and job.deadline <= loop.time():
            job.future.set_exception(_past_deadline())
            return job.future
        started = now_ns()
        try:
            result, seconds, cpu = _timed(_run_group, runtime, [job], job.length, job.activations)
        except Exception as e:
            if not isinstance(e, RecurError):
                log.warning("a call of %d chunks failed in ONNX Runtime: %s", job.rows, e.__class__.__name__)
            job.future.set_exception(e)
            return job.future
        if self.tracing.on:
            job.link = self.tracing.current()
        self._account([job], job.length, seconds, cpu, started)
        job.future.set_result(result)
        self._idle_since = loop.time()
        return job.future

    def _queue(self, runtime: ModelRuntime, job: _Job) -> asyncio.Future:
        q = self._queues.get(id(runtime))
        if q is None:
            q = self._queues[id(runtime)] = _ModelQueue(runtime)
        n = job.rows
        self.admitted += n
        job.future.add_done_callback(lambda _: self._release(n))
        if self.tracing.on:
            job.link = self.tracing.current()
        q.jobs.append(job)
        self._schedule()
        return job.future

    def _release(self, n: int) -> None:
        self.admitted -= n

    async def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _schedule(self) -> None:
        """Dispatch soon: after the callbacks already queued, so chunks that became ready in the
        same turn of the event loop join the same call."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            loop = asyncio.get_running_loop()
            if self.options.window > 0 and self._busy == 0:
                loop.call_later(self.options.window, self._dispatch)
            else:
                loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        loop = asyncio.get_running_loop()
        while self._busy < self.options.threads:
            taken = self._take()
            if taken is None:
                return
            self._busy += 1
            task = loop.create_task(self._run_batch(*taken))
            self._calls.add(task)  # a strong reference until it ends
            task.add_done_callback(self._calls.discard)

    def _take(self) -> tuple[_ModelQueue, list[_Job]] | None:
        """The longest-waiting model's next jobs, up to max_batch rows (round robin over models)."""
        for key in list(self._queues):
            q = self._queues[key]
            if q.jobs:
                self._queues[key] = self._queues.pop(key)  # move to the back: fair across models
                taken, rows = [q.jobs.popleft()], 0
                rows = taken[0].rows
                while q.jobs and rows + q.jobs[0].rows <= self.options.max_batch:
                    rows += q.jobs[0].rows
                    taken.append(q.jobs.popleft())
                return q, taken
        return None

    async def _run_batch(self, q: _ModelQueue, jobs: list[_Job]) -> None:
        try:
            groups: dict[tuple[int, bool], list[_Job]] = {}
            now = asyncio.get_running_loop().time()
            for job in jobs:
                if job.future.done():  # cancelled
                    continue
                if job.deadline is not None and job.deadline <= now:  # nothing is stored yet: safe to drop
                    job.future.set_exception(_past_deadline())
                    continue
                groups.setdefault((job.next_slice(self.options.slice_steps), job.activations), []).append(job)
            for (steps, with_acts), group in groups.items():
                for part, result in await self._run_isolating(q.runtime, group, steps, with_acts):
                    self._scatter(q, part, steps, result)
        finally:
            self._busy -= 1
            self._idle_since = asyncio.get_running_loop().time()
            self._schedule()

    async def _run_isolating(self, runtime: ModelRuntime, group: list[_Job], steps: int, with_acts: bool
                             ) -> list[tuple[list[_Job], Ran]]:
        """Run a group as one call; if the call fails, run its jobs one by one so that only the
        failing job fails, not the rest of its batch."""
        loop = asyncio.get_running_loop()
        rows = sum(job.rows for job in group)
        try:
            started = now_ns()
            # alone: the only call in flight, of callers' blocks (packed messages, 8 rows a job or more; not many
            # streams' tokens batched together, whose event loop needs the cores the wide session would take)
            alone = self._busy == 1 and rows >= _BLOCK_ROWS * len(group)
            result, seconds, cpu = await loop.run_in_executor(self._pool, _timed, _run_group, runtime, group, steps,
                                                              with_acts, alone)
            self._account(group, steps, seconds, cpu, started)
            return [(group, result)]
        except Exception as e:
            if len(group) == 1:
                if not isinstance(e, RecurError):
                    log.warning("a call of %d chunks failed in ONNX Runtime: %s", rows, e.__class__.__name__)
                if not group[0].future.done():
                    group[0].future.set_exception(e)
                return []
        results = []
        for job in group:
            results.extend(await self._run_isolating(runtime, [job], steps, with_acts))
        return results

    def _account(self, group: list[_Job], steps: int, seconds: float, cpu: float, started: int) -> None:
        """One call that ran: the stats, the metrics' hook, and with tracing a span linking its chunks' calls."""
        rows = sum(job.rows for job in group)
        self.stats.calls += 1
        self.stats.slices += rows
        self.stats.steps += steps * rows
        self.stats.max_rows = max(self.stats.max_rows, rows)
        if self.on_call is not None:
            self.on_call(rows, seconds, cpu)
        if self.tracing.on:
            self.tracing.engine_call([job.link for job in group], rows, rows * steps, started, now_ns())

    def _scatter(self, q: _ModelQueue, group: list[_Job], steps: int, result: Ran) -> None:
        logits, new_states, acts = result
        at = 0
        for job in group:
            if len(group) == 1:
                own, own_states, own_acts = logits, new_states, acts
            else:  # copies: a view would keep the whole call's arrays alive
                part = slice(at, at + job.rows)
                own, own_states = logits[part].copy(), [s[:, part].copy() for s in new_states]
                own_acts = None if acts is None else [a[part].copy() for a in acts]
            at += job.rows
            job.outputs.append(own)
            job.states = own_states
            if own_acts is not None:
                job.acts.append(own_acts)
            job.done_steps += steps
            if job.done_steps < job.length:
                q.jobs.append(job)  # the rest of a long chunk waits its turn
            elif not job.future.done():
                job.future.set_result(_finished(job))


def _finished(job: _Job) -> Ran:
    out = job.outputs[0] if len(job.outputs) == 1 else np.concatenate(job.outputs, axis=1)
    if not job.activations:
        return out, job.states, None
    parts = job.acts
    return out, job.states, parts[0] if len(parts) == 1 else [np.concatenate(a, axis=1) for a in zip(*parts)]


def _joined(loop: asyncio.AbstractEventLoop, parts: list[asyncio.Future]) -> asyncio.Future[Ran]:
    """One future for a block split into parts of at most max_batch rows: their results joined in
    order, or the first part's error; cancelling it cancels the parts."""
    out: asyncio.Future[Ran] = loop.create_future()

    def settle(_: asyncio.Future) -> None:
        if out.done() or not all(p.done() for p in parts):
            return
        for p in parts:
            if p.cancelled():
                out.cancel()
                return
            if p.exception() is not None:
                out.set_exception(p.exception())  # type: ignore[arg-type]
                return
        results = [p.result() for p in parts]
        acts = None if results[0][2] is None else [np.concatenate(a) for a in zip(*(r[2] for r in results))]
        out.set_result((np.concatenate([r[0] for r in results]),
                        [np.concatenate(s, axis=1) for s in zip(*(r[1] for r in results))], acts))

    for p in parts:
        p.add_done_callback(settle)
    out.add_done_callback(lambda f: [p.cancel() for p in parts] if f.cancelled() else None)
    return out


_BLOCK_ROWS = 8  # rows a job carries on average for its call to count as blocks, not single tokens (measured)


def _past_deadline() -> DeadlineExceeded:
    return DeadlineExceeded("the call's deadline passed before its chunk ran; nothing was applied")


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """fn(*args) with its wall and CPU time in this (worker) thread: ONNX Runtime's own time, without
    the wait for the event loop to take the result (with one intra-op thread the CPU time is all of it)."""
    started, cpu = time.perf_counter(), time.thread_time()
    out = fn(*args)
    return out, time.perf_counter() - started, time.thread_time() - cpu


def _run_group(runtime: ModelRuntime, group: list[_Job], steps: int, with_acts: bool, alone: bool = False) -> Ran:
    """One call for a group of equal-length slices, their rows concatenated (no copy for a single
    whole job). `alone`: the engine's only call in flight."""
    xs = [job.x if job.done_steps == 0 and steps == job.length else job.x[:, job.done_steps : job.done_steps + steps]
          for job in group]
    if len(group) == 1:
        x, states = xs[0], group[0].states
    else:
        x = np.concatenate(xs)
        states = [np.concatenate(parts, axis=1) for parts in zip(*(job.states for job in group))]
    if with_acts:
        return runtime.run_activations(x, states)
    logits, new_states = runtime.run(x, states, alone)
    return logits, new_states, None
