"""The session record's three stored forms (a SQLite row, a Redis hash, an export blob) are derived from
one declaration (service.store.record) and stay what recur wrote before it: the literals below were
written by the hand-written mappings that the declaration replaced."""

from __future__ import annotations

import json
import sqlite3
import struct
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from service import blob
from service.store import SqliteStore
from service.store.record import (
    BLOB_FIELD_NAMES,
    FIELDS,
    SessionRecord,
    from_hash,
    from_row,
    pack_arrays,
    pack_rows,
    to_hash,
    to_row,
)

STATE_HEX = ("02020200000003000000000000000000803f0000004000004040000080400000a0400202000000030000000000003f0000003f"
             "0000003f0000003f0000003f0000003f")
LOGITS_HEX = "010202000000030000000000803e000080bf000000400000c03f00000000000040bf"
PREV_HEX = ("020202000000030000000000803f0000803f0000803f0000803f0000803f0000803f0202000000030000000000000000000000"
            "00000000000000000000000000000000")
DIGEST = bytes(range(32))


def _record() -> SessionRecord:
    return SessionRecord(
        tenant="acme", session_id="s-1", model="gru-lm", version=2, offset=7, created_at=1700000000.25,
        updated_at=1700000100.5, ttl=3600.0,
        state=[np.arange(6, dtype=np.float32).reshape(2, 3), np.full((2, 3), 0.5, np.float32)],
        last_digest=DIGEST, last_start=5, last_logits=np.array([[0.25, -1.0, 2.0], [1.5, 0.0, -0.75]], np.float32),
        last_prev_state=[np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)], last_request="req-9",
        token=b"old-wid!")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape \
            and bool(np.array_equal(a, b))
    return type(a) is type(b) and a == b


def _assert_fields(got: Any, want: Any, names: tuple[str, ...]) -> None:
    for name in names:
        assert _same(getattr(got, name), getattr(want, name)), name


RECORD_FIELDS = tuple(f.name for f in FIELDS)


# -- SQLite ----------------------------------------------------------------------------------------------
COLUMNS = [  # (name, type, not null) of a file this store writes, as it always has
    ("tenant", "TEXT", 1), ("id", "TEXT", 1), ("model", "TEXT", 1), ("version", "INTEGER", 1),
    ("offset", "INTEGER", 1), ("created", "REAL", 1), ("updated", "REAL", 1), ("ttl", "REAL", 1),
    ("expires", "REAL", 1), ("state", "BLOB", 1), ("last_digest", "BLOB", 1), ("last_start", "INTEGER", 1),
    ("last_logits", "BLOB", 0), ("last_prev_state", "BLOB", 0), ("last_request", "TEXT", 0)]
ROW = {"tenant": "acme", "id": "s-1", "model": "gru-lm", "version": 2, "offset": 7, "created": 1700000000.25,
       "updated": 1700000100.5, "ttl": 3600.0, "expires": 1700003700.5, "state": bytes.fromhex(STATE_HEX),
       "last_digest": DIGEST, "last_start": 5, "last_logits": bytes.fromhex(LOGITS_HEX),
       "last_prev_state": bytes.fromhex(PREV_HEX), "last_request": "req-9"}


async def test_a_new_sqlite_file_has_the_columns_files_always_had(tmp_path: Path) -> None:
    store = await SqliteStore(tmp_path / "new.db").open()
    await store.close()
    with sqlite3.connect(tmp_path / "new.db") as c:
        assert [(r[1], r[2], r[3]) for r in c.execute("PRAGMA table_info(sessions)")] == COLUMNS


def test_the_sqlite_row_of_a_record_is_the_row_written_before() -> None:
    assert to_row(_record()) == ROW
    _assert_fields(from_row(ROW), _record().copy(token=b""), RECORD_FIELDS)  # sqlite keeps no token


def test_a_sqlite_row_from_before_the_later_columns_reads_with_their_defaults() -> None:
    got = from_row({**ROW, "last_prev_state": None, "last_request": None})
    assert got.last_prev_state is None and got.last_request == "" and got.offset == 7


async def test_a_row_written_by_hand_in_the_old_layout_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = await SqliteStore(path).open()
    await store.close()
    with sqlite3.connect(path) as c:
        c.execute(f"INSERT INTO sessions ({', '.join(f'[{k}]' for k in ROW)}) VALUES "
                  f"({', '.join('?' for _ in ROW)})", list(ROW.values()))
    store = await SqliteStore(path, clock=lambda: 1700000200.0).open()  # before the record expires
    try:
        got = await store.get("acme", "s-1")
    finally:
        await store.close()
    _assert_fields(got, _record(), tuple(n for n in RECORD_FIELDS if n != "token"))


