"""Store URLs for Redis: one, Sentinel, Cluster; malformed ones refused without their password."""

from __future__ import annotations

import pytest

from service.store import open_store, redact_url
from service.store.redis_url import parse

PASSWORD = "pw-3c2b1a"


def test_the_three_kinds() -> None:
    assert parse("redis://h:6379/0").kind == "single"
    s = parse(f"redis+sentinel://:{PASSWORD}@s1:26379,[::1]:26380/recur?db=2&sentinel_password=x")
    assert (s.kind, s.hosts, s.service, s.db, s.password) == ("sentinel", [("s1", 26379), ("::1", 26380)], "recur", 2,
                                                              PASSWORD)
    assert s.params == {"sentinel_password": "x"}
    c = parse("redis+cluster://u:p%40ss@n1:7000,n2:7001/?buckets=64")
    assert (c.kind, c.hosts, c.username, c.password, c.params) == ("cluster", [("n1", 7000), ("n2", 7001)], "u",
                                                                   "p@ss", {"buckets": "64"})


@pytest.mark.parametrize("url, words", [
    ("redis+sentinel://s1:26379/", "needs the service name"),
    ("redis+sentinel://s1/recur", "expected HOST:PORT"),
    ("redis+cluster://n1:7000/0", "takes no database"),
    ("redis+cluster://n1:7000/?db=1", r"unknown redis\+cluster parameter"),
    ("redis+foo://n1:7000/", "expected redis://"),
])
def test_malformed_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse(url)


async def test_open_store_names_the_url_redacted() -> None:
    with pytest.raises(ValueError) as e:
        await open_store(f"redis+sentinel://:{PASSWORD}@s1:x/recur", durability="sync", memory_capacity=1,
                         cache_size=1, async_window=0.05, tombstone_seconds=1)
    assert PASSWORD not in str(e.value) and ":***@" in str(e.value)
    with pytest.raises(ValueError, match="redis store only"):
        await open_store("memory:", durability="sync", memory_capacity=1, cache_size=1, async_window=0.05,
                         tombstone_seconds=1, redis_min_replicas=1)
    with pytest.raises(ValueError, match="wait-timeout"):
        await open_store("redis://127.0.0.1:1/0", durability="sync", memory_capacity=1, cache_size=1,
                         async_window=0.05, tombstone_seconds=1, redis_min_replicas=1, redis_wait_timeout=0)


def test_a_sentinel_password_is_redacted() -> None:
    url = f"redis+sentinel://:{PASSWORD}@s1:26379,s2:26379/recur?sentinel_password={PASSWORD}"
    assert PASSWORD not in redact_url(url)
    assert redact_url(url) == "redis+sentinel://:***@s1:26379,s2:26379/recur?sentinel_password=***"
