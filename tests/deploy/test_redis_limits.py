"""The Redis store against a real redis-server: session limits that hold under concurrency (counted
by the scripts, never by SCAN), counters right after deletes and expiry, health that follows
Redis going away and coming back, and a password that never reaches a client or a log."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis as sync_redis
from grpc_health.v1 import health, health_pb2
from redis._parsers.encoders import Encoder

from recur.client import RecurClient
from service.errors import LimitExceeded, SessionExpired, SessionNotFound, StoreConflict, Unavailable
from service.store.base import SessionRecord
from service.store.record import to_hash
from service.store.redis import PUT_SESSIONS, RedisStore
from service.transport.health import watch_store
from tests.helpers import Redis, Server

PASSWORD = "pw-9f8e7d6c5b4a"


def _rec(sid: str, tenant: str = "t", ttl: float = 3600, offset: int = 0) -> SessionRecord:
    t = time.time()
    return SessionRecord(tenant=tenant, session_id=sid, model="m", version=1, offset=offset, created_at=t, updated_at=t,
                         ttl=ttl, state=[np.full((2, 4), offset, np.float32)])


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    r = Redis(tmp_path).start()
    yield r
    r.kill()


async def test_64_concurrent_creates_at_a_limit_of_100_store_exactly_100(redis: Redis) -> None:
    store = RedisStore(redis.url)
    try:
        for i in range(50):
            await store.create(_rec(f"old{i}"), max_sessions=100)
        results = await asyncio.gather(*(store.create(_rec(f"new{i}"), max_sessions=100) for i in range(64)),
                                       return_exceptions=True)
        refused = [r for r in results if r is not None]
        assert len(refused) == 14 and all(isinstance(r, LimitExceeded) for r in refused)
        assert "the server holds its limit of 100 sessions; delete sessions or raise --max-sessions" in str(refused[0])
        assert await store.count() == 100 and await store.count("t") == 100
        # per tenant, concurrently, beside the global limit
        results = await asyncio.gather(*(store.create(_rec(f"u{i}", tenant="u"), max_sessions=200,
                                                      max_tenant_sessions=7) for i in range(30)),
                                       return_exceptions=True)
        assert sum(r is None for r in results) == 7
        assert "tenant 'u' holds its limit of 7 sessions" in str(next(r for r in results if r is not None))
        assert (await store.count(), await store.count("u")) == (107, 7)
    finally:
        await store.close()


async def test_a_thousand_writes_at_once_wait_for_their_turn(redis: Redis) -> None:
    """More operations at once than redis-py's pool has connections (100): they wait, none is refused."""
    store = RedisStore(redis.url)
    try:
        await asyncio.gather(*(store.create(_rec(f"c{i}")) for i in range(1000)))
        results = await asyncio.gather(*(store.put(_rec(f"c{i}", offset=1), prev_offset=0) for i in range(1000)),
                                       return_exceptions=True)
        assert results == [None] * 1000
        got = await asyncio.gather(*(store.fresh("t", f"c{i}") for i in range(1000)))
        assert {r.offset for r in got} == {1} and await store.count() == 1000
    finally:
        await store.close()


async def test_a_round_of_puts_stores_each_hash_as_a_record_writes_it(redis: Redis) -> None:
    """put_many over more sessions than one put script takes: every hash holds, field by field, the bytes
    redis-py would have sent for to_hash's pairs (the write id the one the store keeps as its hint's), and a
    session refused in the middle of a script (deleted; advanced elsewhere) leaves the others applied."""
    store = RedisStore(redis.url)
    n = PUT_SESSIONS + 6
    try:
        await asyncio.gather(*(store.create(_rec(f"p{i}")) for i in range(n)))
        recs = [_rec(f"p{i}", offset=3).copy(last_digest=bytes([i]) * 32, last_start=0, last_request=f"req-é{i}",
                                             last_logits=np.arange(6, dtype=np.float32).reshape(3, 2) * i,
                                             last_prev_state=[np.full((2, 4), -i, np.float32)]) for i in range(n)]
        await store.delete("t", "p3")
        writes = [(r, 0) for r in recs]
        writes[PUT_SESSIONS + 1] = (recs[PUT_SESSIONS + 1], 2)  # read at another offset: it is at 0
        results = await store.put_many(writes)
        assert isinstance(results[3], SessionNotFound)
        conflict = results[PUT_SESSIONS + 1]
        assert isinstance(conflict, StoreConflict) and conflict.actual == 0
        applied = [i for i in range(n) if i not in (3, PUT_SESSIONS + 1)]
        assert [results[i] for i in applied] == [None] * len(applied)
        raw, wire = sync_redis.Redis(port=redis.port), Encoder("utf-8", "strict", False)
        for i in applied:
            stored = raw.hgetall(f"recur:t:s:p{i}")
            pairs = to_hash(recs[i], stored[b"wid"])
            assert stored == {wire.encode(k): wire.encode(v) for k, v in zip(pairs[::2], pairs[1::2])}
            assert (await store.get("t", f"p{i}")).token == stored[b"wid"]
        assert raw.hget(f"recur:t:s:p{PUT_SESSIONS + 1}", "offset") == b"0" and not raw.exists("recur:t:s:p3")
    finally:
        await store.close()


