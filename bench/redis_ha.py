"""Redis beyond one process, measured: what a chunk costs Redis on one Redis and on a 3-primary
cluster (operations and Redis CPU per chunk, memory per session), throughput of two recur replicas
on 1 and on 3 cluster primaries, and failover as clients see it (Sentinel, cluster), with and without
--redis-min-replicas. All Redis processes are local (redis-server, redis-sentinel mode), started here.

    python -m bench.redis_ha [--only ops,throughput,failover] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.run import ROOT, Process, Result, _drive, _sequences, machine, recur_server, write_section
from service.store.redis_cluster import ClusterStore
from tests.helpers import Fed, RedisCluster, RedisNode, RedisSentinels, feed, until, wait_linked

S = 1024
BUDGET = 20.0


def _drained(server: Process) -> Process:
    """A server whose log is read (and dropped) as it comes: a failover's warnings would fill the pipe
    and stop the server."""
    assert server.proc.stdout is not None
    threading.Thread(target=server.proc.stdout.read, daemon=True).start()
    return server


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((w.split("=")[1] for w in out.split() if w.startswith("v=")), "?")


def _primaries(nodes: list[RedisNode]) -> list[RedisNode]:
    return [n for n in nodes if n.proc and n.proc.poll() is None and n.role() == "master"]


def _counters(nodes: list[RedisNode]) -> tuple[int, float, int]:
    """Commands processed, CPU seconds and bytes used, summed over the primaries."""
    ops = cpu = mem = 0.0
    for n in _primaries(nodes):
        stats, cpu_info, memory = n.info("stats"), n.info("cpu"), n.info("memory")
        ops += int(stats["total_commands_processed"])
        cpu += float(cpu_info["used_cpu_user"]) + float(cpu_info["used_cpu_sys"])
        mem += int(memory["used_memory"])
    return int(ops), cpu, int(mem)


async def _measured(servers: list[Process], seqs: list[np.ndarray], chunk: int, api: str,
                    nodes: list[RedisNode]) -> tuple[list[Result], tuple[int, float, int]]:
    """Each server driven with its sequences at once; and the Redis counters when the first window opened."""
    marks: list[tuple[int, float, int]] = []

    def mark() -> None:
        marks.append(_counters(nodes))

    results = await asyncio.gather(*(_drive(s, q, chunk, api, check=1, budget=BUDGET, on_start=mark)
                                     for s, q in zip(servers, seqs)))
    return list(results), marks[0]


def ops_and_cpu(tmp: Path) -> tuple[list[tuple], dict[str, float]]:
    """Per store (one Redis, a 3-primary cluster) and per API and C: tokens/s, Redis operations and
    Redis CPU per chunk, Redis memory per session."""
    rows: list[tuple] = []
    per_session: dict[str, float] = {}
    for store in ("redis", "cluster"):
        if store == "redis":
            node = RedisNode(tmp / "single").start()
            nodes, url, stop = [node], f"redis://127.0.0.1:{node.port}/0", node.kill
        else:
            cluster = RedisCluster(tmp / "cluster3", primaries=3, replicas=0).start()
            nodes, url, stop = cluster.nodes, cluster.url, cluster.stop
        server = _drained(recur_server(url))
        try:
            for api in ("packed", "stream"):
                for chunk in (1, 16):
                    seqs = _sequences(S, 256 if chunk == 1 else 512, seed=chunk)
                    before_create = _counters(nodes)
                    [r], (ops0, cpu0, _) = asyncio.run(_measured([server], [seqs], chunk, api, nodes))
                    ops, cpu, mem = _counters(nodes)
                    per_session[f"{store} C={chunk}"] = (mem - before_create[2]) / S
                    rows.append((store, api, chunk, r.rate, (ops - ops0) / r.chunks, 1e6 * (cpu - cpu0) / r.chunks,
                                 r.chunks / r.seconds))
                    print(rows[-1], flush=True)
        finally:
            server.stop()
            stop()
    return rows, per_session


def creates(tmp: Path, n: int = 300) -> list[tuple]:
    """Milliseconds per create, one store in process, one at a time: one Redis and a 3-primary cluster,
    without a limit and with --max-sessions set (the cluster then counts the other buckets first)."""
    from service.store.base import SessionRecord
    from service.store.redis import RedisStore

    async def run(url: str, limit: int, tag: str) -> float:
        store = RedisStore(url)
        state = [np.zeros((2, 1, 256), np.float32)] * 2
        t = time.time()

        def record(sid: str) -> SessionRecord:
            return SessionRecord(tenant="t", session_id=sid, model="m", version=1, offset=0, created_at=t,
                                 updated_at=t, ttl=3600, state=state)

        try:
            await store.create(record(f"{tag}-warm"), max_sessions=limit)
            start = time.perf_counter()
            for i in range(n):
                await store.create(record(f"{tag}{i}"), max_sessions=limit)
            return 1e3 * (time.perf_counter() - start) / n
        finally:
            await store.close()

    rows = []
    node = RedisNode(tmp / "creates-single").start()
    cluster = RedisCluster(tmp / "creates-cluster", primaries=3, replicas=0)
    try:
        cluster.start()
        for name, url in (("redis", f"redis://127.0.0.1:{node.port}/0"), ("cluster", cluster.url)):
            rows.append((name, asyncio.run(run(url, 0, "n")), asyncio.run(run(url, 1_000_000, "l"))))
            print(rows[-1], flush=True)
    finally:
        node.kill()
        cluster.stop()
    return rows


def wait_cost(tmp: Path) -> list[tuple]:
    """One replica on a primary with one Redis replica, --redis-min-replicas 0 and then 1: what WAIT
    adds to a chunk (S = 256; packed C = 16 and Stream C = 1)."""
    primary = RedisNode(tmp / "wait-primary").start()
    replica = RedisNode(tmp / "wait-replica", ["--replicaof", "127.0.0.1", str(primary.port)]).start()
    rows = []
    try:
        wait_linked([primary, replica])
        url = f"redis://127.0.0.1:{primary.port}/0"
        for api, chunk in (("packed", 16), ("stream", 1)):
            for n in (0, 1):
                server = _drained(recur_server(url, "--redis-min-replicas", str(n)))
                try:
                    seqs = _sequences(256, 512 if chunk == 16 else 256, seed=chunk)
                    r = asyncio.run(_drive(server, seqs, chunk, api, check=1, budget=BUDGET))
                finally:
                    server.stop()
                rows.append((api, chunk, n, r.rate, r.p(50), r.p(99)))
                print(rows[-1], flush=True)
    finally:
        replica.kill()
        primary.kill()
    return rows


def throughput(tmp: Path) -> list[tuple]:
    """Two recur replicas, 256 sessions each, packed C = 16, on a cluster of 1 and of 3 primaries, in
    two alternating rounds (the spread says what one run is worth on a shared machine)."""
    rows = []
    for k, primaries in enumerate((1, 3, 1, 3)):
        cluster = RedisCluster(tmp / f"tp{k}", primaries=primaries, replicas=0)
        servers: list[Process] = []
        try:
            cluster.start()
            servers = [_drained(recur_server(cluster.url)) for _ in range(2)]
            seqs = [_sequences(256, 512, seed=i) for i in range(2)]
            results, (_, cpu0, _) = asyncio.run(_measured(servers, seqs, 16, "packed", cluster.nodes))
            _, cpu, _ = _counters(cluster.nodes)
            seconds = max(r.seconds for r in results)
            chunks = sum(r.chunks for r in results)
            rows.append((primaries, sum(r.tokens for r in results) / seconds, chunks / seconds,
                         1e6 * (cpu - cpu0) / chunks))
            print(rows[-1], flush=True)
        finally:
            for s in servers:
                s.stop()
            cluster.stop()
    return rows


class _Topology:
    """A Sentinel-managed primary with two replicas, or a 3-primary cluster with two replicas each:
    `kill` SIGKILLs a primary that serves sessions, `restore` waits for the failover and brings the
    killed node back as a replica."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.sentinels = RedisSentinels(directory, replicas=2).start() if kind == "sentinel" else None
        self.cluster = RedisCluster(directory, primaries=3, replicas=2).start() if kind == "cluster" else None
        self.victim: RedisNode | None = None

    @property
    def url(self) -> str:
        return self.sentinels.url if self.sentinels else self.cluster.url  # type: ignore[union-attr]

    @property
    def nodes(self) -> list[RedisNode]:
        return self.sentinels.nodes if self.sentinels else self.cluster.nodes  # type: ignore[union-attr]

    def kill(self, session_id: str) -> None:
        if self.sentinels:
            self.victim = self.sentinels.primary()
        else:  # the primary of this session's bucket
            assert self.cluster is not None
            self.victim = self.cluster.primary_of(ClusterStore(self.cluster.url)._keys("default", session_id)[0])
        self.victim.kill()

    def restore(self) -> None:
        victim = self.victim
        assert victim is not None
        if self.sentinels:
            sentinels = self.sentinels
            until(lambda: sentinels.primary() is not victim, 30, "no failover")
        else:
            assert self.cluster is not None
            self.cluster.wait_ok()
        victim.start()
        until(lambda: victim.role() == "slave", 60, "not back as a replica")
        if self.sentinels:
            self.sentinels.settled()
        wait_linked(self.nodes)

    def stop(self) -> None:
        for group in (self.sentinels, self.cluster):
            if group is not None:
                group.stop()


