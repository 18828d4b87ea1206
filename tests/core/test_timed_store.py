"""The metrics wrapper (service.store.timed) forwards every public method and attribute of Store to the
store it wraps, and times each read and write: each method is called here, found by enumerating Store,
so a method added to Store is tested without a line added here."""

from __future__ import annotations

import abc
import inspect
from typing import Any

import pytest

from service.store import MemoryStore
from service.store.base import READS, UNTIMED, WRITES, Store
from service.store.timed import public_attributes, public_methods, timed


class Recorder(Store):
    """A store whose every public method records its call and answers ("answer", name)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []


def _recording(name: str) -> Any:
    async def call(self: Recorder, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((name, args, kwargs))
        return ("answer", name)

    def call_sync(self: Recorder, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((name, args, kwargs))
        return ("answer", name)

    return call if inspect.iscoroutinefunction(vars(Store)[name]) else call_sync


for _name in public_methods():
    setattr(Recorder, _name, _recording(_name))
abc.update_abstractmethods(Recorder)


def _arguments(name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A distinct object for every parameter of Store.`name`: positional ones by position, keyword-only
    ones by name."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in list(inspect.signature(vars(Store)[name]).parameters.values())[1:]:
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = object()
        else:
            args.append(object())
    return tuple(args), kwargs


def test_every_public_method_of_store_is_read_write_or_untimed() -> None:
    methods = public_methods()
    assert {"get", "fresh", "get_many", "put", "put_many", "list_sessions", "write_lag"} <= set(methods)
    assert sorted(READS + WRITES + UNTIMED) == sorted(methods)  # each in exactly one list
    assert public_attributes() == ["clock", "events", "hints"]


@pytest.mark.parametrize("name", public_methods())
async def test_each_method_is_forwarded_with_its_arguments_and_timed_as_declared(name: str) -> None:
    inner = Recorder()
    seen: dict[str, list[float]] = {"read": [], "write": []}
    store = timed(inner, read=seen["read"].append, write=seen["write"].append)
    args, kwargs = _arguments(name)
    answer = getattr(store, name)(*args, **kwargs)
    if inspect.isawaitable(answer):
        answer = await answer
    assert answer == ("answer", name)
    assert inner.calls == [(name, args, kwargs)]  # the inner store's own method, never Store's default
    kind = "read" if name in READS else "write" if name in WRITES else None
    assert {k: len(v) for k, v in seen.items()} == {"read": int(kind == "read"), "write": int(kind == "write")}
    assert all(seconds >= 0 for v in seen.values() for seconds in v)


async def test_a_failed_read_is_timed_and_raises_as_the_inner_store_raised() -> None:
    reads: list[float] = []
    store = timed(MemoryStore(), read=reads.append, write=lambda s: None)
    with pytest.raises(Exception, match="does not exist"):
        await store.fresh("t", "missing")
    assert len(reads) == 1


def test_attributes_are_the_inner_stores() -> None:
    inner = MemoryStore(clock=lambda: 42.0)
    store = timed(inner, read=lambda s: None, write=lambda s: None)
    assert store.clock() == 42.0 and store.hints is False
    inner.hints = True
    assert store.hints is True  # read through, never copied
    store.clock = lambda: 7.0
    assert inner.clock() == 7.0
    assert store.nbytes == inner.nbytes  # beyond Store's attributes: the inner store's too
