"""The session record and the one declaration of how each of its fields is kept.

Every field of `SessionRecord` carries a `Kept` in its type (`Annotated[int, Kept(INT)]`): how its
value is encoded, the name it is stored under, and which homes keep it. The SQLite columns and
row mapping, the Redis hash fields and the export blob's header and arrays are all derived from
those declarations by the functions below, so adding a field is one line in `SessionRecord`.

The formats these functions write are the ones recur has always written (tests/core/test_record_formats.py
holds bytes written before this module existed); a field added later (`added=True`) is absent from
older rows, hashes and blobs and reads as its default there, and a blob carries it only when it is
not its default, so older servers still read the blobs of newer ones.
"""

from __future__ import annotations

import struct
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum, Flag
from typing import Annotated, Any

import numpy as np

from service.errors import InvalidInput

RECORD_OVERHEAD = 256  # bytes a record costs beyond its arrays (ids, numbers, dict slots), for byte bounds


class Enc(Enum):
    """How a field's value is encoded; each home below has one codec per member."""

    TEXT = "str"
    INT = "int"
    FLOAT = "float"
    BYTES = "bytes"
    ARRAYS = "list of float32 arrays"
    ARRAY_OR_NONE = "a float32 array or None"
    ARRAYS_OR_NONE = "a list of float32 arrays or None"


class Home(Flag):
    SQLITE = 1
    REDIS = 2
    BLOB = 4


ALL = Home.SQLITE | Home.REDIS | Home.BLOB
TEXT, INT, FLOAT, BYTES = Enc.TEXT, Enc.INT, Enc.FLOAT, Enc.BYTES
ARRAYS, ARRAY_OR_NONE, ARRAYS_OR_NONE = Enc.ARRAYS, Enc.ARRAY_OR_NONE, Enc.ARRAYS_OR_NONE
_OR_NONE = (ARRAY_OR_NONE, ARRAYS_OR_NONE)
_ARRAY_KINDS = (ARRAYS, ARRAY_OR_NONE, ARRAYS_OR_NONE)


@dataclass(frozen=True)
class Kept:
    """How one field of SessionRecord is kept (the metadata of its annotated type)."""

    enc: Enc
    stored: str = ""  # its SQLite column and Redis hash field ("": the field's own name; a blob always uses that)
    homes: Home = ALL  # the homes that keep it as a field (Redis keeps tenant and id in the key, not the hash)
    fixed: bool = False  # set by the create only: SQLite's UPDATE of a put leaves its column alone
    added: bool = False  # added after data was first written: older rows, hashes and blobs lack it (its default)