def _one_failover(target: str, topology: _Topology, losses: bool) -> tuple[float, int]:
    from recur.client import RecurClient

    rng = np.random.default_rng(int(time.time()))
    with RecurClient(target) as c:
        sequences = {c.create("pylm").session_id: rng.integers(0, 90, 150) for _ in range(16)}
    fed = Fed()
    feeder = threading.Thread(target=feed, args=(target, sequences, 3, fed), kwargs={"pause": 0.01, "losses": losses})
    feeder.start()
    until(lambda: sum(len(a) for a in fed.acked.values()) >= 64, 60, "the stream did not start")
    killed_at = time.monotonic()
    topology.kill(next(iter(sequences)))
    feeder.join(180)
    topology.restore()
    if fed.failures:
        raise AssertionError(fed.failures[:3])
    return fed.gap_over(killed_at), len(fed.lost)


def failover(tmp: Path, runs: int) -> list[tuple]:
    rows = []
    for kind in ("sentinel", "cluster"):
        for min_replicas in (0, 1):
            topology = _Topology(kind, tmp / f"{kind}{min_replicas}")
            server = _drained(recur_server(topology.url, "--redis-min-replicas", str(min_replicas),
                                           "--redis-wait-timeout", "0.5"))
            gaps, lost = [], 0
            try:
                for _ in range(runs):
                    gap, n = _one_failover(f"127.0.0.1:{server.port}", topology, losses=min_replicas == 0)
                    gaps.append(gap)
                    lost += n
                    print(kind, min_replicas, round(gap, 2), n, flush=True)
            finally:
                server.stop()
                topology.stop()
            rows.append((kind, min_replicas, statistics.median(gaps), max(gaps), lost, runs))
    return rows


