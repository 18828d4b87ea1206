"""Cross-session batching: chunks of many sessions of one model run as one ONNX Runtime call.

A job is one session's chunk and its state. Jobs wait in a FIFO per model; whenever an
inference thread is free, the scheduler takes up to `max_batch` jobs, cuts each to its next
slice of at most `slice_steps` steps, groups slices of equal length, stacks their states
(batch axis 1) and runs each group as one call. Nothing is padded, so no padded step can
reach a state. A job with steps left goes to the back of the queue with its new state, so a
long chunk advances a slice at a time and never holds up short ones.

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


@dataclass(frozen=True)
class EngineOptions:
    """The engine's settings; their defaults are the server's (service.config.Settings reads them)."""

    max_batch: int = 256  # most jobs in one call
    slice_steps: int = 64  # most steps of one job in one call (fairness for long chunks)
    window: float = 0.0  # seconds to wait for more jobs when a thread is idle
    threads: int = 1  # concurrent ONNX Runtime calls
    max_queue: int = 4096  # most chunks admitted (queued or running); more are refused


@dataclass
class _Job:
    x: np.ndarray  # (T,) int64 or (T, D) float32
    states: list[np.ndarray]  # each (L, H)
    future: asyncio.Future
    deadline: float | None  # on the loop's clock; a job past it is not run
    done_steps: int = 0
    outputs: list[np.ndarray] = field(default_factory=list)  # (t, C) per slice
    block: int = 0  # > 0: a block of that many equal-length chunks already batched (the packed path):
    # x (B, T[, D]), states (L, B, H), outputs (B, t, C); it runs as its own call
    activations: list[list[np.ndarray]] | None = None  # a block asking for them: each slice's (B, t, H)
    link: Any = None  # the span of the call it serves (tracing on), for the engine call's span to link

    @property
    def length(self) -> int:
        return self.x.shape[1] if self.block else len(self.x)


@dataclass
class EngineStats:
    calls: int = 0
    slices: int = 0  # job slices run (a chunk longer than slice_steps counts once per slice)
    steps: int = 0


class _ModelQueue:
    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.jobs: deque[_Job] = deque()


class Engine:
    """Runs chunks for all models; `run` returns (logits (T, C), new states each (L, H))."""

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
        # (sessions, seconds, cpu seconds) of each call, timed in the thread that ran it: metrics
        self.on_call: Callable[[int, float, float], None] | None = None
        self.tracing = OFF  # with tracing on, each call is a span linking the calls its chunks came from

    async def run(self, runtime: ModelRuntime, x: np.ndarray, states: list[np.ndarray],
                  deadline: float | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        return await self.submit(runtime, x, states, deadline)

    def submit(self, runtime: ModelRuntime, x: np.ndarray, states: list[np.ndarray],
               deadline: float | None = None) -> asyncio.Future:
        """Queue one chunk; the future gives (logits (T, C), new states each (L, H)). Over the
        queue bound the chunk is refused at once (shed), never queued."""
        return self._queue(runtime, _Job(x, states, asyncio.get_running_loop().create_future(), deadline))

    def submit_block(self, runtime: ModelRuntime, x: np.ndarray, states: list[np.ndarray],
                     deadline: float | None = None, activations: bool = False) -> asyncio.Future:
        """Queue B equal-length chunks gathered already: x (B, T[, D]), states each (L, B, H); the
        future gives (logits (B, T, C), new states each (L, B, H)), and with `activations` a third
        item, the model's per-step activations each (B, T, H) (its activation graph runs). It counts
        as B chunks of the queue bound and runs as its own call(s), a slice at a time like any chunk."""
        job = _Job(x, states, asyncio.get_running_loop().create_future(), deadline, block=len(x),
                   activations=[] if activations else None)
        return self._queue(runtime, job)

    def _queue(self, runtime: ModelRuntime, job: _Job) -> asyncio.Future:
        n = job.block or 1
        if self.admitted + n > self.options.max_queue:
            raise LimitExceeded(f"the server is overloaded: {self.admitted} chunks are queued, its limit "
                                f"(--max-queue {self.options.max_queue}); retry shortly")
        q = self._queues.get(id(runtime))
        if q is None:
            q = self._queues[id(runtime)] = _ModelQueue(runtime)
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
        """The longest-waiting model's next batch (round robin over models)."""
        for key in list(self._queues):
            q = self._queues[key]
            if q.jobs:
                self._queues[key] = self._queues.pop(key)  # move to the back: fair across models
                n = min(len(q.jobs), self.options.max_batch)
                return q, [q.jobs.popleft() for _ in range(n)]
        return None

    async def _run_batch(self, q: _ModelQueue, jobs: list[_Job]) -> None:
        try:
            groups: dict[int, list[_Job]] = {}
            blocks: list[_Job] = []
            now = asyncio.get_running_loop().time()
            for job in jobs:
                if job.future.done():  # cancelled
                    continue
                if job.deadline is not None and job.deadline <= now:  # nothing is stored yet: safe to drop
                    job.future.set_exception(DeadlineExceeded("the call's deadline passed before its chunk ran; "
                                                              "nothing was applied"))
                    continue
                if job.block:
                    blocks.append(job)
                    continue
                steps = min(self.options.slice_steps, len(job.x) - job.done_steps)
                groups.setdefault(steps, []).append(job)
            for steps, group in groups.items():
                for part, result in await self._run_isolating(q.runtime, group, steps):
                    self._scatter(q, part, steps, *result)
            if blocks:
                await self._run_blocks(q, blocks)
        finally:
            self._busy -= 1
            self._schedule()

    async def _run_isolating(self, runtime: ModelRuntime, group: list[_Job], steps: int) -> list[tuple]:
        """Run a group as one call; if the call fails, run its jobs one by one so that only the
        failing job fails, not the rest of its batch."""
        loop = asyncio.get_running_loop()
        try:
            started = now_ns()
            result, seconds, cpu = await loop.run_in_executor(self._pool, _timed, _run_group, runtime, group, steps)
            if self.on_call is not None:
                self.on_call(len(group), seconds, cpu)
            if self.tracing.on:
                self.tracing.engine_call([job.link for job in group], len(group), len(group) * steps, started, now_ns())
            return [(group, result)]
        except Exception as e:
            if len(group) == 1:
                log.warning("chunk failed in ONNX Runtime: %s", e.__class__.__name__)
                if not group[0].future.done():
                    group[0].future.set_exception(e)
                return []
        results = []
        for job in group:
            results.extend(await self._run_isolating(runtime, [job], steps))
        return results

    def _scatter(self, q: _ModelQueue, group: list[_Job], steps: int, logits: np.ndarray,
                 new_states: list[np.ndarray]) -> None:
        self.stats.calls += 1
        self.stats.slices += len(group)
        self.stats.steps += steps * len(group)
        for i, job in enumerate(group):
            job.outputs.append(logits[i].copy())  # copies: a view would keep the whole batch alive
            job.states = [np.ascontiguousarray(s[:, i]) for s in new_states]
            job.done_steps += steps
            if job.done_steps < len(job.x):
                q.jobs.append(job)  # the rest of a long chunk waits its turn
            elif not job.future.done():
                out = job.outputs[0] if len(job.outputs) == 1 else np.concatenate(job.outputs)
                job.future.set_result((out, job.states))


    async def _run_blocks(self, q: _ModelQueue, blocks: list[_Job]) -> None:
        """Blocks whose next slices have equal length (and ask for activations alike) run as one call:
        their rows concatenated, the results split back. A failed call fails those blocks only."""
        groups: dict[tuple[int, bool], list[_Job]] = {}
        for job in blocks:
            steps = min(self.options.slice_steps, job.length - job.done_steps)
            groups.setdefault((steps, job.activations is not None), []).append(job)
        loop = asyncio.get_running_loop()
        for (steps, with_acts), group in groups.items():
            xs = [job.x[:, job.done_steps : job.done_steps + steps] if job.done_steps or steps < job.length
                  else job.x for job in group]
            size = sum(job.block for job in group)
            if len(group) == 1:
                x, states = xs[0], group[0].states
            else:
                x = np.concatenate(xs)
                states = [np.concatenate(parts, axis=1) for parts in zip(*(job.states for job in group))]
            try:
                started = now_ns()
                if with_acts:
                    (logits, new_states, acts), seconds, cpu = await loop.run_in_executor(
                        self._pool, _timed, q.runtime.run_activations, x, states)
                else:
                    (logits, new_states), seconds, cpu = await loop.run_in_executor(self._pool, _timed,
                                                                                    q.runtime.run, x, states)
                    acts = None
                if self.on_call is not None:
                    self.on_call(size, seconds, cpu)
                if self.tracing.on:
                    self.tracing.engine_call([job.link for job in group], size, size * steps, started, now_ns())
            except Exception as e:
                if not isinstance(e, RecurError):
                    log.warning("a call of %d chunks failed in ONNX Runtime: %s", size, e.__class__.__name__)
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.stats.calls += 1
            self.stats.slices += size
            self.stats.steps += steps * size
            at = 0
            for job in group:
                rows = slice(at, at + job.block)
                at += job.block
                whole = len(group) == 1
                job.outputs.append(logits if whole else logits[rows])
                job.states = new_states if whole else [s[:, rows] for s in new_states]
                if job.activations is not None and acts is not None:
                    job.activations.append(acts if whole else [a[rows] for a in acts])
                job.done_steps += steps
                if job.done_steps < job.length:
                    q.jobs.append(job)
                elif not job.future.done():
                    self._finish_block(job)

    @staticmethod
    def _finish_block(job: _Job) -> None:
        out = job.outputs[0] if len(job.outputs) == 1 else np.concatenate(job.outputs, axis=1)
        if job.activations is None:
            job.future.set_result((out, job.states))
        else:
            parts = job.activations
            acts = parts[0] if len(parts) == 1 else [np.concatenate(a, axis=1) for a in zip(*parts)]
            job.future.set_result((out, job.states, acts))


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """fn(*args) with its wall and CPU time in this (worker) thread: ONNX Runtime's own time, without
    the wait for the event loop to take the result (with one intra-op thread the CPU time is all of it)."""
    started, cpu = time.perf_counter(), time.thread_time()
    out = fn(*args)
    return out, time.perf_counter() - started, time.thread_time() - cpu


def _run_group(runtime: ModelRuntime, group: list[_Job], steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call for a group of equal-length slices: (B, T[, D]) inputs, states stacked on axis 1."""
    x = np.stack([job.x[job.done_steps : job.done_steps + steps] for job in group])
    states = [np.stack([job.states[k] for job in group], axis=1) for k in range(len(group[0].states))]
    return runtime.run(x, states)
