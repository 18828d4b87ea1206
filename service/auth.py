"""Tenants behind API keys: who is calling, and how much they may do.

`recur serve --auth-keys FILE` reads a JSON key file. Keys are stored only as the sha256 of the
key (hex); each maps to a tenant, and each tenant may have its own limits:

    {
      "tenants": {
        "acme":   {"max_sessions": 1000, "max_chunk": 1024, "requests_per_second": 50},
        "globex": {}
      },
      "keys": [
        {"sha256": "<64 hex digits: sha256 of the key>", "tenant": "acme", "label": "prod"},
        {"sha256": "<...>", "tenant": "acme", "label": "ci"},
        {"sha256": "<...>", "tenant": "globex"}
      ]
    }

- `keys` (required, at least one): `sha256` and `tenant` are required; `label` and `created` are
  free text for people; `"admin": true` lets the key call the admin API (recur.v1.RecurAdmin:
  load, unload and reload models), which every other key is refused (PERMISSION_DENIED). A
  tenant may have several keys (rotate by adding the new key, then
  removing the old entry).
- `tenants` (optional): per-tenant limits, each 0 or absent for "no per-tenant limit" (the
  server-wide `--max-sessions` / `--max-chunk` still apply). `max_sessions`: live sessions of the
  tenant; `max_chunk`: steps in one chunk; `requests_per_second`: chunks per second (a call counts
  one, a stream or batch message one per chunk it carries; a token bucket holding one second of them,
  at least one, which a larger message may leave in debt). A tenant named by a key but not listed here has no
  limits of its own. Tenant names: letters, digits, `.`, `_`, `-` (1 to 64).

`recur keys add --file FILE --tenant NAME [--max-sessions N] [--max-chunk N]
[--requests-per-second R] [--label TEXT] [--admin]` makes a random key, prints it once (it is not stored)
and adds its hash to the file (created with mode 0600 when missing). `recur keys list --file FILE`
shows the tenants, their limits and how many keys each has.

Clients send `authorization: Bearer KEY` metadata on every call. A missing or unknown key is
UNAUTHENTICATED; a tenant over its request rate is RESOURCE_EXHAUSTED. Without a key file the
server is open: every call is tenant "default" (the server logs a warning at start).

Standard library only: the serving image imports this too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import LimitExceeded, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
MISSING_KEY = "missing API key: send 'authorization: Bearer KEY' metadata"
UNKNOWN_KEY = "unknown API key"
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_FIELDS = {"sha256", "tenant", "label", "created", "admin"}


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's own limits; 0 means no per-tenant limit."""

    max_sessions: int = 0
    max_chunk: int = 0
    requests_per_second: float = 0


NO_LIMITS = TenantLimits()

_LIMIT_TYPES: dict[str, type] = {f.name: (float if f.name == "requests_per_second" else int)
                                 for f in fields(TenantLimits)}