def main() -> None:
    global S, BUDGET  # one run's settings, read by the measurements
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="ops,throughput,failover,wait")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=S, help="S of the cost rows")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds a row")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    S, BUDGET = args.sessions, args.budget
    only = set(args.only.split(","))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [f"## Redis beyond one process\n\nMeasured {started} on {machine()}, Redis "
             f"{_redis_version()}, every Redis process on the same machine (append-only, fsync every second). "
             f"Command: `python -m bench.redis_ha` (sections: --only {args.only}).\n"]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "ops" in only:
            rows, per_session = ops_and_cpu(tmp)
            parts.append(
                f"\n### What a chunk costs Redis\n\nOne replica, S = {S:,} sessions of pylm, over the packed batch "
                "(StreamPacked, groups of 32) and Stream, full logits returned, "
                f"{BUDGET:.0f} s a row. Redis operations and CPU are summed over the primaries (INFO stats, INFO cpu) "
                "over the measured window and divided by the chunks answered; Redis counts the commands a script runs "
                "as commands too (a put: EVALSHA and the 7 it runs), while the replica sends one EVALSHA per chunk "
                "(a packed message's in one pipeline).\n\n"
                "| store | API | C | tokens/s | chunks/s | Redis commands per chunk | Redis CPU µs per chunk |\n"
                "|---|---|---:|---:|---:|---:|---:|\n"
                + "\n".join(f"| {s} | {a} | {c} | {rate:,.0f} | {cps:,.0f} | {ops:.2f} | {cpu:.1f} |"
                            for s, a, c, rate, ops, cpu, cps in rows)
                + "\n\nRedis memory per session (used_memory after creating and feeding S sessions, over S): "
                + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in per_session.items()) + ".\n")
            single16 = max(cpu for s, a, c, _, _, cpu, _ in rows if s == "cluster" and c == 1)
            kib = max(per_session.values()) / 1024
            parts.append(_paper(single16, kib))
            rows = creates(tmp)
            parts.append("\nCreating a session (one store, one create at a time, 300 creates; ms each):\n\n"
                         "| store | no limit | --max-sessions set |\n|---|---:|---:|\n"
                         + "\n".join(f"| {name} | {free:.2f} | {limited:.2f} |" for name, free, limited in rows)
                         + "\n")
        if "throughput" in only:
            rows = throughput(tmp)
            parts.append(
                "\n### Two replicas on 1 and on 3 cluster primaries\n\nTwo `recur serve` processes, 256 sessions "
                "each, packed C = 16, two alternating rounds.\n\n"
                "| primaries | tokens/s | chunks/s | Redis CPU µs per chunk |\n"
                "|---:|---:|---:|---:|\n"
                + "\n".join(f"| {p} | {rate:,.0f} | {cps:,.0f} | {cpu:.1f} |" for p, rate, cps, cpu in rows) + "\n")
        if "failover" in only:
            rows = failover(tmp, args.runs)
            parts.append(
                f"\n### Failover as clients see it\n\nSIGKILL of the primary serving part of 16 sessions fed by "
                "Step, 3 tokens a chunk, every 10 ms, through one replica; the time is the longest any session "
                "waited for an acknowledgement across the kill (retries of UNAVAILABLE every 20 ms included). "
                "Sentinel: a primary, two replicas, three sentinels, down-after 1 s. Cluster: 3 primaries with two "
                f"replicas each, node timeout 1 s. {args.runs} runs each; the killed node is brought back as a "
                "replica between runs. Lost: chunks acknowledged and then missing on the promoted primary "
                "(over all runs).\n\n| topology | --redis-min-replicas | p50 s | max s | lost |\n"
                "|---|---:|---:|---:|---:|\n"
                + "\n".join(f"| {t} | {m} | {p50:.2f} | {mx:.2f} | {lost} of {runs} runs |"
                            for t, m, p50, mx, lost, runs in rows) + "\n")
    if "wait" in only:  # its own section: measured apart from the rest
        with tempfile.TemporaryDirectory() as t:
            rows = wait_cost(Path(t))
        write_section(args.out, "## Redis: what --redis-min-replicas costs", (
            f"## Redis: what --redis-min-replicas costs\n\nMeasured {started} on {machine()}. Command: "
            "`python -m bench.redis_ha --only wait`. One replica on a Redis primary with one Redis replica (same "
            f"machine, append-only), S = 256 sessions of pylm, {BUDGET:.0f} s a row; with 1, every write and every "
            "read that is not a hint is followed by WAIT on its connection.\n\n"
            "| API | C | --redis-min-replicas | tokens/s | p50 chunk ms | p99 chunk ms |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            + "\n".join(f"| {a} | {c} | {n} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |"
                        for a, c, n, rate, p50, p99 in rows)
            + "\n"))
    if only - {"wait"}:
        write_section(args.out, "## Redis beyond one process", "".join(parts))