@dataclass
class SessionRecord:
    """One sequence's life on the server. `state` tensors are (layers, hidden), batch-free.

    `last_*` describe the last applied chunk, so a retry of it can be answered
    with the recorded reply without advancing the state again.
    """

    tenant: Annotated[str, Kept(TEXT, homes=Home.SQLITE, fixed=True)]  # a blob is imported into its caller's tenant
    session_id: Annotated[str, Kept(TEXT, "id", homes=Home.SQLITE | Home.BLOB, fixed=True)]
    model: Annotated[str, Kept(TEXT, fixed=True)]
    version: Annotated[int, Kept(INT)]
    offset: Annotated[int, Kept(INT)]
    created_at: Annotated[float, Kept(FLOAT, "created", fixed=True)]
    updated_at: Annotated[float, Kept(FLOAT, "updated")]
    ttl: Annotated[float, Kept(FLOAT)]
    state: Annotated[list[np.ndarray], Kept(ARRAYS)]
    last_digest: Annotated[bytes, Kept(BYTES)] = b""
    last_start: Annotated[int, Kept(INT)] = -1
    last_logits: Annotated[np.ndarray | None, Kept(ARRAY_OR_NONE)] = None  # (T, C) of the last applied chunk
    # The state before the last applied chunk, kept only when its logits were too large to keep
    # (over --max-replay-bytes), so that a replay can recompute them.
    last_prev_state: Annotated[list[np.ndarray] | None, Kept(ARRAYS_OR_NONE, added=True)] = None
    # The request id the last chunk came with where the protocol makes it a replay key (the Open Inference
    # Protocol's request `id`): a request with the same id is that chunk's retry. Kept in the store, so it
    # holds per tenant and sequence, across restarts and replicas.
    last_request: Annotated[str, Kept(TEXT, added=True)] = ""
    # The store's version of the record, where it keeps one (redis: the id of the write that stored it;
    # each write stores a new one, see to_hash).
    token: Annotated[bytes, Kept(BYTES, "wid", homes=Home.REDIS, added=True)] = b""
    _nbytes: int = field(default=-1, init=False, repr=False, compare=False)  # computed once (records are not mutated)

    @property
    def expires_at(self) -> float:
        return self.updated_at + self.ttl

    @property
    def nbytes(self) -> int:
        """What holding this record in process costs, for the byte bounds of caches and the memory store."""
        if self._nbytes < 0:
            arrays = 0
            for a in self.state:
                arrays += a.nbytes
            for a in self.last_prev_state or ():
                arrays += a.nbytes
            if self.last_logits is not None:
                arrays += self.last_logits.nbytes
            names = len(self.tenant) + len(self.session_id) + len(self.last_request)
            self._nbytes = arrays + len(self.last_digest) + names + RECORD_OVERHEAD
        return self._nbytes

    @classmethod
    def of_fields(cls, **values: Any) -> SessionRecord:
        """A record from every field by name, without the dataclass's __init__ (a hot path's reads)."""
        if __debug__ and values.keys() != _RECORD_FIELDS:
            raise TypeError(f"SessionRecord.of_fields needs every field: {sorted(_RECORD_FIELDS ^ values.keys())}")
        new = object.__new__(cls)
        new.__dict__.update(values)
        new.__dict__["_nbytes"] = -1
        return new

    def copy(self, **changes: Any) -> SessionRecord:
        """A new record with `changes` (field names); dataclasses.replace costs ~10 µs on the hot path."""
        if __debug__ and not changes.keys() <= _RECORD_FIELDS:
            raise TypeError(f"SessionRecord has no field(s) {sorted(changes.keys() - _RECORD_FIELDS)}")
        new = object.__new__(SessionRecord)
        d = new.__dict__
        d.update(self.__dict__)
        d.update(changes)
        d["_nbytes"] = -1
        return new


_RECORD_FIELDS = frozenset(f.name for f in fields(SessionRecord) if f.init)


@dataclass(frozen=True)
class Field:
    """One field of SessionRecord as its Kept declares it, with its default (MISSING: none)."""

    name: str
    enc: Enc
    stored: str
    homes: Home
    fixed: bool
    added: bool
    default: Any


def _declared() -> tuple[Field, ...]:
    hints = typing.get_type_hints(SessionRecord, include_extras=True)
    out = []
    for f in fields(SessionRecord):
        if not f.init:
            continue
        kept = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Kept)]
        if len(kept) != 1:
            raise TypeError(f"SessionRecord.{f.name} must declare how it is kept: Annotated[..., Kept(...)]")
        k = kept[0]
        out.append(Field(f.name, k.enc, k.stored or f.name, k.homes, k.fixed, k.added, f.default))
    return tuple(out)


FIELDS = _declared()  # in declaration order: the order of SQLite's columns, Redis's fields and a blob's arrays


def pack_arrays(arrays: list[np.ndarray]) -> bytes:
    """Compact float32 encoding: count, then each array's rank, dims and little-endian data."""
    parts = [struct.pack("<B", len(arrays))]
    for a in arrays:
        a = np.ascontiguousarray(a, dtype="<f4")
        parts.append(struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape))
        parts.append(a.tobytes())
    return b"".join(parts)


