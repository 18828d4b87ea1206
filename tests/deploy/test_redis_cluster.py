"""The Redis store on a real Redis Cluster (3 primaries, each with a replica, started once for the
module): the store's contract, the single Redis's hint and exactly-once tests run again on it,
limits exact on one store and bounded across stores, one pass over every entry point through two
real servers, and streams that go on, losing and doubling nothing, while a slot is resharded and
while a primary is killed."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis as sync_redis

from recur.client import RecurClient, packed_request
from recur.kserve import grpc_service_pb2 as kpb
from recur.kserve import grpc_service_pb2_grpc
from recur.v1 import recur_pb2 as pb
from service.engine.runtime import RuntimeOptions
from service.errors import (
    AlreadyExists,
    LimitExceeded,
    SessionExpired,
    SessionNotFound,
    StoreConflict,
    Unavailable,
)
from service.repository.models import ModelRepository
from service.store.base import SessionRecord
from service.store.redis import RedisStore
from service.store.redis_cluster import ClusterStore, bucket_tags
from tests.deploy.test_redis_hints import (  # the single Redis's tests, collected again here on the cluster
    test_a_retry_on_the_first_replica_after_the_second_moved_on,
    test_alternating_replicas_equal_one_pass,
    test_deleted_and_created_again_is_never_written_from_the_old_state,
    test_generate_chains_its_writes_on_redis,
    test_packed_batches_across_replicas,
    test_scripts_survive_a_script_flush,
)
from tests.deploy.test_redis_limits import (
    test_64_concurrent_creates_at_a_limit_of_100_store_exactly_100,
    test_a_thousand_writes_at_once_wait_for_their_turn,
)
from tests.helpers import TOL, Fed, RedisCluster, Server, feed, free_port, logits_of, redis_cli, state_of, until

__all__ = [
    "test_64_concurrent_creates_at_a_limit_of_100_store_exactly_100",
    "test_a_retry_on_the_first_replica_after_the_second_moved_on",
    "test_a_thousand_writes_at_once_wait_for_their_turn",
    "test_alternating_replicas_equal_one_pass",
    "test_deleted_and_created_again_is_never_written_from_the_old_state",
    "test_generate_chains_its_writes_on_redis",
    "test_packed_batches_across_replicas",
    "test_scripts_survive_a_script_flush",
]


PASSWORD = "pw-7a6b5c4d"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


class _Url:
    """What the imported single-Redis tests read of their `redis` fixture."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.url, self.port = cluster.url, cluster.nodes[0].port


@pytest.fixture
def redis(cluster: RedisCluster) -> _Url:
    """The module's cluster, emptied: each test starts from no sessions, as on its own Redis."""
    cluster.wait_ok()
    for node in cluster.alive():
        if "master" in redis_cli(node.port, "role", timeout=5).split()[0]:
            sync_redis.Redis(port=node.port).flushall()
    return _Url(cluster)


@pytest.fixture(scope="module")
def repository(tiny_models: Path) -> ModelRepository:
    return ModelRepository.load(tiny_models, RuntimeOptions())


def _rec(sid: str, tenant: str = "t", offset: int = 0, ttl: float = 3600, model: str = "m") -> SessionRecord:
    t = time.time()
    return SessionRecord(tenant=tenant, session_id=sid, model=model, version=1, offset=offset, created_at=t,
                         updated_at=t, ttl=ttl, state=[np.full((2, 4), offset, np.float32)])


