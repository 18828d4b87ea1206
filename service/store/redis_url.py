"""The Redis store's URLs, parsed into redis-py clients.

- `redis://[:PASSWORD@]HOST:PORT/DB` (or `rediss://`): one Redis.
- `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[?db=N&sentinel_password=P]`: the
  primary of SERVICE, found through the sentinels and followed across failovers. PASSWORD is the
  data nodes'; sentinels that require their own give it as `sentinel_password`.
- `redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/[?buckets=N]`: a Redis Cluster found from
  any of these nodes; `buckets` is the cluster layout's bucket count (service.store.redis_cluster).

Passwords stay inside the clients: every message formats the URL with redact_url.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://")


@dataclass(frozen=True)
class RedisUrl:
    kind: str  # "single", "sentinel" or "cluster"
    url: str  # as given (single: handed to redis-py's from_url)
    hosts: list[tuple[str, int]] = field(default_factory=list)
    username: str | None = None
    password: str | None = None
    service: str = ""  # sentinel: the monitored primary's name
    db: int = 0
    params: dict[str, str] = field(default_factory=dict)  # the remaining query parameters


def _hosts(netloc: str) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, not {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def parse(url: str) -> RedisUrl:
    """What a store URL names; ValueError (without the password) when it is malformed."""
    if url.startswith(("redis://", "rediss://")):
        return RedisUrl("single", url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+sentinel", "redis+cluster"):
        raise ValueError("expected redis://, rediss://, redis+sentinel:// or redis+cluster://")
    netloc, _, path_query = rest.partition("/")
    path, _, query = path_query.partition("?")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(pw) if colon else None
    params = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
    kind = scheme.removeprefix("redis+")
    known = {"sentinel": {"db", "sentinel_password", "sentinel_username"}, "cluster": {"buckets"}}[kind]
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"unknown {scheme} parameter(s) {sorted(unknown)}: expected {sorted(known)}")
    service = path.strip("/")
    if kind == "sentinel" and not service:
        raise ValueError("redis+sentinel:// needs the service name: redis+sentinel://HOST:PORT,.../SERVICE")
    if kind == "cluster" and service:
        raise ValueError("redis+cluster:// takes no database or path: redis+cluster://HOST:PORT,.../")
    return RedisUrl(kind, url, _hosts(hostlist), username, password, service, int(params.pop("db", "0")), params)


def connect(u: RedisUrl, timeout: float) -> Any:
    """A redis-py asyncio client for `u`: Redis, a Sentinel-managed primary, or RedisCluster."""
    opts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if u.kind == "single":
        import redis.asyncio as aioredis

        return aioredis.from_url(u.url, **opts)
    if u.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel_opts = {**opts, "password": u.params.get("sentinel_password"),
                         "username": u.params.get("sentinel_username")}
        sentinel = Sentinel(u.hosts, sentinel_kwargs=sentinel_opts, username=u.username, password=u.password,
                            db=u.db, **opts)
        return sentinel.master_for(u.service)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in u.hosts], username=u.username,
                        password=u.password, **opts)
