"""The exported form of a session (ExportSession / ImportSession): a self-describing, versioned blob.

Layout (format 1), all integers little-endian:

    b"RECURSESSION1\\n"        magic: names the format and its version
    u32 N                      length of the JSON header
    N bytes                    the JSON header (UTF-8), see below
    arrays                     each float32 array the header lists, in its order: u8 rank, rank x u32
                               dims, then the data (C order)

The header holds `format` (1), `model_sha256` (the sha256 of the model's ONNX file, as its manifest
states it), `arrays` (the names of the arrays that follow, in order) and the session record's
fields as service.store.record declares them: `session_id`, `model`, `version`, `offset`,
`created_at`, `updated_at`, `ttl`, `last_digest` (hex), `last_start`, and `last_request` when there
is one; the arrays are `state.0`, ... then `last_logits` when kept, then `last_prev_state.0`, ...
when kept. The tenant is not part of a blob: an import recreates the session in the importing
caller's tenant.

`decode` checks sizes before contents (a blob over MAX_BLOB_BYTES, a header over MAX_HEADER_BYTES,
an array whose declared size runs past the end are refused before anything is allocated for them)
and `check_against` checks the arrays' shapes against the importing server's model. Every refusal is
InvalidInput (INVALID_ARGUMENT), except a model whose sha256 differs: ModelMismatch
(FAILED_PRECONDITION, naming both hashes), which `force` overrides.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidInput, ModelMismatch
from service.repository.models import Model
from service.store.record import from_blob, to_blob

MAGIC = b"RECURSESSION1\n"
FORMAT = 1
MAX_BLOB_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 256
MAX_RANK = 4
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last second a protobuf Timestamp holds
MAX_NAME = 128  # characters of the session id, the model name and the last request id


@dataclass
class ExportedSession:
    """What a blob carries: a session record's fields but its tenant and the store's version (`token`),
    and the model's sha256. Which fields a blob carries, and how, is SessionRecord's declaration
    (service.store.record); these are the same fields (tests/core/test_record_formats.py holds them
    equal), declared here so that a blob's reader needs no store."""

    session_id: str
    model: str
    version: int
    model_sha256: str
    offset: int
    created_at: float
    updated_at: float
    ttl: float
    state: list[np.ndarray]
    last_digest: bytes = b""
    last_start: int = -1
    last_logits: np.ndarray | None = None
    last_prev_state: list[np.ndarray] | None = None
    last_request: str = ""  # the last chunk's replay key (Open Inference Protocol request id)


def encode(s: ExportedSession) -> bytes:
    header, names, arrays = to_blob(s)
    header.update(format=FORMAT, model_sha256=s.model_sha256, arrays=names)
    head = json.dumps(header, sort_keys=True).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head]
    for a in arrays:
        a = np.ascontiguousarray(a, dtype="<f4")
        parts.append(struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape))
        parts.append(a.tobytes())
    return b"".join(parts)


def _bad(why: str) -> InvalidInput:
    return InvalidInput(f"not a valid session blob: {why}")


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _bad(f"header field {name!r} is missing or of the wrong type")
    return value


def _arrays(blob: bytes, pos: int, count: int) -> list[np.ndarray]:
    out = []
    for i in range(count):
        if pos + 1 > len(blob):
            raise _bad(f"array {i} is cut off")
        rank = blob[pos]
        if rank > MAX_RANK or pos + 1 + 4 * rank > len(blob):
            raise _bad(f"array {i} has a bad rank or is cut off")
        shape = struct.unpack_from(f"<{rank}I", blob, pos + 1)
        pos += 1 + 4 * rank
        n = math.prod(shape)
        if pos + 4 * n > len(blob):  # the declared size, checked before any array is made
            raise _bad(f"array {i} declares {n} values but the blob ends first")
        a = np.frombuffer(blob, dtype="<f4", count=n, offset=pos).reshape(shape).astype(np.float32)
        if not np.isfinite(a).all():
            raise _bad(f"array {i} holds values that are not finite")
        out.append(a)
        pos += 4 * n
    if pos != len(blob):
        raise _bad(f"{len(blob) - pos} bytes follow the last array")
    return out