def _paper(cpu_us: float, kib: float) -> str:
    """One primary's capacity from the measured Redis CPU per chunk and memory per session."""
    per_core = 1e6 / cpu_us
    sessions_per_16g = 16 * 1024 * 1024 / kib
    need_cpu = math.ceil(1_000_000 / (0.7 * per_core))  # a primary kept at 70 % of its one core
    need_mem = math.ceil(1_000_000 / sessions_per_16g)
    return (f"\n**On paper.** One primary (one core: Redis runs commands on one thread) at {cpu_us:.0f} µs of CPU "
            f"per chunk (the cluster's C = 1 rows, the dearest) serves at most {per_core:,.0f} chunks/s; at 70 % "
            f"of its core, {0.7 * per_core:,.0f}. A session of pylm's size takes about {kib:.1f} KiB (its state, "
            f"the last chunk's logits for a replay, the tombstone and live-set entries), so 16 GiB of primary "
            f"memory holds about {sessions_per_16g:,.0f}. A million sessions at one chunk per second each: "
            f"{need_cpu:.0f} primaries by CPU, {need_mem:.0f} by memory (16 GiB each), so about "
            f"{max(need_cpu, need_mem):.0f} primaries (with a replica each for failover, twice the processes); "
            "the 256 buckets allow up to 256.\n")


if __name__ == "__main__":
    main()