async def test_counters_stay_right_after_delete_and_expiry(redis: Redis) -> None:
    store = RedisStore(redis.url, tombstone_seconds=60)
    try:
        for i in range(10):
            await store.create(_rec(f"s{i}"), max_sessions=20)
        for i in range(5):
            await store.create(_rec(f"short{i}", ttl=0.3), max_sessions=20)
        assert await store.count() == 15
        for i in range(4):
            await store.delete("t", f"s{i}")
        with pytest.raises(SessionNotFound):
            await store.delete("t", "s0")
        assert await store.count() == 11
        await store.put(_rec("s5", offset=3).copy(last_prev_state=[np.ones((2, 4), np.float32)]), prev_offset=0)
        got = await store.get("t", "s5")
        assert got.offset == 3 and got.last_prev_state is not None and got.last_prev_state[0][0, 0] == 1
        await asyncio.sleep(0.5)  # Redis expired the short ones; no script ran
        assert await store.count() == 6 and await store.count("t") == 6
        with pytest.raises(SessionExpired, match="expired at"):
            await store.get("t", "short0")
        for i in range(14):  # the expired ones make room: exactly 20 again
            await store.create(_rec(f"more{i}"), max_sessions=20)
        with pytest.raises(LimitExceeded):
            await store.create(_rec("one-too-many"), max_sessions=20)
        assert await store.count() == 20
        for key in (b"recur-live", b"recur-live:t"):  # the trim left only live members
            assert await store._r.zcard(key) == 20
    finally:
        await store.close()


async def test_health_follows_redis_away_and_back(redis: Redis, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(redis.url, timeout=0.5)
    servicer = health.aio.HealthServicer()
    names = ["recur.v1.Recur"]

    async def status(name: str) -> int:
        return (await servicer.Check(health_pb2.HealthCheckRequest(service=name), None)).status

    async def until(expected: int) -> None:
        deadline = time.monotonic() + 15
        while not all([await status(n) == expected for n in ["", *names]]):
            assert time.monotonic() < deadline, f"health did not become {expected}"
            await asyncio.sleep(0.05)

    for name in names:  # as the server does at start
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watcher = asyncio.create_task(watch_store(store, servicer, names, interval=0.1))
    try:
        await until(health_pb2.HealthCheckResponse.SERVING)
        redis.kill()
        await until(health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(Unavailable, match="unreachable"):
            await store.get("t", "x")
        redis.start()  # same port
        await until(health_pb2.HealthCheckResponse.SERVING)
        await store.create(_rec("back"))
    finally:
        watcher.cancel()
        await store.close()
    transitions = [r.getMessage() for r in caplog.records if r.name == "service.transport.health"]
    assert any("NOT_SERVING" in m for m in transitions) and any("SERVING again" in m for m in transitions)


async def test_the_password_never_leaks_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="service")
    r = Redis(tmp_path, password=PASSWORD).start()
    store = RedisStore(r.url, timeout=0.5)
    try:
        await store.create(_rec("a"))
        assert PASSWORD not in repr(store)
        r.kill()
        messages = []
        for call in (store.fresh("t", "a"), store.get("t", "b"), store.put(_rec("a", offset=1), 0),
                     store.create(_rec("b")), store.count(), store.ping(), store.delete("t", "a")):
            with pytest.raises(Unavailable) as e:
                await call
            messages.append(str(e.value))
        assert all("session store" in m and PASSWORD not in m for m in messages)
        logged = [rec.getMessage() for rec in caplog.records]
        assert logged and all(PASSWORD not in m for m in logged)
        assert any(":***@" in m for m in logged)  # the URL is there, redacted
    finally:
        r.kill()
        await store.close()


def test_the_password_never_leaks_from_a_server(tiny_models: Path, tmp_path: Path) -> None:
    r = Redis(tmp_path, password=PASSWORD).start()
    server = Server(tiny_models, r.url)
    try:
        server.start()
        with RecurClient(server.target) as c:
            sid = c.create("gru-lm").session_id
            c.step(sid, tokens=[1, 2, 3])
            r.kill()
            details = []
            for call in (lambda: c.step(sid, tokens=[4]), lambda: c.get(sid), lambda: c.create("gru-lm")):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
                details.append(e.value.details())
        assert all("session store" in d and PASSWORD not in d for d in details), details
    finally:
        server.kill()
        r.kill()
    log = "".join(server.log)
    assert ":***@" in log and PASSWORD not in log  # the store named, its password redacted


def test_recur_healthcheck_follows_the_store(tiny_models: Path, redis: Redis) -> None:
    """Through the server: `python -m recur.healthcheck` fails while Redis is down, passes once it is back."""
    server = Server(tiny_models, redis.url, ["--health-interval", "0.2"]).start()

    def healthy() -> bool:
        done = subprocess.run([sys.executable, "-m", "recur.healthcheck", server.target], capture_output=True,
                              timeout=30)
        return done.returncode == 0

    def until(expected: bool) -> None:
        deadline = time.monotonic() + 20
        while healthy() != expected:
            assert time.monotonic() < deadline, f"healthcheck did not become {'healthy' if expected else 'unhealthy'}"
            time.sleep(0.2)

    try:
        until(True)
        redis.kill()
        until(False)
        redis.start()
        until(True)
    finally:
        server.kill()
