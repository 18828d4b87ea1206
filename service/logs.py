"""Log formatting: `--log-format text|json` (RECUR_LOG_FORMAT).

JSON: one object a line with `timestamp` (UTC, ISO 8601), `level`, `event` (the message), `logger`,
and, when the call passed them with `extra=`, `model`, `version`, `tenant`, `rpc`, `code`,
`duration_ms`, `count`, `offset`, `from_version`; a worker of `recur serve --workers` adds `worker`.
A session id is written as itself only when the server logs at DEBUG; else as `session_hash`, a short
sha256 (enough to follow one session through the lines, not to name it).
Text: the classic line, with those fields appended as key=value.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging

LOG_FORMATS = ("text", "json")
FIELDS = ("model", "version", "from_version", "offset", "tenant", "rpc", "code", "duration_ms", "count", "reason",
          "worker")


def session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()[:12]


def _fields(record: logging.LogRecord, show_sessions: bool) -> dict[str, object]:
    out: dict[str, object] = {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}
    session = getattr(record, "session", None)
    if session is not None:
        if show_sessions:
            out["session"] = session
        else:
            out["session_hash"] = session_hash(str(session))
    return out


class JsonFormatter(logging.Formatter):
    def __init__(self, show_sessions: bool = False) -> None:
        super().__init__()
        self.show_sessions = show_sessions

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            **_fields(record, self.show_sessions),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, show_sessions: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.show_sessions = show_sessions

    def formatMessage(self, record: logging.LogRecord) -> str:
        base = super().formatMessage(record)
        extra = _fields(record, self.show_sessions)
        return base + "".join(f" {k}={v}" for k, v in extra.items()) if extra else base


def configure(level: str, fmt: str) -> None:
    """The root logger's level and format (recur.cli calls it once)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {LOG_FORMATS}, not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    show = numeric == logging.DEBUG
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(show) if fmt == "json" else TextFormatter(show))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
