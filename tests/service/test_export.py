"""Moving sessions between servers and stores (ExportSession / ImportSession) and listing them
(ListSessions), against real server processes: a session exported from a SQLite server continues on
a Redis server at the same offset, exactly once; a model whose sha256 differs is refused unless
forced; malformed blobs are INVALID_ARGUMENT; ListSessions pages, filters and keeps to its tenant."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from recur.client import RecurClient
from service import blob
from service.auth import add_key
from tests.helpers import TOL, Redis, Reference, Server, logits_of, refused, state_of

MODEL = "lstm-lm"
TOKENS = [int(t) for t in np.random.default_rng(7).integers(0, 20, size=50)]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    r = Redis(tmp_path / "redis")
    r.directory.mkdir()
    r.start()
    yield r
    r.kill()


def _feed(c: RecurClient, sid: str, start: int, end: int, **options: object) -> object:
    return c.step(sid, tokens=TOKENS[start:end], expected_offset=start, return_logits=True, **options)


@pytest.mark.parametrize("replay_bytes", [[], ["--max-replay-bytes", "0"]], ids=["outputs", "prev-state"])
def test_sqlite_to_redis_continues_exactly_once(start_server: Callable[..., Server], redis: Redis,
                                                reference: Callable[[str], Reference], replay_bytes: list[str]
                                                ) -> None:
    ref_logits, ref_states = reference(MODEL).run(np.array(TOKENS, dtype=np.int64))
    src = start_server(extra=replay_bytes)
    dst = start_server(store=redis.url, extra=replay_bytes)
    with src.client() as a, dst.client() as b:
        a.create(MODEL, session_id="moving", ttl_seconds=600)
        _feed(a, "moving", 0, 20)
        last = _feed(a, "moving", 20, 35)
        data = a.export_session("moving")
        assert data.startswith(b"RECURSESSION1\n")
        s = b.import_session(data)
        assert (s.session_id, s.model, s.version, s.offset) == ("moving", MODEL, 1, 35)
        assert b.get("moving").offset == 35
        # a retry of the last chunk on the new server is recognised and answered as recorded
        again = _feed(b, "moving", 20, 35)
        assert again.replayed and again.start_offset == 20 and again.offset == 35
        assert np.abs(logits_of(again) - logits_of(last)).max() <= TOL  # type: ignore[arg-type]
        assert np.abs(logits_of(again) - ref_logits[20:35]).max() <= TOL
        # a chunk at a stale offset is still refused with the actual one
        refused(lambda: _feed(b, "moving", 0, 20), grpc.StatusCode.FAILED_PRECONDITION, "offset 35")
        rest = _feed(b, "moving", 35, 50, return_state=True)
        assert not rest.replayed and rest.offset == 50  # type: ignore[attr-defined]
        assert np.abs(logits_of(rest) - ref_logits[35:]).max() <= TOL
        for got, want in zip(state_of(rest), ref_states):
            assert np.abs(got - want).max() <= TOL
        # the same blob again: the id is taken; under another id it is a second copy
        refused(lambda: b.import_session(data), grpc.StatusCode.ALREADY_EXISTS, "moving")
        assert b.import_session(data, session_id="copy").offset == 35
        assert a.get("moving").offset == 35  # exporting leaves the source as it was


@pytest.fixture
def changed_models(tiny_models: Path, tmp_path: Path) -> Path:
    """A copy of the tiny models where lstm-lm's graph differs (its doc string), so its sha256 does."""
    root = tmp_path / "changed"
    shutil.copytree(tiny_models, root)
    d = root / MODEL / "1"
    m = onnx.load(str(d / "model.onnx"))
    m.doc_string = "retrained elsewhere"
    onnx.save(m, str(d / "model.onnx"))
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_model_sha256_mismatch_refused_unless_forced(start_server: Callable[..., Server], changed_models: Path,
                                                     tiny_models: Path) -> None:
    src = start_server(store="memory:")
    dst = Server(changed_models, "memory:").start()
    try:
        with src.client() as a, dst.client() as b:
            a.create(MODEL, session_id="s1")
            _feed(a, "s1", 0, 10)
            data = a.export_session("s1")
            old = json.loads((tiny_models / MODEL / "1" / "manifest.json").read_text())["sha256"]
            new = json.loads((changed_models / MODEL / "1" / "manifest.json").read_text())["sha256"]
            refused(lambda: b.import_session(data), grpc.StatusCode.FAILED_PRECONDITION, old, new, "force")
            refused(lambda: b.get("s1"), grpc.StatusCode.NOT_FOUND)  # a refused import changes nothing
            assert b.import_session(data, force=True).offset == 10
            assert _feed(b, "s1", 10, 20).offset == 20  # type: ignore[attr-defined]
    finally:
        dst.kill()