def test_bucket_tags_spread_evenly_over_the_slots() -> None:
    from redis.crc import key_slot

    for n in (1, 3, 256, 1000):
        slots = [key_slot(f"{{{t}}}".encode()) for t in bucket_tags(n)]
        assert [s * n // 16384 for s in slots] == list(range(n))


async def test_the_store_contract_on_a_cluster(redis: _Url) -> None:
    store = RedisStore(redis.url, tombstone_seconds=60)
    other = RedisStore(redis.url)
    assert isinstance(store, ClusterStore)
    try:
        for i in range(40):  # spread over buckets, so over the three primaries
            await store.create(_rec(f"s{i:02d}", model="a" if i % 2 else "b"))
        with pytest.raises(AlreadyExists):
            await other.create(_rec("s00"))
        await store.put(_rec("s01", offset=5), prev_offset=0)
        with pytest.raises(StoreConflict) as e:
            await store.put(_rec("s01", offset=9), prev_offset=0)
        assert e.value.actual == 5
        got = await other.get("t", "s01")
        assert got.offset == 5 and got.state[0][0, 0] == 5
        with pytest.raises(SessionNotFound):
            await store.get("other-tenant", "s01")
        # a hint made stale by another store fails the compare-and-set: written since it was read
        stale = await store.get("t", "s01")  # store's hint: offset 5
        await other.put(got.copy(offset=6, state=[np.zeros((2, 4), np.float32)]), prev_offset=5)
        await other.put((await other.get("t", "s01")).copy(offset=5), prev_offset=6)  # back at 5, another write
        with pytest.raises(StoreConflict, match="written since it was read"):
            await store.put(stale.copy(offset=7), prev_offset=stale.offset)
        results = await store.put_many([(_rec(f"s{i:02d}", offset=2), 0) for i in range(2, 8)] +
                                       [(_rec("s01", offset=3), 0), (_rec("nope", offset=1), 0)])
        assert results[:6] == [None] * 6
        assert isinstance(results[6], StoreConflict) and isinstance(results[7], SessionNotFound)
        many = await other.get_many("t", ["s02", "s07", "nope"])
        assert [r.offset for r in many[:2]] == [2, 2] and isinstance(many[2], SessionNotFound)
        assert (await store.count(), await store.count("t"), await store.count("u")) == (40, 40, 0)
        await store.delete("t", "s03")
        with pytest.raises(SessionNotFound):
            await other.delete("t", "s03")
        assert await other.count() == 39
        listed = await other.list_sessions("t", limit=10)
        assert [s.session_id for s in listed] == sorted(f"s{i:02d}" for i in range(40) if i != 3)[:10]
        after = await other.list_sessions("t", after_id=listed[-1].session_id, limit=100)
        assert len(listed) + len(after) == 39
        assert {s.model for s in await other.list_sessions("t", model="a", limit=100)} == {"a"}
        await store.create(_rec("short", ttl=0.3))
        await asyncio.sleep(0.5)
        with pytest.raises(SessionExpired, match="expired at"):
            await other.get("t", "short")
        assert await store.count() == 39
        await store.ping()
    finally:
        await store.close()
        await other.close()


async def test_a_cluster_laid_out_with_other_buckets_is_refused(redis: _Url) -> None:
    first = await ClusterStore(redis.url).open()
    await first.create(_rec("x"))
    other = ClusterStore(redis.url.rstrip("/") + "/?buckets=64")
    try:
        with pytest.raises(ValueError, match="laid out in 256 buckets, not 64"):
            await other.open()
    finally:
        await first.close()
        await other.close()


async def test_a_cluster_no_node_of_which_answers_is_unavailable() -> None:
    store = RedisStore(f"redis+cluster://:{PASSWORD}@127.0.0.1:{free_port()}/", timeout=0.3)
    try:
        for call in (store.create(_rec("a")), store.fresh("t", "a"), store.put(_rec("a", offset=1), 0),
                     store.count(), store.list_sessions("t"), store.delete("t", "a"), store.ping()):
            with pytest.raises(Unavailable, match="unreachable") as e:
                await call
            assert PASSWORD not in str(e.value)
        assert isinstance((await store.put_many([(_rec("a", offset=1), 0)]))[0], Unavailable)
    finally:
        await store.close()


async def test_limits_across_stores_overshoot_by_at_most_stores_minus_one(redis: _Url) -> None:
    """Three stores (three replica processes) creating at once at a limit of 60: the count ends in
    [60, 62]; the tenant limit likewise. One store alone is exact (the imported test above)."""
    stores = [RedisStore(redis.url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(stores[i % 3].create(_rec(f"n{i}"), max_sessions=60) for i in range(150)),
                                       return_exceptions=True)
        assert all(r is None or isinstance(r, LimitExceeded) for r in results), results
        assert 60 <= sum(r is None for r in results) == await stores[0].count() <= 62
        results = await asyncio.gather(*(stores[i % 3].create(_rec(f"u{i}", tenant="u"), max_tenant_sessions=20)
                                         for i in range(90)), return_exceptions=True)
        assert 20 <= sum(r is None for r in results) == await stores[1].count("u") <= 22
        with pytest.raises(LimitExceeded, match="limit of 60"):  # once the count is there, every store refuses
            await stores[2].create(_rec("late"), max_sessions=60)
    finally:
        for s in stores:
            await s.close()


# -- through real servers ----------------------------------------------------------------------


@pytest.fixture
def servers(tiny_models: Path, redis: _Url) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        for name in ("r1", "r2"):
            started.append(Server(tiny_models, redis.url, ["--replica-id", name]).start())
        yield started
    finally:
        for s in started:
            s.kill()


APIS = ("Step", "Stream", "StreamBatch", "StepPacked", "StreamPacked")


def _chunk(c: RecurClient, api: str, sid: str, part: np.ndarray, at: int) -> np.ndarray:
    req = pb.StepRequest(session_id=sid, tokens=[int(t) for t in part], expected_offset=at, return_logits=True)
    if api in ("StepPacked", "StreamPacked"):
        packed = packed_request([sid], [part], expected_offsets=[at], return_logits=True)
        got: Any = c.stub.StepPacked(packed) if api == "StepPacked" else next(c.stub.StreamPacked(iter([packed])))
        assert not got.failed and list(got.offsets) == [at + len(part)]
        return logits_of(got)
    if api == "Step":
        reply = c.stub.Step(req)
    elif api == "Stream":
        reply = next(c.stub.Stream(iter([req])))
    else:
        reply = next(c.stub.StreamBatch(iter([pb.StepBatch(steps=[req])]))).steps[0]
    assert not reply.HasField("status") and reply.offset == at + len(part)
    return logits_of(reply)


def test_one_pass_over_every_entry_point_and_both_replicas(servers: list[Server], reference) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    clients = [s.client() for s in servers]
    try:
        for k, model in enumerate(("lstm-lm", "gru-tagger", "rnn-lm")):
            for n in range(4):
                seq = rng.integers(0, 98, 37)
                cuts = [0, *sorted(rng.choice(np.arange(1, 37), 6, replace=False)), 37]
                sid = clients[n % 2].create(model).session_id
                parts = [_chunk(clients[(n + j) % 2], APIS[(k + n + j) % len(APIS)], sid, seq[a:b], int(a))
                         for j, (a, b) in enumerate(itertools.pairwise(cuts))]
                want_logits, want_state = reference(model).run(seq.astype(np.int64))
                assert np.abs(np.concatenate(parts) - want_logits).max() <= TOL
                for got, want in zip(state_of(clients[(n + 1) % 2].get(sid, include_state=True)), want_state):
                    assert np.abs(got - want).max() <= TOL
    finally:
        for c in clients:
            c.close()


def _v2(tokens: np.ndarray, seq: str, start: bool) -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(model_name="gru-lm")
    r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)]).contents.int64_contents.extend(
        int(t) for t in tokens)
    r.parameters["sequence_id"].string_param = seq
    r.parameters["sequence_start"].bool_param = start
    return r


