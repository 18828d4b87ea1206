"""What the bidirectional streams of both protocols share (recur.v1 Stream, inference
ModelStreamInfer): requests handled concurrently with flow control, and an idle timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

Req = TypeVar("Req")
Rep = TypeVar("Rep")


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


async def handled(requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Rep]], *, max_inflight: int,
                  idle_timeout: float | None, context: grpc.aio.ServicerContext) -> AsyncIterator[Rep]:
    """Each request handled in its own task, started in arrival order (the core's per-session FIFO
    locks keep one session's chunks in order); replies yielded as they are ready. `handle` answers
    every request (errors become replies). A request's slot is freed only once its reply was handed
    to gRPC, so a client that does not read stops being read from: at most `max_inflight` replies
    are running or waiting. A stream idle for `idle_timeout` ends with DEADLINE_EXCEEDED."""
    replies: asyncio.Queue[Rep | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_inflight)
    idle = asyncio.Event()

    async def one(request: Req) -> None:
        try:
            reply = await handle(request)
        except BaseException:
            slots.release()
            raise
        replies.put_nowait(reply)  # bounded by the slots

    async def read() -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in messages(requests, idle_timeout, idle):
                await slots.acquire()
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)  # unlike gather, a cancelled wait leaves the chunks running
        finally:
            replies.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
            slots.release()  # only now: the reply has left this call's memory
    finally:
        reader.cancel()
    await end_if_idle(idle, idle_timeout, context)


async def ordered(requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Rep]], read_ahead: int,
                  idle_timeout: float | None, context: grpc.aio.ServicerContext) -> AsyncIterator[Rep]:
    """Replies in the order of the requests (batch messages), each request handled as soon as it is
    read, at most `read_ahead` requests read ahead of the replies sent. `handle` answers every request."""
    pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(maxsize=read_ahead)
    idle = asyncio.Event()

    async def read() -> None:
        try:
            async for request in messages(requests, idle_timeout, idle):
                await pending.put(asyncio.ensure_future(handle(request)))
        finally:
            await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (task := await pending.get()) is not None:
            yield await task
    finally:
        reader.cancel()
    await end_if_idle(idle, idle_timeout, context)


async def end_if_idle(idle: asyncio.Event, idle_timeout: float | None, context: grpc.aio.ServicerContext) -> None:
    if idle.is_set():
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no message on this stream for {idle_timeout:g} s (--stream-idle-timeout); "
                            "open a new stream to go on")