def pack_rows(arrays: Sequence[np.ndarray]) -> list[bytes]:
    """`pack_arrays([a[:, j] for a in arrays])` for every j (axis 1 is the rows' axis, as in the session
    table's state tensors), from one copy of each array: the row write's encoding, without a call per array
    per row."""
    n = arrays[0].shape[1]
    heads, bufs, sizes = [], [], []
    for a in arrays:
        rows = np.ascontiguousarray(np.moveaxis(a, 1, 0), dtype="<f4")  # (n, ...): row j's array is rows[j]
        heads.append(struct.pack(f"<B{rows.ndim - 1}I", rows.ndim - 1, *rows.shape[1:]))
        bufs.append(rows.tobytes())
        sizes.append(rows[0].nbytes if n else 0)
    count = struct.pack("<B", len(arrays))
    if len(arrays) == 1:
        (head,), (buf,), (size,) = heads, bufs, sizes
        return [count + head + buf[j * size : (j + 1) * size] for j in range(n)]
    return [count + b"".join(h + b[j * k : (j + 1) * k] for h, b, k in zip(heads, bufs, sizes)) for j in range(n)]


def unpack_arrays(blob: bytes) -> list[np.ndarray]:
    (count,), pos, out = struct.unpack_from("<B", blob), 1, []
    for _ in range(count):
        (ndim,) = struct.unpack_from("<B", blob, pos)
        shape = struct.unpack_from(f"<{ndim}I", blob, pos + 1)
        pos += 1 + 4 * ndim
        n = int(np.prod(shape)) if shape else 1
        out.append(np.frombuffer(blob, dtype="<f4", count=n, offset=pos).reshape(shape).copy())
        pos += 4 * n
    return out


def _same(v: Any) -> Any:
    return v


def _pack_or_none(v: Any) -> bytes | None:
    return None if v is None else pack_arrays(v)


def _pack_one_or_none(v: Any) -> bytes | None:
    return None if v is None else pack_arrays([v])


def _unpack_or_none(b: Any) -> list[np.ndarray] | None:
    return unpack_arrays(b) if b else None  # SQLite: NULL; Redis: b""


def _unpack_one_or_none(b: Any) -> np.ndarray | None:
    return unpack_arrays(b)[0] if b else None


Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]  # (encode, decode)


def _array_codec(enc: Enc) -> Codec:
    if enc is ARRAYS:
        return pack_arrays, unpack_arrays
    if enc is ARRAY_OR_NONE:
        return _pack_one_or_none, _unpack_one_or_none
    return _pack_or_none, _unpack_or_none


# -- SQLite: one column per field it keeps, plus `expires` ------------------------------------------------
_SQL_TYPES = {TEXT: "TEXT", INT: "INTEGER", FLOAT: "REAL", BYTES: "BLOB", ARRAYS: "BLOB", ARRAY_OR_NONE: "BLOB",
              ARRAYS_OR_NONE: "BLOB"}
EXPIRES = "expires"  # the one column computed from the fields (updated + ttl): the sweep and the limits order by it


def _sql_codec(enc: Enc) -> Codec:
    return _array_codec(enc) if enc in _ARRAY_KINDS else (_same, _same)


def _sqlite_columns() -> tuple[tuple[str, str], ...]:
    """(name, declaration) of every column, in the order files have always had them: `expires` after ttl.
    A column that may be NULL: a value that may be None, or a field added later (ALTER TABLE adds it)."""
    out = []
    for f in FIELDS:
        if Home.SQLITE in f.homes:
            null = f.enc in _OR_NONE or f.added
            out.append((f.stored, _SQL_TYPES[f.enc] + ("" if null else " NOT NULL")))
        if f.name == "ttl":
            out.append((EXPIRES, "REAL NOT NULL"))
    return tuple(out)


SQLITE_COLUMNS = _sqlite_columns()
SQLITE_FIXED = tuple(f.stored for f in FIELDS if Home.SQLITE in f.homes and f.fixed)
_SQL_FIELDS = [(f.name, f.stored, *_sql_codec(f.enc), f.added, f.default) for f in FIELDS if Home.SQLITE in f.homes]