def test_one_pass_over_the_open_inference_protocol_and_generate(servers: list[Server], reference) -> None:  # type: ignore[no-untyped-def]
    """ModelInfer and ModelStreamInfer (a sequence's chunks alternating between them and the two
    replicas), then the native API and Generate go on from where the sequence is."""
    seq = np.random.default_rng(11).integers(0, 98, 30)
    cuts = [0, 4, 11, 12, 20, 30]
    parts = []
    for j, (a, b) in enumerate(itertools.pairwise(cuts)):
        with grpc.insecure_channel(servers[j % 2].target) as ch:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
            req = _v2(seq[a:b], "cluster-seq", a == 0)
            if j % 2:
                reply = next(stub.ModelStreamInfer(iter([req]), timeout=30))
                assert reply.error_message == "", reply.error_message
                r = reply.infer_response
            else:
                r = stub.ModelInfer(req, timeout=30)
        parts.append(np.frombuffer(r.raw_output_contents[0], "<f4").reshape(tuple(r.outputs[0].shape)))
    want_logits, want_state = reference("gru-lm").run(seq.astype(np.int64))
    assert np.abs(np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts]) - want_logits).max() <= TOL
    with servers[1].client() as c:
        got = c.get("v2-cluster-seq", include_state=True)
        assert got.offset == 30
        for g, w in zip(state_of(got), want_state):
            assert np.abs(g - w).max() <= TOL
        made = [r.token for r in c.generate("v2-cluster-seq", max_tokens=5, temperature=0.0)]
    # greedy generation is the reference's argmax, fed back: the same tokens from one pass
    ref = reference("gru-lm")
    tokens = list(seq)
    for _ in range(5):
        logits, _ = ref.run(np.array(tokens, np.int64))
        tokens.append(int(np.argmax(logits[-1])))
    assert made == tokens[30:]