def _valid(c: RecurClient) -> bytes:
    c.create(MODEL, session_id="src")
    _feed(c, "src", 0, 12)
    return c.export_session("src")


def _reshaped(data: bytes) -> bytes:
    s = blob.decode(data)
    s.state = [np.zeros((a.shape[0], a.shape[1] + 1), dtype=np.float32) for a in s.state]
    return blob.encode(s)


def _huge_array(data: bytes) -> bytes:
    (n,) = struct.unpack_from("<I", data, len(blob.MAGIC))
    at = len(blob.MAGIC) + 4 + n  # the first array: rank, then its dims
    rank = data[at]
    return data[:at + 1] + struct.pack(f"<{rank}I", *([2**31] * rank)) + data[at + 1 + 4 * rank:]


def _header(data: bytes, **changes: object) -> bytes:
    """The blob with header fields replaced (a forged blob: its arrays untouched)."""
    (n,) = struct.unpack_from("<I", data, len(blob.MAGIC))
    at = len(blob.MAGIC) + 4
    header = {**json.loads(data[at:at + n]), **changes}
    head = json.dumps(header).encode()
    return blob.MAGIC + struct.pack("<I", len(head)) + head + data[at + n:]


# numeric extremes and oversized names in the header: each refused before anything is stored
FORGED: dict[str, dict[str, object]] = {
    "created_at 1e300": {"created_at": 1e300}, "created_at -1": {"created_at": -1.0},
    "created_at NaN": {"created_at": float("nan")}, "updated_at inf": {"updated_at": float("inf")},
    "updated_at 1e19": {"updated_at": 1e19}, "ttl 1e300": {"ttl": 1e300}, "ttl -5": {"ttl": -5},
    "ttl 0": {"ttl": 0}, "offset 2**63": {"offset": 2**63}, "offset -1": {"offset": -1},
    "offset 2**62": {"offset": 2**62}, "last_start past offset": {"last_start": 2**40},
    "last_start -2": {"last_start": -2}, "version 2**40": {"version": 2**40}, "version 0": {"version": 0},
    "long model": {"model": "m" * 10_000}, "long id": {"session_id": "s" * 500},
    "long last_request": {"last_request": "r" * 1000}, "last_request a number": {"last_request": 7},
    "offset a float": {"offset": 12.5}, "digest odd": {"last_digest": "abc"},
}


MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    **{name: (lambda d, c=changes: _header(d, **c)) for name, changes in FORGED.items()},
    "empty": lambda d: b"",
    "garbage": lambda d: b"not a session at all",
    "other format": lambda d: b"RECURSESSION2\n" + d[len(blob.MAGIC):],
    "truncated": lambda d: d[:-7],
    "trailing bytes": lambda d: d + b"\0",
    "huge header": lambda d: blob.MAGIC + struct.pack("<I", 2**31) + d[len(blob.MAGIC) + 4:],
    "huge array": _huge_array,
    "state shape": _reshaped,
    "header not json": lambda d: blob.MAGIC + struct.pack("<I", 3) + b"{x}",
}


