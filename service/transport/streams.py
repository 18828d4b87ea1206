"""What the bidirectional streams of both protocols share (recur.v1 Stream, inference
ModelStreamInfer): requests handled concurrently with flow control, and an idle timeout."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

Req = TypeVar("Req")
Rep = TypeVar("Rep")
Item = TypeVar("Item")


async def messages(requests: AsyncIterator[Req], idle_timeout: float | None, idle: asyncio.Event
                   ) -> AsyncIterator[Req]:
    """The call's messages until its end; if none comes for `idle_timeout` seconds, `idle` is set
    and the reading task is cancelled. A timer, not a timeout per message: this is the hot path."""
    if idle_timeout is None:
        async for request in requests:
            yield request
        return
    loop, reader = asyncio.get_running_loop(), asyncio.current_task()
    last = loop.time()
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal timer
        quiet = loop.time() - last
        if quiet >= idle_timeout:
            idle.set()
            if reader is not None:
                reader.cancel()
        else:
            timer = loop.call_later(idle_timeout - quiet, check)

    timer = loop.call_later(idle_timeout, check)
    try:
        async for request in requests:
            last = loop.time()
            yield request
    finally:
        if timer is not None:
            timer.cancel()


TRIM_AFTER_BYTES = 8 * 1024 * 1024  # a stream that held more gives the allocator's free pages back when it ends
_LIBC = ctypes.util.find_library("c")


def give_back_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them in its arenas otherwise, so a stream that
    once held its full budget would keep the process that large). A no-op where there is no glibc."""
    if _LIBC:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(_LIBC).malloc_trim(0)


class ByteBudget:
    """The bytes of replies a stream holds, running or waiting to be sent, granted in arrival order.
    A request reserves its reply budget (service/core/budget.py) before it runs and gives it back once its
    reply was handed to gRPC; one larger than the whole budget is granted it alone (the core refuses
    replies over --max-reply-bytes, which the server keeps at most the stream's budget)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held, self.peak = limit, 0, 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        if not self._waiters and self.held + n <= self.limit:
            self.held += n
            self.peak = max(self.peak, self.held)
            return n
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(n)
            raise
        return n

    def release(self, n: int) -> None:
        self.held -= n
        while self._waiters:
            want, granted = self._waiters[0]
            if granted.done():  # its reader was cancelled
                self._waiters.popleft()
                continue
            if self.held and self.held + want > self.limit:
                return
            self._waiters.popleft()
            self.held += want
            self.peak = max(self.peak, self.held)
            granted.set_result(None)


async def handled(requests: AsyncIterator[Req], prepare: Callable[[Req], tuple[Item, int]],
                  handle: Callable[[Item], Awaitable[Rep]], *, max_inflight: int, max_bytes: int,
                  idle_timeout: float | None, context: grpc.aio.ServicerContext) -> AsyncIterator[Rep]:
    """Each request converted (`prepare`: the core's input and its reply budget in bytes) and handled in
    its own task, started in arrival order (the core's per-session FIFO locks keep one session's chunks
    in order); replies yielded as they are ready. `handle` answers every request (errors become
    replies). A request's slot and bytes are freed only once its reply was handed to gRPC, so a client
    that does not read stops being read from: at most `max_inflight` replies and `max_bytes` bytes of
    them are running or waiting, and the chunks waiting for room hold no session lock. A stream idle
    for `idle_timeout` ends with DEADLINE_EXCEEDED."""
    replies: asyncio.Queue[tuple[Rep, int] | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_inflight)
    room = ByteBudget(max_bytes)
    idle = asyncio.Event()
    closed = False

    async def one(item: Item, reserved: int) -> None:
        try:
            reply = await handle(item)
        except BaseException:
            slots.release()
            room.release(reserved)
            raise
        if not closed:  # a cancelled call keeps nothing of the replies it will never send
            replies.put_nowait((reply, reserved))  # bounded by the slots

    async def read() -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in messages(requests, idle_timeout, idle):
                item, cost = prepare(request)
                del request
                await slots.acquire()
                try:
                    reserved = await room.acquire(cost)
                except BaseException:
                    slots.release()
                    raise
                task = asyncio.create_task(one(item, reserved))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)  # unlike gather, a cancelled wait leaves the chunks running
        finally:
            replies.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (ready := await replies.get()) is not None:
            reply, reserved = ready
            del ready
            yield reply
            del reply
            slots.release()  # only now: the reply has left this call's memory
            room.release(reserved)
    finally:
        closed = True
        reader.cancel()
        while not replies.empty():
            replies.get_nowait()
        if room.peak > TRIM_AFTER_BYTES:
            give_back_memory()
    await end_if_idle(idle, idle_timeout, context)


async def ordered(requests: AsyncIterator[Req], prepare: Callable[[Req], tuple[Item, int]],
                  handle: Callable[[Item], Awaitable[Rep]], read_ahead: int, max_bytes: int,
                  idle_timeout: float | None, context: grpc.aio.ServicerContext) -> AsyncIterator[Rep]:
    """Replies in the order of the requests (batch messages), each request handled as soon as it is
    read, at most `read_ahead` requests and `max_bytes` bytes of their replies (their budgets) ahead of
    the replies sent. `handle` answers every request."""
    pending: asyncio.Queue[tuple[asyncio.Future, int] | None] = asyncio.Queue(maxsize=read_ahead)
    room = ByteBudget(max_bytes)
    idle = asyncio.Event()

    async def read() -> None:
        try:
            async for request in messages(requests, idle_timeout, idle):
                item, cost = prepare(request)
                del request
                reserved = await room.acquire(cost)
                await pending.put((asyncio.ensure_future(handle(item)), reserved))
        finally:
            await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (ready := await pending.get()) is not None:
            task, reserved = ready
            del ready
            yield await task
            del task
            room.release(reserved)
    finally:
        reader.cancel()
    await end_if_idle(idle, idle_timeout, context)


async def end_if_idle(idle: asyncio.Event, idle_timeout: float | None, context: grpc.aio.ServicerContext) -> None:
    if idle.is_set():
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no message on this stream for {idle_timeout:g} s (--stream-idle-timeout); "
                            "open a new stream to go on")