def _check_one_pass(c: RecurClient, sequences: dict[str, np.ndarray], reference, model: str) -> None:  # type: ignore[no-untyped-def]
    for sid, seq in sequences.items():
        got = c.get(sid, include_state=True)
        assert got.offset == len(seq), (sid, got.offset)
        for g, w in zip(state_of(got), reference(model).run(seq.astype(np.int64))[1]):
            assert np.abs(g - w).max() <= TOL, sid  # a chunk applied twice would move the state


def test_slots_resharded_mid_stream_lose_and_double_nothing(servers: list[Server], cluster: RedisCluster,
                                                             reference) -> None:  # type: ignore[no-untyped-def]
    """`redis-cli --cluster reshard` moves a primary's first 300 slots (MOVED and ASK on the way) while
    sessions in them stream; then moves them back."""
    from redis.crc import key_slot

    layout = ClusterStore(cluster.url)
    primaries = [n for n in cluster.alive() if "master" in redis_cli(n.port, "role", timeout=5).split()[0]]
    source, target = primaries[0], primaries[1]
    moving = set(cluster.slots_of(source)[:300])
    ids = [f"m{i}" for i in range(5000) if key_slot(layout._keys("default", f"m{i}")[0].encode()) in moving][:8]
    assert len(ids) == 8
    rng = np.random.default_rng(8)
    with servers[0].client() as c:
        sequences = {c.create("gru-lm", session_id=sid).session_id: rng.integers(0, 98, 150) for sid in ids}
        sequences.update({c.create("gru-lm").session_id: rng.integers(0, 98, 150) for _ in range(4)})
    fed, done = Fed(), threading.Event()

    def stream() -> None:
        feed(servers[0].target, sequences, 3, fed, pause=0.01)
        done.set()

    feeder = threading.Thread(target=stream)
    feeder.start()
    until(lambda: sum(len(a) for a in fed.acked.values()) >= 40, 30, "the stream did not start")
    redis_cli(source.port, "--cluster", "reshard", f"127.0.0.1:{source.port}", "--cluster-from",
              cluster.node_id(source), "--cluster-to", cluster.node_id(target), "--cluster-slots", "300",
              "--cluster-yes", timeout=240)
    moved_mid_stream = not done.is_set()
    feeder.join(120)
    assert moved_mid_stream, "the reshard finished after the stream: make the stream longer"
    assert not fed.failures, fed.failures
    assert moving <= set(cluster.slots_of(target))
    with servers[1].client() as c:
        _check_one_pass(c, sequences, reference, "gru-lm")
    redis_cli(target.port, "--cluster", "reshard", f"127.0.0.1:{target.port}", "--cluster-from",
              cluster.node_id(target), "--cluster-to", cluster.node_id(source), "--cluster-slots", "300",
              "--cluster-yes", timeout=240)
    cluster.wait_ok()


def test_a_primary_killed_mid_stream_loses_and_doubles_nothing(tiny_models: Path, redis: _Url,
                                                               cluster: RedisCluster, reference) -> None:  # type: ignore[no-untyped-def]
    """With --redis-min-replicas 1 every acknowledged chunk is on a replica when its primary dies, so
    the promoted replica has it: the streams end equal to one pass, through the failover. (The
    promoted replica has no replica of its own until the killed node comes back as one: writes to
    its slots wait for that.)"""
    server = Server(tiny_models, redis.url, ["--redis-min-replicas", "1", "--redis-wait-timeout", "0.5"]).start()
    rng = np.random.default_rng(9)
    layout = ClusterStore(cluster.url)
    victim = None
    try:
        with server.client() as c:
            sequences = {c.create("lstm-lm").session_id: rng.integers(0, 98, 90) for _ in range(9)}
        victim = cluster.primary_of(layout._keys("default", next(iter(sequences)))[0])
        fed = Fed()
        feeder = threading.Thread(target=feed, args=(server.target, sequences, 3, fed), kwargs={"pause": 0.02})
        feeder.start()
        until(lambda: sum(len(a) for a in fed.acked.values()) >= 30, 30, "the stream did not start")
        killed_at = time.monotonic()
        victim.kill()
        cluster.wait_ok()  # its replica promoted
        victim.start()  # back, as the promoted one's replica
        feeder.join(150)
        assert not feeder.is_alive()
        assert not fed.failures, fed.failures
        assert fed.gap_over(killed_at) > 0.5  # the clients saw the failover (as a wait, or UNAVAILABLE and a retry)
        with server.client() as c:
            _check_one_pass(c, sequences, reference, "lstm-lm")
    finally:
        server.kill()
        if victim is not None and (victim.proc is None or victim.proc.poll() is not None):
            victim.start()
        cluster.wait_ok()
