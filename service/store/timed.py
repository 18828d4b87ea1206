"""A store that times another: every public method and attribute of `Store` forwarded to the store it
wraps, each read's and write's duration reported.

Nothing here names a Store method: the forwarders are made from `Store` itself (its public functions,
sorted by `base.READS`, `base.WRITES` and `base.UNTIMED`), so a method added to Store is forwarded
as soon as it exists, and one that none of the three lists names stops this module from loading
rather than going untimed or unforwarded. tests/core/test_timed_store.py calls each of them.
"""

from __future__ import annotations

import abc
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

from service.store.base import READS, UNTIMED, WRITES, Store

Observe = Callable[[float], None]  # called with a call's duration in seconds


def public_methods() -> list[str]:
    """Store's public methods (functions, async or not), in the order it declares them."""
    return [name for name, value in vars(Store).items() if not name.startswith("_") and inspect.isfunction(value)]


def public_attributes() -> list[str]:
    """Store's public attributes that are not methods (`clock`, `hints`, `events`)."""
    return [name for name, value in vars(Store).items() if not name.startswith("_") and not inspect.isfunction(value)]


def _kind(name: str) -> str | None:
    """"read", "write" or None (forwarded untimed); a method no list names is refused."""
    if name in READS:
        return "read"
    if name in WRITES:
        return "write"
    if name in UNTIMED:
        return None
    raise TypeError(f"Store.{name} is in none of base.READS, base.WRITES and base.UNTIMED: say whether it is timed")


def _forwarder(name: str) -> Callable[..., Any]:
    kind = _kind(name)
    declared = vars(Store)[name]
    if inspect.iscoroutinefunction(declared):
        async def forward(self: TimedStore, *args: Any, **kwargs: Any) -> Any:
            if kind is None:
                return await getattr(self.inner, name)(*args, **kwargs)
            t = time.perf_counter()
            try:
                return await getattr(self.inner, name)(*args, **kwargs)
            finally:
                self.observers[kind](time.perf_counter() - t)

        method: Callable[..., Any] = forward
    else:
        def forward_sync(self: TimedStore, *args: Any, **kwargs: Any) -> Any:
            if kind is None:
                return getattr(self.inner, name)(*args, **kwargs)
            t = time.perf_counter()
            try:
                return getattr(self.inner, name)(*args, **kwargs)
            finally:
                self.observers[kind](time.perf_counter() - t)

        method = forward_sync
    # name, docstring and signature (through __wrapped__), but not __isabstractmethod__: this one is concrete
    return functools.update_wrapper(method, declared, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                                    updated=())


def _forwarded(name: str) -> property:
    def get(self: TimedStore) -> Any:
        return getattr(self.inner, name)

    def put(self: TimedStore, value: Any) -> None:
        setattr(self.inner, name, value)

    return property(get, put, doc=f"the wrapped store's `{name}`")


def _forwarding(cls: type) -> type:
    """Install a forwarder for every public method and attribute of Store."""
    for name in public_methods():
        setattr(cls, name, _forwarder(name))
    for name in public_attributes():
        setattr(cls, name, _forwarded(name))
    abc.update_abstractmethods(cls)
    return cls


@_forwarding
class TimedStore(Store):
    """Forwards every public method and attribute of Store to `inner` (installed by @_forwarding); reads
    and writes report their duration (as the caller waits for it, errors included) to `read` and
    `write`. Attributes a store has beyond Store's (SqliteStore.commits) are the inner store's too."""

    def __init__(self, inner: Store, *, read: Observe, write: Observe) -> None:
        self.inner = inner
        self.observers = {"read": read, "write": write}

    def __getattr__(self, name: str) -> Any:  # only what Store does not define: @_forwarding did the rest
        if name in ("inner", "observers"):  # not set yet (a copy being made): never ask the inner store
            raise AttributeError(name)
        return getattr(self.inner, name)


def timed(inner: Store, *, read: Observe, write: Observe) -> Store:
    """`inner`, its reads and writes timed (see TimedStore)."""
    return TimedStore(inner, read=read, write=write)  # type: ignore[abstract]  # @_forwarding made it concrete