def decode(blob: bytes) -> ExportedSession:
    """The session a blob carries; InvalidInput when it is not a well-formed format-1 blob."""
    if len(blob) > MAX_BLOB_BYTES:
        raise _bad(f"{len(blob)} bytes is over the limit of {MAX_BLOB_BYTES}")
    if not blob.startswith(MAGIC[:12]):
        raise _bad("it does not start with RECURSESSION (was it made by ExportSession?)")
    if not blob.startswith(MAGIC):
        raise _bad(f"format {blob[12:13]!r} is not one this server reads (it reads format {FORMAT})")
    pos = len(MAGIC)
    if len(blob) < pos + 4:
        raise _bad("the header is cut off")
    (n,) = struct.unpack_from("<I", blob, pos)
    pos += 4
    if n > MAX_HEADER_BYTES or pos + n > len(blob):
        raise _bad(f"the header declares {n} bytes (at most {MAX_HEADER_BYTES}, and within the blob)")
    try:
        header = json.loads(blob[pos:pos + n].decode())
    except (UnicodeDecodeError, ValueError):
        raise _bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad("the header is not a JSON object")
    if header.get("format") != FORMAT:
        raise _bad(f"format {header.get('format')!r} is not one this server reads (it reads format {FORMAT})")
    names = _field(header, "arrays", list)
    if len(names) > MAX_ARRAYS or not all(isinstance(x, str) for x in names):
        raise _bad("the header's array list is malformed")
    arrays = dict(zip(names, _arrays(blob, pos + n, len(names))))
    if len(arrays) != len(names):
        raise _bad("the header names an array twice")
    values = from_blob(header, arrays)  # pops the arrays it knows
    if arrays:
        raise _bad(f"unexpected arrays {sorted(arrays)}")
    s = ExportedSession(model_sha256=_field(header, "model_sha256", str), **values)
    # every field in range before anything is stored: a value a store or a reply cannot hold is refused here
    if not 0 < s.version < 2**31 or not 0 <= s.offset < 2**62:
        raise _bad(f"version must be 1 to {2**31 - 1} and offset 0 to {2**62 - 1}")
    for name, t in (("created_at", s.created_at), ("updated_at", s.updated_at), ("ttl", s.ttl)):
        if not math.isfinite(t) or not 0 <= t <= MAX_TIME:
            raise _bad(f"{name} must be a number of seconds from 0 to {MAX_TIME:.0f} (year 9999)")
    if max(len(s.session_id), len(s.model), len(s.last_request)) > MAX_NAME or len(s.model_sha256) > 2 * MAX_NAME:
        raise _bad(f"session_id, model and last_request hold at most {MAX_NAME} characters, model_sha256 "
                   f"{2 * MAX_NAME}")
    if s.offset < 0 or not -1 <= s.last_start <= s.offset or (s.last_start >= 0) != bool(s.last_digest):
        raise _bad(f"offset {s.offset}, last_start {s.last_start} and last_digest do not agree")
    if len(s.last_digest) not in (0, 32):
        raise _bad("last_digest is not a sha256")
    if not math.isfinite(s.ttl) or s.ttl <= 0:
        raise _bad("ttl must be positive")
    return s


def check_against(s: ExportedSession, model: Model, sha256: str, force: bool) -> None:
    """Refuse a blob that the importing server's `model` cannot continue."""
    if s.model_sha256 != sha256 and not force:
        raise ModelMismatch(f"model {model.name} v{model.version} differs: the session was exported with sha256 "
                            f"{s.model_sha256} and this server has {sha256}; import with force to continue "
                            "on this model anyway")
    want = [(spec.layers, spec.hidden) for spec in model.states]
    for what, arrays in (("state", s.state), ("last_prev_state", s.last_prev_state)):
        if arrays is None:
            continue
        got = [a.shape for a in arrays]
        if got != want:
            raise _bad(f"{what} has shapes {[list(g) for g in got]} but model {model.name} v{model.version} "
                       f"has {[list(w) for w in want]}")
    if s.last_logits is not None:
        shape = s.last_logits.shape
        if len(shape) != 2 or shape[1] != model.classes or not 1 <= shape[0] <= max(1, s.offset - s.last_start):
            raise _bad(f"last_logits has shape {list(shape)}; model {model.name} has {model.classes} outputs a step")
    if s.last_start >= 0 and s.last_logits is None:
        raise _bad("a blob with a last chunk must carry its outputs (last_logits)")