# -- Redis -------------------------------------------------------------------------------------------------
WID = bytes(range(1, 9))
HASH = ["model", "gru-lm", "version", 2, "offset", 7, "created", "1700000000.25", "updated", "1700000100.5",
        "ttl", "3600.0", "state", bytes.fromhex(STATE_HEX), "last_digest", DIGEST, "last_start", 5,
        "last_logits", bytes.fromhex(LOGITS_HEX), "last_prev_state", bytes.fromhex(PREV_HEX),
        "last_request", "req-9", "wid", WID]


def _as_redis_answers(pairs: list[Any]) -> dict[bytes, bytes]:
    """What HGETALL answers for a hash written with these HSET arguments."""
    enc = [x if isinstance(x, bytes) else str(x).encode() for x in pairs]
    return dict(zip(enc[::2], enc[1::2]))


def test_the_redis_hash_of_a_record_is_the_hash_written_before() -> None:
    assert to_hash(_record(), WID) == HASH  # a write stores its own write id, not the one it was read with
    got = from_hash(_as_redis_answers(HASH), "acme", "s-1")
    _assert_fields(got, _record().copy(token=WID), RECORD_FIELDS)


def test_a_redis_hash_from_before_the_later_fields_reads_with_their_defaults() -> None:
    old = HASH[:HASH.index("last_prev_state")]  # before last_prev_state, last_request and write ids
    got = from_hash(_as_redis_answers(old), "acme", "s-1")
    assert got.last_prev_state is None and got.last_request == "" and got.token == b"" and got.offset == 7
    none = from_hash(_as_redis_answers([*HASH[:-8], "last_logits", b"", "last_prev_state", b"", *HASH[-4:]]),
                     "acme", "s-1")
    assert none.last_logits is None and none.last_prev_state is None


# -- the export blob -----------------------------------------------------------------------------------------
def _blob(header: dict[str, Any], arrays_hex: str) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    return blob.MAGIC + struct.pack("<I", len(head)) + head + bytes.fromhex(arrays_hex)


FULL_HEADER = {
    "arrays": ["state.0", "state.1", "last_logits", "last_prev_state.0", "last_prev_state.1"],
    "created_at": 1700000000.25, "format": 1, "last_digest": DIGEST.hex(), "last_request": "req-9",
    "last_start": 5, "model": "gru-lm", "model_sha256": "ab" * 32, "offset": 7, "session_id": "s-1",
    "ttl": 3600.0, "updated_at": 1700000100.5, "version": 2}
FULL = _blob(FULL_HEADER, STATE_HEX[2:] + LOGITS_HEX[2:] + PREV_HEX[2:])  # arrays without pack_arrays' count
MINIMAL = _blob({"arrays": ["state.0"], "created_at": 1700000000.0, "format": 1, "last_digest": "",
                 "last_start": -1, "model": "lstm-lm", "model_sha256": "cd" * 32, "offset": 0, "session_id": "fresh",
                 "ttl": 60.0, "updated_at": 1700000000.0, "version": 1},
                "0201000000020000000000000000000000")


def test_a_blob_written_before_loads_and_is_written_again_byte_for_byte() -> None:
    assert len(FULL) == 635 and len(MINIMAL) == 331  # the sizes the hand-written encoder gave
    s = blob.decode(FULL)
    _assert_fields(s, _record(), BLOB_FIELD_NAMES)
    assert s.model_sha256 == "ab" * 32
    assert blob.encode(s) == FULL
    m = blob.decode(MINIMAL)
    assert m.last_logits is None and m.last_prev_state is None and m.last_request == "" and m.last_start == -1
    assert blob.encode(m) == MINIMAL  # a field added later is left out while it is its default


def test_an_exported_session_has_the_records_blob_fields() -> None:
    assert {f.name for f in fields(blob.ExportedSession)} == {*BLOB_FIELD_NAMES, "model_sha256"}
    assert "tenant" not in BLOB_FIELD_NAMES and "token" not in BLOB_FIELD_NAMES


def test_every_record_field_declares_how_it_is_kept() -> None:
    assert tuple(f.name for f in fields(SessionRecord) if f.init) == RECORD_FIELDS


def test_the_row_writes_encoding_is_the_records() -> None:
    """pack_rows (SQLite's row writes, a column at a time) gives each row the bytes pack_arrays gives it."""
    rng = np.random.default_rng(3)
    for shapes in ([(2, 5, 7), (2, 5, 7)], [(1, 3, 4)], [(3, 1, 2, 2)]):
        arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        assert pack_rows(arrays) == [pack_arrays([a[:, j] for a in arrays]) for j in range(shapes[0][1])]
    final = rng.standard_normal((5, 9)).astype(np.float32)
    assert pack_rows([final[None]]) == [pack_arrays([final[j : j + 1]]) for j in range(5)]
