"""The SQLite store's write queue on its own (service/store/write_queue.py), over a fake file: ordering,
coalescing, fencing, failure and retry, and nothing acknowledged lost. `check()` runs after every
operation (the queue is built with checking on) and again here after each step."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import numpy as np
import pytest

from service.errors import AlreadyExists, SessionNotFound, StoreConflict, Unavailable
from service.store.record import SessionRecord
from service.store.write_queue import (
    Create,
    Delete,
    Expire,
    Failed,
    Key,
    Outcome,
    Probe,
    Put,
    Sweep,
    Write,
    WriteQueue,
)

T0 = 1000.0


def rec(sid: str, offset: int, ttl: float = 3600.0) -> SessionRecord:
    return SessionRecord(tenant="t", session_id=sid, model="m", version=1, offset=offset, created_at=T0,
                         updated_at=T0, ttl=ttl, state=[np.full((1, 2), offset, np.float32)])


class File:
    """What the file holds: each transaction applies all its writes in order, or none. `refuse` decides,
    per transaction, whether it fails as a whole (and how)."""

    def __init__(self) -> None:
        self.rows: dict[Key, SessionRecord] = {}
        self.transactions: list[list[Write]] = []
        self.refuse: Callable[[list[Write]], Failed | None] = lambda batch: None

    async def attempt(self, batch: list[Write]) -> Outcome:
        self.transactions.append(list(batch))
        failed = self.refuse(batch)
        if failed is not None:
            return failed
        rows, results = dict(self.rows), []
        for w in batch:
            results.append(_apply(rows, w))
        self.rows = rows
        return results

    def offsets(self) -> dict[str, int]:
        return {k[1]: r.offset for k, r in self.rows.items()}


def _apply(rows: dict[Key, SessionRecord], w: Write) -> Exception | None:
    match w:
        case Create():
            if w.key in rows:
                return AlreadyExists("exists")
            rows[w.key] = w.record
        case Put():
            current = rows.get(w.key)
            if current is None:
                return SessionNotFound("missing")
            if current.offset != w.prev_offset:
                return StoreConflict("conflict", current.offset)
            rows[w.key] = w.record
        case Delete():
            rows.pop(w.key, None)
        case Expire():
            if w.key in rows and rows[w.key].expires_at <= w.at:
                del rows[w.key]
        case Sweep() | Probe():
            pass
    return None


def queue(max_pending: int = 100, cache_size: int = 100) -> WriteQueue:
    return WriteQueue(cache_size=cache_size, cache_bytes=1 << 20, max_pending=max_pending, checking=True)


async def turn(q: WriteQueue, file: File) -> None:
    """One turn of the writer: take what is queued, commit it."""
    retry, new = q.take()
    await q.commit(retry, new, file.attempt)
    q.check()


def waited(loop: asyncio.AbstractEventLoop, w: Write) -> asyncio.Future[None]:
    w.future = loop.create_future()
    return w.future


def full_disk(keys: set[Key] | None = None) -> Callable[[list[Write]], Failed | None]:
    """Refuse every transaction holding a write of `keys` (every transaction: None), as a full disk does."""
    def refuse(batch: list[Write]) -> Failed | None:
        if keys is None or any(getattr(w, "key", None) in keys for w in batch):
            return Failed(OSError("database or disk is full"), transient=True)
        return None
    return refuse


# -- ordering -------------------------------------------------------------------------------------------
async def test_writes_go_in_one_transaction_in_the_order_they_were_queued() -> None:
    q, file, loop = queue(), File(), asyncio.get_running_loop()
    first = Create(("t", "a"), rec("a", 0), T0)
    futures = [waited(loop, first)]
    q.enqueue(first)
    for offset in range(1, 4):
        q.acknowledge(rec("a", offset), offset - 1, T0)  # joins the queued Put: see the next test
    second = Create(("t", "b"), rec("b", 0), T0)
    futures.append(waited(loop, second))
    q.enqueue(second)
    await turn(q, file)
    assert len(file.transactions) == 1
    assert [type(w).__name__ for w in file.transactions[0]] == ["Create", "Put", "Create"]
    assert file.offsets() == {"a": 3, "b": 0} and all(f.done() and f.result() is None for f in futures)
    assert q.pending_count == 0 and q.acknowledged(("t", "a")) is not None and q.empty()


async def test_a_write_behind_joins_the_one_still_queued_but_never_one_in_flight() -> None:
    q, file = queue(), File()
    file.rows[("t", "a")] = rec("a", 0)
    first = q.acknowledge(rec("a", 1), 0, T0)
    assert first is not None and q.acknowledge(rec("a", 2), 1, T0) is None  # joined: one UPDATE 0 -> 2
    assert first.prev_offset == 0 and first.record.offset == 2 and q.pending_record(("t", "a")) is first.record
    retry, new = q.take()  # in flight now: a newer write-behind gets a write of its own
    third = q.acknowledge(rec("a", 3), 2, T0)
    assert third is not None and third is not first
    assert q.pending_record(("t", "a")) is third.record and q.known(("t", "a")) is third.record
    await q.commit(retry, new, file.attempt)
    assert q.pending_record(("t", "a")) is third.record  # the newer one is still pending
    await turn(q, file)
    assert file.offsets() == {"a": 3} and q.pending_count == 0 and q.known(("t", "a")).offset == 3


async def test_a_read_waits_for_the_newest_write_and_sees_an_expire_queued() -> None:
    q, file, loop = queue(), File(), asyncio.get_running_loop()
    d = Delete(("t", "a"), T0)
    future = waited(loop, d)
    q.enqueue(d)
    assert q.unsettled(("t", "a")) is future and q.known(("t", "a")) is None and q.touched(("t", "a"))
    await turn(q, file)
    assert q.unsettled(("t", "a")) is None and not q.touched(("t", "a"))
    q.enqueue(Expire(("t", "b"), at=T0 + 5))
    assert q.expiring(("t", "b")) == T0 + 5 and q.known(("t", "b")) is None


# -- failure, retry and fencing ---------------------------------------------------------------------------
async def test_a_failed_write_behind_fences_its_session_until_it_is_stored() -> None:
    q, file, loop = queue(), File(), asyncio.get_running_loop()
    file.rows[("t", "a")] = rec("a", 0)
    file.rows[("t", "b")] = rec("b", 0)
    q.acknowledge(rec("a", 1), 0, T0)
    waiting = Put(("t", "b"), rec("b", 1), 0, T0)
    answer = waited(loop, waiting)
    q.enqueue(waiting)
    file.refuse = full_disk()
    await turn(q, file)
    assert q.failure == "OSError" and q.retrying == 1 and q.is_fenced(("t", "a"))
    with pytest.raises(Unavailable, match=r"is fenced: .* until that write is stored"):
        q.check_fence(("t", "a"))
    assert isinstance(answer.exception(), Unavailable)  # the waiting caller: refused, nothing applied
    assert q.pending_record(("t", "a")).offset == 1  # still acknowledged
    assert q.write_lag(T0 + 2) == 2.0
    await turn(q, file)  # still full: retried again, still fenced
    assert q.is_fenced(("t", "a")) and file.offsets() == {"a": 0, "b": 0}
    file.refuse = lambda batch: None
    await turn(q, file)
    assert file.offsets() == {"a": 1, "b": 0} and not q.fenced_count and q.failure is None
    assert q.pending_count == 0 and q.known(("t", "a")).offset == 1


async def test_other_sessions_go_on_while_a_retried_write_cannot_be_stored() -> None:
    """A retried write and a later write of its session stay together, in order; the others go alone."""
    q, file, loop = queue(), File(), asyncio.get_running_loop()
    for sid in "ab":
        file.rows[("t", sid)] = rec(sid, 0)
    q.acknowledge(rec("a", 1), 0, T0)
    file.refuse = full_disk()
    await turn(q, file)
    assert q.is_fenced(("t", "a"))
    b = Put(("t", "b"), rec("b", 1), 0, T0)
    answer = waited(loop, b)
    q.enqueue(b)
    file.refuse = full_disk({("t", "a")})  # only a's write cannot be stored
    await turn(q, file)
    assert [len(t) for t in file.transactions[-2:]] == [2, 1]  # both, then b's alone
    assert answer.done() and answer.result() is None and file.offsets() == {"a": 0, "b": 1}
    assert q.is_fenced(("t", "a")) and q.retrying == 1
    file.refuse = lambda batch: None
    await turn(q, file)
    assert file.offsets() == {"a": 1, "b": 1} and not q.fenced_count


async def test_a_write_behind_that_can_never_be_stored_fences_for_good_and_its_batch_goes_on() -> None:
    q, file = queue(), File()
    for sid in "abc":
        file.rows[("t", sid)] = rec(sid, 0)
    for sid in "abc":
        q.acknowledge(rec(sid, 1), 0, T0)

    def refuse(batch: list[Write]) -> Failed | None:  # b's record cannot be stored, whatever the disk
        bad = any(isinstance(w, Put) and w.key == ("t", "b") for w in batch)
        return Failed(ValueError("cannot bind"), transient=False) if bad else None

    file.refuse = refuse
    await turn(q, file)
    assert file.offsets() == {"a": 1, "b": 0, "c": 1}  # one by one: a and c stored
    with pytest.raises(Unavailable, match="refused rather than served from an older state"):
        q.check_fence(("t", "b"))
    assert q.pending_count == 0 and q.retrying == 0


async def test_a_conflict_behind_an_acknowledgement_fences_rather_than_serving_the_older_row() -> None:
    q, file = queue(), File()
    file.rows[("t", "a")] = rec("a", 5)  # not the offset the write-behind was acknowledged from
    q.acknowledge(rec("a", 1), 0, T0)
    await turn(q, file)
    with pytest.raises(Unavailable, match="StoreConflict"):
        q.check_fence(("t", "a"))
    assert q.pending_count == 0 and q.acknowledged(("t", "a")) is None


# -- bounds --------------------------------------------------------------------------------------------------
async def test_the_pending_map_and_the_cache_keep_their_bounds() -> None:
    q, file = queue(max_pending=3, cache_size=2), File()
    for i in range(3):
        file.rows[("t", f"s{i}")] = rec(f"s{i}", 0)
        assert q.has_room(("t", f"s{i}"))
        q.acknowledge(rec(f"s{i}", 1), 0, T0)
    assert not q.has_room(("t", "s9")) and q.has_room(("t", "s0"))  # a session already pending joins
    await turn(q, file)
    assert q.pending_count == 0 and q.cached_count == 2  # the LRU kept the last two stored


async def test_a_sweep_forgets_the_cached_records_it_expired() -> None:
    q, file, loop = queue(), File(), asyncio.get_running_loop()
    q.remember(rec("old", 0, ttl=1))
    q.remember(rec("new", 0, ttl=3600))
    sweep = Sweep(at=T0 + 10)
    waited(loop, sweep)
    q.enqueue(sweep)
    await turn(q, file)
    assert q.acknowledged(("t", "old")) is None and q.acknowledged(("t", "new")) is not None


# -- nothing acknowledged lost ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
async def test_random_traffic_and_failures_lose_nothing_acknowledged(seed: int) -> None:
    """Puts of a few sessions (write-behinds, or waited for while the store fails, as SqliteStore does),
    turns of the writer that fail at random (a full disk): at every step each session reads (pending, else
    cached, else the file) as its last acknowledged record, and once the disk has room again the file
    holds exactly those."""
    rng, q, file, loop = random.Random(seed), queue(max_pending=3), File(), asyncio.get_running_loop()
    acked: dict[str, int] = {}
    waiting: dict[str, asyncio.Future[None]] = {}
    for sid in "abcde":
        file.rows[("t", sid)] = rec(sid, 0)
        acked[sid] = 0
    for _ in range(200):
        sid = rng.choice("abcde")
        key = ("t", sid)
        if rng.random() < 0.6 and not q.is_fenced(key) and sid not in waiting:
            if q.failure is not None:  # while the store fails, a put waits for its commit
                put = Put(key, rec(sid, acked[sid] + 1), acked[sid], T0)
                waiting[sid] = waited(loop, put)
                q.enqueue(put)
            elif q.has_room(key):
                q.acknowledge(rec(sid, acked[sid] + 1), acked[sid], T0)
                acked[sid] += 1
        else:
            file.refuse = full_disk() if rng.random() < 0.4 else (lambda batch: None)
            await turn(q, file)
            for sid, future in list(waiting.items()):
                assert future.done()
                acked[sid] += future.exception() is None
                del waiting[sid]
        for sid, offset in acked.items():
            seen = q.acknowledged(("t", sid)) or file.rows[("t", sid)]
            assert seen.offset == offset, (sid, seen.offset, offset)
    file.refuse = lambda batch: None
    probe = Probe(at=T0)  # what SqliteStore.ping queues while the store fails
    waited(loop, probe)
    q.enqueue(probe)
    while not q.empty():
        await turn(q, file)
    for sid, future in waiting.items():
        acked[sid] += future.exception() is None
    assert file.offsets() == acked and q.pending_count == 0 and not q.fenced_count and q.failure is None


# -- the rules themselves --------------------------------------------------------------------------------------
async def test_a_transaction_that_answers_for_fewer_writes_than_it_was_given_is_caught() -> None:
    q = queue()
    q.acknowledge(rec("a", 1), 0, T0)
    q.acknowledge(rec("b", 1), 0, T0)

    async def short(batch: list[Write]) -> Outcome:
        return [None]  # one result for two writes: b's write would be neither stored nor refused

    retry, new = q.take()
    with pytest.raises(AssertionError):
        await q.commit(retry, new, short)