def hash_key(key: str) -> str:
    """The form a key is stored in: the sha256 of its UTF-8 bytes, as 64 lowercase hex digits."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _Bucket:
    """A token bucket: `rate` calls per second, holding at most max(1, rate) (one second's worth)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate, self.capacity = rate, max(1.0, rate)
        self.tokens, self.at = self.capacity, now

    def take(self, now: float, n: int = 1) -> bool:
        """Whether `n` chunks may go now. A message of more chunks than the bucket holds goes when the
        bucket is not empty and leaves it in debt, so that over time the rate holds whatever the sizes."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= n
            return True
        return False


def _number(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:g}"


class Authenticator:
    """Maps a call's metadata to its tenant, and holds each tenant's limits.

    `tenant_of` is called once per call (a stream is one call) on the event loop thread; the
    token buckets are also safe to use from other threads.
    """

    def __init__(self, keys: Sequence[tuple[str, str]], limits: dict[str, TenantLimits], *,
                 clock: Callable[[], float] = time.monotonic, source: str = "", admins: Sequence[str] = ()) -> None:
        """keys: (sha256 hex of a key, tenant) pairs; empty for an open server (every call is "default").
        admins: the sha256 hex of the keys that may call the admin API."""
        self._keys = [(bytes.fromhex(digest), tenant) for digest, tenant in keys]
        self._admins = {bytes.fromhex(d) for d in admins}
        self._limits = dict(limits)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self.source = source  # the key file, for log lines
        self._seen = _file_version(source) if source else None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def open(cls) -> Authenticator:
        """No keys: every call belongs to the tenant "default", which has no limits of its own."""
        return cls([], {})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic) -> Authenticator:
        """Read a key file. A missing or malformed file is SystemExit with a message naming the
        problem (never a key or a hash)."""
        keys, limits, admins = _parse(Path(path))
        if not keys:
            raise SystemExit(f"key file {path}: lists no keys; add one with `recur keys add --file {path} "
                             "--tenant NAME`")
        return cls(keys, limits, clock=clock, source=str(path), admins=admins)

    @classmethod
    def from_setting(cls, auth_keys: str) -> Authenticator:
        """`--auth-keys`: a key file, or "" for an open server."""
        return cls.load(auth_keys) if auth_keys else cls.open()

    # -- queries -----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return not self._keys

    @property
    def tenants(self) -> list[str]:
        """Every tenant that has a key (["default"] for an open server), sorted."""
        if self.is_open:
            return [DEFAULT_TENANT]
        return sorted({t for _, t in self._keys})

    def limits(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, NO_LIMITS)

    def reload(self) -> bool:
        """Read the key file again (SIGHUP, or a poll that saw it change): revoked keys are refused and new
        ones served from now on. A file that does not parse leaves the keys as they were (logged).
        Whether anything changed."""
        if not self.source:
            return False
        self._seen = _file_version(self.source)
        try:
            keys, limits, admins = _parse(Path(self.source))
            if not keys:
                raise SystemExit(f"key file {self.source}: lists no keys")
        except SystemExit as e:
            log.error("keeping the API keys as they were: %s", e)
            return False
        new_keys = [(bytes.fromhex(digest), tenant) for digest, tenant in keys]
        new_admins = {bytes.fromhex(d) for d in admins}
        changed = (new_keys, new_admins, limits) != (self._keys, self._admins, self._limits)
        with self._lock:
            self._keys, self._admins, self._limits = new_keys, new_admins, dict(limits)
            self._buckets = {t: b for t, b in self._buckets.items() if limits.get(t, NO_LIMITS).requests_per_second
                             == b.rate}
        if changed:
            log.warning("API keys reloaded from %s: tenants %s", self.source, ", ".join(self.tenants))
        return changed

    def changed_on_disk(self) -> bool:
        return bool(self.source) and _file_version(self.source) != self._seen

    def identifies(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        """Whether the call carries a key this server knows (no rate charged): what may see the replica header."""
        if self.is_open:
            return True
        key = _bearer(metadata)
        if key is None:
            return False
        digest = hashlib.sha256(key).digest()
        return any([hmac.compare_digest(stored, digest) for stored, _ in self._keys])

    def is_admin(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        """Whether the call carries an admin key (an open server has one tenant: every caller sees it all)."""
        if self.is_open:
            return True
        key = _bearer(metadata)
        return key is not None and hashlib.sha256(key).digest() in self._admins

    def charge(self, tenant: str, chunks: int) -> None:
        """Count `chunks` more against the tenant's requests_per_second (a stream's messages, a batch's
        chunks beyond the one its call was counted as); LimitExceeded when it is over."""
        if chunks > 0:
            self._admit(tenant, chunks)

    def tenant_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The tenant a call's `authorization: Bearer KEY` metadata names, after its request-rate check.

        Raises Unauthenticated for a missing or unknown key and LimitExceeded for a tenant over
        its requests_per_second. An open server answers "default" whatever the metadata says.
        """
        if self.is_open:
            return DEFAULT_TENANT
        return self._identify(metadata)[0]

    def admin_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The tenant of a call to the admin API, whose key must be an admin key: Unauthenticated for a
        missing or unknown key, PermissionDenied for any other. An open server serves the admin API
        only on --admin-port (never on its public port), so there every caller is let in."""
        if self.is_open:
            return DEFAULT_TENANT
        tenant, admin = self._identify(metadata)
        if not admin:
            raise PermissionDenied("this API key may not call the admin API; use a key added with "
                                   "`recur keys add --admin`")
        return tenant

    def _identify(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[str, bool]:
        key = _bearer(metadata)
        if key is None:
            raise Unauthenticated(MISSING_KEY)
        digest = hashlib.sha256(key).digest()
        tenant = None
        for stored, name in self._keys:  # every entry, so the time taken does not say which one matched
            if hmac.compare_digest(stored, digest):
                tenant = name
        if tenant is None:
            raise Unauthenticated(UNKNOWN_KEY)
        self._admit(tenant)
        return tenant, digest in self._admins

    def _admit(self, tenant: str, n: int = 1) -> None:
        rate = self.limits(tenant).requests_per_second
        if rate <= 0:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _Bucket(rate, now)
            ok = bucket.take(now, n)
        if not ok:
            raise LimitExceeded(f"tenant {tenant} is over its limit of {_number(rate)} requests per second "
                                "(each chunk counts as one); slow down and retry")


def _file_version(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, key = text.strip().partition(" ")
        key = key.strip()
        if scheme.lower() == "bearer" and key:
            return key.encode("utf-8")
        return None
    return None


# -- the key file ----------------------------------------------------------------------------------


def _parse(path: Path) -> tuple[list[tuple[str, str]], dict[str, TenantLimits], list[str]]:
    where = f"key file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SystemExit(f"{where}: no such file (create it with `recur keys add --file {path} --tenant NAME`)") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{where}: cannot read it ({type(e).__name__})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:  # the position only: the message could quote the file
        raise SystemExit(f"{where}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    return _parse_doc(doc, where)


def _parse_doc(doc: Any, where: str) -> tuple[list[tuple[str, str]], dict[str, TenantLimits], list[str]]:
    """(sha256, tenant) of each key, each tenant's limits, and the sha256 of the admin keys."""
    if not isinstance(doc, dict):
        raise SystemExit(f"{where}: must be a JSON object with a \"keys\" list")
    unknown = set(doc) - {"keys", "tenants"}
    if unknown:
        raise SystemExit(f"{where}: unknown top-level field(s) {sorted(unknown)} (expected \"keys\", \"tenants\")")
    limits: dict[str, TenantLimits] = {}
    tenants = doc.get("tenants", {})
    if not isinstance(tenants, dict):
        raise SystemExit(f"{where}: \"tenants\" must be an object of tenant name -> limits")
    for name, spec in tenants.items():
        _check_tenant(name, f"{where}: tenants")
        limits[name] = _parse_limits(spec, f"{where}: tenant {name}")
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise SystemExit(f"{where}: \"keys\" must be a list of {{\"sha256\": ..., \"tenant\": ...}} objects")
    keys: list[tuple[str, str]] = []
    admins: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries, 1):
        at = f"{where}: keys entry {i}"
        if not isinstance(entry, dict):
            raise SystemExit(f"{at}: must be an object with \"sha256\" and \"tenant\"")
        unknown = set(entry) - _KEY_FIELDS
        if unknown:
            raise SystemExit(f"{at}: unknown field(s) {sorted(unknown)} (allowed: {sorted(_KEY_FIELDS)})")
        digest, tenant = entry.get("sha256"), entry.get("tenant")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
            raise SystemExit(f"{at}: \"sha256\" must be the key's sha256 as 64 hex digits (store the hash, "
                             "never the key itself)")
        if not isinstance(tenant, str):
            raise SystemExit(f"{at}: \"tenant\" must be a tenant name")
        _check_tenant(tenant, at)
        digest = digest.lower()
        if digest in seen:
            raise SystemExit(f"{at}: the same key hash is listed twice")
        seen.add(digest)
        keys.append((digest, tenant))
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise SystemExit(f"{at}: \"admin\" must be true or false")
        if admin:
            admins.append(digest)
    return keys, limits, admins