def to_row(r: SessionRecord) -> dict[str, object]:
    """The SQLite row of a record, by column name."""
    row: dict[str, object] = {column: encode(getattr(r, name)) for name, column, encode, _, _, _ in _SQL_FIELDS}
    row[EXPIRES] = r.expires_at
    return row


def from_row(row: Any) -> SessionRecord:
    """The record a SQLite row holds (an sqlite3.Row, or any mapping by column name)."""
    values = {}
    for name, column, _, decode, added, default in _SQL_FIELDS:
        raw = row[column]
        values[name] = default if raw is None and added else decode(raw)
    return SessionRecord(**values)


def sqlite_encoder(name: str) -> Callable[[Any], Any]:
    """How record field `name` is written to its SQLite column."""
    return _sql_codec(_BY_NAME[name].enc)[0]


def sqlite_column(name: str) -> str:
    """The column that keeps record field `name` (or `expires_at`)."""
    return EXPIRES if name == "expires_at" else _BY_NAME[name].stored


# -- Redis: one hash field per field it keeps (tenant and id are the key) ---------------------------------
def _hash_codec(enc: Enc) -> Codec:
    if enc in _ARRAY_KINDS:
        encode, decode = _array_codec(enc)
        return (lambda v: encode(v) or b""), decode  # None is b"" in a hash
    if enc is TEXT:
        return _same, lambda b: b.decode("utf-8", "replace")
    if enc is INT:
        return _same, int
    if enc is FLOAT:
        return repr, float
    return _same, _same


_TOKEN = "token"  # the field a write sets to its own write id (see SessionRecord.token)
_HASH_FIELDS = [(f.name, f.stored, f.stored.encode(), *_hash_codec(f.enc), f.added, f.default) for f in FIELDS
                if Home.REDIS in f.homes]


def to_hash(r: SessionRecord, token: bytes) -> list[Any]:
    """The hash's field/value pairs (HSET's arguments) of a write that stores `r` as version `token`."""
    out: list[Any] = []
    for name, stored, _, encode, _, _, _ in _HASH_FIELDS:
        out.append(stored)
        out.append(token if name == _TOKEN else encode(getattr(r, name)))
    return out


# MessagePack, as far as Redis's put script needs it (cmsgpack): arrays and byte strings, each with a 32-bit length
_MP = struct.Struct(">BI")


def mp_array(n: int) -> bytes:
    """The header of an array of n items (the items follow it)."""
    return _MP.pack(0xDD, n)


def mp_str(v: bytes) -> bytes:
    return _MP.pack(0xDB, len(v)) + v


def _wire(enc: Enc) -> Callable[[Any], bytes]:
    """A hash field's value as the bytes Redis stores: what redis-py makes of to_hash's value as an argument
    (an int's or a float's repr, a str's UTF-8; arrays and bytes are bytes already)."""
    if enc is INT or enc is FLOAT:
        return lambda v: repr(v).encode()
    if enc is TEXT:
        return str.encode
    return _hash_codec(enc)[0]


# (name, the field's name as a MessagePack string, its value's encoder to bytes)
_PACKED_FIELDS = [(f.name, mp_str(f.stored.encode()), _wire(f.enc)) for f in FIELDS if Home.REDIS in f.homes]


HASH_ORDER = tuple(name for name, _, _ in _PACKED_FIELDS)  # the fields packed_values takes, in this order


def packed_values(values: Sequence[bytes]) -> bytes:
    """packed_hash from the fields' values as the bytes Redis stores, in HASH_ORDER (a row write's, encoded
    a column at a time)."""
    out = [mp_array(2 * len(_PACKED_FIELDS))]
    pack = _MP.pack
    for (_, head, _), v in zip(_PACKED_FIELDS, values, strict=True):
        out += (head, pack(0xDB, len(v)), v)
    return b"".join(out)


