"""The two Redis overrides validate with the compose file and describe the topologies the tests run
with local processes (test_redis_sentinel, test_redis_cluster): a primary, a replica and three
sentinels with quorum 2 that the replicas reach through redis+sentinel:// with
--redis-min-replicas 1; six cluster nodes joined as three primaries with a replica each."""

from __future__ import annotations

from service.store.redis_url import parse
from tests.helpers import compose_config


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_sentinel_override() -> None:
    services = compose_config("docker-compose.yml", "docker-compose.ha.yml")["services"]
    replica_redis = services["redis-replica"]["command"]
    assert _flag(replica_redis, "--replicaof") == "redis" and "6379" in replica_redis
    sentinels = [name for name in services if name.startswith("sentinel-")]
    assert len(sentinels) == 3
    for name in sentinels:
        script = services[name]["command"][-1]
        assert "'sentinel monitor recur redis 6379 2'" in script and "resolve-hostnames yes" in script
        assert services[name]["depends_on"]["redis-replica"]["condition"] == "service_healthy"
    cmd = services["replica"]["command"]
    url = parse(_flag(cmd, "--store"))
    assert url.kind == "sentinel" and url.service == "recur"
    assert sorted(url.hosts) == [(name, 26379) for name in sorted(sentinels)]
    assert _flag(cmd, "--redis-min-replicas") == "1" and _flag(cmd, "--durability") == "sync"
    assert all(services["replica"]["depends_on"][s]["condition"] == "service_healthy" for s in sentinels)


def test_the_cluster_override() -> None:
    services = compose_config("docker-compose.yml", "docker-compose.cluster.yml")["services"]
    nodes = ["redis", *(f"redis-{i}" for i in range(2, 7))]
    for name in nodes:
        cmd = services[name]["command"]
        assert _flag(cmd, "--cluster-enabled") == "yes" and _flag(cmd, "--appendonly") == "yes"
        assert services[name]["healthcheck"]["test"][-1] == "ping"
    init = services["redis-cluster-init"]
    script = init["command"][-1]
    assert "--cluster-replicas 1" in script and all(f" {n} " in f" {script.split('for n in ')[1].split(';')[0]} "
                                                    for n in nodes)
    assert set(init["depends_on"]) == set(nodes)
    cmd = services["replica"]["command"]
    url = parse(_flag(cmd, "--store"))
    assert url.kind == "cluster" and {h for h, _ in url.hosts} <= set(nodes)
    assert services["replica"]["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