def _check_tenant(name: object, at: str) -> None:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        raise SystemExit(f"{at}: tenant names are 1 to 64 letters, digits, '.', '_' or '-'")


def _parse_limits(spec: Any, at: str) -> TenantLimits:
    if not isinstance(spec, dict):
        raise SystemExit(f"{at}: limits must be an object (e.g. {{\"max_sessions\": 100}})")
    unknown = set(spec) - set(_LIMIT_TYPES)
    if unknown:
        raise SystemExit(f"{at}: unknown limit(s) {sorted(unknown)} (allowed: {sorted(_LIMIT_TYPES)})")
    values: dict[str, Any] = {}
    for name, kind in _LIMIT_TYPES.items():
        value = spec.get(name, 0)
        if value is None:
            value = 0
        ok = (not isinstance(value, bool) and isinstance(value, int | float)
              and (kind is float or float(value).is_integer()) and math.isfinite(value) and value >= 0)
        if not ok:
            what = "a non-negative number" if kind is float else "a non-negative integer"
            raise SystemExit(f"{at}: {name} must be {what} (0 or absent: no limit)")
        values[name] = kind(value)
    return TenantLimits(**values)


def _write_atomically(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def add_key(path: Path, tenant: str, *, label: str = "", max_sessions: int | None = None,
            max_chunk: int | None = None, requests_per_second: float | None = None, admin: bool = False) -> str:
    """Make a new key for `tenant`, store its hash in the key file (creating the file), set the
    limits given (None: leave as they are); returns the key, which is stored nowhere."""
    _check_tenant(tenant, "--tenant")
    if path.exists():
        _parse(path)  # refuse to extend a malformed file
        doc = json.loads(path.read_text(encoding="utf-8"))
    else:
        doc = {"tenants": {}, "keys": []}
    doc.setdefault("tenants", {})
    doc.setdefault("keys", [])
    limits = asdict(_parse_limits(doc["tenants"].get(tenant, {}), f"tenant {tenant}"))
    for name, value in (("max_sessions", max_sessions), ("max_chunk", max_chunk),
                        ("requests_per_second", requests_per_second)):
        if value is not None:
            if value < 0 or not math.isfinite(value):
                raise SystemExit(f"--{name.replace('_', '-')} must be 0 (no limit) or more")
            limits[name] = value
    doc["tenants"][tenant] = {k: v for k, v in limits.items() if v}
    key = "-"
    while key.startswith("-"):  # a key starting with "-" would read as a flag in `recur client --api-key KEY`
        key = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"sha256": hash_key(key), "tenant": tenant,
             "created": datetime.now(UTC).replace(microsecond=0).isoformat()}
    if label:
        entry["label"] = label
    if admin:
        entry["admin"] = True
    doc["keys"].append(entry)
    _parse_doc(doc, f"key file {path}")  # what is written always loads
    _write_atomically(path, doc)
    return key


def key_file_summary(path: Path) -> list[str]:
    """One line per tenant of a key file: how many keys (and admin keys), and its limits; no key or hash."""
    keys, limits, admins = _parse(path)
    counts: dict[str, int] = {}
    admin_counts: dict[str, int] = {}
    for digest, tenant in keys:
        counts[tenant] = counts.get(tenant, 0) + 1
        admin_counts[tenant] = admin_counts.get(tenant, 0) + (digest in admins)
    lines = []
    for tenant in sorted(set(counts) | set(limits)):
        lim = limits.get(tenant, TenantLimits())
        shown = ", ".join(f"{k} {_number(v)}" for k, v in asdict(lim).items() if v) or "no limits of its own"
        admin = f" ({admin_counts[tenant]} admin)" if admin_counts.get(tenant) else ""
        lines.append(f"{tenant}: {counts.get(tenant, 0)} key(s){admin}; {shown}")
    return lines