def test_malformed_blobs_are_invalid_argument(client: RecurClient) -> None:
    data = _valid(client)
    for name, spoil in MALFORMED.items():
        details = refused(lambda: client.import_session(spoil(data), session_id="dst"),  # noqa: B023
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert "blob" in details or "state" in details, (name, details)
    refused(lambda: client.get("dst"), grpc.StatusCode.NOT_FOUND)
    assert [x.session_id for x in client.list_sessions()] == ["src"]  # nothing stored, nothing poisoned
    refused(lambda: client.export_session("nobody"), grpc.StatusCode.NOT_FOUND, "nobody")
    assert client.import_session(data, session_id="dst").offset == 12


@pytest.mark.parametrize("store", ["sqlite", "memory", "redis"])
def test_list_sessions_pages_filters_and_keeps_to_its_tenant(start_server: Callable[..., Server], tmp_path: Path,
                                                            store: str) -> None:
    keys = tmp_path / "keys.json"
    acme, globex = add_key(keys, "acme"), add_key(keys, "globex")
    r = Redis(tmp_path / "redis") if store == "redis" else None
    if r is not None:
        r.directory.mkdir()
        r.start()
    try:
        url = {"sqlite": f"sqlite:{tmp_path / 'list.db'}", "memory": "memory:", "redis": r.url if r else ""}[store]
        s = start_server(store=url, extra=["--auth-keys", str(keys)])
        with RecurClient(s.target, api_key=acme) as a, RecurClient(s.target, api_key=globex) as g:
            made = {f"a{i:02d}": ("gru-tagger" if i % 3 == 0 else MODEL) for i in range(23)}
            for sid, model in made.items():
                a.create(model, session_id=sid)
            g.create(MODEL, session_id="a05x")  # between acme's ids: never in acme's pages
            a.step("a01", tokens=[1, 2, 3])
            first = a.list_sessions_page(page_size=10)
            assert [x.session_id for x in first.sessions] == sorted(made)[:10] and first.next_page_token
            listed = list(a.list_sessions(page_size=10))
            assert [x.session_id for x in listed] == sorted(made)
            assert {x.session_id: x.model for x in listed} == made
            assert next(x for x in listed if x.session_id == "a01").offset == 3
            assert all(x.expires_at.seconds > 0 and not x.state for x in listed)
            tagged = [x.session_id for x in a.list_sessions(model="gru-tagger", page_size=4)]
            assert tagged == sorted(sid for sid, m in made.items() if m == "gru-tagger")
            assert [x.session_id for x in g.list_sessions()] == ["a05x"]
            assert list(a.list_sessions(model="no-such-model")) == []
            a.delete("a02")
            assert "a02" not in [x.session_id for x in a.list_sessions()]
            refused(lambda: a.list_sessions_page(page_token="not a token!"), grpc.StatusCode.INVALID_ARGUMENT,
                    "page_token")
            refused(lambda: a.list_sessions_page(page_size=5000), grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    finally:
        if r is not None:
            r.kill()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_forged_timestamp_is_refused_and_stores_nothing(start_server: Callable[..., Server], tmp_path: Path,
                                                          store: str) -> None:
    """A blob with created_at 1e300 was stored, then answered INTERNAL on every GetSession and ListSessions."""
    r = Redis(tmp_path / "redis") if store == "redis" else None
    if r is not None:
        r.directory.mkdir()
        r.start()
    try:
        s = start_server(store=r.url if r else f"sqlite:{tmp_path / 'forged.db'}")
        with s.client() as c:
            data = _valid(c)
            for forged in ({"created_at": 1e300}, {"updated_at": 1e300, "ttl": 1e300}):
                refused(lambda: c.import_session(_header(data, **forged), session_id="evil"),  # noqa: B023
                        grpc.StatusCode.INVALID_ARGUMENT, "year 9999")
            refused(lambda: c.get("evil"), grpc.StatusCode.NOT_FOUND)
            assert [x.session_id for x in c.list_sessions()] == ["src"]
            assert c.import_session(_header(data, created_at=1.0), session_id="old").offset == 12
            assert c.get("old").created_at.seconds == 1
    finally:
        if r is not None:
            r.kill()