def packed_hash(r: SessionRecord, token: bytes) -> bytes:
    """to_hash's pairs as one MessagePack array, which the put script unpacks into HSET's arguments: one
    script argument where there were two per field (redis-py encodes each argument in Python), and the
    same bytes stored (tested)."""
    return packed_values([token if name == _TOKEN else encode(getattr(r, name)) for name, _, encode in _PACKED_FIELDS])


def from_hash(h: dict[bytes, bytes], tenant: str, session_id: str) -> SessionRecord:
    """The record a session's hash holds (HGETALL's answer); a field added later may be missing."""
    values: dict[str, Any] = {}
    for name, _, key, _, decode, added, default in _HASH_FIELDS:
        raw = h.get(key) if added else h[key]
        values[name] = default if raw is None else decode(raw)
    return SessionRecord(tenant=tenant, session_id=session_id, **values)


def hash_field(name: str) -> str:
    """The hash field that keeps record field `name`."""
    return _BY_NAME[name].stored


def hash_value(name: str, raw: bytes) -> Any:
    """Record field `name`'s value from its hash field's bytes."""
    return _hash_codec(_BY_NAME[name].enc)[1](raw)


_BY_NAME = {f.name: f for f in FIELDS}


# -- the export blob: a JSON header for the scalar fields, float32 arrays after it -------------------------
_BLOB_FIELDS = [f for f in FIELDS if Home.BLOB in f.homes]
BLOB_FIELD_NAMES = tuple(f.name for f in _BLOB_FIELDS)
_JSON_TYPES: dict[Enc, type | tuple[type, ...]] = {TEXT: str, INT: int, FLOAT: (int, float), BYTES: str}


def to_blob(r: Any) -> tuple[dict[str, Any], list[str], list[np.ndarray]]:
    """The header fields of a blob of `r` (a SessionRecord, or anything with its blob fields), and its
    arrays with their names, in declaration order (`state.0`, ..., `last_logits`, `last_prev_state.0`, ...).
    A field added later is written only when it is not its default."""
    header: dict[str, Any] = {}
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for f in _BLOB_FIELDS:
        v = getattr(r, f.name)
        if f.enc in _ARRAY_KINDS:
            if v is None:
                continue
            one = f.enc is ARRAY_OR_NONE
            names.extend([f.name] if one else [f"{f.name}.{i}" for i in range(len(v))])
            arrays.extend([v] if one else v)
        elif not (f.added and v == f.default):
            header[f.name] = v.hex() if f.enc is BYTES else v
    return header, names, arrays


def from_blob(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The blob fields' values from a blob's header and its arrays by name (popped from `arrays`);
    InvalidInput naming the field when one is missing (and not added later) or of the wrong type."""
    values: dict[str, Any] = {}
    for f in _BLOB_FIELDS:
        if f.enc in _ARRAY_KINDS:
            values[f.name] = _blob_arrays(f, arrays)
        elif f.name not in header and f.added:
            values[f.name] = f.default
        else:
            values[f.name] = _blob_value(f, header.get(f.name))
    return values


def _blob_value(f: Field, value: Any) -> Any:
    typed = isinstance(value, _JSON_TYPES[f.enc]) and not isinstance(value, bool)
    if not typed:
        raise InvalidInput(f"not a valid session blob: header field {f.name!r} is missing or of the wrong type")
    if f.enc is FLOAT:
        return float(value)
    if f.enc is BYTES:
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise InvalidInput(f"not a valid session blob: {f.name} is not hex") from None
    return value


def _blob_arrays(f: Field, arrays: dict[str, np.ndarray]) -> Any:
    if f.enc is ARRAY_OR_NONE:
        return arrays.pop(f.name, None)
    count = sum(name.startswith(f"{f.name}.") for name in arrays)
    # state.0 to state.N-1; any other name of this field stays in `arrays`, refused there as unexpected
    got = [arrays.pop(f"{f.name}.{i}") for i in range(count) if f"{f.name}.{i}" in arrays]
    if f.enc is ARRAYS_OR_NONE:
        return got or None
    return got
